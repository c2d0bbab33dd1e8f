"""Gradient × activation: an example memeval localizer plugin.

Score of neuron i in layer l for a sequence: the mean over the positions that predict suffix tokens of
|h_{l,i,t} · ∂L/∂h_{l,i,t}|, where h is the input of the layer's MLP down-projection and L the mean NLL of
the suffix (a first-order estimate of how much the loss changes when the neuron is zeroed; Shrikumar et al.
2017, "Learning important features through propagating activation differences").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import Batch, Localizer
from memeval.models import NeuronModel


class GradTimesActivation(Localizer):
    name = "grad_x_act"
    summary = "Mean |activation x gradient of the suffix loss| of each MLP neuron over the suffix"
    paper = "Shrikumar et al. 2017 (arXiv:1704.02685)"

    @dataclass
    class Config(Localizer.Config):  # inherits seed: int = 0
        absolute: bool = True  # false: signed mean (a neuron that lowers the loss scores negative)

    def localize(self, model: NeuronModel, batch: Batch) -> torch.Tensor:
        # A zero tensor added to each layer's down-projection input: its gradient is dL/dh, through every path.
        deltas: dict[int, torch.Tensor] = {}
        acts: dict[int, torch.Tensor] = {}

        def probe(layer: int):
            def fn(h: torch.Tensor) -> torch.Tensor:
                acts[layer] = h.detach()
                deltas[layer] = torch.zeros_like(h, requires_grad=True)
                return h + deltas[layer]
            return fn

        with torch.enable_grad(), model.intervene({l: probe(l) for l in range(model.num_layers)}):
            loss = model.sequence_nll(batch).sum()  # rows are independent: each row's gradient is its own
            grads = torch.autograd.grad(loss, [deltas[l] for l in range(model.num_layers)])
        # position p predicts token p + 1: the suffix tokens' predicting positions
        pred = torch.zeros_like(batch.loss_mask)
        pred[:, :-1] = batch.loss_mask[:, 1:]
        w = pred.float()[:, :, None]
        scores = []
        for l, g in enumerate(grads):
            contrib = acts[l].float() * g.float()
            contrib = contrib.abs() if self.config.absolute else contrib
            scores.append((contrib * w).sum(1) / w.sum(1).clamp_min(1))
        return torch.stack(scores, dim=1)  # [B, num_layers, num_neurons]


@hookimpl
def memeval_methods():
    return [GradTimesActivation]
