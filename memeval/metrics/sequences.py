"""Token-level quantities from one teacher-forced pass, and string/sequence distances."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Token-level quantities from one teacher-forced forward pass


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood in nats, ``[B, T]``, aligned with ``input_ids`` (0 at t = 0)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(nll, (1, 0))


def token_correct(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Whether the greedy (argmax) next-token prediction equals the true token, ``[B, T]`` bool."""
    hit = logits[:, :-1].argmax(-1) == input_ids[:, 1:]
    return F.pad(hit, (1, 0), value=False)


def greedy_tokens(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher-forced argmax prediction of each token, ``[B, T]`` (token 0 is kept as is)."""
    return torch.cat([input_ids[:, :1], logits[:, :-1].argmax(-1)], dim=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` over ``mask``, ``[B]`` (NaN for a row with an empty mask)."""
    mask = mask.to(values.dtype) if values.is_floating_point() else mask.float()
    values = values.to(mask.dtype)
    return (values * mask).sum(-1) / mask.sum(-1)


def perplexity(mean_nll: float) -> float:
    """Perplexity = exp(mean token NLL in nats). (MemPi's code uses 2**NLL, a defect: see `faithful`.)"""
    return math.exp(mean_nll)


def mempi_perplexity(chunk_nlls: Sequence[float]) -> float:
    """MemPi's reference Rand-PPL (``faithful: true`` only): the text is scored in chunks of 16 sequences, each
    chunk's mean token NLL in nats ``l_c`` is turned into ``2 ** l_c`` (base 2 on a natural-log loss), and the
    chunks are averaged: mean_c 2^(l_c). Neither a perplexity nor 2^(mean NLL) when chunks differ."""
    return sum(2.0 ** l for l in chunk_nlls) / len(chunk_nlls)


# ---------------------------------------------------------------------------------------------
# Strings and sequences


def levenshtein(a: str | Sequence, b: str | Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions of cost 1) between two strings or sequences."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a, b))


def levenshtein_similarity(a: str | Sequence, b: str | Sequence) -> float:
    """1 − distance / max(len a, len b), in [0, 1]; 1.0 for two empty inputs."""
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.normalized_similarity(a, b))


def ngrams(tokens: Sequence, n: int) -> set[tuple]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def ngram_jaccard(a: Sequence, b: Sequence, n: int = 5) -> float:
    """|A ∩ B| / |A ∪ B| of the sets of n-grams of two sequences (0.0 when both are empty)."""
    ga, gb = ngrams(a, n), ngrams(b, n)
    union = ga | gb
    return len(ga & gb) / len(union) if union else 0.0


