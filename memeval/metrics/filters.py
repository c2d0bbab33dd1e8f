"""Which sequences count as memorized: MemPi's DEL filters (Chang et al. 2024 §4)."""

from __future__ import annotations

import math
from typing import Sequence

from memeval.metrics.sequences import ngrams


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


