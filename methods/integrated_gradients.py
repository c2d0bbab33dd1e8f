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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memeval import hookimpl
from memeval.api import Batch, Localizer
from memeval.models import NeuronModel, cache_kwarg, returned_cache
from memeval_methods._common import accepts_logits_to_keep, trim


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) ``[B, heads, T, head_dim]`` per layer of a transformers cache (old or new API)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]


def _make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)


class IntegratedGradients(Localizer):
    name = "integrated_gradients"
    summary = "Integrated gradients of the true next-token probability w.r.t. each neuron (knowledge neurons)"
    paper = "Chang, Thomason & Jia 2024 (NAACL), §3; Dai et al. 2022"
    # Follows the per-row rules (each single-token forward row is its pair's batch row, model.rows(b_r); tested on
    # a batched INJ model) but INJ scores it one item at a time: its forwards are already batched over
    # (position, α) pairs, so a batch of injected items gains nothing (organism, 8 items: 0.58 s/item batched,
    # 0.26 s/item one at a time; benchmarks/inj_localizers.py: the per-row deltas cost more than they save).
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
        with torch.no_grad(), model.capture() as acts:
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

        scores = torch.zeros(B, L, I, device=dev)
        counts = torch.zeros(B, device=dev).index_add_(0, pb, torch.ones(npairs, device=dev))
        grad_sum = torch.zeros(L, npairs, I, device=dev)
        for s, e in chunks:  # chunks outside layers: a chunk's gathered key/value cache serves every layer
            b_r = pb[s:e].repeat_interleave(cfg.steps)
            p_r = pp[s:e].repeat_interleave(cfg.steps)
            a_r = alphas.repeat(e - s)
            pmax = int(pp[e - 1])
            pos = torch.arange(pmax + 1, device=dev)
            attn = ((pos[None] < p_r[:, None]) | (pos[None] == pmax)).long()
            past_kv = [(k[b_r, :, :pmax], v[b_r, :, :pmax]) for k, v in kv] if pmax > 0 else None
            for l in range(L):
                x = (a_r[:, None] * acts[l][b_r, p_r].float()).requires_grad_(True)

                def patch(h: torch.Tensor, x=x) -> torch.Tensor:
                    return x[:, None, :].to(h.dtype)

                past = _make_cache(past_kv) if past_kv else None  # a fresh cache: the forward extends it
                with torch.enable_grad(), model.rows(b_r), model.intervene({l: patch}):
                    logits = model.hf(input_ids=tokens[s:e].repeat_interleave(cfg.steps)[:, None],
                                      attention_mask=attn, position_ids=p_r[:, None], **{cache_kwarg(model.hf): past},
                                      use_cache=past is not None, **extra).logits[:, -1]
                    prob = F.softmax(logits.float(), dim=-1).gather(1, targets[s:e].repeat_interleave(cfg.steps)[:, None])
                    (g,) = torch.autograd.grad(prob.sum(), x)
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
