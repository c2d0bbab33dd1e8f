"""Activations (Geva et al. 2022), as used by Chang, Thomason & Jia (2024) §3, Eq. 8.

A_i = mean_t |h_{i,t}| · ‖v_i‖ over the positions t that predict suffix tokens, with v_i the down-projection
column of neuron i. ``faithful: true`` reproduces the reference code, which takes |mean_t h_{i,t}| instead.
One forward pass for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import Batch, Localizer
from memeval.models import NeuronModel
from memeval_methods._common import accepts_logits_to_keep, causal_only


class Activations(Localizer):
    name = "activations"
    summary = "Mean absolute neuron activation over the suffix-predicting positions times the output-weight norm"
    paper = "Chang, Thomason & Jia 2024 (NAACL), §3 Eq. 8; Geva et al. 2022"
    per_row_weights = True  # ‖v_i‖ from each row's own down-projection (model.down_proj(l, row=b))

    @dataclass
    class Config(Localizer.Config):
        faithful: bool = False  # true: the reference code's |mean_t h| instead of the paper's mean_t |h|

    @torch.no_grad()
    def localize(self, model: NeuronModel, batch: Batch) -> torch.Tensor:
        pred = torch.zeros_like(batch.loss_mask)
        pred[:, :-1] = batch.loss_mask[:, 1:]  # position p predicts token p + 1
        w = pred.float()[:, :, None]  # [B, T, 1]
        kwargs = dict(input_ids=batch.input_ids, attention_mask=causal_only(batch), use_cache=False)
        if accepts_logits_to_keep(model):
            kwargs["logits_to_keep"] = 1
        out = []
        with model.capture() as acts:
            model.hf(**kwargs)
        for l in range(model.num_layers):
            h = torch.where(pred[:, :, None], acts[l].float(), torch.zeros((), device=w.device))
            if self.config.faithful:
                a = ((h * w).sum(1) / w.sum(1)).abs()
            else:
                a = (h.abs() * w).sum(1) / w.sum(1)
            norms = torch.stack([model.down_proj(l, row=b).float().norm(dim=0) for b in range(len(batch))])
            out.append(a * norms)
        return torch.stack(out, dim=1)


@hookimpl
def memeval_methods():
    return [Activations]
