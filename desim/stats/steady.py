"""Steady-state analysis of one long run: warm-up truncation and batch means.

A simulation usually starts empty (cold caches, no queued work), so its first
observations are biased. MSER picks how many to throw away: truncating d
observations removes bias but leaves fewer data, and MSER balances the two by
minimising the squared standard error of the remaining mean,

    MSER(d) = sum_{j>d} (Z_j - mean(Z_{d+1..k}))^2 / (k - d)^2,

over d. MSER-5 (White 1997, "An effective truncation heuristic for bias
reduction in simulation output", Simulation 69(6):323-334; White, Cobb &
Spratt 2000, "A comparison of five steady-state truncation heuristics for
simulation", Proc. Winter Simulation Conference) applies it to the means Z_j
of consecutive batches of 5 observations, which smooths the noise. The search
is limited to the first half of the run; if the best d sits at that limit the
run is still trending (or too short) and the answer is flagged as unreliable.

Observations of one run are correlated, so the plain t interval is too narrow.
Non-overlapping batch means (Law, *Simulation Modeling and Analysis*, 5th ed.
2015, sec. 9.5.3) split the (truncated) run into k batches; with batches long
enough, the batch means are nearly independent and normal, and the t interval
of their mean is valid. The lag-1 autocorrelation of the batch means is
reported as a check: near 0 is good; clearly positive means the batches are too
short (too few observations per batch) for the interval to be trusted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from desim.stats.ci import Interval, t_ci

ArrayLike = Sequence[float] | np.ndarray


def _series(series: ArrayLike) -> np.ndarray:
    x = np.asarray(series, dtype=float).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("series contains NaN or infinite values")
    return x


@dataclass(frozen=True)
class Mser5Result:
    """MSER truncation of a series.

    ``truncation`` is in original observations (``batch_size *
    truncation_batches``); ``truncated_mean`` is the mean of
    ``series[truncation:]``. ``warning`` is True when the optimum is at the
    half-run search limit; ``message`` then says why.
    """

    truncation: int
    truncation_batches: int
    batch_size: int
    n: int
    truncated_mean: float
    untruncated_mean: float
    warning: bool
    message: str
    mser: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "truncation": self.truncation,
            "truncation_batches": self.truncation_batches,
            "batch_size": self.batch_size,
            "n": self.n,
            "truncated_mean": self.truncated_mean,
            "untruncated_mean": self.untruncated_mean,
            "warning": self.warning,
            "message": self.message,
        }


def mser_statistic(z: np.ndarray, d_max: int) -> np.ndarray:
    """MSER(d) of the values ``z`` for d = 0 .. d_max (in units of z)."""
    k = z.size
    c = z - z.mean()  # centring keeps the sums-of-squares formula accurate
    s1 = np.cumsum(c[::-1])[::-1]  # s1[d] = sum of c[d:]
    s2 = np.cumsum((c * c)[::-1])[::-1]
    m = k - np.arange(d_max + 1)
    ss = np.maximum(s2[: d_max + 1] - s1[: d_max + 1] ** 2 / m, 0.0)
    return ss / m.astype(float) ** 2


def mser5(series: ArrayLike, batch_size: int = 5) -> Mser5Result:
    """MSER-5 warm-up truncation point of ``series`` (White 1997; White et al. 2000).

    The series is cut into k = n // batch_size batches (a remainder of fewer
    than ``batch_size`` observations at the end is left out of the search but
    kept in ``truncated_mean``). The truncation d* minimises MSER(d) over
    d = 0 .. k // 2 batches (first minimum on ties).
    """
    x = _series(series)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    k = x.size // batch_size
    if k < 4:
        raise ValueError(
            f"MSER needs at least 4 batches of {batch_size} observations, got {x.size} observations"
        )
    z = x[: k * batch_size].reshape(k, batch_size).mean(axis=1)
    d_max = k // 2
    stat = mser_statistic(z, d_max)
    d = int(np.argmin(stat))
    warning = d >= d_max
    message = ""
    if warning:
        message = (
            f"MSER optimum at {d * batch_size} of {x.size} observations, the half-run "
            "limit: the series is still trending or the run is too short; the "
            "truncation is unreliable, run longer"
        )
    trunc = d * batch_size
    return Mser5Result(
        truncation=trunc,
        truncation_batches=d,
        batch_size=batch_size,
        n=int(x.size),
        truncated_mean=float(x[trunc:].mean()),
        untruncated_mean=float(x.mean()),
        warning=warning,
        message=message,
        mser=stat,
    )


@dataclass(frozen=True)
class BatchMeansResult:
    """Batch-means interval of a steady-state mean.

    ``interval.n`` is the number of batches. The first ``n_dropped``
    observations (the remainder of n / batch_size) are not used.
    """

    interval: Interval
    batch_size: int
    n_batches: int
    n_dropped: int
    lag1_autocorrelation: float
    batch_means: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval.to_dict(),
            "batch_size": self.batch_size,
            "n_batches": self.n_batches,
            "n_dropped": self.n_dropped,
            "lag1_autocorrelation": self.lag1_autocorrelation,
        }


def lag1_autocorrelation(y: ArrayLike) -> float:
    """Sample lag-1 autocorrelation sum((y_j - m)(y_{j+1} - m)) / sum((y_j - m)^2).

    NaN if fewer than 2 values or all values equal.
    """
    v = np.asarray(y, dtype=float)
    if v.size < 2:
        return math.nan
    c = v - v.mean()
    denom = float(np.dot(c, c))
    if denom == 0.0:
        return math.nan
    return float(np.dot(c[:-1], c[1:])) / denom


def batch_means(
    series: ArrayLike,
    n_batches: int = 20,
    batch_size: int | None = None,
    confidence: float = 0.95,
) -> BatchMeansResult:
    """Non-overlapping batch-means t interval of the mean of ``series`` (Law 2015, 9.5.3).

    Give either ``n_batches`` (default 20; batch size = n // n_batches) or
    ``batch_size`` (then n_batches = n // batch_size). Leftover observations
    are dropped from the *start* of the series, where residual warm-up bias
    would be. Pass an already truncated series (see :func:`mser5`).
    """
    x = _series(series)
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n_batches = x.size // batch_size
    else:
        if n_batches < 2:
            raise ValueError(f"n_batches must be >= 2, got {n_batches}")
        batch_size = x.size // n_batches
    if n_batches < 2 or batch_size < 1:
        raise ValueError(
            f"{x.size} observations are too few for {n_batches} batches of {batch_size}"
        )
    dropped = x.size - n_batches * batch_size
    y = x[dropped:].reshape(n_batches, batch_size).mean(axis=1)
    iv = replace(t_ci(y, confidence), method="batch-means")
    return BatchMeansResult(iv, batch_size, n_batches, dropped, lag1_autocorrelation(y), y)


def steady_state_ci(
    series: ArrayLike, n_batches: int = 20, confidence: float = 0.95
) -> tuple[Mser5Result, BatchMeansResult]:
    """MSER-5 truncation followed by batch means on the retained observations."""
    trunc = mser5(series)
    x = _series(series)[trunc.truncation :]
    return trunc, batch_means(x, n_batches=n_batches, confidence=confidence)
