"""Forgetting and collateral damage of an edit (the specificity protocol)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from memeval.metrics.sequences import levenshtein_similarity

# ---------------------------------------------------------------------------------------------
# Editing: forgetting and collateral damage (the specificity protocol, DESIGN §6)
#
# Sources: greedy exact match and the loose (Levenshtein ≥ 0.75) match of Merullo et al. 2025
# (goodfire-ai/memorization_kfac, ``strict_acc`` / ``loose_acc``) and Sakarvadia et al. 2025 (% memorized);
# nDCG@10 drift against the unedited model from Merullo et al. 2025; the trade-off AUC is memeval's.

LOOSE_MATCH_THRESHOLD = 0.75
NDCG_K = 10


def suffix_exact_match(correct: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Whether every suffix token is the greedy prediction, ``[B]`` bool.

    ``correct`` is :func:`token_correct` of one teacher-forced pass. When all suffix tokens are the argmax
    given the true prefix, greedy decoding from the prefix reproduces the suffix exactly, so this equals
    exact match of the greedy continuation (Carlini et al. 2021's extractability; Merullo et al.'s
    ``strict_acc``) without generating. A row with an empty suffix is False.
    """
    hit = (correct | ~loss_mask).all(-1)
    return hit & loss_mask.any(-1)


def loose_match(continuation: Sequence[int], reference: Sequence[int],
                threshold: float = LOOSE_MATCH_THRESHOLD) -> bool:
    """Loose match (Merullo et al. 2025's ``loose_acc``): 1 − d/ℓ ≥ ``threshold`` (0.75), where the
    continuation is the *greedy generation* of ℓ tokens from the prefix, the reference the true ℓ-token suffix
    and d their token-level Levenshtein distance (:func:`levenshtein_similarity` on token ids).

    Free generation, not teacher forcing: after a first error the model continues from its own tokens, as
    the paper's ``generate`` does, so one early slip that derails the rest is not forgiven.
    """
    return levenshtein_similarity(continuation, reference) >= threshold


def ndcg_at_k(ranked: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """nDCG@k of the edited model's top-k next tokens against the unedited model's top-k, per position.

    ``ranked`` and ``reference`` are ``[..., k]`` token ids, best first (``logits.topk(k).indices``).
    Merullo et al. 2025: the reference model's top-k tokens get graded relevance k, k−1, …, 1 (its rank-1
    token is worth k), every other token 0. The edited list earns DCG = Σ_{i=1..k} rel(token_i) / log2(i + 1);
    nDCG = DCG / IDCG with IDCG = Σ_{i=1..k} (k + 1 − i) / log2(i + 1), the reference's own list. Returns
    ``[...]``: 1.0 = same top-k in the same order, 0.0 = disjoint. memeval uses k = 10 (``NDCG_K``).
    """
    k = reference.shape[-1]
    relevance = torch.arange(k, 0, -1, device=reference.device, dtype=torch.float32)  # k..1
    discount = 1.0 / torch.log2(torch.arange(2, ranked.shape[-1] + 2, device=reference.device, dtype=torch.float32))
    match = ranked[..., :, None] == reference[..., None, :]  # [..., k(edited), k(reference)]
    gains = (match.float() * relevance).sum(-1)  # relevance of each edited-list token
    ideal = (relevance * discount[:k]).sum()
    return (gains * discount).sum(-1) / ideal


def relative_increase(after: float, before: float) -> float:
    """after / before − 1 (e.g. held-out perplexity: 0.1 = 10% higher than the unedited model)."""
    return after / before - 1.0


def fraction_removed(after: float, before: float) -> float:
    """(before − after) / before, the fraction of a rate removed by an edit (0 when ``before`` is 0)."""
    return (before - after) / before if before > 0 else 0.0


def forget_collateral_auc(points: Iterable[tuple[float, float]], max_collateral: float = 0.5) -> float:
    """Area under the forget-vs-collateral staircase, normalised to [0, 1] (memeval's specificity headline).

    Each point (x, y) is one budget of an editor's sweep: x = its collateral (negative values clipped to 0),
    y = fraction of the forget set's exact match removed (:func:`fraction_removed`, clipped to [0, 1]).
    The curve is

        f(x) = max { y_i : x_i ≤ x }   (0 when no tried budget has collateral ≤ x),

    the most forgetting any *tried* budget reached with at most x collateral: a step function, flat between
    measured points, since a budget that was not tried is not assumed to exist. The headline is
    ∫₀^B f(x) dx / B with B = ``max_collateral`` (default 0.5). 1.0 = the whole forget set forgotten at no
    collateral; 0.0 = nothing forgotten within the bound. Examples: points (0.1, 0.5), (0.3, 1.0) with
    bound 1: 0.2·0.5 + 0.7·1 = 0.8; one point (0.4, 1.0) with bound 0.5: 0.1·1 / 0.5 = 0.2; one point
    (0.6, 1.0) with bound 0.5: 0 (nothing was measured inside the bound).
    """
    return sum((end - start) * y for start, end, y in forget_collateral_frontier(points, max_collateral)) / max_collateral


def forget_collateral_frontier(points: Iterable[tuple[float, float]],
                               max_collateral: float = 0.5) -> list[tuple[float, float, float]]:
    """The staircase f of :func:`forget_collateral_auc` on [0, ``max_collateral``] as segments (x_start, x_end,
    f): f is constant on each; segments with f = 0 are included, so they cover the whole interval."""
    pts = sorted((max(0.0, float(x)), min(1.0, max(0.0, float(y)))) for x, y in points)
    inside = [(x, y) for x, y in pts if x < max_collateral]
    segments, best = [], 0.0
    if not inside or inside[0][0] > 0:
        segments.append((0.0, inside[0][0] if inside else max_collateral, 0.0))
    edges = [x for x, _ in inside[1:]] + [max_collateral]
    for (x, y), end in zip(inside, edges):
        best = max(best, y)
        segments.append((x, end, best))
    return segments


