"""Every metric memeval reports, defined once (DESIGN §6).

Conventions: token-level tensors are aligned with ``input_ids``: entry ``[b, t]`` concerns the prediction
of token ``t`` from positions ``< t`` (entry ``t = 0`` has no prediction and is 0 / False).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

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


def perplexity_base2(mean_nll: float) -> float:
    """MemPi's reference "perplexity": 2 ** (NLL in nats). Only for ``faithful: true`` reproductions."""
    return 2.0 ** mean_nll


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


# ---------------------------------------------------------------------------------------------
# Localization against a known set of neurons (INJ, Chang et al. 2024 §3)


def per_layer_k(num_neurons: int, ratio: float) -> int:
    """Neurons selected per layer for a ratio: ``round(I · ratio)`` (MemPi's INJ rule), at least 1."""
    return max(1, round(num_neurons * ratio))


def top_k_per_layer(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[L, I]`` mask of each layer's ``k`` highest scores (ties broken by the lower index)."""
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def top_k_global(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest scores over the flattened ``[L · I]`` grid."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.flatten().topk(k, sorted=False).indices] = True
    return flat.view_as(scores)


def recall(selected: torch.Tensor, gold: torch.Tensor) -> float:
    """|selected ∩ gold| / |gold| over boolean masks of the same shape (Chang et al. 2024, Recall@k)."""
    return float((selected & gold).sum()) / float(gold.sum())


def per_layer_ceiling(gold: torch.Tensor, k: int) -> float:
    """The best recall any per-layer top-``k`` selection can reach: Σ_l min(k, |gold_l|) / |gold|."""
    return float(gold.sum(-1).clamp(max=k).sum()) / float(gold.sum())


def average_precision(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """Average precision of the flattened scores against the gold mask (scikit-learn's definition)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(gold.flatten().cpu().numpy(), scores.flatten().float().cpu().numpy()))


def roc_auc(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """Area under the ROC curve of the flattened scores against the gold mask (ties count one half)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(gold.flatten().cpu().numpy(), scores.flatten().float().cpu().numpy()))


# ---------------------------------------------------------------------------------------------
# Aggregation


def mean_stderr(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with ddof = 1, over √n); stderr 0 for n < 2."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(xs) / n
    if n < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


# ---------------------------------------------------------------------------------------------
# Memorization filters (MemPi §4)
#
# The DEL benchmark keeps a sequence as "memorized" when (1) its teacher-forced suffix accuracy is above
# 0.9, (2) both the greedy and the true suffix have at least 16 distinct tokens (of 48), (3) the
# character Levenshtein distance between the decoded greedy continuation (prefix + teacher-forced
# argmax) and the reference is at most 20, and (4) among sequences whose 5-gram Jaccard similarity
# exceeds 0.05 only the lowest-distance member of each connected component survives. The thresholds of
# (2) and (3) are given for a 48-token suffix and scale linearly with the suffix length.

DEL_SUFFIX_LEN = 48
DEL_MIN_ACCURACY = 0.9
DEL_MIN_DISTINCT = 16
DEL_MAX_DISTANCE = 20


def del_thresholds(suffix_len: int = DEL_SUFFIX_LEN) -> dict[str, float]:
    """MemPi's filter thresholds scaled to ``suffix_len`` tokens: min_accuracy, min_distinct, max_distance."""
    scale = suffix_len / DEL_SUFFIX_LEN
    return {
        "min_accuracy": DEL_MIN_ACCURACY,
        "min_distinct": max(1, math.ceil(DEL_MIN_DISTINCT * scale - 1e-9)),
        "max_distance": max(0, round(DEL_MAX_DISTANCE * scale)),
    }


def distinct_count(tokens: Sequence) -> int:
    """Number of distinct tokens in a sequence."""
    return len(set(tokens))


def passes_del_filters(
    suffix_accuracy: float,
    greedy_suffix: Sequence,
    true_suffix: Sequence,
    distance: float,
    *,
    min_accuracy: float = DEL_MIN_ACCURACY,
    min_distinct: int = DEL_MIN_DISTINCT,
    max_distance: float = DEL_MAX_DISTANCE,
) -> bool:
    """Filters 1-3 of the DEL protocol for one sequence (accuracy, distinct tokens, Levenshtein)."""
    return (
        suffix_accuracy > min_accuracy
        and distinct_count(greedy_suffix) >= min_distinct
        and distinct_count(true_suffix) >= min_distinct
        and distance <= max_distance
    )


def jaccard_components(sequences: Sequence[Sequence], n: int = 5, threshold: float = 0.05) -> list[list[int]]:
    """Connected components of the graph joining two sequences whose n-gram Jaccard exceeds ``threshold``.

    Components are lists of indices in increasing order, sorted by their first index.
    """
    grams = [ngrams(s, n) for s in sequences]
    parent = list(range(len(sequences)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # candidate pairs share at least one n-gram (an inverted index avoids the all-pairs loop)
    index: dict[tuple, list[int]] = {}
    for i, g in enumerate(grams):
        for gram in g:
            index.setdefault(gram, []).append(i)
    pairs = {(a, b) for members in index.values() for ai, a in enumerate(members) for b in members[ai + 1 :]}
    for a, b in sorted(pairs):
        union = grams[a] | grams[b]
        if union and len(grams[a] & grams[b]) / len(union) > threshold:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    comps: dict[int, list[int]] = {}
    for i in range(len(sequences)):
        comps.setdefault(find(i), []).append(i)
    return sorted(comps.values(), key=lambda c: c[0])


def dedup_lowest_distance(
    sequences: Sequence[Sequence], distances: Sequence[float], n: int = 5, threshold: float = 0.05
) -> list[int]:
    """Filter 4 of DEL: the index of the lowest-distance member of each n-gram-Jaccard component (ties:
    the lower index), in increasing order."""
    keep = [min(comp, key=lambda i: (distances[i], i)) for comp in jaccard_components(sequences, n, threshold)]
    return sorted(keep)
