"""Layer matching against brute force: search ranges, order, sampling distributions, baselines, validation."""

import itertools
import math

import pytest
import torch

from vlsi.matching import layer_match, match_probabilities, normalized_entropy

SHAPES = [(1, 1), (3, 3), (5, 2), (7, 3), (8, 1), (20, 7)]  # (t_l, t_s)
VARIANTS = [
    {"strategy": "adaptive", "temperature": "scale_over_range"},
    {"strategy": "adaptive", "temperature": "range_over_scale"},
    {"strategy": "multinomial"},
    {"strategy": "bottom_k", "bottom_k": 1},
    {"strategy": "bottom_k", "bottom_k": 3},
    {"strategy": "random"},
    {"strategy": "uniform"},
]


def _d(t_l, t_s, seed):
    g = torch.Generator().manual_seed(seed)
    return 5 * torch.rand(t_l, t_s, generator=g)


def _window(lo, i, t_l, t_s, search_range, order):
    # brute-force candidate list for student layer i
    hi = t_l - t_s + i if search_range else t_l - 1
    if not order:
        return list(range(hi + 1))
    return list(range(lo, hi + 1)) or [hi]


@pytest.mark.parametrize("search_range, order", list(itertools.product([True, False], repeat=2)))
def test_picks_stay_in_range_ordered_and_feasible(search_range, order):
    for (t_l, t_s), variant, seed in itertools.product(SHAPES, VARIANTS, range(4)):
        g = torch.Generator().manual_seed(seed)
        matched = layer_match(_d(t_l, t_s, seed), search_range=search_range, order=order, generator=g, **variant)
        assert len(matched) == t_s
        lo = 0
        for i, picks in enumerate(matched):
            cands = _window(lo, i, t_l, t_s, search_range, order)
            k = variant.get("bottom_k", 1) if variant["strategy"] == "bottom_k" else 1
            assert len(picks) == min(k, len(cands)) and len(set(picks)) == len(picks)
            assert all(j in cands for j in picks), (variant, i, picks, cands)
            if search_range and order:  # never runs out: strictly after every earlier pick
                assert min(picks) >= lo
            if order:
                lo = max(picks) + 1


def _exact_joint(d, **kw):
    # t_s = 2 with search range and order: P(m0, m1) = P(m0) * P(m1 | candidates m0 + 1 .. t_l - 1)
    t_l = d.shape[0]
    p0 = match_probabilities(d[: t_l - 1, 0], **kw)
    joint = {}
    for m0 in range(t_l - 1):
        p1 = match_probabilities(d[m0 + 1 :, 1], **kw)
        for k, p in enumerate(p1):
            joint[(m0, m0 + 1 + k)] = float(p0[m0] * p)
    return joint


@pytest.mark.parametrize("temperature", ["scale_over_range", "range_over_scale"])
def test_empirical_frequencies_match_probabilities(temperature):
    # ("multinomial" shares this sampling path; its distribution is checked in test_adaptive_temperature_formulas)
    d = torch.tensor([[0.9, 1.3], [0.2, 0.4], [1.5, 0.1], [0.6, 0.8]])  # t_l = 4, t_s = 2
    kw = {"strategy": "adaptive", "temperature": temperature}
    joint = _exact_joint(d, **kw)
    draws = 8000  # std of a frequency <= 0.0056
    g = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(joint, 0)
    for _ in range(draws):
        (m0,), (m1,) = layer_match(d, generator=g, **kw)
        counts[(m0, m1)] += 1
    assert math.isclose(sum(joint.values()), 1.0)
    for pair, p in joint.items():
        assert abs(counts[pair] / draws - p) < 0.02, (pair, counts[pair] / draws, p)


def test_adaptive_temperature_formulas():
    d = torch.tensor([0.3, 1.1, 2.0, 0.7], dtype=torch.float64)
    spread, scale, eps = 1.7, 2.0, 1e-6
    # as printed: T = scale / (spread + eps)
    torch.testing.assert_close(
        match_probabilities(d, "adaptive", "scale_over_range", scale, eps),
        torch.softmax(-d * (spread + eps) / scale, 0),
    )
    # alternative: T = spread / scale, a logit span of exactly `scale`
    p = match_probabilities(d, "adaptive", "range_over_scale", scale, eps)
    torch.testing.assert_close(p, torch.softmax(-d * scale / (spread + eps), 0))
    torch.testing.assert_close(p.max() / p.min(), torch.tensor(math.exp(scale), dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(match_probabilities(d, "multinomial", fixed_temperature=0.5), torch.softmax(-d / 0.5, 0))


@pytest.mark.parametrize("temperature", ["scale_over_range", "range_over_scale"])
def test_adaptive_invariant_to_constant_shift_and_uniform_on_ties(temperature):
    d = torch.tensor([0.3, 1.1, 2.0, 0.7], dtype=torch.float64)
    p = match_probabilities(d, "adaptive", temperature)
    torch.testing.assert_close(match_probabilities(d + 7.5, "adaptive", temperature), p)
    assert p.argmax() == 0 and p.argmin() == 2
    torch.testing.assert_close(
        match_probabilities(torch.full((3,), 4.0), "adaptive", temperature),
        torch.full((3,), 1 / 3, dtype=torch.float64),
    )


def test_range_over_scale_ignores_units_of_d_and_scale_over_range_does_not():
    d = torch.tensor([0.3, 1.1, 2.0, 0.7], dtype=torch.float64)
    p = match_probabilities(d, "adaptive", "range_over_scale")
    torch.testing.assert_close(match_probabilities(10 * d, "adaptive", "range_over_scale"), p)
    sharper = match_probabilities(10 * d, "adaptive", "scale_over_range")
    assert sharper.max() > match_probabilities(d, "adaptive", "scale_over_range").max()


@pytest.mark.parametrize("search_range, order", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("k", [1, 3])
def test_bottom_k_picks_the_k_smallest(search_range, order, k):
    for (t_l, t_s), seed in itertools.product(SHAPES, range(3)):
        d = _d(t_l, t_s, seed)
        matched = layer_match(d, "bottom_k", bottom_k=k, search_range=search_range, order=order)
        lo = 0
        for i, picks in enumerate(matched):
            cands = _window(lo, i, t_l, t_s, search_range, order)
            expected = sorted(sorted(cands, key=lambda j: float(d[j, i]))[:k])
            assert picks == expected
            lo = max(picks) + 1


@pytest.mark.parametrize("search_range, order", list(itertools.product([True, False], repeat=2)))
def test_uniform_is_strided_and_ignores_d(search_range, order):
    for (t_l, t_s), seed in itertools.product(SHAPES, range(2)):
        matched = layer_match(_d(t_l, t_s, seed), "uniform", search_range=search_range, order=order)
        assert matched == [[i * (t_l // t_s)] for i in range(t_s)]


def test_random_covers_every_candidate():
    g = torch.Generator().manual_seed(0)
    d = torch.zeros(5, 2)
    d[0, 0] = -100.0  # a huge preference that "random" must ignore
    first = {layer_match(d, "random", generator=g)[0][0] for _ in range(300)}
    assert first == {0, 1, 2, 3}  # search range leaves teacher layer 4 for the second student layer
    anywhere = {layer_match(d, "random", search_range=False, order=False, generator=g)[1][0] for _ in range(300)}
    assert anywhere == {0, 1, 2, 3, 4}


def test_fixed_returns_the_given_layers_and_validates():
    d = torch.rand(5, 3)
    assert layer_match(d, "fixed", fixed=[4, 0, 2]) == [[4], [0], [2]]
    with pytest.raises(ValueError, match="needs fixed"):
        layer_match(d, "fixed")
    with pytest.raises(ValueError, match="3 student target layers"):
        layer_match(d, "fixed", fixed=[0, 1])
    with pytest.raises(ValueError, match=r"outside the 5 teacher target layers"):
        layer_match(d, "fixed", fixed=[0, 1, 5])
    with pytest.raises(ValueError, match=r"outside"):
        layer_match(d, "fixed", fixed=[-1, 1, 2])
    with pytest.raises(ValueError, match="integer"):
        layer_match(d, "fixed", fixed=[0, 1.5, 2])
    with pytest.raises(ValueError, match="only used with strategy='fixed'"):
        layer_match(d, "adaptive", fixed=[0, 1, 2])


def test_bad_shapes_and_options_raise():
    with pytest.raises(ValueError, match="need t_s <= t_l"):
        layer_match(torch.rand(3, 4))
    with pytest.raises(ValueError, match="got shape"):
        layer_match(torch.rand(3))
    with pytest.raises(ValueError, match="unknown matching strategy"):
        layer_match(torch.rand(3, 2), "greedy")
    with pytest.raises(ValueError, match="unknown temperature"):
        layer_match(torch.rand(3, 2), temperature="inverse")
    with pytest.raises(ValueError, match="bottom_k >= 1"):
        layer_match(torch.rand(3, 2), "bottom_k", bottom_k=0)
    with pytest.raises(ValueError, match="does not sample"):
        match_probabilities(torch.rand(3), "bottom_k")


@pytest.mark.parametrize("strategy", ["adaptive", "multinomial", "random"])
def test_same_seed_same_matching(strategy):
    d = _d(20, 7, seed=0)
    runs = [layer_match(d, strategy, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    draws = {str(layer_match(d, strategy, generator=torch.Generator().manual_seed(s))) for s in range(20)}
    assert len(draws) > 1  # and it does explore


def _entropy_brute_force(p):
    # float64, by hand: -sum p ln p over the non-zero entries, over ln(n)
    p = [float(x) for x in p]
    return 0.0 if len(p) == 1 else -sum(x * math.log(x) for x in p if x > 0) / math.log(len(p))


def test_normalized_entropy_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 20):
        for _ in range(5):
            p = torch.softmax(3 * torch.randn(n, generator=g, dtype=torch.float64), 0)
            assert normalized_entropy(p).item() == pytest.approx(_entropy_brute_force(p), rel=1e-12, abs=1e-15)
    assert normalized_entropy(torch.full((5,), 0.2, dtype=torch.float64)).item() == pytest.approx(1.0, rel=1e-12)
    assert normalized_entropy(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)).item() == 0.0  # 0 ln 0 = 0
    assert normalized_entropy(torch.tensor([1.0], dtype=torch.float64)).item() == 0.0  # one candidate: no choice


@pytest.mark.parametrize("search_range, order", list(itertools.product([True, False], repeat=2)))
def test_returned_probabilities_are_each_layers_draw(search_range, order):
    # the distribution over the brute-force candidate window, and the same picks as without return_probabilities
    for (t_l, t_s), variant, seed in itertools.product(SHAPES, VARIANTS, range(2)):
        d = _d(t_l, t_s, seed)
        kw = dict(search_range=search_range, order=order, **variant)
        plain = layer_match(d, generator=torch.Generator().manual_seed(seed), **kw)
        matched, probs = layer_match(d, generator=torch.Generator().manual_seed(seed), return_probabilities=True, **kw)
        assert matched == plain and len(probs) == t_s
        lo = 0
        for i, (picks, p) in enumerate(zip(matched, probs)):
            cands = _window(lo, i, t_l, t_s, search_range, order)
            if variant["strategy"] in ("adaptive", "multinomial", "random"):
                scoring = {k: v for k, v in variant.items() if k != "bottom_k"}
                torch.testing.assert_close(p, match_probabilities(d[cands, i], **scoring), rtol=0, atol=0)
            else:
                assert p is None
            lo = max(picks) + 1
    matched, probs = layer_match(torch.rand(5, 3), "fixed", fixed=[4, 0, 2], return_probabilities=True)
    assert matched == [[4], [0], [2]] and probs == [None, None, None]


def test_random_draws_are_uniform_and_sharp_multinomial_nearly_one_hot():
    d = _d(20, 7, seed=1)
    g = torch.Generator().manual_seed(0)
    _, probs = layer_match(d, "random", search_range=False, order=False, generator=g, return_probabilities=True)
    for p in probs:  # 20 candidates per layer
        assert normalized_entropy(p).item() == pytest.approx(1.0, rel=1e-12)
        assert p.max().item() == pytest.approx(1 / 20)
    _, probs = layer_match(d, "multinomial", fixed_temperature=1e-3, generator=g, return_probabilities=True)
    for p in probs:
        if p.numel() > 1:
            assert normalized_entropy(p).item() < 1e-3 and p.max().item() > 1 - 1e-6


@pytest.mark.parametrize("strategy", ["adaptive", "multinomial", "random"])
def test_one_candidate_has_entropy_zero(strategy):
    # t_l = t_s with search range and order: each student layer has exactly one teacher layer left
    matched, probs = layer_match(_d(4, 4, seed=0), strategy, generator=torch.Generator(), return_probabilities=True)
    assert matched == [[0], [1], [2], [3]]
    for p in probs:
        assert p.tolist() == [1.0] and normalized_entropy(p).item() == 0.0


def test_scale_over_range_is_near_uniform_on_small_kls_and_range_over_scale_is_not():
    # candidate KLs of 0.1-0.4 nats: T = 2 / 0.3 makes the logits span 0.045, T = 0.3 / 2 makes them span 2
    d = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    flat, sharp = (
        layer_match(d, temperature=t, search_range=False, generator=torch.Generator(), return_probabilities=True)[1][0]
        for t in ("scale_over_range", "range_over_scale")
    )
    assert normalized_entropy(flat).item() > 0.999 and flat.max().item() < 0.26
    assert normalized_entropy(sharp).item() < 0.9 and sharp.max().item() > 0.45
