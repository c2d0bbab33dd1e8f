"""Zero-Out (occlusion), as used by Chang, Thomason & Jia (2024) §3.

A_i = ℓ_mem(model with neuron i zeroed) − ℓ_mem(model), for every neuron of every layer (signed).

Fast path (exact up to float rounding). For each sequence one clean forward records, per block, the
positional and keyword arguments it was called with (position embeddings, attention masks, ...) and its
output. Zeroing neuron i of layer l changes block l's output by exactly −h_{i,t} · v_i at every position t
(the down-projection is linear and added to the residual stream), so a chunk of ablation variants starts from
block l's clean output minus that rank-1 term, runs only blocks l+1..L−1 (called directly with the recorded
arguments, broadcast along the variants), then the final norm and the LM head at the suffix-predicting
positions only. Both shortcuts are checked at run time on the clean pass (blocks + head reproduce the model's
logits; the rank-1 update equals re-running block l with the neuron zeroed); if either check fails, e.g. an
architecture with a norm after the MLP, the affected layers fall back to the generic path (block l re-run with
the neuron zeroed, or full-model forwards with logits only where needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memeval import hookimpl
from memeval.api import Batch, Localizer
from memeval.models import NeuronModel
from memeval_methods._common import kept_logits, logits_agree, nll_at, predicting_positions

FINAL_NORM_NAMES = ("transformer.ln_f", "gpt_neox.final_layer_norm", "model.norm", "model.final_layernorm",
                    "model.decoder.final_layer_norm", "transformer.norm_f", "model.final_norm")


def _expand(value, n: int):
    """Broadcast a recorded block argument from batch 1 to ``n`` variants (tensors with a leading 1)."""
    if isinstance(value, torch.Tensor):
        return value.expand(n, *value.shape[1:]) if value.dim() >= 2 and value.shape[0] == 1 else value
    if isinstance(value, tuple):
        return tuple(_expand(v, n) for v in value)
    if isinstance(value, list):
        return [_expand(v, n) for v in value]
    return value


def _unwrap(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def find_final_norm(model: NeuronModel) -> nn.Module | None:
    """The norm between the last block and the LM head: a known name, else the only norm outside the blocks."""
    named = dict(model.hf.named_modules())
    for name in FINAL_NORM_NAMES:
        if name in named:
            return named[name]
    inside = {id(m) for b in model.blocks for m in b.modules()}
    norms = [m for m in named.values() if id(m) not in inside and "norm" in type(m).__name__.lower()]
    return norms[0] if len(norms) == 1 else None


class _Trace:
    """One clean forward of a single sequence: every block's call arguments and output, activations, logits."""

    def __init__(self, model: NeuronModel, row: Batch, keep: torch.Tensor):
        self.model = model
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.outs: dict[int, torch.Tensor] = {}
        handles = []
        for j, block in enumerate(model.blocks):
            handles.append(block.register_forward_pre_hook(self._pre(j), with_kwargs=True))
            handles.append(block.register_forward_hook(self._post(j)))
        try:
            with model.capture() as acts:
                self.logits = kept_logits(model, row, keep)
        finally:
            for h in handles:
                h.remove()
        self.acts = dict(acts)

    def _pre(self, j):
        def hook(_m, args, kwargs):
            self.calls[j] = (args, kwargs)

        return hook

    def _post(self, j):
        def hook(_m, _args, out):
            self.outs[j] = _unwrap(out)

        return hook

    def run_block(self, j: int, x: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.calls[j]
        n = x.shape[0]
        if args:
            args = (x,) + tuple(_expand(a, n) for a in args[1:])
            kwargs = {k: _expand(v, n) for k, v in kwargs.items()}
        else:
            kwargs = {k: _expand(v, n) for k, v in kwargs.items()}
            kwargs["hidden_states"] = x
        return _unwrap(self.model.blocks[j](*args, **kwargs))

    def run_from(self, start: int, x: torch.Tensor, keep: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Blocks ``start..L-1`` on residual ``x [N, n, d]`` (the input of block ``start``), then the head at ``keep``."""
        for j in range(start, self.model.num_layers):
            x = self.run_block(j, x)
        return self.model.hf.get_output_embeddings()(norm(x[:, keep]))


class ZeroOut(Localizer):
    name = "zero_out"
    summary = "Increase of the suffix loss when one neuron is zeroed, for every neuron (occlusion)"
    paper = "Chang, Thomason & Jia 2024 (NAACL), §3"
    # Follows the per-row rules (one row at a time inside model.rows([b]), its own down-projection; tested on a
    # batched INJ model) but INJ scores it one item at a time: each row's ablation variants are its own forwards
    # anyway, and the per-row deltas cost them 17 % (organism, 8 items: 0.93 s/item batched, 0.79 s/item one at
    # a time with the item's columns written in; benchmarks/inj_localizers.py). Same floats either way.
    per_row_weights = False

    @dataclass
    class Config(Localizer.Config):
        # ablation variants × sequence length per forward chunk; 0 = by device: 2048 on CPU (a chunk's
        # activations stay in cache: 20% faster than 8192 on the organism), 32768 on accelerators
        chunk_tokens: int = 0
        max_logit_elems: int = 1 << 25  # variants × positions × vocab per LM-head call
        fast: bool = True  # false: always the generic full-model path (for checks)
        layers: tuple[int, ...] = ()  # partial runs (benchmarks): only these layers (others score 0); () = all
        max_neurons: int = 0  # partial runs (benchmarks): only the first max_neurons of each layer; 0 = all

    @torch.no_grad()
    def localize(self, model: NeuronModel, batch: Batch) -> torch.Tensor:
        out = torch.zeros(len(batch), model.num_layers, model.num_neurons, device=model.device)
        lengths = batch.attention_mask.sum(1).tolist()
        for b, n in enumerate(lengths):
            row = Batch(batch.input_ids[b : b + 1, :n], batch.attention_mask[b : b + 1, :n],
                        batch.loss_mask[b : b + 1, :n], [batch.item_ids[b]])
            with model.rows([b]):
                out[b] = self._row(model, row, b)
        return out

    def _chunk(self, model: NeuronModel, n: int, k: int) -> int:
        vocab = model.hf.get_output_embeddings().weight.shape[0]
        tokens = self.config.chunk_tokens or (2048 if model.device.type == "cpu" else 32768)
        return max(1, min(tokens // max(n, 1), self.config.max_logit_elems // max(k * vocab, 1)))

    def _row(self, model: NeuronModel, row: Batch, b: int = 0) -> torch.Tensor:
        keep = predicting_positions(row.loss_mask)
        L, I, n, dev = model.num_layers, model.num_neurons, row.input_ids.shape[1], model.device
        trace = _Trace(model, row, keep)
        norm = find_final_norm(model) if self.config.fast else None
        fast = norm is not None and model.hf.get_output_embeddings() is not None
        if fast:  # blocks called directly + final norm + head must reproduce the model's logits
            first = trace.calls[0][0][0] if trace.calls[0][0] else trace.calls[0][1]["hidden_states"]
            fast = logits_agree(trace.run_from(0, first, keep, norm), trace.logits)
        if fast:
            clean = nll_at(trace.run_from(L, trace.outs[L - 1], keep, norm), row, keep)
        else:
            clean = nll_at(trace.logits, row, keep)
        chunk = self._chunk(model, n, keep.numel())
        scores = torch.zeros(L, I, device=dev)
        todo = [l % L for l in self.config.layers] if self.config.layers else range(L)
        width = min(I, self.config.max_neurons) if self.config.max_neurons > 0 else I
        for l in todo:
            h = trace.acts[l][0]  # [n, I]
            v = model.down_proj(l, row=b).T  # [I, d], batch row b's own
            rank1 = fast and self._rank1_ok(model, trace, l, h, v)
            for start in range(0, width, chunk):
                idx = torch.arange(start, min(start + chunk, width), device=dev)
                if rank1:
                    x = trace.outs[l] - h[:, idx].T[:, :, None] * v[idx][:, None, :]
                    logits = trace.run_from(l + 1, x, keep, norm)
                elif fast:
                    x = trace.calls[l][0][0] if trace.calls[l][0] else trace.calls[l][1]["hidden_states"]
                    with model.intervene({l: self._zeroer(idx, I)}):
                        x = trace.run_block(l, x.expand(idx.numel(), -1, -1))
                    logits = trace.run_from(l + 1, x, keep, norm)
                else:
                    rows = Batch(row.input_ids.expand(idx.numel(), -1), row.attention_mask.expand(idx.numel(), -1),
                                 row.loss_mask.expand(idx.numel(), -1), row.item_ids * idx.numel())
                    with model.intervene({l: self._zeroer(idx, I)}):
                        logits = kept_logits(model, rows, keep)
                scores[l, idx] = nll_at(logits, row, keep) - clean
        return scores

    @staticmethod
    def _zeroer(idx: torch.Tensor, width: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            coef = torch.ones(idx.numel(), width, device=h.device, dtype=h.dtype)
            coef[torch.arange(idx.numel(), device=h.device), idx] = 0
            return h * coef[:, None, :]

        return fn

    @staticmethod
    def _rank1_ok(model: NeuronModel, trace: _Trace, l: int, h: torch.Tensor, v: torch.Tensor) -> bool:
        """Zeroing a neuron must change block l's output by exactly −h_i v_i (checked on the strongest neuron)."""
        j = int((h.float().norm(dim=0) * v.float().norm(dim=1)).argmax())
        x = trace.calls[l][0][0] if trace.calls[l][0] else trace.calls[l][1]["hidden_states"]
        idx = torch.tensor([j], device=h.device)
        with model.intervene({l: ZeroOut._zeroer(idx, h.shape[-1])}):
            y = trace.run_block(l, x)
        delta = (h[:, j, None] * v[j][None, :])[None].float()
        err = (y.float() - trace.outs[l].float() + delta).abs().max()
        eps = torch.finfo(y.dtype).eps
        bound = 0.02 * delta.abs().max() + 64 * eps * trace.outs[l].float().abs().max()
        return bool((err <= bound).item())


@hookimpl
def memeval_methods():
    return [ZeroOut]
