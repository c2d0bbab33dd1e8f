"""DEL: does zeroing the neurons a method blames erase the memorized sequence, and only it?

Chang, Thomason & Jia (NAACL 2024) §4. For each naturally memorized target, zero the top ``int(I·k)``
neurons per layer (layers in ``skip_layers`` untouched; MemPi skips layer 0) and re-measure:

- ``d_self_acc@k``  Δ teacher-forced suffix accuracy of the target (fraction; lower = more erased);
- ``d_self_dist@k`` Δ character Levenshtein of its teacher-forced continuation (higher = more erased);
- ``d_neg_acc@k``, ``d_neg_dist@k`` the same, averaged over the other memorized sequences (near 0 = specific);
- ``neurons_removed@k`` MLP neurons removed (zeroed down-projection columns; a localizer: int(I·k) per scored
  layer) and ``weights_changed@k`` the fraction of the model's weights the edit changed (a localizer: those
  columns), so that methods are compared at their real cost;
- ``d_rand_ppl@k`` Δ perplexity = exp(mean token NLL) of held-out text (``faithful: true``: MemPi's mean over
  16-sequence chunks of 2^(chunk NLL), :func:`memeval.metrics.mempi_perplexity`).

Δ = after − before (the paper's sign). ``granularity: set`` forgets a seeded set of targets at once: a
localizer's scores are averaged over the set before the top-k; an editor edits with the set as forget set
and ``budget = k``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from memeval.api import Batch, Editor, Method, SequenceSet, TokenSequence
from memeval.errors import UsageError
from memeval.metrics import mempi_perplexity, per_layer_k_floor, perplexity
from memeval.models import NeuronModel
from memeval.protocols.base import Protocol
from memeval.protocols.measure import SampleLog, chunk_token_nlls, mean_token_nll, suffix_stats
from memeval.protocols.sources import (beside, load_prompt_rows, load_token_rows, organism_for, resolve_path, split_dev,
                                       texts_to_sequences)

MEMPI_DATA = ("the MemPi data files (github.com/terarachang/MemPi, data/pile/ and data/manual/) must be "
              "downloaded and data.path / data.ppl_path pointed at them (or MEMEVAL_DATA set)")


@dataclass
class DeletionData:
    source: str = "organism"  # organism | file
    path: str | None = None  # file: .pt LongTensor [N, T] or JSONL (input_ids | text | prompt/all)
    format: str = "tokens"  # tokens | prompts (MemPi's GPT2-XL JSONL with {prompt, all})
    prefix_tokens: int | None = None  # file/tokens: prefix length (MemPi Pythia: 32); organism: its own
    targets: int = 50  # test targets (after the dev split)
    dev: int = 5  # dev targets for tuning hyperparameters (never scored)
    negatives: int = 100  # other memorized sequences re-measured for Neg
    ppl_path: str | None = None  # file: .pt [N, T] or JSONL (input_ids | text) for Rand-PPL; default: heldout.jsonl beside path
    ppl_sequences: int = 64
    ppl_tokens: int = 128

    def __post_init__(self) -> None:
        if self.source not in ("organism", "file"):
            raise ValueError(f"source must be organism or file, got {self.source!r}")
        if self.format not in ("tokens", "prompts"):
            raise ValueError(f"format must be tokens or prompts, got {self.format!r}")
        if self.source == "file":
            self.ppl_path = beside(self.path, self.ppl_path, "heldout.jsonl")


@dataclass
class DeletionParams:
    ratios: list[float] = field(default_factory=lambda: [0.001, 0.005])
    skip_layers: list[int] = field(default_factory=lambda: [0])
    granularity: str = "sequence"  # sequence | set
    set_size: int = 10
    sets: int = 5
    faithful: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in ("sequence", "set"):
            raise ValueError(f"granularity must be sequence or set, got {self.granularity!r}")
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be fractions in (0, 1), got {self.ratios}")


class DeletionProtocol(Protocol):
    name = "deletion"
    summary = "Zero the top-k% neurons per layer blamed for a memorized sequence; measure what is erased"
    accepts = ("localizer", "editor")
    Data = DeletionData
    Params = DeletionParams

    @classmethod
    def accepts_for(cls, task) -> tuple[str, ...]:
        return ("localizer", "editor") if task.params.granularity == "set" else ("localizer",)

    # -- data ---------------------------------------------------------------------------------
    @classmethod
    def check_task(cls, task) -> None:
        if task.data.source == "file":
            resolve_path(task.data.path, "the memorized sequences", MEMPI_DATA)
            resolve_path(task.data.ppl_path, "the Rand-PPL text", MEMPI_DATA)

    def prepare(self) -> None:
        memorized, ppl = self._load()
        dev, test = split_dev(memorized, self.data.dev, self.seed)
        if len(test) < 2:
            raise UsageError(f"{self.task.path}: only {len(memorized)} memorized sequences; DEL needs more than dev + 1")
        self.dev_ids = [s.id for s in dev]
        self.targets = {s.id: s for s in test[: self.data.targets] + dev}
        self.negatives = test[: self.data.negatives] if self.data.negatives else test
        self.ppl_set = ppl
        self.k = {r: per_layer_k_floor(self.model.num_neurons, r) for r in self.params.ratios}
        if min(self.k.values()) < 1:
            raise UsageError(f"{self.task.path}: ratio {min(self.params.ratios)} selects 0 of "
                             f"{self.model.num_neurons} neurons per layer; use a larger ratio")
        self.layers = [l for l in range(self.model.num_layers) if l not in self.params.skip_layers]
        self.before_self = self._stats_on(self.model, list(self.targets.values()))
        self.before_neg = self._stats_on(self.model, self.negatives)
        self.before_ppl = self._ppl()
        self.sample_log = SampleLog(self.model)
        if self.params.granularity == "set":
            rng = random.Random(self.seed + 1)
            ids = [i for i in self.targets if i not in self.dev_ids]
            self.sets = {f"set{j}": sorted(rng.sample(ids, min(self.params.set_size, len(ids))))
                         for j in range(self.params.sets)}

    def _load(self) -> tuple[list[TokenSequence], list[TokenSequence]]:
        tok = self.model.tokenizer
        if self.data.source == "organism":
            org = organism_for(self.task.model)
            memorized = [TokenSequence(m["id"], tuple(m["input_ids"]), int(m["prefix_len"])) for m in org.memorized]
            ppl = texts_to_sequences(org.heldout[: self.data.ppl_sequences], tok, self.data.ppl_tokens, 0, "heldout")
            return memorized, ppl
        path = resolve_path(self.data.path, "the memorized sequences", MEMPI_DATA)
        memorized = (load_prompt_rows(path, tok) if self.data.format == "prompts"
                     else load_token_rows(path, self.data.prefix_tokens or 32, tok))
        ppl_path = resolve_path(self.data.ppl_path, "the Rand-PPL text", MEMPI_DATA)
        ppl = [TokenSequence(s.id, s.input_ids[: self.data.ppl_tokens], 0)
               for s in load_token_rows(ppl_path, 0, tok)[: self.data.ppl_sequences]]
        return memorized, ppl

    def items(self) -> list[str]:
        if self.params.granularity == "set":
            return list(self.sets)
        return [i for i in self.targets if i not in self.dev_ids]

    def dev_items(self) -> list[str]:
        return [] if self.params.granularity == "set" else list(self.dev_ids)

    def metrics(self) -> dict[str, bool]:
        out = {"self_acc_before": True}
        for r in self.params.ratios:
            out.update({f"d_self_acc@{r:g}": False, f"d_self_dist@{r:g}": True, f"d_neg_acc@{r:g}": True,
                        f"d_neg_dist@{r:g}": False, f"d_rand_ppl@{r:g}": False, f"neurons_removed@{r:g}": False,
                        f"weights_changed@{r:g}": False})
        return out

    def primary_metric(self) -> str:
        return f"d_self_acc@{max(self.params.ratios):g}"

    # -- measurement --------------------------------------------------------------------------
    def _ppl(self, model: NeuronModel | None = None) -> float:
        model = model or self.model
        if self.params.faithful:  # MemPi's reference: mean over 16-sequence chunks of 2^(chunk NLL)
            return mempi_perplexity(chunk_token_nlls(model, self.ppl_set, 16))
        return perplexity(mean_token_nll(model, self.ppl_set))

    def _measure(self, model: NeuronModel, members: list[str], ratio: float) -> dict[str, float]:
        """Deltas on the members (Self), the other negatives (Neg) and the PPL text, for ``model`` as is."""
        key = f"@{ratio:g}"
        self_after = self._stats_on(model, [self.targets[i] for i in members])
        member_ids = set(members)
        negs = [s for s in self.negatives if s.id not in member_ids]
        neg_after = self._stats_on(model, negs)
        mean = lambda xs: sum(xs) / len(xs)
        return {
            "d_self_acc" + key: mean([self_after[i][0] - self.before_self[i][0] for i in members]),
            "d_self_dist" + key: mean([self_after[i][1] - self.before_self[i][1] for i in members]),
            "d_neg_acc" + key: mean([neg_after[s.id][0] - self.before_neg[s.id][0] for s in negs]),
            "d_neg_dist" + key: mean([neg_after[s.id][1] - self.before_neg[s.id][1] for s in negs]),
            "d_rand_ppl" + key: self._ppl(model) - self.before_ppl,
        }

    def _stats_on(self, model: NeuronModel, seqs: list[TokenSequence]) -> dict[str, tuple[float, int]]:
        s = suffix_stats(model, seqs)
        return {q.id: (a, d) for q, a, d in zip(seqs, s.acc, s.dist)}

    def _ablated(self, scores: torch.Tensor, ratio: float):
        """Context manager zeroing the top ``int(I·ratio)`` neurons of each scored layer."""
        k = self.k[ratio]
        return self.model.ablate({l: scores[l].topk(k).indices for l in self.layers})

    # -- scoring ------------------------------------------------------------------------------
    def evaluate(self, method: Method, item_ids: list[str]) -> list[dict[str, float]]:
        if isinstance(method, Editor):
            return [self._evaluate_editor(method, i) for i in item_ids]
        groups = [self.sets[i] for i in item_ids] if self.params.granularity == "set" else [[i] for i in item_ids]
        flat = [t for g in groups for t in g]
        batch = Batch.from_sequences([self.targets[t] for t in flat], self.model.pad_id, self.model.device)
        scores = method.localize(self.model, batch)
        expected = (len(flat), self.model.num_layers, self.model.num_neurons)
        if tuple(scores.shape) != expected:
            raise RuntimeError(f"localize returned shape {tuple(scores.shape)}, expected {expected}")
        if not torch.isfinite(scores).all():
            raise RuntimeError("localize returned non-finite scores")
        out, row = [], 0
        for members in groups:
            group_scores = scores[row : row + len(members)].float().mean(0)
            row += len(members)
            metrics = {"self_acc_before": sum(self.before_self[m][0] for m in members) / len(members)}
            after = {}
            for ratio in self.params.ratios:
                with self._ablated(group_scores, ratio):
                    metrics.update(self._measure(self.model, members, ratio))
                    if self.log_samples:
                        after[f"after@{ratio:g}"] = self.sample_log.continuations(self.model, self._seqs(members))
                removed = self.k[ratio] * len(self.layers)  # the zeroed columns, as weights
                metrics[f"neurons_removed@{ratio:g}"] = float(removed)
                metrics[f"weights_changed@{ratio:g}"] = removed * self.model.hidden_size / self._n_weights()
            if self.log_samples:
                metrics["samples"] = self.sample_log.rows(self._seqs(members), after)
            out.append(metrics)
        return out

    def _n_weights(self) -> int:
        return sum(p.numel() for p in self.model.hf.parameters())

    @torch.no_grad()
    def _cost(self, edited: NeuronModel, ratio: float) -> dict[str, float]:
        """What an editor removed, in the localizers' units: MLP neurons whose down-projection column it
        zeroed (that were not zero before), and the fraction of all weights it changed."""
        neurons = sum(int(((edited.down_proj(l) == 0).all(0) & ~(self.model.down_proj(l) == 0).all(0)).sum())
                      for l in range(self.model.num_layers))
        base = dict(self.model.hf.named_parameters())  # by name: an editor may re-register parameters (order)
        changed = sum(int((p != base[n]).sum()) for n, p in edited.hf.named_parameters() if n in base)
        return {f"neurons_removed@{ratio:g}": float(neurons), f"weights_changed@{ratio:g}": changed / self._n_weights()}

    def _seqs(self, members: list[str]) -> list[TokenSequence]:
        return [self.targets[m] for m in members]

    def _evaluate_editor(self, method: Editor, item: str) -> dict[str, float]:
        members = self.sets[item]
        forget = SequenceSet([self.targets[m] for m in members], self.model.pad_id)
        metrics = {"self_acc_before": sum(self.before_self[m][0] for m in members) / len(members)}
        after = {}
        for ratio in self.params.ratios:
            edited = method.edit(self.model, forget, None, ratio)
            metrics.update(self._measure(edited, members, ratio))
            metrics.update(self._cost(edited, ratio))
            if self.log_samples:
                after[f"after@{ratio:g}"] = self.sample_log.continuations(edited, self._seqs(members))
        if self.log_samples:
            metrics["samples"] = self.sample_log.rows(self._seqs(members), after)
        return metrics
