"""Means, standard errors and paired differences over items."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping


# ---------------------------------------------------------------------------------------------
# Aggregation


def paired_difference(a: Mapping[Any, float | None], b: Mapping[Any, float | None]) -> tuple[float, float, int]:
    """Mean ± standard error of the per-item difference a_i − b_i over the items both score (finite values).

    The paired comparison of two methods on the same items (Chang et al. 2024 compare methods with paired
    t-tests): item difficulty cancels, so two methods whose marginal error bars overlap can still be told
    apart. Returns (mean, stderr, n); (nan, nan, 0) without shared items, stderr 0 for n = 1.
    """
    shared = [k for k in a if k in b and _finite_number(a[k]) and _finite_number(b[k])]
    if not shared:
        return float("nan"), float("nan"), 0
    mean, se = mean_stderr(float(a[k]) - float(b[k]) for k in shared)
    return mean, se, len(shared)


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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


