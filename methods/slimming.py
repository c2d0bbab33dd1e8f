"""Slimming (network slimming with an L1 mask; Liu et al. 2017), as used by Chang, Thomason & Jia (2024) §3.

A mask m ∈ R^{L×I} per sequence multiplies the MLP neurons (the down-projection input), starts at 1 and is
clipped to [0, 1] in the forward pass. Loss = ℓ_mem + λ · mean|m| (L1 over the masked layers, normalised by
the mask count), Adam on the mask only. Every 10 steps a row stops once its L1 term is below ``stop_loss``.
Attribution = clamp(m, 0, 1).

Batched: masks ``[B, L, I]``; rows are independent (sum of per-row losses, elementwise Adam with a shared step
count) and a finished row leaves the batch (its mask is final, as the reference's ``break``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memeval import hookimpl
from memeval.api import Batch, Localizer
from memeval.models import NeuronModel
from memeval_methods._common import masked_layers, optimise_masks, suffix_nll


class Slimming(Localizer):
    name = "slimming"
    summary = "L1-sparsified neuron mask in [0, 1] trained to keep the memorized suffix likely (network slimming)"
    paper = "Chang, Thomason & Jia 2024 (NAACL), §3; Liu et al. 2017"
    per_row_weights = True  # forwards its active rows inside model.rows(rows)

    @dataclass
    class Config(Localizer.Config):
        # Defaults: MemPi DEL Pythia-6.9B (script/pile/slim.sh): lr 5e-3, λ 30000, 60 steps, stop 0.4.
        lr: float = 5e-3
        lambda_l1: float = 30000.0
        max_steps: int = 60
        stop_loss: float = 0.4
        check_every: int = 10
        skip_layers: tuple[int, ...] = ()  # layers left unmasked (their score is the initial value 1)

    def localize(self, model: NeuronModel, batch: Batch) -> torch.Tensor:
        cfg = self.config
        layers = masked_layers(model, cfg.skip_layers)
        B, dev = len(batch), model.device
        init = torch.ones(B, len(layers), model.num_neurons, device=dev, dtype=torch.float32)

        def loss_fn(masks: torch.Tensor, sub: Batch, rows: torch.Tensor):
            def scale(j: int):
                return lambda h: h * masks[:, j].clamp(0.0, 1.0).to(h.dtype)[:, None, :]

            with model.rows(rows), model.intervene({l: scale(j) for j, l in enumerate(layers)}):
                lm = suffix_nll(model, sub)
            reg = masks.abs().mean(dim=(1, 2))
            return lm, reg

        final = optimise_masks(init, batch, loss_fn, lr=cfg.lr, lam=cfg.lambda_l1, max_steps=cfg.max_steps,
                               stop_loss=cfg.stop_loss, check_every=cfg.check_every)
        scores = torch.ones(B, model.num_layers, model.num_neurons, device=dev, dtype=torch.float32)
        scores[:, layers] = final.clamp(0.0, 1.0)
        return scores


@hookimpl
def memeval_methods():
    return [Slimming]
