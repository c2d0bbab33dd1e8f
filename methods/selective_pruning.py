"""Selective Pruning (Pochinkov & Schoots 2024, arXiv 2403.01267; nickypro/taker).

MLP neurons (the inputs of the down-projection) are scored by how much more important they are for the
forget set than for the retain set, S(n) = I(forget, n) / (I(retain, n) + ε) with I = mean |activation|
over the scored tokens (taker's ``abs``, the default) and ε = 1e-3, and pruned by one *global* top-k over
all layers (no per-layer quota). Iterative, as the default ``recalculate_activations``: each step
re-collects the statistics on the already-pruned model and prunes a further ``step_fraction`` of all
neurons (pruned neurons score 0 and are never re-picked), until ``budget`` (the fraction of all MLP neurons
pruned) is reached. Pruning zeroes the neuron's down-projection column.

Attention neurons (optional, ``attn_fraction > 0``; the paper's attention pruning, taker's ``attn_frac`` with
``attn_mode="pre-out"``): the input coordinates of each block's attention output projection W_O, i.e. the
concatenated per-head values before W_O. They are scored in the same forward passes with the same importance
and the ratio I(forget)/(I(retain) + ``attn_eps``) (taker's ``attn_eps`` = 1e-4), and pruned by their own
global top-k over all layers, in the same steps as the MLP neurons; pruning zeroes the W_O input column.
Budget: ``budget`` stays the fraction of all *MLP* neurons. As in taker, where every step prunes ``ff_frac``
of the MLP neurons and ``attn_frac`` of the attention neurons, ``attn_fraction`` is the fraction of all
attention neurons pruned per ``step_fraction`` of MLP neurons, so the fraction of attention neurons pruned is

    attention budget = min(1, budget × attn_fraction / step_fraction),

spread evenly over the steps (exactly ``attn_fraction`` a step when ``budget`` is a multiple of
``step_fraction``). The defaults (``attn_fraction`` = 0) prune MLP neurons only, as before.

Not included: whole-head pruning (taker's ``attn_prune_heads``), attention-only pruning (taker's
``ff_frac`` = 0), mean replacement. Without a retain set the statistics of text sampled from the model stand in.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from memeval import hookimpl
from memeval.api import Editor, SequenceSet
from memeval.errors import UsageError
from memeval.metrics import per_layer_k_floor
from memeval.models import NeuronModel
from memeval_methods._editing import general_text, require_forget, zero_columns

IMPORTANCE = ("abs", "rms", "std", "freq", "mean_abs_sqrt")


def _token_sums(h: torch.Tensor) -> list[torch.Tensor]:
    """Per-unit sums over the tokens of ``h [L, N, U]``: |h|, h², [h > 0], sqrt|h|, h."""
    return [h.abs().sum(1), (h * h).sum(1), (h > 0).float().sum(1), h.abs().sqrt().sum(1), h.sum(1)]


def _importance(sums: list[torch.Tensor], n: int, kind: str) -> torch.Tensor:
    s1, s2, pos, sq, sm = sums
    if kind == "abs":
        return s1 / n
    if kind == "rms":
        return (s2 / n).sqrt()
    if kind == "std":
        return (s2 / n - (sm / n) ** 2).clamp(min=0).sqrt()
    if kind == "freq":
        return pos / n
    if kind == "mean_abs_sqrt":
        return sq / n
    raise UsageError(f"selective_pruning: unknown importance '{kind}' (expected {', '.join(IMPORTANCE)})")


@torch.no_grad()
def neuron_importance(model: NeuronModel, seqs: SequenceSet, kind: str = "abs", batch_size: int = 16,
                      attention: bool = False) -> dict[str, torch.Tensor]:
    """Per-unit importance over every attended token of ``seqs`` (taker/scoring.py): ``"mlp"`` ``[L, I]``
    and, with ``attention``, ``"attn"`` ``[L, attn_width]`` from the same forward passes."""
    sums: dict[str, list[torch.Tensor]] = {}
    n = 0
    for batch in seqs.batches(batch_size, model.device):
        with contextlib.ExitStack() as stack:
            stores = {"mlp": stack.enter_context(model.capture())}
            if attention:
                stores["attn"] = stack.enter_context(model.capture(attention=True))
            model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        mask = batch.attention_mask.bool()
        for unit, store in stores.items():
            h = torch.stack([store[l][mask].float() for l in range(model.num_layers)])  # [L, N, U]
            parts = _token_sums(h)
            sums[unit] = parts if unit not in sums else [a + b for a, b in zip(sums[unit], parts)]
        n += int(mask.sum())
    return {unit: _importance(v, n, kind) for unit, v in sums.items()}


class SelectivePruning(Editor):
    name = "selective_pruning"
    summary = "Iteratively prune the MLP neurons most important to the forget set relative to the retain set"
    paper = "Pochinkov & Schoots 2024, arXiv 2403.01267"

    @dataclass
    class Config(Editor.Config):
        importance: str = "abs"  # abs | rms | std | freq | mean_abs_sqrt
        eps: float = 1e-3
        step_fraction: float = 0.02  # fraction of all neurons pruned per step (the paper's ff_frac)
        attn_fraction: float = 0.0  # attention neurons pruned per step (taker's attn_frac); 0 = MLP only
        attn_eps: float = 1e-4
        iterative: bool = True  # re-collect statistics after every step
        batch_size: int = 16
        sampled_sequences: int = 64  # without a retain set
        sampled_length: int = 64
        # Equal cost with localizers (DEL): per_layer prunes per_layer_k_floor(I, budget) MLP neurons in every layer
        # not in skip_layers (the localizers' per-layer rule) instead of one global top-k of budget·L·I.
        per_layer: bool = False
        skip_layers: list[int] = field(default_factory=list)

    def edit(self, model: NeuronModel, forget: SequenceSet | None, retain: SequenceSet | None,
             budget: float) -> NeuronModel:
        cfg = self.config
        forget = require_forget(forget, self.name)
        if not 0 <= cfg.attn_fraction <= 1 or (cfg.attn_fraction > 0 and cfg.step_fraction <= 0):
            raise UsageError("selective_pruning: attn_fraction must lie in [0, 1] and needs step_fraction > 0")
        attn_width = model.attn_width if cfg.attn_fraction > 0 else 0  # a UsageError if W_O is not found
        retain = general_text(model, retain, cfg.sampled_sequences, cfg.sampled_length, cfg.seed)
        edited = model.clone()
        total = model.num_layers * model.num_neurons
        eligible = torch.tensor([l not in cfg.skip_layers for l in range(model.num_layers)], device=model.device)
        quota = per_layer_k_floor(model.num_neurons, budget) if cfg.per_layer else 0  # per eligible layer
        target = quota * int(eligible.sum()) if cfg.per_layer else min(total, round(budget * total))
        if target <= 0:
            return edited
        steps = max(1, math.ceil(target / max(1, round(cfg.step_fraction * total))))

        def none_pruned(width: int) -> torch.Tensor:
            return torch.zeros(model.num_layers, width, dtype=torch.bool, device=model.device)

        # unit -> (how many to prune in all, [L, U] pruned so far, ε of the score)
        units = {"mlp": (target, none_pruned(model.num_neurons), cfg.eps)}
        if attn_width:
            attn_total = model.num_layers * attn_width
            attn_target = min(attn_total, round(budget * cfg.attn_fraction / cfg.step_fraction * attn_total))
            units["attn"] = (attn_target, none_pruned(attn_width), cfg.attn_eps)
        scores = None
        for step in range(steps):
            if scores is None or cfg.iterative:
                f = neuron_importance(edited, forget, cfg.importance, cfg.batch_size, "attn" in units)
                r = neuron_importance(edited, retain, cfg.importance, cfg.batch_size, "attn" in units)
                scores = {unit: f[unit] / (r[unit] + eps) for unit, (_, _, eps) in units.items()}
            for unit, (unit_target, pruned, _) in units.items():
                blocked = pruned | ~eligible[:, None] if unit == "mlp" else pruned
                if unit == "mlp" and cfg.per_layer:  # each eligible layer up to its share of the quota
                    new = torch.zeros_like(pruned)
                    for l in torch.nonzero(eligible).flatten().tolist():
                        k = round(quota * (step + 1) / steps) - int(pruned[l].sum())
                        if k > 0:
                            new[l, scores[unit][l].masked_fill(pruned[l], float("-inf")).topk(k).indices] = True
                else:
                    k = round(unit_target * (step + 1) / steps) - int(pruned.sum())
                    if k <= 0:
                        continue
                    s = scores[unit].masked_fill(blocked, float("-inf")).flatten()
                    new = torch.zeros_like(pruned).flatten()
                    new[s.topk(k).indices] = True
                    new = new.view_as(pruned)
                pruned |= new
                zero_columns(edited, {l: new[l] for l in range(model.num_layers)}, attention=unit == "attn")
        return edited


@hookimpl
def memeval_methods():
    return [SelectivePruning]
