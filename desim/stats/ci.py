"""Confidence intervals for the outputs of independent replications.

A simulation run is one random sample of a metric (mean latency, p99, ...).
Running R independent replications gives R numbers; the question is how far
their average can be from the value an infinite number of runs would give.
A confidence interval answers it: with probability ``confidence`` (over the
randomness of the replications) the interval covers that true value.

* :func:`t_ci` -- the classical Student-t interval of a mean. Exact when the
  replication outputs are normal, and close for averages of many events by the
  central limit theorem (Law, *Simulation Modeling and Analysis*, 5th ed. 2015,
  sec. 4.5 and 9.4.1).
* :func:`paired_diff_ci` -- compare two policies run with common random numbers
  (replication i of both uses the same seed): take the per-replication
  differences and use the t interval of their mean (Law 2015, sec. 10.2.1,
  "paired-t confidence interval").
* :func:`ratio_ci` / :func:`relative_change_ci` -- the same comparison as a
  ratio ("policy B costs 0.83x of A"). Two estimators, which estimate
  *different* quantities:

  - ``method="log"``: t interval of mean(log b_i - log a_i), exponentiated.
    It estimates the **geometric mean of the per-replication ratios**
    exp(E[log(b/a)]). Needs strictly positive values. The interval is not
    symmetric around the estimate.
  - ``method="delta"``: the **ratio of means** mean(b) / mean(a), with the
    first-order (delta-method) variance of a ratio estimator using the paired
    covariance: Var(R) ~ sum((b_i - R a_i)^2) / ((n - 1) n mean(a)^2)
    (Cochran, *Sampling Techniques*, 3rd ed. 1977, sec. 6.3-6.4). Works for
    values of any sign as long as mean(a) != 0.

* :func:`bootstrap_ci` -- the percentile (and BCa) bootstrap for statistics
  with no usable closed form, such as a p99 pooled over all events (Efron &
  Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13-14).

Degenerate inputs do not crash: fewer than two samples give an interval with
infinite half-width, and samples that are all equal give half-width 0.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats as sps

ArrayLike = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Interval:
    """A confidence interval: ``low <= true value <= high`` with prob. ``confidence``.

    ``half_width`` is ``(high - low) / 2``; for asymmetric intervals (log-ratio,
    bootstrap) it is a summary and ``low``/``high`` are authoritative.
    """

    estimate: float
    low: float
    high: float
    half_width: float
    n: int
    confidence: float
    method: str = "t"

    @property
    def mean(self) -> float:
        """Alias of :attr:`estimate` (for intervals of a mean)."""
        return self.estimate

    @property
    def relative_half_width(self) -> float:
        """``half_width / |estimate|``: 0 if the half-width is 0, inf if the estimate is 0."""
        if self.half_width == 0.0:
            return 0.0
        if self.estimate == 0.0 or math.isnan(self.estimate):
            return math.inf
        return self.half_width / abs(self.estimate)

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies inside the closed interval."""
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-friendly), including ``relative_half_width``."""
        d = asdict(self)
        d["relative_half_width"] = self.relative_half_width
        return d


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def _as_1d(samples: ArrayLike, name: str = "samples") -> np.ndarray:
    x = np.asarray(samples, dtype=float).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _as_pair(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    xa, xb = _as_1d(a, "a"), _as_1d(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"paired samples need equal lengths, got {xa.size} and {xb.size}")
    return xa, xb


@lru_cache(maxsize=1024)
def t_quantile(confidence: float, df: int) -> float:
    """Two-sided Student-t critical value t_{df, 1 - (1 - confidence)/2}."""
    return float(sps.t.ppf(0.5 + confidence / 2.0, df))


def _infinite(estimate: float, n: int, confidence: float, method: str) -> Interval:
    return Interval(estimate, -math.inf, math.inf, math.inf, n, confidence, method)


def t_ci(samples: ArrayLike, confidence: float = 0.95) -> Interval:
    """Student-t confidence interval of the mean of i.i.d. ``samples``.

    mean +- t_{n-1, 1-alpha/2} * s / sqrt(n), with s the sample standard
    deviation (Law 2015, eq. 4.12).
    """
    _check_confidence(confidence)
    x = _as_1d(samples)
    n = int(x.size)
    if n == 0:
        return _infinite(math.nan, 0, confidence, "t")
    if n < 2:
        return _infinite(float(x[0]), n, confidence, "t")
    if np.ptp(x) == 0.0:  # all equal: exact, and avoids round-off "variance"
        v = float(x[0])
        return Interval(v, v, v, 0.0, n, confidence, "t")
    mean = float(x.mean())
    hw = t_quantile(confidence, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - hw, mean + hw, hw, n, confidence, "t")


def paired_diff_ci(a: ArrayLike, b: ArrayLike, confidence: float = 0.95) -> Interval:
    """Paired-t interval of mean(b - a); ``a`` is the baseline, ``b`` the alternative.

    ``a[i]`` and ``b[i]`` must come from the same replication (same seed), so
    their common noise cancels in the difference (Law 2015, sec. 10.2.1).
    """
    xa, xb = _as_pair(a, b)
    iv = t_ci(xb - xa, confidence)
    return Interval(iv.estimate, iv.low, iv.high, iv.half_width, iv.n, confidence, "paired-t")


def ratio_ci(
    a: ArrayLike, b: ArrayLike, confidence: float = 0.95, method: str = "log"
) -> Interval:
    """Interval of the ratio b/a (alternative over baseline) from paired replications.

    ``method="log"`` estimates the geometric mean of the ratios b_i/a_i
    (exp of the t interval of mean(log b_i - log a_i)); all values must be > 0.
    ``method="delta"`` estimates the ratio of means mean(b)/mean(a) with the
    delta-method standard error sqrt(sum((b_i - R a_i)^2) / (n-1) / n) / |mean(a)|
    (Cochran 1977, sec. 6.4) and a t_{n-1} critical value.
    """
    _check_confidence(confidence)
    xa, xb = _as_pair(a, b)
    n = int(xa.size)
    if method == "log":
        if n and (xa.min() <= 0.0 or xb.min() <= 0.0):
            raise ValueError(
                "ratio_ci(method='log') needs strictly positive values "
                f"(min a = {xa.min():g}, min b = {xb.min():g}); use method='delta' "
                "for the ratio of means, or paired_diff_ci for a difference"
            )
        iv = t_ci(np.log(xb) - np.log(xa), confidence)
        est = math.exp(iv.estimate) if n else math.nan
        low, high = math.exp(iv.low), math.exp(iv.high)
        hw = math.inf if math.isinf(iv.half_width) else (high - low) / 2.0
        return Interval(est, low, high, hw, n, confidence, "ratio-log")
    if method == "delta":
        if n == 0:
            return _infinite(math.nan, 0, confidence, "ratio-delta")
        mean_a = float(xa.mean())
        if mean_a == 0.0:
            raise ValueError("ratio_ci(method='delta') needs mean(a) != 0")
        r = float(xb.mean()) / mean_a
        if n < 2:
            return _infinite(r, n, confidence, "ratio-delta")
        resid = xb - r * xa
        se = float(resid.std(ddof=1)) / (math.sqrt(n) * abs(mean_a))
        hw = t_quantile(confidence, n - 1) * se
        return Interval(r, r - hw, r + hw, hw, n, confidence, "ratio-delta")
    raise ValueError(f"method must be 'log' or 'delta', got {method!r}")


def relative_change_ci(
    a: ArrayLike, b: ArrayLike, confidence: float = 0.95, method: str = "log"
) -> Interval:
    """Relative change of b over a as a fraction: :func:`ratio_ci` minus 1.

    -0.17 means "b is 17 % lower than a". The half-width is the ratio's; note
    that ``relative_half_width`` is then relative to the *change*, which blows
    up when the change is near 0 -- use the ratio interval for precision tests.
    """
    r = ratio_ci(a, b, confidence, method)
    return Interval(
        r.estimate - 1.0, r.low - 1.0, r.high - 1.0, r.half_width, r.n, confidence,
        f"relative-change-{method}",
    )


def bootstrap_ci(
    samples: ArrayLike,
    statistic: Callable[[np.ndarray], float] = np.mean,
    confidence: float = 0.95,
    n_boot: int = 2000,
    rng: np.random.Generator | int | None = None,
    method: str = "percentile",
) -> Interval:
    """Bootstrap interval of ``statistic(samples)`` (e.g. a p99).

    Draws ``n_boot`` resamples with replacement and takes the alpha/2 and
    1 - alpha/2 quantiles of the resampled statistic ("percentile", Efron &
    Tibshirani 1993, ch. 13) or their bias- and skew-corrected levels ("bca",
    ch. 14.3; needs n extra jackknife evaluations of ``statistic``, so use it
    for moderate n only). Deterministic for a given Generator state or int
    seed; ``rng=None`` draws fresh entropy.
    """
    _check_confidence(confidence)
    if method not in ("percentile", "bca"):
        raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    x = _as_1d(samples)
    n = int(x.size)
    name = f"bootstrap-{method}"
    theta = float(statistic(x)) if n else math.nan
    if n < 2:
        return _infinite(theta, n, confidence, name)
    if np.ptp(x) == 0.0:
        return Interval(theta, theta, theta, 0.0, n, confidence, name)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    boot = np.empty(n_boot)
    for i in range(n_boot):
        boot[i] = statistic(x[gen.integers(0, n, size=n)])
    alpha = 1.0 - confidence
    levels = np.array([alpha / 2.0, 1.0 - alpha / 2.0])
    if method == "bca":
        levels = _bca_levels(x, statistic, theta, boot, levels)
    low, high = (float(v) for v in np.quantile(boot, levels))
    return Interval(theta, low, high, (high - low) / 2.0, n, confidence, name)


def _bca_levels(
    x: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    theta: float,
    boot: np.ndarray,
    levels: np.ndarray,
) -> np.ndarray:
    """BCa-adjusted quantile levels (Efron & Tibshirani 1993, eqs. 14.9-14.15)."""
    b = boot.size
    frac = (np.sum(boot < theta) + 0.5 * np.sum(boot == theta)) / b
    frac = min(max(frac, 0.5 / b), 1.0 - 0.5 / b)  # keep z0 finite
    z0 = sps.norm.ppf(frac)
    jack = np.array([statistic(np.delete(x, i)) for i in range(x.size)])
    dev = jack.mean() - jack
    denom = 6.0 * float(np.sum(dev**2)) ** 1.5
    acc = float(np.sum(dev**3)) / denom if denom > 0 else 0.0
    z = sps.norm.ppf(levels)
    return sps.norm.cdf(z0 + (z0 + z) / (1.0 - acc * (z0 + z)))
