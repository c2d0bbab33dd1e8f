"""Helpers shared by the editors (selective pruning, K-FAC, BalancedSubnet, gradient ascent, NPO).

- the MLP matrices of a block (up/gate projections, or a fused gate/up projection, found by shape; the
  down-projection from NeuronModel; read and write them as ``[out, in]`` with
  ``memeval.models.weight_out_in`` / ``set_weight_out_in``, whatever the module type);
- the general text an editor needs for statistics: the ``retain`` set, or, when a protocol gives none
  (DEL), text sampled from the model itself;
- the causal-LM losses on a :class:`~memeval.api.Batch` with gradients.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Iterator

import torch
from torch import nn

from memeval.api import Batch, SequenceSet, TokenSequence
from memeval.errors import UsageError
from memeval.metrics import token_nll
from memeval.models import NeuronModel, _conv1d_or_linear_dims


# ---------------------------------------------------------------------------------------------
# MLP matrices


def mlp_matrices(model: NeuronModel, layer: int) -> dict[str, nn.Module]:
    """The MLP projections of ``layer`` (modules of the down-projection's parent module), ``down`` last:

    - every map hidden → num_neurons: ``gate`` if its attribute name contains "gate", else ``up`` (a second
      such map is named by its attribute name);
    - every fused map hidden → k·num_neurons (k ≥ 2; e.g. Phi-3's ``gate_up_proj``, split into gate and up
      inside the MLP): ``gate_up``, a second one by its attribute name;
    - ``down``: the down-projection of :class:`~memeval.models.NeuronModel`.
    """
    block = model.blocks[layer]
    down = model.down_projs[layer]
    h, n = model.hidden_size, model.num_neurons
    out: dict[str, nn.Module] = {}
    parent = None
    for name, module in block.named_modules():
        if module is down:
            parent = name.rpartition(".")[0]
    for name, module in block.named_modules():
        dims = _conv1d_or_linear_dims(module)
        if module is down or dims is None or name.rpartition(".")[0] != parent or dims[0] != h:
            continue
        short = name.rpartition(".")[2]
        if dims[1] == n:
            key = "gate" if "gate" in short else "up"
        elif dims[1] % n == 0 and dims[1] >= 2 * n:
            key = "gate_up"
        else:
            continue
        out[short if key in out else key] = module
    out["down"] = down
    return out


# ---------------------------------------------------------------------------------------------
# Data


def require_forget(forget: SequenceSet | None, name: str) -> SequenceSet:
    if forget is None or len(forget) == 0:
        raise UsageError(f"{name} needs a forget set (the protocol gave none)")
    return forget


@torch.no_grad()
def sample_text(model: NeuronModel, n: int, length: int, seed: int) -> SequenceSet:
    """``n`` sequences of ``length`` tokens sampled (temperature 1) from the model, each starting at its
    end-of-text token: general text when no retain set is given."""
    start = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else model.pad_id
    ids = torch.full((n, 1), int(start), dtype=torch.long, device=model.device)
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=length - 1,
                                min_new_tokens=length - 1, top_k=0, top_p=1.0, temperature=1.0,
                                pad_token_id=model.pad_id)
    return SequenceSet([TokenSequence(f"sampled{i}", tuple(r), 0) for i, r in enumerate(out.tolist())], model.pad_id)


def general_text(model: NeuronModel, retain: SequenceSet | None, n: int = 32, length: int = 64,
                 seed: int = 0) -> SequenceSet:
    """The retain set if given, else :func:`sample_text`; every token of it is a target (prefix 0)."""
    if retain is not None and len(retain):
        return SequenceSet([TokenSequence(s.id, s.input_ids, 0) for s in retain.sequences], retain.pad_id)
    return sample_text(model, n, length, seed)


def set_digest(seqs: SequenceSet) -> str:
    blob = json.dumps([[s.input_ids, s.prefix_len] for s in seqs.sequences]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cycle_batches(seqs: SequenceSet, size: int, device, seed: int) -> Iterator[Batch]:
    """Endless seeded shuffled batches of a set."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(seqs), generator=gen).tolist()
        for start in range(0, len(order), size):
            chunk = [seqs.sequences[i] for i in order[start : start + size]]
            yield Batch.from_sequences(chunk, seqs.pad_id, device)


# ---------------------------------------------------------------------------------------------
# Losses (with gradients)


def token_nlls(model: NeuronModel, batch: Batch) -> torch.Tensor:
    """Next-token NLL of each token, aligned with ``input_ids`` (``memeval.metrics.token_nll``), ``[B, T]``."""
    logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return token_nll(logits, batch.input_ids)


def mean_nll(model: NeuronModel, batch: Batch) -> torch.Tensor:
    """Mean over rows of each row's mean next-token NLL over its loss mask (a scalar; 0 for no rows)."""
    if len(batch) == 0:
        return torch.zeros((), device=model.device)
    mask = batch.loss_mask.float()
    return ((token_nlls(model, batch) * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def sequence_logprob(model: NeuronModel, batch: Batch) -> torch.Tensor:
    """Sum of log-probabilities of each row's suffix tokens, ``[B]``."""
    return -(token_nlls(model, batch) * batch.loss_mask.float()).sum(-1)


@contextlib.contextmanager
def trainable(params: list[nn.Parameter]) -> Iterator[None]:
    """Temporarily enable gradients for ``params`` (of a cloned model) and switch to train-free eval mode."""
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


class MasterAdam:
    """Adam on fp32 master copies of ``params`` when they are stored in lower precision (bf16/fp16 models).

    A 1e-4 Adam step is below half a bf16 ulp for most weights, so Adam applied to bf16 weights rounds it away
    and those weights never move; the fp32 masters accumulate every step and are copied (rounded) into the
    model after each one (mixed-precision training). fp32 params are stepped in place, as plain Adam."""

    def __init__(self, params: list[nn.Parameter], lr: float, max_grad_norm: float | None = None) -> None:
        self.params = params
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
                        for p in params]
        self.opt = torch.optim.Adam(self.masters, lr=lr)
        self.max_grad_norm = max_grad_norm

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.masters, self.max_grad_norm)
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)


def zero_columns(model: NeuronModel, masks: dict[int, torch.Tensor], attention: bool = False) -> None:
    """Zero the down-projection columns (neurons) ``masks[l]`` ([I] bool) of ``model`` in place; with
    ``attention``, the attention output projection's columns (attention neurons, ``[attn_width]`` bool)."""
    get, put = (model.attn_out_proj, model.set_attn_out_proj) if attention else (model.down_proj, model.set_down_proj)
    for layer, mask in masks.items():
        if bool(mask.any()):
            w = get(layer).detach().clone()
            w[:, mask.to(w.device)] = 0
            put(layer, w)
