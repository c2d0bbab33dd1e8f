"""Negative preference optimisation (Zhang, Lin, Bai & Mei 2024, arXiv 2404.05868), with a retain term (NPO+RT).

L = −(2/β) · E_forget[log σ(−β · (log π_θ(y|x) − log π_ref(y|x)))] + retain_weight · CE(retain), where
log π(y|x) is the summed log-probability of a sequence's suffix and π_ref is the unedited model. Adam over
all weights for ``steps = ceil(budget · max_steps)``; without a retain set the retain term is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memeval import hookimpl
from memeval.api import Editor, SequenceSet
from memeval.models import NeuronModel
from memeval_methods._editing import require_forget, sequence_logprob
from memeval_methods.gradient_ascent import unlearn


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """−(2/β) · mean log σ(−β (logp − ref_logp)) over rows (Zhang et al. 2024, Eq. 3)."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def _keys(batch) -> list[tuple[int, ...]]:
    """Each row's unpadded token ids (a key independent of the batch's padding width)."""
    lengths = batch.attention_mask.sum(1).tolist()
    return [tuple(r[:n]) for r, n in zip(batch.input_ids.tolist(), lengths)]


class NPO(Editor):
    name = "npo"
    summary = "Negative preference optimisation on the forget set against the unedited model, plus retain CE"
    paper = "Zhang, Lin, Bai & Mei 2024 (COLM), arXiv 2404.05868"

    @dataclass
    class Config(Editor.Config):
        beta: float = 0.1
        lr: float = 1e-4
        max_steps: int = 100
        batch_size: int = 16
        retain_weight: float = 1.0
        max_grad_norm: float = 1.0

    def edit(self, model: NeuronModel, forget: SequenceSet | None, retain: SequenceSet | None,
             budget: float) -> NeuronModel:
        forget = require_forget(forget, self.name)
        ref: dict[tuple, torch.Tensor] = {}
        with torch.no_grad():
            for batch in forget.batches(64, model.device):
                for key, lp in zip(_keys(batch), sequence_logprob(model, batch)):
                    ref[key] = lp
        beta = self.config.beta

        def loss(m, batch):
            ref_lp = torch.stack([ref[k] for k in _keys(batch)])
            return npo_loss(sequence_logprob(m, batch), ref_lp, beta)

        return unlearn(model, forget, retain, budget, self.config, loss)


@hookimpl
def memeval_methods():
    return [NPO]
