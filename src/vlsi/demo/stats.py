"""The statistics of the demo, the study and the ablation: pure functions on accuracies and 0/1 outcomes.

Seeds are the independent replicates (each trains every student afresh); the test items are not: items of the same
task and pattern (`tasks.Item.pattern`: the digit pair of a compare question, the (start, step) of a sequence) are
answered right or wrong together, so counting 1200 items as 1200 independent trials overstates the evidence.

    seed_mean(values)                        mean over seeds with a t-based 95 % CI
    paired_seeds(a, b, margin)               the seed-level mean difference a - b (same seeds), its t CI, a paired
                                             t-test's p and TOST equivalence within +-margin
    tost(differences, margin)                two one-sided t-tests: is the mean difference inside (-margin, margin)?
    cluster_bootstrap(a, b, clusters, ...)   one seed's paired difference on the same items, a percentile CI from
                                             resampling whole clusters, and the same equivalence read off its 90 % CI
    paired(a, b)                             item-level: difference, SE and McNemar's exact p, all of which treat the
                                             items as independent (reported as such, never as the headline)
"""

from __future__ import annotations

import math
import statistics

import numpy as np
from scipy.stats import t as student_t

MARGIN = 0.02  # equivalence margin: two points of accuracy, stated wherever an equivalence is claimed
CONFIDENCE = 0.95
RESAMPLES = 2000


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
    (the per-item differences' sample standard deviation / sqrt(n)) and McNemar's exact p-value. Item-level: both
    treat the items as independent, which clustered items are not (`cluster_bootstrap`)."""
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


def seed_mean(values: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean over seeds with the t-based CI mean +- t_{n-1} * std / sqrt(n): {"mean", "std", "n", "low", "high"};
    one seed has no spread to estimate, so its interval is None."""
    summary = mean_std(values)
    n = summary["n"]
    if n < 2:
        return {**summary, "low": None, "high": None}
    half = student_t.ppf(0.5 + confidence / 2, n - 1) * summary["std"] / math.sqrt(n)
    return {**summary, "low": summary["mean"] - half, "high": summary["mean"] + half}


def tost(differences: list[float], margin: float = MARGIN, alpha: float = 0.05) -> dict:
    """Two one-sided t-tests of the mean of `differences` (one per seed): H0 mean <= -margin and H0 mean >= margin.
    "equivalent within +-margin" holds when both are rejected at `alpha` (p = the larger one-sided p), which is the
    (1 - 2 alpha) t CI lying inside (-margin, margin). None of it with fewer than two seeds."""
    n = len(differences)
    if n < 2:
        return {"margin": margin, "p": None, "equivalent": None}
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    if sd == 0:  # every seed gives the same difference: no sampling spread to test against
        return {"margin": margin, "p": 0.0 if abs(mean) < margin else 1.0, "equivalent": abs(mean) < margin}
    se = sd / math.sqrt(n)
    p_lower = student_t.sf((mean + margin) / se, n - 1)  # H0: mean <= -margin
    p_upper = student_t.cdf((mean - margin) / se, n - 1)  # H0: mean >= +margin
    p = float(max(p_lower, p_upper))
    return {"margin": margin, "p": p, "equivalent": p < alpha}


def _t_test_p(mean: float, sd: float, n: int) -> float | None:
    """Two-sided p of a one-sample t-test of "mean 0" (None for one value; 1 or 0 when every value is the same)."""
    if n < 2:
        return None
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * student_t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def paired_seeds(a: list[float], b: list[float], margin: float = MARGIN, confidence: float = CONFIDENCE) -> dict:
    """The difference a - b of two methods' accuracies on the same seeds: {"difference" (mean over seeds), "low",
    "high" (t CI of it), "p" (two-sided paired t-test), "per_seed", "n", "margin", "equivalent" and "p_tost"
    (`tost` within +-margin)}."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired seeds need two equally long, non-empty accuracy lists ({len(a)} vs {len(b)})")
    diffs = [x - y for x, y in zip(a, b)]
    ci, equivalence = seed_mean(diffs, confidence), tost(diffs, margin)
    return {
        "difference": ci["mean"],
        "low": ci["low"],
        "high": ci["high"],
        "p": _t_test_p(ci["mean"], ci["std"], ci["n"]),
        "per_seed": diffs,
        "n": ci["n"],
        "margin": margin,
        "equivalent": equivalence["equivalent"],
        "p_tost": equivalence["p"],
    }


def cluster_bootstrap(
    a: list[int],
    b: list[int],
    clusters: list[str],
    *,
    margin: float = MARGIN,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict:
    """Accuracy of `a` minus `b` on the same items, with a percentile CI from resampling whole clusters (item i in
    `clusters[i]`) with replacement, `resamples` times, deterministic in `seed`. Each resample's difference is its
    items' mean difference. -> {"difference", "low", "high", "clusters", "resamples", "margin", "equivalent"};
    "equivalent" is a percentile-bootstrap TOST at 5 %: the 90 % interval inside (-margin, margin)."""
    if not (len(a) == len(b) == len(clusters)) or not a:
        raise ValueError(
            f"cluster bootstrap needs equally long, non-empty outcomes and clusters ({len(a)}, {len(b)}, "
            f"{len(clusters)})"
        )
    names, index = np.unique(np.asarray(clusters), return_inverse=True)
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)  # [items]
    sums = np.bincount(index, weights=diffs, minlength=len(names))  # [clusters]
    counts = np.bincount(index, minlength=len(names)).astype(float)  # [clusters]
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))  # [R, clusters]
    estimates = sums[draws].sum(1) / counts[draws].sum(1)  # [R]
    tail = (1 - confidence) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    tost_low, tost_high = np.quantile(estimates, [0.05, 0.95])
    return {
        "difference": float(diffs.mean()),
        "low": float(low),
        "high": float(high),
        "clusters": len(names),
        "resamples": resamples,
        "margin": margin,
        "equivalent": bool(-margin < tost_low and tost_high < margin),
    }
