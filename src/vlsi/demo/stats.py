"""Paired comparison of two models on the same test items: difference, its standard error, McNemar's exact test.

    paired(a_hits, b_hits) -> {"difference", "se", "b_only", "a_only", "p_mcnemar"}

Pure functions on lists of 0/1 outcomes (one per item, the same items in the same order for both models).
"""

from __future__ import annotations

import math
import statistics


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: under "no difference" each of the
    n = a_only + b_only items that only one model got right is equally likely to favour either, so
    p = min(1, 2 * P[Binomial(n, 1/2) <= min(a_only, b_only)])."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(a: list[int], b: list[int]) -> dict:
    """Accuracy of `a` minus accuracy of `b` on the same items, with the standard error of that paired difference
    (the per-item differences' sample standard deviation / sqrt(n)) and McNemar's exact p-value."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs two equally long, non-empty outcome lists ({len(a)} vs {len(b)})")
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0
    a_only, b_only = diffs.count(1), diffs.count(-1)
    return {
        "difference": sum(diffs) / n,
        "se": se,
        "a_only": a_only,
        "b_only": b_only,
        "p_mcnemar": mcnemar_p(a_only, b_only),
    }


def mean_std(values: list[float]) -> dict:
    """{"mean", "std" (sample; 0 for one value), "n"}."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }
