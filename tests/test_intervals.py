"""The exact (Clopper-Pearson) interval of an accuracy: closed forms at the ends, published
values, the defining tail probabilities computed independently with exact binomial sums,
symmetry, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from bastion.errors import ConfigError
from bastion.results.intervals import Estimate, clopper_pearson, count_of, format_interval


def _tail_ge(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def _tail_le(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))


def test_closed_forms_at_the_ends() -> None:
    """k = 0: [0, 1 - (alpha/2)^(1/n)]; k = n: [(alpha/2)^(1/n), 1]."""
    for n in (1, 10, 137):
        low, high = clopper_pearson(0, n)
        assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / n), abs=1e-12)
        low, high = clopper_pearson(n, n)
        assert high == 1.0 and low == pytest.approx(0.025 ** (1 / n), abs=1e-12)
    low, high = clopper_pearson(0, 10, level=0.9)
    assert high == pytest.approx(1 - 0.05 ** (1 / 10), abs=1e-12)


def test_published_value() -> None:
    """5 of 10: [0.187086, 0.812914] (R's binom.test(5, 10))."""
    low, high = clopper_pearson(5, 10)
    assert low == pytest.approx(0.187086, abs=1e-6) and high == pytest.approx(0.812914, abs=1e-6)


@pytest.mark.parametrize(("k", "n"), [(1, 10), (3, 7), (18, 100), (50, 100), (99, 100), (180, 1000)])
def test_bounds_solve_the_tail_equations(k: int, n: int) -> None:
    """The lower bound is the p with P(X >= k) = alpha/2, the upper the p with P(X <= k) = alpha/2."""
    low, high = clopper_pearson(k, n)
    assert low < k / n < high
    assert _tail_ge(k, n, low) == pytest.approx(0.025, abs=1e-9)
    assert _tail_le(k, n, high) == pytest.approx(0.025, abs=1e-9)


def test_symmetry_and_width() -> None:
    for k, n in ((0, 8), (3, 8), (4, 8), (17, 40)):
        low, high = clopper_pearson(k, n)
        mlow, mhigh = clopper_pearson(n - k, n)
        assert low == pytest.approx(1 - mhigh, abs=1e-12) and high == pytest.approx(1 - mlow, abs=1e-12)
    small, large = clopper_pearson(18, 100), clopper_pearson(180, 1000)
    assert small[1] - small[0] > large[1] - large[0]  # more points, narrower
    wide = clopper_pearson(18, 100, level=0.99)
    assert wide[0] < small[0] and wide[1] > small[1]


@pytest.mark.parametrize(("args", "match"), [
    ((11, 10), "k=11"), ((-1, 10), "k=-1"), ((0, 0), "n=0"), ((2.5, 10), "integer"), ((True, 3), "integer"),
])
def test_bad_counts_name_the_value(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        clopper_pearson(*args)


def test_bad_level() -> None:
    with pytest.raises(ConfigError, match="level=1.5"):
        clopper_pearson(1, 2, level=1.5)


def test_count_of_reads_only_fractions_of_n() -> None:
    assert count_of(0.6, 10) == 6 and count_of(0.0, 3) == 0 and count_of(1.0, 3) == 3
    assert count_of(0.25, 13) is None and count_of(float("nan"), 5) is None and count_of(0.5, 0) is None
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(10_000, generator=g) < 0.37
    assert count_of(float(mask.float().mean()), 10_000) == int(mask.sum())  # a float32 mean still counts


def test_format_interval_rounds_outwards() -> None:
    assert format_interval(0.18, (0.14849, 0.21651)) == "18.0 [14.8, 21.7]"
    assert format_interval(0.5, (0.25, 0.75)) == "50.0 [25.0, 75.0]"
    assert format_interval(0.123, None) == "12.3"
    assert str(Estimate(0.0, (0.0, 0.3085))) == "0.0 [0.0, 30.9]"
