"""INJ: can a localizer find the neurons into which a new sequence was injected?

Chang, Thomason & Jia (NAACL 2024) §3, Alg. 1. Per sequence, a seeded random ``r`` fraction of all
neurons (uniform over the flattened [layers × neurons] grid) is chosen; only their down-projection columns
are trained (Adam, lr 0.05 for r ≤ 0.1% else 0.01, ≤ 200 steps, stop at loss < 0.05) until the model
reproduces the sequence. The method then scores the injected model, and its scores are compared with the
injected set, which never leaves this module:

- ``recall@{m}x``: per-layer top-k with k = round(I · m · r), pooled recall (the paper's metric);
- ``global_recall@{m}x``: one top-k over all layers with k = round(L · I · m · r) (paper App. A.11);
- ``ap``, ``auc``: average precision and ROC AUC of all scores against the injected set;
- ``ceiling@1x``: the best recall a per-layer top-k can reach (gold neurons are not spread evenly);
- ``injected``: 1 when the injection reached the stop loss. An item whose injection failed has stored no
  sequence in its chosen neurons: it reports ``injected = 0`` and no other metric (null; the method is not
  run), so recall and the ranking are over injected items only and a failed injection cannot move a method.

With ``preserve_norm`` every injected column is rescaled to its original norm after each Adam step, so the
injection is visible only through what the columns do, not through their size (memeval's choice for small
models, whose columns unconstrained Adam grows several-fold; the paper's setup leaves it off).

Injection is batched across sequences (a per-row weight delta on the chosen columns, rows independent,
per-row early stopping) and cached as the changed columns only. Scoring is batched too for localizers that
declare ``per_row_weights``: the batch's injected items form one model whose row b carries item b's columns
(memeval.batched); other localizers score one item at a time on a copy with the columns written in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from memeval.api import Batch, Method, TokenSequence
from memeval.errors import UsageError
from memeval.metrics import (average_precision, masked_mean, per_layer_ceiling, per_layer_k, recall, roc_auc,
                             token_nll, top_k_global, top_k_per_layer)
from memeval.protocols.base import Protocol
from memeval.protocols.sources import load_texts, organism_for, resolve_path, split_dev, texts_to_sequences

ECBD = "ECBD definitions ship with MemPi (github.com/terarachang/MemPi, data/ecbd/); download them and set data.path"


@dataclass
class InjectionData:
    source: str = "organism"  # organism (its never-seen new-entity definitions) | file (JSONL)
    path: str | None = None
    key: str = "definition"  # JSONL field holding the text (ECBD: definition)
    sequences: int = 40  # test sequences (after the dev split)
    dev: int = 5
    max_tokens: int = 48

    def __post_init__(self) -> None:
        if self.source not in ("organism", "file"):
            raise ValueError(f"source must be organism or file, got {self.source!r}")


@dataclass
class InjectionParams:
    ratio: float = 0.01
    multiples: list[int] = field(default_factory=lambda: [1, 2, 5])
    lr: float | None = None  # None: 0.05 for ratio ≤ 0.001, else 0.01 (MemPi's inject.sh)
    max_steps: int = 200
    stop_loss: float = 0.05
    inject_batch: int = 16
    # After every Adam step, rescale each injected column back to its original norm (a projection onto the
    # sphere): the sequence is stored by rotating the columns only, so column norms carry no trace of the
    # injection. false = MemPi's unconstrained Adam (the paper's setup).
    preserve_norm: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be a fraction in (0, 1), got {self.ratio}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.05 if self.ratio <= 0.001 else 0.01)


def _cache_root() -> Path:
    return Path(os.environ.get("MEMEVAL_CACHE", Path.home() / ".cache" / "memeval")) / "injected"


class InjectionProtocol(Protocol):
    name = "injection"
    summary = "Inject a new sequence into random neurons, then ask the localizer to find them"
    accepts = ("localizer",)
    Data = InjectionData
    Params = InjectionParams

    # -- data and injection -------------------------------------------------------------------
    @classmethod
    def check_task(cls, task) -> None:
        if task.data.source == "file":
            resolve_path(task.data.path, "the injection texts", ECBD)

    def prepare(self) -> None:
        tok = self.model.tokenizer
        if self.data.source == "organism":
            texts = organism_for(self.task.model).new_entities
        else:
            texts = load_texts(resolve_path(self.data.path, "the injection texts", ECBD), self.data.key)
        seqs = texts_to_sequences(texts, tok, self.data.max_tokens, 1, "seq")
        dev, test = split_dev(seqs, self.data.dev, self.seed)
        self.dev_ids = [s.id for s in dev]
        self.sequences = {s.id: s for s in test[: self.data.sequences] + dev}
        if not self.sequences:
            raise UsageError(f"{self.task.path}: no injection sequences left after the dev split")
        L, I = self.model.num_layers, self.model.num_neurons
        self.count = int(L * I * self.params.ratio)
        if self.count < 1:
            raise UsageError(f"{self.task.path}: ratio {self.params.ratio} selects no neuron of {L}×{I}")
        self.injections = self._load_or_inject(list(self.sequences.values()))
        self.work = self.model.clone()

    def gold_mask(self, item: str) -> torch.Tensor:
        """The hidden ground truth of one item: a seeded random set over the flattened grid, ``[L, I]``."""
        L, I = self.model.num_layers, self.model.num_neurons
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(item.encode()))
        mask = torch.zeros(L * I, dtype=torch.bool)
        mask[torch.randperm(L * I, generator=gen)[: self.count]] = True
        return mask.view(L, I)

    def _key(self, seq: TokenSequence) -> str:
        if getattr(self, "_base_fingerprint", None) is None:  # the base weights, read once (prepare never edits them)
            self._base_fingerprint = self.model.fingerprint()
        blob = json.dumps({"model": self._base_fingerprint, "ids": seq.input_ids, "item": seq.id, "seed": self.seed,
                           "ratio": self.params.ratio, "lr": self.params.learning_rate, "steps": self.params.max_steps,
                           "stop": self.params.stop_loss, "dtype": str(self.model.dtype), "v": 1,
                           **({"preserve_norm": True} if self.params.preserve_norm else {})})
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def _load_or_inject(self, seqs: list[TokenSequence]) -> dict[str, dict]:
        """Each sequence's injection from the cache, or trained and cached; under a lock on the set, so that
        workers preparing the same task at once inject it once (the others wait, then load)."""
        from memeval.organisms.cache import locked

        root = _cache_root()
        root.mkdir(parents=True, exist_ok=True)
        set_key = hashlib.sha256(",".join(sorted(self._key(s) for s in seqs)).encode()).hexdigest()[:20]
        with locked(set_key, root):
            return self._load_or_inject_unlocked(seqs, root)

    def _load_or_inject_unlocked(self, seqs: list[TokenSequence], root: Path) -> dict[str, dict]:
        out, todo = {}, []
        for s in seqs:
            path = root / f"{self._key(s)}.pt"
            if path.exists():
                out[s.id] = torch.load(path, map_location="cpu")
            else:
                todo.append(s)
        with Progress(transient=True) as progress:
            bar = progress.add_task(f"injecting {len(todo)} sequences", total=len(todo))
            for start in range(0, len(todo), self.params.inject_batch):
                chunk = todo[start : start + self.params.inject_batch]
                for s, result in zip(chunk, self._inject(chunk)):
                    tmp = root / f".{self._key(s)}.{os.getpid()}.tmp"
                    torch.save(result, tmp)
                    os.replace(tmp, root / f"{self._key(s)}.pt")
                    out[s.id] = result
                progress.advance(bar, len(chunk))
        return out

    def _inject(self, seqs: list[TokenSequence]) -> list[dict]:
        """Train the chosen columns of each row's own model copy, all rows at once (rows independent)."""
        model, dev = self.model, self.model.device
        B, L = len(seqs), model.num_layers
        golds = [self.gold_mask(s.id) for s in seqs]
        idx, valid, deltas = [], [], []
        for layer in range(L):
            rows = [g[layer].nonzero().flatten() for g in golds]
            width = max(1, max(len(r) for r in rows))
            idx.append(torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows]).to(dev))
            valid.append(torch.stack([torch.arange(width) < len(r) for r in rows]).to(dev, model.dtype))
            deltas.append(torch.zeros(B, model.hidden_size, width, device=dev, dtype=model.dtype, requires_grad=True))
        originals = [model.down_proj(layer).detach().T[idx[layer]].transpose(1, 2) for layer in range(L)]  # [B, H, w]
        batch = Batch.from_sequences(seqs, model.pad_id, dev)
        opt = torch.optim.Adam(deltas, lr=self.params.learning_rate)
        active = torch.ones(B, dtype=torch.bool, device=dev)
        final = torch.full((B,), float("inf"), device=dev)
        with self._row_deltas(idx, valid, deltas):
            for _ in range(self.params.max_steps + 1):
                row_loss = masked_mean(token_nll(model.logits(batch), batch.input_ids), batch.loss_mask)
                final = torch.where(active, row_loss.detach(), final)
                active &= row_loss.detach() >= self.params.stop_loss
                if not active.any() or _ == self.params.max_steps:
                    break
                opt.zero_grad()
                (row_loss * active).sum().backward()
                frozen = [d.detach().clone() for d in deltas]
                opt.step()
                with torch.no_grad():
                    for d, keep, orig in zip(deltas, frozen, originals):
                        if self.params.preserve_norm:
                            d.copy_(_same_norm(orig, d))
                        d[~active] = keep[~active]
        results = []
        for b in range(B):
            layers = {}
            for layer in range(L):
                n = int(valid[layer][b].sum())
                if n:
                    cols = idx[layer][b, :n]
                    new = model.down_proj(layer)[:, cols].detach() + deltas[layer][b, :, :n].detach()
                    layers[layer] = (cols.cpu(), new.cpu())
            results.append({"layers": layers, "final_loss": float(final[b]),
                            "success": bool(final[b] < self.params.stop_loss)})
        return results

    @contextlib.contextmanager
    def _row_deltas(self, idx, valid, deltas):
        """Add ``Δ_b · h_b[chosen]`` to each row's down-projection output (row b's own injected model)."""
        handles = []

        def make(layer: int):
            def hook(module, args, output):
                h = args[0]
                shape = output.shape
                if h.dim() == 2:  # flattened tokens (OPT)
                    h = h.view(*self.model.hf._memeval_bt, h.shape[-1])
                B, T, _ = h.shape
                sel = h.gather(-1, idx[layer][:, None, :].expand(B, T, -1)) * valid[layer][:, None, :]
                return (output.view(B, T, -1) + torch.einsum("btk,bhk->bth", sel, deltas[layer])).view(shape)

            return hook

        try:
            for layer in range(self.model.num_layers):
                handles.append(self.model.down_projs[layer].register_forward_hook(make(layer)))
            yield
        finally:
            for h in handles:
                h.remove()

    # -- scoring ------------------------------------------------------------------------------
    def items(self) -> list[str]:
        return [i for i in self.sequences if i not in self.dev_ids]

    def dev_items(self) -> list[str]:
        return list(self.dev_ids)

    def metrics(self) -> dict[str, bool]:
        out = {"ap": True, "auc": True, "ceiling@1x": True, "injected": True}
        for m in self.params.multiples:
            out[f"recall@{m}x"] = True
            out[f"global_recall@{m}x"] = True
        return out

    def primary_metric(self) -> str:
        return f"recall@{self.params.multiples[0]}x"

    @contextlib.contextmanager
    def _injected(self, item: str):
        """The work copy of the model with ``item``'s columns injected; restored afterwards."""
        originals = {}
        for layer, (cols, new) in self.injections[item]["layers"].items():
            originals[layer] = self.model.down_proj(layer)[:, cols.to(self.model.device)].detach().clone()
            w = self.work.down_proj(layer).detach().clone()
            w[:, cols.to(w.device)] = new.to(w.device, w.dtype)
            self.work.set_down_proj(layer, w)
        expected = self.work.fingerprint()
        try:
            yield self.work
            if self.work.fingerprint() != expected:
                self.work = self.model.clone()
                raise RuntimeError("the method modified the model's weights (fingerprint changed)")
        finally:
            for layer, cols in ((l, c) for l, (c, _) in self.injections[item]["layers"].items()):
                w = self.work.down_proj(layer).detach().clone()
                w[:, cols.to(w.device)] = originals[layer]
                self.work.set_down_proj(layer, w)

    @contextlib.contextmanager
    def _injected_rows(self, items: list[str]):
        """The work copy as one batched model, row b with ``items[b]``'s columns (its weights stay the base's)."""
        from memeval.batched import row_weights

        expected = self.work.fingerprint()
        with row_weights(self.work, [self.injections[i]["layers"] for i in items]) as model:
            yield model
        if self.work.fingerprint() != expected:
            self.work = self.model.clone()
            raise RuntimeError("the method modified the model's weights (fingerprint changed)")

    def _scores(self, method: Method, items: list[str]) -> list[torch.Tensor]:
        """``[L, I]`` scores per item: one call for a method that takes per-row weights, else one per item."""
        if len(items) > 1 and getattr(method, "per_row_weights", False):
            with self._injected_rows(items) as model:
                batch = Batch.from_sequences([self.sequences[i] for i in items], model.pad_id, model.device)
                return list(self._checked(method.localize(model, batch), len(items)))
        out = []
        for item in items:
            with self._injected(item) as model:
                batch = Batch.from_sequences([self.sequences[item]], model.pad_id, model.device)
                out.append(self._checked(method.localize(model, batch), 1)[0])
        return out

    def _checked(self, scores: torch.Tensor, n: int) -> torch.Tensor:
        L, I = self.model.num_layers, self.model.num_neurons
        if tuple(scores.shape) != (n, L, I):
            raise RuntimeError(f"localize returned shape {tuple(scores.shape)}, expected ({n}, {L}, {I})")
        if not torch.isfinite(scores).all():
            raise RuntimeError("localize returned non-finite scores")
        return scores.float().cpu()

    def evaluate(self, method: Method, item_ids: list[str]) -> list[dict[str, float]]:
        """The injected items of the batch scored together when the method takes per-row weights (each row its
        own injected model, memeval.batched; equal to one item at a time up to float rounding), else one by one."""
        L, I = self.model.num_layers, self.model.num_neurons
        done = [i for i in item_ids if self.injections[i]["success"]]
        scored = dict(zip(done, self._scores(method, done)))
        out = []
        for item in item_ids:
            if item not in scored:  # nothing was stored there: no recall to score
                out.append({name: None for name in self.metrics()} | {"injected": 0.0})
                continue
            scores, gold = scored[item], self.gold_mask(item)
            r = self.params.ratio
            metrics = {"ap": average_precision(scores, gold), "auc": roc_auc(scores, gold),
                       "ceiling@1x": per_layer_ceiling(gold, per_layer_k(I, r)),
                       "injected": float(self.injections[item]["success"])}
            for m in self.params.multiples:
                metrics[f"recall@{m}x"] = recall(top_k_per_layer(scores, per_layer_k(I, m * r)), gold)
                metrics[f"global_recall@{m}x"] = recall(top_k_global(scores, max(1, round(L * I * m * r))), gold)
            out.append(metrics)
        return out


def _same_norm(original: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The delta that gives ``original + delta`` the norm of ``original``, per column (dim −2).

    Columns ``[..., H, w]``; a zero column stays as it is (its direction is undefined)."""
    new = original + delta
    scale = original.norm(dim=-2, keepdim=True) / new.norm(dim=-2, keepdim=True).clamp_min(1e-12)
    return new * scale - original
