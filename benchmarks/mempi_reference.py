"""Faithful batch-1 fp32 re-implementations of the MemPi localizers' reference code (terarachang/MemPi:
`baselines.py`, `knowledge_neuron.py`, `slim.py`, `hardconcrete.py`), one sequence at a time: full-model
forwards with full logits, IG re-encoding the truncated input for every position and α chunk, Zero-Out running
the whole model for every chunk of ablations. `benchmarks/localizers.py` times memeval against them; the
tests use them as naive oracles. ``ids`` is ``[1, n]`` on the model's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _labels(ids: torch.Tensor, prefix_len: int) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :prefix_len] = -100
    return labels


@torch.no_grad()
def reference_activations(model, ids, prefix_len: int, faithful: bool = True) -> torch.Tensor:
    """knowledge_neuron.largest_act: |mean_t h| · ‖v‖ (faithful) or mean_t |h| · ‖v‖ over positions [prefix-1, -1)."""
    with model.capture() as acts:
        model.hf(input_ids=ids)
    out = []
    for l in range(model.num_layers):
        a = acts[l][0, prefix_len - 1 : -1].float()
        m = a.mean(0).abs() if faithful else a.abs().mean(0)
        out.append(m * model.down_proj(l).float().norm(dim=0))
    return torch.stack(out)


@torch.no_grad()
def reference_zero_out(model, ids, prefix_len: int, n_batches: int = 10, layers=None, chunks=None) -> torch.Tensor:
    """baselines.fast_zero_out_vector: per layer, ``n_batches`` chunks of "all ones but one zero" coefficient rows,
    each chunk a full-model forward with full logits. Rows not computed (subset runs) are NaN."""
    I, n = model.num_neurons, ids.shape[1]
    loss_ori = model.hf(input_ids=ids, labels=_labels(ids, prefix_len)).loss.item()
    coefs = torch.ones(I, I, device=model.device)
    coefs.fill_diagonal_(0.0)
    losses = torch.full((model.num_layers, I), float("nan"), device=model.device)
    for ly in range(model.num_layers) if layers is None else layers:
        start = 0
        for c, batch_coef in enumerate(coefs.chunk(n_batches)):
            bs = len(batch_coef)
            if chunks is None or c < chunks:
                with model.intervene({ly: lambda h, bc=batch_coef: h * bc.unsqueeze(1)}):
                    logits = model.hf(input_ids=ids.expand(bs, n)).logits
                shift_logits = logits[..., prefix_len - 1 : -1, :]
                shift_labels = ids.expand(bs, n)[..., prefix_len:]
                loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)).float(),
                                       shift_labels.reshape(-1), reduction="none").view(bs, -1).mean(1)
                losses[ly, start : start + bs] = loss
            start += bs
    return losses - loss_ori


def reference_ig(model, ids, prefix_len: int, steps: int = 20, n_batches: int = 1, layers=None) -> torch.Tensor:
    """knowledge_neuron.integrated_gradients: for every layer and position i, re-encode ids[:i+1] with the last
    position's activation replaced by α·h (α chunks of ``steps / n_batches``), grad of p(target)."""
    with torch.no_grad(), model.capture() as acts_:
        model.hf(input_ids=ids)
    acts = {l: a[0].float() for l, a in acts_.items()}
    target_ids = ids[0, 1:].tolist()
    n, I = ids.shape[1], model.num_neurons
    out = torch.full((model.num_layers, I), float("nan"), device=model.device)
    scales = torch.linspace(0, 1, steps, device=model.device)[:, None]
    for ly in range(model.num_layers) if layers is None else layers:
        per_pos = []
        for i in range(prefix_len - 1, n - 1):
            ori = acts[ly][i]
            scaled = (ori.expand(steps, I) * scales).requires_grad_(True)
            total = torch.zeros(I, device=model.device)
            for bw in scaled.chunk(n_batches):
                bs = len(bw)

                def patch(h, bw=bw):
                    h = h.clone()
                    h[:, -1, :] = bw.to(h.dtype)
                    return h

                with model.intervene({ly: patch}):
                    logits = model.hf(input_ids=ids[:, : i + 1].expand(bs, i + 1)).logits
                probs = F.softmax(logits[:, -1, :].float(), dim=-1)
                (grad,) = torch.autograd.grad(torch.unbind(probs[:, target_ids[i]]), bw)
                total += grad.sum(0)
            per_pos.append(ori * total / steps)
        out[ly] = torch.stack(per_pos).mean(0)
    return out


def reference_slimming(model, ids, prefix_len: int, cfg) -> torch.Tensor:
    """slim.slim: masks at 1, clip in the forward, HF loss + λ·‖m‖₁/N, Adam; stop check every 10 steps."""
    L, I = model.num_layers, model.num_neurons
    params = [torch.ones(I, device=model.device, requires_grad=True) for _ in range(L)]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    labels = _labels(ids, prefix_len)
    fns = {l: (lambda h, p=params[l]: h * torch.clip(p, 0, 1)) for l in range(L)}
    for i in range(cfg.max_steps):
        opt.zero_grad()
        with model.intervene(fns):
            lm = model.hf(input_ids=ids, labels=labels).loss
        l1 = sum(torch.norm(p, 1) for p in params) / (L * I)
        loss = lm + cfg.lambda_l1 * l1
        if (i + 1) % cfg.check_every == 0 and l1 < cfg.stop_loss:
            break
        loss.backward()
        opt.step()
    return torch.stack(params).detach().clamp(0, 1)


def reference_hardconcrete(model, ids, prefix_len: int, cfg, generator=None) -> torch.Tensor:
    """hardconcrete.hard_concrete + modeling_hardconcrete.L0Mask (noise from the global seed 0, per layer).
    With ``generator``, the noise of each step is instead one [L, I] draw from it (memeval's per-row stream),
    which makes the two implementations comparable draw for draw."""
    torch.manual_seed(0)
    L, I = model.num_layers, model.num_neurons
    left, right = -0.1, 1.1
    p = (cfg.p_init - left) / (right - left)
    params = [torch.full((I,), math.log(p / (1 - p)), device=model.device, requires_grad=True) for _ in range(L)]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    labels = _labels(ids, prefix_len)

    noise = {}

    def gate(s, l):
        def fn(h):
            if generator is None:
                u = torch.zeros_like(s).uniform_().clamp(0.0001, 0.9999)
            else:
                if l == 0:
                    noise["u"] = torch.rand((L, I), generator=generator, device=s.device)
                u = noise["u"][l].clamp(0.0001, 0.9999)
            z = torch.sigmoid((u.log() - (1 - u).log() + s) / cfg.beta)
            return h * (z * (right - left) + left).clamp(0.0, 1.0)

        return fn

    fns = {l: gate(params[l], l) for l in range(L)}
    for i in range(cfg.max_steps):
        opt.zero_grad()
        with model.intervene(fns):
            lm = model.hf(input_ids=ids, labels=labels).loss
        reg = sum(torch.sigmoid(s - cfg.beta * math.log(-left / right)).sum() / I for s in params) / L
        if (i + 1) % cfg.check_every == 0 and reg < cfg.stop_loss:
            break
        (lm + cfg.lambda_l0 * reg).backward()
        opt.step()
    return torch.sigmoid(torch.stack(params).detach())
