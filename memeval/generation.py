"""Greedy decoding, batched: the one implementation memeval uses wherever a greedy continuation is needed.

Definitions (``reference/prediction_detection.md`` §A1 and §C2; Carlini et al. 2022; Chen et al. 2024):

- The **greedy continuation** of a prompt p is x_1 … x_ℓ with x_i = argmax_v P(v | p, x_<i). Exactly ℓ
  tokens are produced: no token ends generation early and no logits processor is applied (no EOS
  suppression, no repetition penalty), so x_i is the plain argmax of the model's next-token logits.
- For a training sequence with prefix p (``prefix_len`` tokens) and true suffix s (the remaining ℓ tokens),
  the **greedy match** vector is m_i = 1[x_i = s_i] and the memorization score is M = (1/ℓ) Σ m_i
  (Biderman et al. 2023; Chen et al. 2024). Exact match is M = 1.

The **teacher-forced shortcut** (§A, "Tip"): in one teacher-forced forward pass over p‖s, the argmax at
suffix position i equals x_i for every i up to and including the first position j where the argmax differs
from s_j (before j the greedy context *is* p‖s_<i). So m_<j = 1, m_j = 0, x_j = that argmax, and only the
tail x_{j+1..ℓ} needs generation, from the context p‖s_<j‖x_j. Fully matched rows need no generation at
all. ``greedy_match`` uses it; ``greedy_continuations`` is plain generation (the oracle in the tests).

Rows are independent: batched prompts are left-padded, with position ids counted over real tokens, so a
row's continuation does not depend on its batchmates (up to floating-point ties, tested equal on organisms).
Interventions active on the model (``NeuronModel.intervene``/``ablate``) apply to every generated step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from memeval.api import Batch, TokenSequence
from memeval.metrics import greedy_tokens
from memeval.models import cache_kwarg, returned_cache

if TYPE_CHECKING:
    from memeval.models import NeuronModel


@dataclass(frozen=True)
class GreedyMatch:
    """The greedy continuation of one sequence's prefix and how it compares with the true suffix."""

    continuation: tuple[int, ...]  # x_1 .. x_ℓ
    matches: tuple[bool, ...]  # m_i = 1[x_i = s_i]

    @property
    def score(self) -> float:
        """M = fraction of the ℓ greedy tokens equal to the true suffix."""
        return sum(self.matches) / len(self.matches)

    @property
    def exact(self) -> bool:
        """Exact match: the whole suffix is reproduced (M = 1)."""
        return all(self.matches)

    @property
    def first_mismatch(self) -> int:
        """Index of the first wrong token (ℓ when there is none)."""
        return next((i for i, m in enumerate(self.matches) if not m), len(self.matches))


@torch.no_grad()
def _generate_batch(model: "NeuronModel", prompts: Sequence[Sequence[int]], n_new: int) -> torch.Tensor:
    """Greedy tokens ``[B, n_new]`` for left-padded prompts, with a KV cache."""
    hf = model.hf
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), model.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    use_pos = "position_ids" in inspect.signature(hf.forward).parameters
    cache_kw = cache_kwarg(hf)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"position_ids": positions} if use_pos else {}
    out = hf(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
    tokens = [out.logits[:, -1].argmax(-1)]
    past = returned_cache(out)
    last_pos = positions[:, -1:]
    for _ in range(n_new - 1):
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        last_pos = last_pos + 1
        kwargs = {"position_ids": last_pos} if use_pos else {}
        kwargs[cache_kw] = past
        out = hf(input_ids=tokens[-1][:, None], attention_mask=mask, use_cache=True, **kwargs)
        past = returned_cache(out)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


def greedy_continuations(model: "NeuronModel", prompts: Sequence[Sequence[int]], n_new: int | Sequence[int],
                         batch_size: int = 32) -> list[list[int]]:
    """The greedy continuation of each prompt: exactly ``n_new`` tokens (one count, or one per prompt).

    Prompts are grouped by length (longest first) so that batches need little padding.
    """
    counts = [int(n_new)] * len(prompts) if isinstance(n_new, int) else [int(n) for n in n_new]
    if len(counts) != len(prompts):
        raise ValueError(f"{len(counts)} token counts for {len(prompts)} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_continuations: every prompt needs at least one token")
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted((i for i in range(len(prompts)) if counts[i] > 0), key=lambda i: (-len(prompts[i]), -counts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        gen = _generate_batch(model, [prompts[i] for i in rows], max(counts[i] for i in rows)).tolist()
        for row, i in enumerate(rows):
            out[i] = gen[row][: counts[i]]
    return out


@torch.no_grad()
def teacher_forced_argmax(model: "NeuronModel", sequences: Sequence[TokenSequence],
                          batch_size: int = 32) -> list[list[int]]:
    """Per sequence, the teacher-forced argmax prediction of each suffix token (``len(suffix)`` ids)."""
    out: list[list[int]] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        batch = Batch.from_sequences(chunk, model.pad_id, model.device)
        pred = greedy_tokens(model.logits(batch), batch.input_ids).tolist()
        out.extend(pred[row][s.prefix_len : len(s.input_ids)] for row, s in enumerate(chunk))
    return out


def greedy_match(model: "NeuronModel", sequences: Sequence[TokenSequence], batch_size: int = 32) -> list[GreedyMatch]:
    """Greedy continuation of each sequence's prefix (``prefix_len`` tokens, at least 1) compared with its
    suffix, computed with the teacher-forced shortcut (module docstring): one forward pass per batch, then
    generation only of the tails after each row's first mismatch."""
    for s in sequences:
        if s.prefix_len < 1:
            raise ValueError(f"sequence {s.id}: greedy generation needs a prefix of at least one token")
    argmax = teacher_forced_argmax(model, sequences, batch_size)
    heads: list[list[int]] = []
    tails_needed: list[int] = []
    for s, pred in zip(sequences, argmax):
        suffix = s.input_ids[s.prefix_len:]
        j = next((i for i, (p, t) in enumerate(zip(pred, suffix)) if p != t), len(suffix))
        heads.append(list(suffix[:j]) + ([pred[j]] if j < len(suffix) else []))
        tails_needed.append(len(suffix) - len(heads[-1]))
    todo = [i for i, n in enumerate(tails_needed) if n > 0]
    tails = greedy_continuations(model, [list(sequences[i].input_ids[: sequences[i].prefix_len]) + heads[i] for i in todo],
                                 [tails_needed[i] for i in todo], batch_size)
    continuation = {i: heads[i] for i in range(len(sequences))}
    for i, tail in zip(todo, tails):
        continuation[i] = heads[i] + tail
    results = []
    for i, s in enumerate(sequences):
        suffix = s.input_ids[s.prefix_len:]
        cont = tuple(continuation[i])
        results.append(GreedyMatch(cont, tuple(a == b for a, b in zip(cont, suffix))))
    return results
