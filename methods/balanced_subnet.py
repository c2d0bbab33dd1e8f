"""BalancedSubnet (Sakarvadia et al., ICLR 2025, arXiv 2410.02159; msakarvadia/memorization).

Learns one score per weight of every MLP matrix (up/gate or a fused gate_up, and down) in every layer; the
forward pass uses W ⊙ M where M drops the ``budget`` fraction of entries with the smallest |score| (edge-popup
masks, a straight-through estimator passes the gradient to the scores). Weights stay frozen; the scores are
trained with SGD on L = −(1−w)·CE(forget) + w·CE(retain) over batches that mix both groups; after training
the mask is baked into the weights. ``budget`` = fraction of MLP weights masked.

Guard missing in the reference code: a batch lacking one group contributes 0 for that term (not NaN); here
every step draws a batch of each group, so neither is ever empty unless the group itself is (no retain set:
the retain term is text sampled from the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from memeval import hookimpl
from memeval.api import Editor, SequenceSet
from memeval.errors import UsageError
from memeval.models import NeuronModel
from memeval_methods._editing import (cycle_batches, general_text, mean_nll, mlp_matrices, require_forget,
                                      trainable)


class _Mask(nn.Module):
    """W ↦ W ⊙ M(S): M keeps the (1 − ratio) fraction of largest |S|; straight-through to S."""

    def __init__(self, scores: torch.Tensor, ratio: float) -> None:
        super().__init__()
        self.scores = nn.Parameter(scores)
        self.ratio = ratio

    def mask(self) -> torch.Tensor:
        a = self.scores.abs()
        k = int(self.ratio * a.numel())  # entries dropped
        if k <= 0:
            hard = torch.ones_like(a)
        else:
            thresh = a.detach().flatten().kthvalue(k).values
            hard = (a.detach() > thresh).to(a.dtype)
        return hard + (a - a.detach())  # forward: exactly the hard mask; backward: straight through to |S|

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()


def initial_scores(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """The fp32 score tensor of one weight, as the reference initialises it: ``kaiming_uniform_(a=√5)`` on a
    tensor of the weight's shape (bound 1/√shape[1]); fp32 whatever the model's dtype (the trained master)."""
    scores = torch.empty(shape, dtype=torch.float32)
    return nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=generator)


class BalancedSubnet(Editor):
    name = "balanced_subnet"
    summary = "Learn a straight-through top-k mask over MLP weights: ascend on forget, descend on retain"
    paper = "Sakarvadia et al., ICLR 2025, arXiv 2410.02159"

    @dataclass
    class Config(Editor.Config):
        loss_weighting: float = 0.5  # w; the paper sweeps {0.5, 0.7, 0.9} (code default 0.05)
        epochs: int = 20
        optimizer: str = "sgd"  # sgd (the paper) | adam
        lr: float = 0.1
        momentum: float = 0.9
        weight_decay: float = 5e-4
        batch_size: int = 32  # per group per step
        steps_per_epoch: int = 0  # 0: enough steps to see the larger group once
        sampled_sequences: int = 64
        sampled_length: int = 64

    def edit(self, model: NeuronModel, forget: SequenceSet | None, retain: SequenceSet | None,
             budget: float) -> NeuronModel:
        cfg = self.config
        forget = require_forget(forget, self.name)
        retain = general_text(model, retain, cfg.sampled_sequences, cfg.sampled_length, cfg.seed)
        edited = model.clone()
        if budget <= 0:
            return edited
        gen = torch.Generator().manual_seed(cfg.seed)
        masks: list[_Mask] = []
        modules = [m for l in range(edited.num_layers) for m in mlp_matrices(edited, l).values()]
        for m in modules:
            w = m.weight
            mask = _Mask(initial_scores(w.shape, gen).to(w.device), float(budget))
            parametrize.register_parametrization(m, "weight", mask, unsafe=True)
            masks.append(mask)
        params = [mk.scores for mk in masks]
        if cfg.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            raise UsageError(f"balanced_subnet: optimizer must be sgd or adam, got {cfg.optimizer!r}")
        steps = cfg.steps_per_epoch or max(1, math.ceil(max(len(forget), len(retain)) / cfg.batch_size))
        fb = cycle_batches(forget, cfg.batch_size, edited.device, cfg.seed)
        rb = cycle_batches(retain, cfg.batch_size, edited.device, cfg.seed + 1)
        w = cfg.loss_weighting
        with trainable(params):
            for _ in range(cfg.epochs * steps):
                f_batch, r_batch = next(fb), next(rb)
                loss_f = mean_nll(edited, f_batch) if len(f_batch) else torch.zeros((), device=edited.device)
                loss_r = mean_nll(edited, r_batch) if len(r_batch) else torch.zeros((), device=edited.device)
                loss = -(1 - w) * loss_f + w * loss_r
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            for m in modules:
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            for p in edited.hf.parameters():
                p.requires_grad_(False)
        return edited


@hookimpl
def memeval_methods():
    return [BalancedSubnet]
