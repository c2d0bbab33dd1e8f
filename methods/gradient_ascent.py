"""Gradient ascent with a retain term: the unlearning baseline (e.g. Jang et al. 2023; Maini et al. 2024, TOFU).

Minimise −CE(forget) + retain_weight · CE(retain) with Adam over all weights for
``steps = ceil(budget · max_steps)`` steps (``budget`` = fraction of the full schedule). Without a retain
set, the retain term is dropped (plain gradient ascent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


from memeval import hookimpl
from memeval.api import Editor, SequenceSet
from memeval.models import NeuronModel
from memeval_methods._editing import MasterAdam, cycle_batches, mean_nll, require_forget, trainable


def unlearn(model: NeuronModel, forget: SequenceSet, retain: SequenceSet | None, budget: float, cfg,
            forget_loss) -> NeuronModel:
    """The shared loop of gradient ascent and NPO on a clone: ``forget_loss(model, batch) + w·CE(retain)``."""
    edited = model.clone()
    steps = math.ceil(max(0.0, budget) * cfg.max_steps)
    if steps == 0:
        return edited
    params = [p for p in edited.hf.parameters()]
    opt = MasterAdam(params, cfg.lr, cfg.max_grad_norm)  # fp32 masters when the model runs in bf16
    fb = cycle_batches(forget, cfg.batch_size, edited.device, cfg.seed)
    rb = cycle_batches(retain, cfg.batch_size, edited.device, cfg.seed + 1) if retain is not None and len(retain) else None
    with trainable(params):
        for _ in range(steps):
            loss = forget_loss(edited, next(fb))
            if rb is not None and cfg.retain_weight:
                loss = loss + cfg.retain_weight * mean_nll(edited, next(rb))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return edited


class GradientAscent(Editor):
    name = "gradient_ascent"
    summary = "Ascend the forget-set loss while descending the retain-set loss (fine-tuning all weights)"
    paper = "Jang et al. 2023 (ACL), arXiv 2210.01504; with a retain term as in TOFU (Maini et al. 2024)"

    @dataclass
    class Config(Editor.Config):
        lr: float = 1e-4
        max_steps: int = 100  # steps at budget 1
        batch_size: int = 16
        retain_weight: float = 1.0
        max_grad_norm: float = 1.0

    def edit(self, model: NeuronModel, forget: SequenceSet | None, retain: SequenceSet | None,
             budget: float) -> NeuronModel:
        forget = require_forget(forget, self.name)
        return unlearn(model, forget, retain, budget, self.config, lambda m, b: -mean_nll(m, b))


@hookimpl
def memeval_methods():
    return [GradientAscent]
