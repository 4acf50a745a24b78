"""`vlsi.demo.stats`: seed-level CIs, paired seed differences and TOST against scipy's t-tests; the cluster bootstrap
against a plain resampling loop; every test item's cluster."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from vlsi.demo.stats import MARGIN, cluster_bootstrap, paired_seeds, seed_mean, tost
from vlsi.demo.tasks import TASKS, _digits, make_split

SEEDS_A = [0.771, 0.768, 0.776, 0.781, 0.762, 0.774, 0.770, 0.779]
SEEDS_B = [0.769, 0.757, 0.735, 0.779, 0.752, 0.760, 0.772, 0.766]


def test_seed_mean_ci_is_scipys_t_interval():
    got = seed_mean(SEEDS_A)
    ref = scipy_stats.ttest_1samp(SEEDS_A, 0.0).confidence_interval(0.95)
    assert got["mean"] == pytest.approx(np.mean(SEEDS_A)) and got["n"] == 8
    assert (got["low"], got["high"]) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert seed_mean([0.7])["low"] is None, "one seed has no spread: no interval"


def test_paired_seeds_is_scipys_paired_t_test():
    got = paired_seeds(SEEDS_A, SEEDS_B)
    ref = scipy_stats.ttest_rel(SEEDS_A, SEEDS_B)
    ci = ref.confidence_interval(0.95)
    assert got["difference"] == pytest.approx(np.mean(np.subtract(SEEDS_A, SEEDS_B)))
    assert (got["low"], got["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert got["p"] == pytest.approx(ref.pvalue)
    assert got["per_seed"] == pytest.approx(list(np.subtract(SEEDS_A, SEEDS_B))) and got["n"] == 8
    same = tost(got["per_seed"])
    assert (got["equivalent"], got["p_tost"], got["margin"]) == (same["equivalent"], same["p"], MARGIN)
    with pytest.raises(ValueError, match="equally long"):
        paired_seeds([0.5], [0.5, 0.6])


@pytest.mark.parametrize("shift", [0.0, 0.012, 0.03, -0.015])
def test_tost_is_two_one_sided_scipy_t_tests(shift):
    diffs = list(np.subtract(SEEDS_A, SEEDS_B) - np.mean(np.subtract(SEEDS_A, SEEDS_B)) + shift)
    got = tost(diffs, MARGIN)
    lower = scipy_stats.ttest_1samp(diffs, -MARGIN, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(diffs, MARGIN, alternative="less").pvalue
    assert got["p"] == pytest.approx(max(lower, upper))
    assert got["equivalent"] == (max(lower, upper) < 0.05) and got["margin"] == MARGIN
    # the same decision as the 90 % t CI lying inside the margin
    ci = scipy_stats.ttest_1samp(diffs, 0.0).confidence_interval(0.90)
    assert got["equivalent"] == (-MARGIN < ci.low and ci.high < MARGIN)


def test_tost_decides_what_it_should():
    assert tost([0.001, -0.002, 0.003, 0.0, -0.001, 0.002, 0.001, -0.001])["equivalent"] is True
    assert tost([0.03, 0.025, 0.035, 0.04, 0.028, 0.031, 0.033, 0.029])["equivalent"] is False
    assert tost([0.01, -0.04, 0.05])["equivalent"] is False, "three noisy seeds cannot show equivalence"
    assert tost([0.01])["equivalent"] is None and tost([0.01])["p"] is None


def _plain_cluster_bootstrap(a, b, clusters, resamples, seed, confidence):
    """The same resampling as a loop: draw clusters with replacement, pool their items, take the mean difference."""
    names = sorted(set(clusters))
    members = {name: [k for k, c in enumerate(clusters) if c == name] for name in names}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(resamples, len(names)))
    estimates = []
    for row in draws:
        items = [k for j in row for k in members[names[j]]]
        estimates.append(np.mean([a[k] - b[k] for k in items]))
    tail = (1 - confidence) / 2
    return np.quantile(estimates, [tail, 1 - tail]), np.quantile(estimates, [0.05, 0.95])


def test_cluster_bootstrap_matches_a_plain_loop_and_is_deterministic():
    rng = np.random.default_rng(1)
    clusters = [f"c{k % 13}" for k in range(300)]
    skill = {f"c{k}": rng.uniform(0.2, 0.9) for k in range(13)}
    a = [int(rng.random() < skill[c] + 0.05) for c in clusters]
    b = [int(rng.random() < skill[c]) for c in clusters]
    got = cluster_bootstrap(a, b, clusters, resamples=500, seed=3)
    (low, high), (low90, high90) = _plain_cluster_bootstrap(a, b, clusters, 500, 3, 0.95)
    assert got["difference"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert (got["low"], got["high"]) == (pytest.approx(low), pytest.approx(high))
    assert got["equivalent"] == (-MARGIN < low90 and high90 < MARGIN)
    assert got["clusters"] == 13 and got["resamples"] == 500
    assert cluster_bootstrap(a, b, clusters, resamples=500, seed=3) == got
    assert cluster_bootstrap(a, b, clusters, resamples=500, seed=4) != got
    with pytest.raises(ValueError, match="equally long"):
        cluster_bootstrap([1, 0], [1, 0], ["x"])


def test_clusters_widen_the_interval_that_independent_items_would_give():
    """Items that rise and fall together: the same 1200 outcomes read as 1200 singletons give a narrower CI than
    read as their 24 clusters, and two identical models have a zero-width CI and are equivalent."""
    clusters = [f"p{k % 24}" for k in range(1200)]
    a = [int(k % 24 < 14) for k in range(1200)]  # a gets 14 of 24 patterns right, b 12: all-or-nothing per pattern
    b = [int(k % 24 < 12) for k in range(1200)]
    grouped = cluster_bootstrap(a, b, clusters)
    alone = cluster_bootstrap(a, b, [str(k) for k in range(1200)])
    assert grouped["high"] - grouped["low"] > 3 * (alone["high"] - alone["low"])
    same = cluster_bootstrap(a, a, clusters)
    assert same["low"] == same["high"] == 0.0 and same["equivalent"]


def test_every_item_names_its_cluster():
    _, target = _digits()
    items = make_split("test", 400, TASKS, ("number",))
    for item in items:
        values = [int(target[index]) for _, index in item.digits]
        if item.task == "compare":
            expected = f"compare {values[0]}-{values[1]}"
        elif item.task == "sequence":
            expected = f"sequence {values[0]}{values[1] - values[0]:+d}"
        elif item.task == "digit":
            expected = f"digit {values[0]}"
        else:
            expected = f"count {len(item.shapes)}"
        assert item.pattern == expected
    compare = {i.pattern for i in make_split("test", 2400, ("compare",), ("number",))}
    sequence = {i.pattern for i in make_split("test", 2400, ("sequence",), ("number",))}
    assert len(compare) == 90 and len(sequence) == 24, "every ordered digit pair; every (start, step) that fits"
