"""Selective Pruning (Pochinkov & Schoots 2024, arXiv 2403.01267; nickypro/taker).

MLP neurons (the inputs of the down-projection) are scored by how much more important they are for the
forget set than for the retain set, S(n) = I(forget, n) / (I(retain, n) + ε) with I = mean |activation|
over the scored tokens (taker's ``abs``, the default) and ε = 1e-3, and pruned by one *global* top-k over
all layers (no per-layer quota). Iterative, as the default ``recalculate_activations``: each step
re-collects the statistics on the already-pruned model and prunes a further ``step_fraction`` of all
neurons (pruned neurons score 0 and are never re-picked), until ``budget`` (the fraction of all MLP neurons
pruned) is reached. Pruning zeroes the neuron's down-projection column.

Not included: attention-neuron pruning and whole-head pruning (taker's ``attn_frac``), mean replacement.
Without a retain set the statistics of text sampled from the model stand in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import Editor, SequenceSet
from memeval.errors import UsageError
from memeval.models import NeuronModel
from memeval_methods._editing import general_text, require_forget, zero_columns

IMPORTANCE = ("abs", "rms", "std", "freq", "mean_abs_sqrt")


@torch.no_grad()
def neuron_importance(model: NeuronModel, seqs: SequenceSet, kind: str = "abs", batch_size: int = 16) -> torch.Tensor:
    """Per-neuron importance ``[L, I]`` over every attended token of ``seqs`` (taker/scoring.py)."""
    s1 = s2 = pos = sq = None
    n = 0
    for batch in seqs.batches(batch_size, model.device):
        with model.capture() as acts:
            model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        mask = batch.attention_mask.bool()
        h = torch.stack([acts[l][mask].float() for l in range(model.num_layers)])  # [L, N, I]
        parts = (h.abs().sum(1), (h * h).sum(1), (h > 0).float().sum(1), h.abs().sqrt().sum(1), h.sum(1))
        if s1 is None:
            s1, s2, pos, sq, sm = parts
        else:
            s1, s2, pos, sq, sm = s1 + parts[0], s2 + parts[1], pos + parts[2], sq + parts[3], sm + parts[4]
        n += h.shape[1]
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


class SelectivePruning(Editor):
    name = "selective_pruning"
    summary = "Iteratively prune the MLP neurons most important to the forget set relative to the retain set"
    paper = "Pochinkov & Schoots 2024, arXiv 2403.01267"

    @dataclass
    class Config(Editor.Config):
        importance: str = "abs"  # abs | rms | std | freq | mean_abs_sqrt
        eps: float = 1e-3
        step_fraction: float = 0.02  # fraction of all neurons pruned per step (the paper's ff_frac)
        iterative: bool = True  # re-collect statistics after every step
        batch_size: int = 16
        sampled_sequences: int = 64  # without a retain set
        sampled_length: int = 64

    def edit(self, model: NeuronModel, forget: SequenceSet | None, retain: SequenceSet | None,
             budget: float) -> NeuronModel:
        cfg = self.config
        forget = require_forget(forget, self.name)
        retain = general_text(model, retain, cfg.sampled_sequences, cfg.sampled_length, cfg.seed)
        edited = model.clone()
        total = model.num_layers * model.num_neurons
        target = min(total, round(budget * total))
        if target <= 0:
            return edited
        steps = max(1, math.ceil(target / max(1, round(cfg.step_fraction * total))))
        pruned = torch.zeros(model.num_layers, model.num_neurons, dtype=torch.bool, device=model.device)
        scores = None
        for step in range(steps):
            if scores is None or cfg.iterative:
                f = neuron_importance(edited, forget, cfg.importance, cfg.batch_size)
                r = neuron_importance(edited, retain, cfg.importance, cfg.batch_size)
                scores = f / (r + cfg.eps)
            k = round(target * (step + 1) / steps) - int(pruned.sum())
            if k <= 0:
                continue
            s = scores.masked_fill(pruned, float("-inf")).flatten()
            new = torch.zeros_like(pruned).flatten()
            new[s.topk(k).indices] = True
            new = new.view_as(pruned)
            pruned |= new
            zero_columns(edited, {l: new[l] for l in range(model.num_layers)})
        return edited


@hookimpl
def memeval_methods():
    return [SelectivePruning]
