"""Memorization prediction: a predictor's per-token probabilities and per-sequence scores against the greedy
match vectors of the scored model (Chen, Han & Miyao, EMNLP 2024; Biderman et al., NeurIPS 2023).

Notation: for sequence n, ``labels[n]`` ``[ℓ]`` is its match vector m_i = 1[greedy token i = true token i],
M = mean_i m_i its memorization score, exact = all m_i; ``probs[n]`` ``[ℓ]`` the predicted P(m_i = 1) and
``scores[n]`` the predicted sequence score. A token is predicted to match when its probability is ≥ 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memeval.metrics.ranking import roc_auc

THRESHOLD = 0.5  # a token (or a sequence, for the forecast) is predicted memorized at probability ≥ 0.5


def _flat(probs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p.float().flatten() for p in probs]), torch.cat([l.bool().flatten() for l in labels])


def token_accuracy(probs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> float:
    """Correctly predicted tokens over all tokens of all sequences (Chen et al.'s token-level accuracy)."""
    p, y = _flat(probs, labels)
    return float(((p >= THRESHOLD) == y).float().mean())


def majority_token_accuracy(labels: Sequence[torch.Tensor]) -> float:
    """Token accuracy of always predicting the more frequent label of these tokens: max(q, 1 − q) with q the
    fraction of matching tokens (the floor a token accuracy is read against; Chen et al. report none)."""
    y = torch.cat([l.bool().flatten() for l in labels]).float()
    q = float(y.mean())
    return max(q, 1.0 - q)


def full_accuracy(probs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> float:
    """Fraction of sequences whose every token is predicted correctly (Chen et al.'s full accuracy)."""
    return sum(bool(((p.float() >= THRESHOLD) == l.bool()).all()) for p, l in zip(probs, labels)) / len(labels)


def token_auc(probs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> float | None:
    """ROC AUC of the token probabilities against the match labels, pooled over all tokens (None if one class)."""
    p, y = _flat(probs, labels)
    return roc_auc(p, y) if 0 < int(y.sum()) < len(y) else None


def exact_auc(scores: Sequence[float], labels: Sequence[torch.Tensor]) -> float | None:
    """ROC AUC of the sequence scores against exact match (every m_i = 1); None if one class only."""
    exact = torch.tensor([bool(l.bool().all()) for l in labels])
    return roc_auc(torch.tensor(scores, dtype=torch.float32), exact) if 0 < int(exact.sum()) < len(exact) else None


def memorized_f1(probs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> float:
    """F1 of the "matches" class over tokens: 2·TP / (2·TP + FP + FN) (0 when there is no positive at all)."""
    p, y = _flat(probs, labels)
    pred = p >= THRESHOLD
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def score_bins(labels: Sequence[torch.Tensor], bins: int = 5) -> list[int]:
    """The bin of each sequence's true M among ``bins`` equal bins of [0, 1] (M = 1 in the last)."""
    return [min(int(float(l.float().mean()) * bins), bins - 1) for l in labels]


def full_accuracy_by_bin(probs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                         bins: int = 5) -> list[float | None]:
    """:func:`full_accuracy` within each bin of true M (None for an empty bin), Chen et al.'s five levels."""
    which = score_bins(labels, bins)
    out = []
    for b in range(bins):
        rows = [i for i, w in enumerate(which) if w == b]
        out.append(full_accuracy([probs[i] for i in rows], [labels[i] for i in rows]) if rows else None)
    return out


def predicted_m_by_bin(probs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                       bins: int = 5) -> list[float | None]:
    """Mean predicted M (mean token probability) of the sequences in each bin of true M (None if empty)."""
    which = score_bins(labels, bins)
    out = []
    for b in range(bins):
        rows = [float(probs[i].float().mean()) for i, w in enumerate(which) if w == b]
        out.append(sum(rows) / len(rows) if rows else None)
    return out


def forecast_precision_recall(scores: Sequence[float], labels: Sequence[torch.Tensor]) -> tuple[float | None, float | None]:
    """Biderman et al.'s framing: the forecast memorized set {score ≥ 0.5} against the final model's memorized
    set {exact match}: precision = |both| / |forecast| and recall = |both| / |memorized| (None when empty)."""
    forecast = [s >= THRESHOLD for s in scores]
    memorized = [bool(l.bool().all()) for l in labels]
    both = sum(f and m for f, m in zip(forecast, memorized))
    return (both / sum(forecast) if any(forecast) else None, both / sum(memorized) if any(memorized) else None)
