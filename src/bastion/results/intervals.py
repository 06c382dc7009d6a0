"""Exact confidence intervals for accuracies measured on ``n`` points.

An accuracy of Bastion is a count: ``k`` of the ``n`` evaluation points were classified right
(clean) or stayed robust. Each point is one Bernoulli outcome, so the accuracy on the population
the points were drawn from has the exact (Clopper-Pearson, 1934) interval

    lower = Beta quantile(alpha / 2; k, n - k + 1)        (0 when k = 0)
    upper = Beta quantile(1 - alpha / 2; k + 1, n - k)    (1 when k = n)

with ``alpha = 1 - level``. It is conservative: its coverage is at least ``level`` for every
true accuracy. The outcome of a point of a random model (right in a strict majority of ``k``
queries, or robust to every draw the attack made) is still one Bernoulli outcome per point, so
the same interval applies to its rows. It covers the sampling of the points only, not the
randomness of the attack or of the model within a point.

* :func:`clopper_pearson`: the interval of ``k`` out of ``n``;
* :func:`count_of`: ``k`` from an accuracy that is a fraction of ``n`` points (None when it is not);
* :class:`Estimate`: an accuracy with its interval; :func:`format_interval` writes one as tables show it;
* :data:`LEVEL`: the level the database, the tables and the exports use (95%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bastion.errors import ConfigError

#: the confidence level of every stored and shown interval
LEVEL = 0.95

#: how far ``accuracy * n`` may be from an integer and still be read as a count (accuracies are
#: often the float32 mean of a mask: about 6e-8 relative error, times n)
_COUNT_TOLERANCE = 1e-3

Interval = tuple[float, float]


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> Interval:
    """The exact two-sided ``level`` interval ``(low, high)`` of a proportion from ``k``
    successes in ``n`` Bernoulli trials (Clopper and Pearson, Biometrika 1934).

    Raises :class:`~bastion.errors.ConfigError` unless ``0 <= k <= n``, ``n >= 1`` and
    ``0 < level < 1``.
    """
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ConfigError(f"clopper_pearson needs integer counts, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n < 1:
        raise ConfigError(f"n={n} must be >= 1 for an interval")
    if not 0 <= k <= n:
        raise ConfigError(f"k={k} must be between 0 and n={n}")
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ConfigError(f"level={level!r} must be between 0 and 1 (exclusive)")
    from scipy.stats import beta

    alpha = 1.0 - float(level)
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def count_of(accuracy: float, n: int) -> int | None:
    """The number of points ``k`` behind ``accuracy`` measured on ``n`` points, or None when
    ``accuracy * n`` is not (within rounding) a whole number in ``[0, n]`` -- then the accuracy
    is not a fraction of the points and has no interval."""
    if n < 1 or not math.isfinite(accuracy):
        return None
    k = round(accuracy * n)
    if abs(accuracy * n - k) > _COUNT_TOLERANCE or not 0 <= k <= n:
        return None
    return int(k)


@dataclass(frozen=True)
class Estimate:
    """An accuracy and its interval (None when the accuracy is not a count of points)."""

    accuracy: float
    interval: Interval | None

    def __str__(self) -> str:
        return format_interval(self.accuracy, self.interval)


def format_interval(value: float, interval: Interval | None) -> str:
    """``value`` in percent with its interval, the bounds rounded outwards to 0.1 so that the
    shown interval holds the exact one: ``"18.0 [14.7, 21.7]"`` (no interval: ``"18.0"``)."""
    if interval is None:
        return f"{100 * value:.1f}"
    low = math.floor(1000 * interval[0] + 1e-9) / 10
    high = math.ceil(1000 * interval[1] - 1e-9) / 10
    return f"{100 * value:.1f} [{low:.1f}, {high:.1f}]"


__all__ = ["LEVEL", "Estimate", "Interval", "clopper_pearson", "count_of", "format_interval"]
