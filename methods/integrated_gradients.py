"""Integrated Gradients over neurons (Dai et al. 2022 knowledge neurons), as adapted by Chang, Thomason & Jia
(2024) §3 from EleutherAI/knowledge-neurons.

For each layer l and each position p that predicts a suffix token y = x_{p+1}: the input is truncated to
x_{≤p}, layer l's neuron vector at the last position p is replaced by α·h^l_p for α ∈ linspace(0, 1, steps)
(zero baseline), and g_α = ∂ softmax(logits_p)[y] / ∂(α h). IG_p = h^l_p · Σ_α g_α / steps; the attribution
is the mean of IG_p over the predicting positions (signed).

Exact and fast: patching position p affects nothing before p, and in the truncated input nothing comes after p,
so the truncated re-encoding of the reference equals one *single-token* step at position p on top of the
clean key/value cache of positions < p. Every (sequence, position, α) is one row of a batched single-token
forward with the clean KV cache (from one forward of the batch), an attention mask hiding the cache entries at
positions ≥ p, and explicit position ids; gradients flow only from layer l up, and the LM head runs for one
token per row. The reference instead re-encodes the whole prefix (and its logits) for every position and α.

Blocks below l see the clean input, so they return their output at p recorded in the clean forward instead of
running (checked at run time: the α = 1 rows, clean at every layer, must give the same logits with and without
the shortcut; otherwise every block runs). The single new token's key and value are written into a preallocated
slot of the gathered cache instead of being concatenated to it. Organism, 8 items (best of 5, interleaved):
0.277 s/item → 0.233 with the slot → 0.205 with the shortcut.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # transformers < 4.56
    DynamicLayer = None

from memeval import hookimpl
from memeval.api import Batch, Localizer
from memeval.models import NeuronModel, cache_kwarg, returned_cache
from memeval_methods._common import accepts_logits_to_keep, logits_agree, trim


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) ``[B, heads, T, head_dim]`` per layer of a transformers cache (old or new API)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]


if DynamicLayer is not None:

    class _SlotLayer(DynamicLayer):
        """One layer's cache over buffers ``[rows, heads, P + 1, head_dim]``: the first P positions are the past, and
        the forward's single new token is written into the last slot instead of being concatenated to the past."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.slots = keys, values
            self.keys, self.values = keys[:, :, :-1], values[:, :, :-1]  # the past: sets the cache's length
            self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            keys, values = self.slots
            return _WriteLastSlot.apply(keys, key_states), _WriteLastSlot.apply(values, value_states)


class _WriteLastSlot(torch.autograd.Function):
    """``buffer[:, :, -1:] = new`` in place, with the gradient of ``new`` only (the buffer's past is constant).

    Autograd's own in-place slice assignment would copy the whole buffer's gradient and zero the slot in backward.
    """

    @staticmethod
    def forward(ctx, buffer: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        buffer[:, :, -1:] = new
        ctx.mark_dirty(buffer)
        return buffer

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad[:, :, -1:]


def _slot_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A KV cache for one single-token forward over per-layer buffers whose last slot takes the new token.

    transformers' own cache copies the whole past twice per layer and forward (once when it is built, once when the
    token is appended): 22 % of IG's time on the organism. Each forward overwrites the buffers' last slot, so each
    gets a cache over detached views of them (the previous forward's graph is consumed by then). Falls back to a
    copying cache when transformers has no per-layer cache objects (before 4.56).
    """
    cache = DynamicCache()
    if DynamicLayer is None or not hasattr(cache, "layers"):
        return DynamicCache(ddp_cache_data=[(k[:, :, :-1], v[:, :, :-1]) for k, v in kv])
    cache.layers = [_SlotLayer(k.detach(), v.detach()) for k, v in kv]
    return cache


def _probability_gradient(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """∂ softmax(z)_y / ∂z = p ⊙ (onehot(y) − p_y) per row, ``[N, V]``, in the order of autograd's softmax backward
    (same floats), without its zero-filled gather and select gradients."""
    p = torch.softmax(logits, dim=-1)
    p_y = p.gather(1, targets[:, None])
    return p.mul(-p_y).scatter_(1, targets[:, None], p_y * (1 - p_y))


@contextmanager
def _block_outputs(blocks):
    """{block index: output} of the next forward, for the blocks that return their hidden state as a tensor."""
    outs: dict[int, torch.Tensor] = {}

    def keep(j):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor):
                outs[j] = out

        return hook

    handles = [b.register_forward_hook(keep(j)) for j, b in enumerate(blocks)]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _outputs_given(blocks, given: dict[int, torch.Tensor]):
    """Blocks ``j in given`` return ``given[j]`` without computing anything while the context is open."""
    saved = {j: blocks[j].__dict__.get("forward") for j in given}
    for j, h in given.items():
        blocks[j].forward = lambda *args, h=h, **kwargs: h
    try:
        yield
    finally:
        for j, f in saved.items():
            if f is None:
                del blocks[j].forward
            else:
                blocks[j].forward = f


class IntegratedGradients(Localizer):
    name = "integrated_gradients"
    summary = "Integrated gradients of the true next-token probability w.r.t. each neuron (knowledge neurons)"
    paper = "Chang, Thomason & Jia 2024 (NAACL), §3; Dai et al. 2022"
    # Follows the per-row rules (each single-token forward row is its pair's batch row, model.rows(b_r); tested on
    # a batched INJ model) but INJ scores it one item at a time: its forwards are already batched over
    # (position, α) pairs, and on the organism the per-row deltas cost more than a batch of items saves (8 items:
    # 0.35 s/item batched, 0.24 s/item one at a time; on the GPT-2-shaped model, 2 items of 16 tokens, batched
    # is 1.15x faster: 13.5 vs 15.4 s/item; benchmarks/inj_localizers.py, 2026-12-04).
    per_row_weights = False

    @dataclass
    class Config(Localizer.Config):
        steps: int = 20  # α = linspace(0, 1, steps), both ends included (MemPi ig_steps = 20)
        chunk_tokens: int = 4096  # rows × cached positions per batched single-token forward

    def localize(self, model: NeuronModel, batch: Batch) -> torch.Tensor:
        cfg = self.config
        batch = trim(batch)
        B, L, I, dev = len(batch), model.num_layers, model.num_neurons, model.device
        extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        with torch.no_grad(), model.capture() as acts, _block_outputs(model.blocks) as outs:
            clean = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True, **extra)
        kv = _cache_tensors(returned_cache(clean))
        acts = dict(acts)
        del clean

        pb, pp = torch.nonzero(batch.loss_mask[:, 1:], as_tuple=True)  # pairs (row b, predicting position p)
        order = torch.argsort(pp, stable=True)
        pb, pp = pb[order], pp[order]
        targets = batch.input_ids[pb, pp + 1]
        tokens = batch.input_ids[pb, pp]
        alphas = torch.linspace(0, 1, cfg.steps, device=dev)
        npairs = pb.numel()
        chunks = self._chunks(pp.tolist(), cfg.steps, cfg.chunk_tokens)
        # Blocks below the patched layer see the clean input: they return their recorded clean output instead of
        # running, if every block returns its hidden state as a tensor and the α = 1 rows (the clean input at every
        # layer) confirm it at run time.
        skip = len(outs) == L and bool((alphas == 1).any())

        scores = torch.zeros(B, L, I, device=dev)
        counts = torch.zeros(B, device=dev).index_add_(0, pb, torch.ones(npairs, device=dev))
        grad_sum = torch.zeros(L, npairs, I, device=dev)
        for s, e in chunks:  # chunks outside layers: a chunk's gathered key/value cache serves every layer
            b_r = pb[s:e].repeat_interleave(cfg.steps)
            p_r = pp[s:e].repeat_interleave(cfg.steps)
            a_r = alphas.repeat(e - s)
            y_r = targets[s:e].repeat_interleave(cfg.steps)
            pmax = int(pp[e - 1])
            pos = torch.arange(pmax + 1, device=dev)
            attn = ((pos[None] < p_r[:, None]) | (pos[None] == pmax)).long()
            slots = [(k[b_r, :, : pmax + 1], v[b_r, :, : pmax + 1]) for k, v in kv]  # slot pmax: the new token
            below = [outs[j][b_r, p_r][:, None] for j in range(L - 1)] if skip else []
            ends = a_r == 1

            def forward(l: int, x: torch.Tensor, given: dict[int, torch.Tensor]) -> torch.Tensor:
                """Logits ``[rows, V]`` of the single-token rows with layer l's neurons set to ``x``."""
                def patch(h: torch.Tensor) -> torch.Tensor:
                    return x[:, None, :].to(h.dtype)

                with model.rows(b_r), model.intervene({l: patch}), _outputs_given(model.blocks, given):
                    out = model.hf(input_ids=tokens[s:e].repeat_interleave(cfg.steps)[:, None], attention_mask=attn,
                                   position_ids=p_r[:, None], use_cache=True,
                                   **{cache_kwarg(model.hf): _slot_cache(slots)}, **extra).logits
                return out.view(len(b_r), -1)  # one token per row

            for l in range(L):
                x = (a_r[:, None] * acts[l][b_r, p_r].float()).requires_grad_(True)
                with torch.enable_grad():
                    logits = forward(l, x, {j: below[j] for j in range(l)} if skip else {})
                    if l == 0:
                        clean_logits = logits.detach()[ends]
                    elif skip and not logits_agree(logits.detach()[ends], clean_logits):
                        skip = False  # the blocks do not compose that way here: run every block from now on
                        logits = forward(l, x, {})
                    (g,) = torch.autograd.grad(logits, x, _probability_gradient(logits.detach().float(), y_r))
                grad_sum[l, s:e] = g.view(e - s, cfg.steps, I).sum(1)
        with torch.no_grad():
            for l in range(L):
                ig = acts[l][pb, pp].float() * grad_sum[l] / cfg.steps  # [pairs, I]
                scores[:, l] = torch.zeros(B, I, device=dev).index_add_(0, pb, ig) / counts[:, None]
        return scores

    @staticmethod
    def _chunks(positions: list[int], steps: int, budget: int) -> list[tuple[int, int]]:
        """Consecutive pair ranges (positions sorted ascending) with pairs × steps × (p_max + 1) ≤ budget."""
        out, s = [], 0
        while s < len(positions):
            e = s + 1
            while e < len(positions) and (e + 1 - s) * steps * (positions[e] + 1) <= budget:
                e += 1
            out.append((s, e))
            s = e
        return out


@hookimpl
def memeval_methods():
    return [IntegratedGradients]
