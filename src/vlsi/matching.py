"""Adaptive layer matching (docs/METHOD.md#the-matching-algorithm) and its ablation baselines: which teacher target
layer each student target layer imitates, chosen from detached divergences D [t_l, t_s] (see
`vlsi.losses.divergence_matrix`)."""

from __future__ import annotations

import math
import operator
import typing
from collections.abc import Sequence

import torch
from torch import Tensor

from .config import Strategy, Temperature

STRATEGIES = typing.get_args(Strategy)
TEMPERATURES = typing.get_args(Temperature)


def match_probabilities(
    d_c: Tensor,
    strategy: str = "adaptive",
    temperature: str = "range_over_scale",
    scale: float = 2.0,
    eps: float = 1e-6,
    fixed_temperature: float = 1.0,
) -> Tensor:
    """Sampling distribution [n] (fp64) over candidates from their divergences d_c [n]: softmax(-d_c / T).

    "adaptive" sets T from the spread of d_c, "multinomial" uses `fixed_temperature`, "random" is uniform.
    """
    d_c = d_c.detach().double()
    if strategy == "random":
        return torch.full_like(d_c, 1.0 / d_c.numel())
    if strategy == "multinomial":
        t = fixed_temperature
    elif strategy == "adaptive":
        spread = d_c.max() - d_c.min()
        if temperature == "scale_over_range":
            # The paper's formula as printed (docs/METHOD.md#the-adaptive-temperature), T = scale / (spread + eps):
            # -d/T = -d * spread / scale. The logits then span spread^2 / scale: near-equal candidates are drawn
            # almost uniformly (explore), far-apart ones almost greedily; how sharp depends on the units of d (KL
            # values in nats).
            t = scale / (spread + eps)
        elif temperature == "range_over_scale":
            # Alternative reading, T = spread / scale: -d/T = -d * scale / spread, i.e. d min-max normalised to a
            # logit span of exactly `scale` (best candidate e^scale times likelier than the worst) whatever the
            # magnitude of d. eps keeps T > 0 when all candidates tie (then uniform).
            t = (spread + eps) / scale
        else:
            raise ValueError(f"unknown temperature {temperature!r}; expected one of {TEMPERATURES}")
    else:
        raise ValueError(f"strategy {strategy!r} does not sample; expected 'adaptive', 'multinomial' or 'random'")
    return torch.softmax(-d_c / t, dim=0)


def normalized_entropy(p: Tensor) -> Tensor:
    """Entropy of a distribution p [n] over log(n), as a 0-dim tensor: 1 = uniform, 0 = one-hot (and for n = 1).

    How sharp a match draw is, comparable between layers with different numbers of candidates."""
    n = p.numel()
    if n == 1:
        return p.new_zeros(())  # log(1) = 0: one candidate is no choice
    return torch.special.entr(p).sum() / math.log(n)  # entr(x) = -x ln x, entr(0) = 0


def _check_fixed(fixed: Sequence[int] | None, t_l: int, t_s: int) -> list[int]:
    if fixed is None:
        raise ValueError("strategy='fixed' needs fixed=[one teacher target-layer index per student target layer]")
    if len(fixed) != t_s:
        raise ValueError(f"fixed has {len(fixed)} entries but there are {t_s} student target layers")
    try:
        picks = [operator.index(j) for j in fixed]
    except TypeError:
        raise ValueError(f"fixed must hold integer teacher target-layer indices, got {list(fixed)}") from None
    bad = [j for j in picks if not 0 <= j < t_l]
    if bad:
        raise ValueError(f"fixed indices {bad} are outside the {t_l} teacher target layers (valid: 0..{t_l - 1})")
    return picks


def layer_match(
    d: Tensor,
    strategy: str = "adaptive",
    *,
    search_range: bool = True,
    order: bool = True,
    temperature: str = "range_over_scale",
    scale: float = 2.0,
    eps: float = 1e-6,
    fixed_temperature: float = 1.0,
    bottom_k: int = 3,
    fixed: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    return_probabilities: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[Tensor | None]]:
    """Teacher target layers matched to each student target layer i, in order, from divergences d [t_l, t_s].

    Returns one list per student layer: one index, or up to `bottom_k` for "bottom_k"; the loss of student layer i
    is the mean of its divergences to the listed teacher layers. Candidates for layer i are [lo, t_l - t_s + i]
    (`search_range`: room left for the later layers, else up to t_l - 1), lo = 1 + last pick (`order`, else 0;
    order without search range can run out, then only t_l - 1 remains). Strategies:
    "adaptive" / "multinomial" sample from `match_probabilities`, "bottom_k" takes the k smallest (ties: lower
    layer), "random" is uniform, "uniform" is i * (t_l // t_s) (always inside the candidates, so d is ignored),
    "fixed" returns `fixed` as given (search range and order do not apply).
    Sampling uses `generator`, which must be a CPU generator: d is copied to the CPU first.
    With `return_probabilities`, returns (matches, probabilities): per student layer the fp64 distribution [n_i]
    its pick was drawn from over its candidates, in layer order; None where the strategy does not sample.
    """
    if d.dim() != 2:
        raise ValueError(f"d must be [teacher target layers, student target layers], got shape {tuple(d.shape)}")
    t_l, t_s = d.shape
    if t_s > t_l:
        raise ValueError(f"{t_s} student target layers but only {t_l} teacher target layers; need t_s <= t_l")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown matching strategy {strategy!r}; expected one of {STRATEGIES}")
    if temperature not in TEMPERATURES:
        raise ValueError(f"unknown temperature {temperature!r}; expected one of {TEMPERATURES}")
    if scale <= 0 or fixed_temperature <= 0 or bottom_k < 1:
        raise ValueError(
            f"need scale > 0, fixed_temperature > 0, bottom_k >= 1; got {scale}, {fixed_temperature}, {bottom_k}"
        )
    if fixed is not None and strategy != "fixed":
        raise ValueError(f"fixed={list(fixed)} is only used with strategy='fixed', not {strategy!r}")
    if strategy == "fixed":
        matched = [[j] for j in _check_fixed(fixed, t_l, t_s)]
        return (matched, [None] * t_s) if return_probabilities else matched

    d = d.detach().to("cpu", torch.float64)  # [t_l, t_s]: tiny; one device sync here instead of one per layer
    step = t_l // t_s
    matched, probabilities = [], []
    lo = 0
    for i in range(t_s):
        hi = t_l - t_s + i if search_range else t_l - 1
        first = min(lo, hi) if order else 0  # candidates are first..hi
        d_c = d[first : hi + 1, i]  # [n]
        probs = None
        if strategy == "uniform":
            picks = [i * step]
        elif strategy == "bottom_k":
            picks = sorted((first + torch.argsort(d_c, stable=True)[:bottom_k]).tolist())
        else:
            probs = match_probabilities(d_c, strategy, temperature, scale, eps, fixed_temperature)
            picks = [first + int(torch.multinomial(probs, 1, generator=generator))]
        matched.append(picks)
        probabilities.append(probs)
        if order:
            lo = max(picks) + 1
    return (matched, probabilities) if return_probabilities else matched
