"""Helpers shared by the MemPi localizers (Chang, Thomason & Jia 2024): suffix loss with logits only where the
loss needs them, per-row seeded generators, and the per-row early-stopped mask optimiser of Slimming and
HardConcrete.

Conventions (``memeval.api.Batch``): ``loss_mask[b, t]`` marks token ``t`` as a suffix token whose prediction is
made at position ``p = t - 1``. "Predicting positions" below are those ``p``.
"""

from __future__ import annotations

import inspect
import math
import zlib
from typing import Callable

import torch
import torch.nn.functional as F

from memeval.api import Batch
from memeval.models import NeuronModel


# ---------------------------------------------------------------------------------------------
# Positions, seeds, batch trimming


def predicting_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Sorted positions ``p`` such that some row has ``loss_mask[:, p + 1]`` (union over rows), ``[K]`` long."""
    return torch.nonzero(loss_mask[:, 1:].any(0), as_tuple=False).flatten()


def row_seed(seed: int, item_id: str) -> int:
    """A stable 63-bit seed from the method seed and the item id (independent of the batch composition)."""
    return (zlib.crc32(f"{item_id}".encode()) << 31 | zlib.crc32(f"memeval:{seed}".encode())) & ((1 << 63) - 1)


def row_generator(model: NeuronModel, seed: int, item_id: str) -> torch.Generator:
    gen = torch.Generator(device=model.device)
    gen.manual_seed(row_seed(seed, item_id))
    return gen


def trim(batch: Batch) -> Batch:
    """Drop padding columns that no row uses (right padding: keep up to the longest row)."""
    width = int(batch.attention_mask.sum(1).max().item())
    if width == batch.input_ids.shape[1]:
        return batch
    return Batch(batch.input_ids[:, :width], batch.attention_mask[:, :width], batch.loss_mask[:, :width],
                 list(batch.item_ids))


def select(batch: Batch, rows: torch.Tensor) -> Batch:
    return trim(batch.select(rows))


# ---------------------------------------------------------------------------------------------
# The memorization loss, with logits only at the predicting positions


def accepts_logits_to_keep(model: NeuronModel) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.hf.forward).parameters
    except (TypeError, ValueError):
        return False


def causal_only(batch: Batch) -> torch.Tensor | None:
    """The attention mask a forward of ``batch`` needs: None for right padding.

    In a causal LM a real position never attends to the padding after it, and position ids count from 0 either
    way, so right-padded rows' real positions compute exactly as alone. Passing no mask lets the attention use
    its causal fast path (the same kernel as a batch-1 call) instead of a materialised padding mask.
    """
    return None


def kept_logits(model: NeuronModel, batch: Batch, keep: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, K, V]`` at positions ``keep`` only (computing the head elsewhere is skipped if possible).

    The forward stops at the last kept position: in a causal LM later columns (at least the final suffix token,
    which is only ever a target) feed no kept logit, so dropping them is exact and saves their work in every layer.
    """
    width = int(keep.max().item()) + 1 if keep.numel() else batch.input_ids.shape[1]
    kwargs = dict(input_ids=batch.input_ids[:, :width], attention_mask=causal_only(batch), use_cache=False)
    if accepts_logits_to_keep(model):
        logits = model.hf(**kwargs, logits_to_keep=keep).logits
        if logits.shape[1] == keep.numel():
            return logits
    return model.hf(**kwargs).logits[:, keep]


def logits_agree(logits: torch.Tensor, expected: torch.Tensor) -> bool:
    """The rule by which a shortcut's logits count as the model's own: same shape and max |diff| ≤ 1e-3 ×
    max(|expected|, 1) (float rounding of a different kernel order, not a different computation)."""
    return logits.shape == expected.shape and bool(
        ((logits - expected).abs().max() <= 1e-3 * expected.abs().max().clamp_min(1.0)).item())


def suffix_nll(model: NeuronModel, batch: Batch) -> torch.Tensor:
    """ℓ_mem per row: mean next-token NLL (nats, float32) over ``loss_mask``, ``[B]``.

    Equal to ``masked_mean(token_nll(logits, ids), loss_mask)`` but computes the LM head only where needed.
    Interventions active around the call apply.
    """
    keep = predicting_positions(batch.loss_mask)
    logits = kept_logits(model, batch, keep)
    return nll_at(logits, batch, keep)


def nll_at(logits: torch.Tensor, batch: Batch, keep: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL from logits ``[N, K, V]`` at positions ``keep`` (rows of ``batch`` or broadcast)."""
    targets = batch.input_ids[:, keep + 1]
    mask = batch.loss_mask[:, keep + 1]
    N, K, V = logits.shape
    # fused −log softmax(z)_y (forward and backward) without a materialised [N, K, V] log-probability tensor
    nll = F.cross_entropy(logits.float().reshape(N * K, V), targets.expand(N, -1).reshape(N * K),
                          reduction="none").view(N, K)
    nll = torch.where(mask, nll, torch.zeros((), device=nll.device))  # padding may hold anything
    return nll.sum(-1) / mask.float().sum(-1)


# ---------------------------------------------------------------------------------------------
# Per-row early-stopped mask optimisation (Slimming, HardConcrete)

LossFn = Callable[[torch.Tensor, Batch, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def optimise_masks(
    init: torch.Tensor,
    batch: Batch,
    loss_fn: LossFn,
    *,
    lr: float,
    lam: float,
    max_steps: int,
    stop_loss: float,
    check_every: int = 10,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.Tensor:
    """Minimise ``lm_b + lam * reg_b`` for every row b independently with Adam; returns the final parameters.

    ``loss_fn(params [b, ...], sub_batch, rows) -> (lm [b], reg [b])`` for the active rows ``rows`` (indices into
    ``batch``). Follows MemPi's loop: at step i, forward; every ``check_every`` steps a row whose ``reg`` is below
    ``stop_loss`` stops *before* its update (its parameters are final, as in the reference's ``break``);
    otherwise backward and one Adam step (torch.optim.Adam's formula, no weight decay).

    Rows are independent: the loss is a sum over rows, Adam is elementwise, and all active rows share the step
    count. A finished row is dropped from the batch, so it costs nothing more and is never touched again.
    """
    final = init.detach().clone()
    rows = torch.arange(init.shape[0], device=init.device)
    params = init.detach().clone()
    exp_avg = torch.zeros_like(params)
    exp_avg_sq = torch.zeros_like(params)
    sub = trim(batch)
    beta1, beta2 = betas
    for i in range(max_steps):
        params.requires_grad_(True)
        lm, reg = loss_fn(params, sub, rows)
        keep = torch.ones(rows.numel(), dtype=torch.bool, device=rows.device)
        if (i + 1) % check_every == 0:
            keep = reg.detach() >= stop_loss
            if not bool(keep.all()):
                done = ~keep
                final[rows[done]] = params.detach()[done]
                if not bool(keep.any()):
                    return final
        loss = (lm + lam * reg)[keep].sum()
        (grad,) = torch.autograd.grad(loss, params)
        with torch.no_grad():
            params = params.detach()
            if not bool(keep.all()):
                params, grad, exp_avg, exp_avg_sq = params[keep], grad[keep], exp_avg[keep], exp_avg_sq[keep]
                rows = rows[keep]
                sub = select(batch, rows)
            step = i + 1
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = math.sqrt(1 - beta2**step)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            params.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    final[rows] = params.detach()
    return final


def masked_layers(model: NeuronModel, skip_layers) -> list[int]:
    skip = {int(l) % model.num_layers for l in (skip_layers or ())}
    return [l for l in range(model.num_layers) if l not in skip]
