"""Training loop of a model organism: AdamW, linear warmup + cosine decay, fixed-length packed chunks,
seeded and deterministic on CPU, checkpoints at fixed fractions of training."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from memeval.organisms.presets import Preset


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def training_threads(preset_threads: int) -> int:
    """``$MEMEVAL_THREADS``, else the preset's count (0 = all cores), capped at the available cores."""
    env = os.environ.get("MEMEVAL_THREADS", "").strip()
    n = int(env) if env.isdigit() and int(env) > 0 else preset_threads
    return min(n, available_cores()) if n > 0 else available_cores()


@contextlib.contextmanager
def deterministic_cpu(threads: int | None = None) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count for the block (previous settings restored)."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads or available_cores())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def pack(docs: list[list[int]], eos_id: int, context: int) -> torch.Tensor:
    """Concatenate documents, each followed by ``eos_id``, and cut the stream into ``[N, context]`` chunks
    (the incomplete tail is dropped)."""
    stream = [t for d in docs for t in (*d, eos_id)]
    n = len(stream) // context
    if n == 0:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one {context}-token chunk")
    return torch.tensor(stream[: n * context], dtype=torch.long).view(n, context)


def lr_factor(step: int, total: int, warmup: int, min_frac: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_frac`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_order(n_chunks: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Chunk indices for every step ``[steps, batch_size]``: epochs of seeded permutations, cycled."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(n_chunks, generator=gen) for _ in range(math.ceil(need / n_chunks))]
    return torch.cat(perms)[:need].view(steps, batch_size)


@dataclass
class TrainStats:
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    losses: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def train(
    model: torch.nn.Module,
    chunks: torch.Tensor,
    preset: Preset,
    seed: int,
    steps: int | None = None,
    on_checkpoint: Callable[[float], None] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``chunks``; ``on_checkpoint(fraction)`` is called at each checkpoint
    fraction of ``preset.checkpoint_fractions`` (not at the end), ``on_step(step, loss, tokens_per_s)``
    after every step."""
    steps = preset.steps if steps is None else steps
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=preset.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    warmup = max(1, int(preset.warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, preset.min_lr_frac))
    order = batch_order(chunks.shape[0], steps, preset.batch_size, seed)
    ckpt_steps = {max(1, round(f * steps)): f for f in preset.checkpoint_fractions if 0 < f < 1}
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for step in range(steps):
        batch = chunks[order[step]]
        logits = model(input_ids=batch).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.numel()
        losses.append(loss.detach().item())
        if on_step is not None:
            on_step(step + 1, losses[-1], tokens / (time.perf_counter() - start))
        if on_checkpoint is not None and (step + 1) in ckpt_steps:
            model.eval()
            on_checkpoint(ckpt_steps[step + 1])
            model.train()
    seconds = time.perf_counter() - start
    model.eval()
    tail = losses[-max(1, steps // 20):]
    return TrainStats(steps=steps, tokens=tokens, seconds=seconds, final_loss=sum(tail) / len(tail), losses=losses)
