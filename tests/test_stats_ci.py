"""Tests of desim.stats.ci against scipy, hand computations and coverage."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from desim.stats import (
    Interval,
    bootstrap_ci,
    paired_diff_ci,
    ratio_ci,
    relative_change_ci,
    t_ci,
)

DATA = [12.1, 9.8, 11.4, 10.9, 13.2, 8.7, 10.1, 11.8, 12.5, 9.9]
BASE = [10.0, 12.0, 9.0, 11.0, 10.5, 13.0, 8.0, 12.5]
ALT = [9.1, 11.2, 8.8, 10.1, 9.4, 12.0, 7.7, 11.0]


# --- exact values ----------------------------------------------------------

@pytest.mark.parametrize("conf", [0.90, 0.95, 0.99])
def test_t_ci_matches_scipy(conf: float) -> None:
    x = np.array(DATA)
    low, high = stats.t.interval(conf, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    iv = t_ci(x, conf)
    assert iv.estimate == pytest.approx(x.mean(), rel=1e-12)
    assert iv.low == pytest.approx(low, rel=1e-12)
    assert iv.high == pytest.approx(high, rel=1e-12)
    assert iv.half_width == pytest.approx((high - low) / 2, rel=1e-12)
    assert iv.n == 10 and iv.confidence == conf
    assert iv.relative_half_width == pytest.approx(iv.half_width / x.mean())


def test_t_ci_textbook_value() -> None:
    # mean 11.04, sum of squares 17.844, s = sqrt(17.844 / 9) = 1.408072,
    # t_{9, 0.975} = 2.262157 (t table) -> hw = 2.262157 * 1.408072 / sqrt(10) = 1.007274
    iv = t_ci(DATA)
    assert iv.mean == pytest.approx(11.04)
    assert iv.half_width == pytest.approx(1.007274, rel=1e-6)


def test_paired_diff_ci_manual() -> None:
    a, b = np.array(BASE), np.array(ALT)
    d = b - a
    n = len(d)
    mean = d.sum() / n
    s = math.sqrt(((d - mean) ** 2).sum() / (n - 1))
    hw = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    iv = paired_diff_ci(a, b)
    assert iv.estimate == pytest.approx(mean)
    assert iv.low == pytest.approx(mean - hw)
    assert iv.high == pytest.approx(mean + hw)
    assert iv.method == "paired-t"


def test_ratio_ci_log_known_data() -> None:
    # Every ratio is exactly 0.9 except noise in the logs: log-ratios known.
    a = np.array([1.0, 2.0, 4.0, 8.0])
    logr = np.array([-0.1, -0.2, 0.0, -0.1])
    b = a * np.exp(logr)
    hw_log = stats.t.ppf(0.975, 3) * logr.std(ddof=1) / 2.0
    iv = ratio_ci(a, b, method="log")
    assert iv.estimate == pytest.approx(math.exp(-0.1))
    assert iv.low == pytest.approx(math.exp(-0.1 - hw_log))
    assert iv.high == pytest.approx(math.exp(-0.1 + hw_log))
    assert iv.low < iv.estimate < iv.high


def test_ratio_ci_exact_ratio_has_zero_width() -> None:
    a = np.array([3.0, 5.0, 7.0])
    assert ratio_ci(a, 2 * a, method="log").half_width == pytest.approx(0.0, abs=1e-12)
    iv = ratio_ci(a, 2 * a, method="delta")
    assert iv.estimate == pytest.approx(2.0)
    assert iv.half_width == pytest.approx(0.0, abs=1e-12)


def test_ratio_ci_delta_manual() -> None:
    a, b = np.array(BASE), np.array(ALT)
    n = len(a)
    r = b.mean() / a.mean()
    var = (np.var(b, ddof=1) - 2 * r * np.cov(a, b)[0, 1] + r * r * np.var(a, ddof=1)) / (
        n * a.mean() ** 2
    )
    hw = stats.t.ppf(0.95, n - 1) * math.sqrt(var)
    iv = ratio_ci(a, b, 0.90, method="delta")
    assert iv.estimate == pytest.approx(r)
    assert iv.half_width == pytest.approx(hw, rel=1e-10)


def test_ratio_ci_log_rejects_non_positive() -> None:
    with pytest.raises(ValueError, match="strictly positive"):
        ratio_ci([1.0, 0.0, 2.0], [1.0, 1.0, 1.0], method="log")
    with pytest.raises(ValueError, match="method"):
        ratio_ci([1.0, 2.0], [1.0, 2.0], method="nope")
    with pytest.raises(ValueError, match="equal lengths"):
        ratio_ci([1.0, 2.0], [1.0, 2.0, 3.0])


def test_relative_change_is_ratio_minus_one() -> None:
    r = ratio_ci(BASE, ALT)
    c = relative_change_ci(BASE, ALT)
    assert c.estimate == pytest.approx(r.estimate - 1)
    assert (c.low, c.high) == pytest.approx((r.low - 1, r.high - 1))
    assert c.estimate < 0  # ALT is cheaper than BASE


def test_degenerate_inputs() -> None:
    one = t_ci([5.0])
    assert one.estimate == 5.0 and math.isinf(one.half_width) and one.n == 1
    assert math.isinf(one.relative_half_width)
    empty = t_ci([])
    assert empty.n == 0 and math.isinf(empty.half_width)
    const = t_ci([0.1] * 10)
    assert const.half_width == 0.0 and const.low == const.high == 0.1
    assert const.relative_half_width == 0.0
    assert t_ci([0.0, 0.0, 0.0]).relative_half_width == 0.0
    assert math.isinf(t_ci([-1.0, 1.0]).relative_half_width)
    assert math.isinf(ratio_ci([2.0], [3.0]).half_width)
    assert math.isinf(bootstrap_ci([2.0], rng=0).half_width)
    with pytest.raises(ValueError, match="NaN"):
        t_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        t_ci(DATA, 95)


def test_to_dict_round_trip() -> None:
    iv = t_ci(DATA)
    d = iv.to_dict()
    assert d["relative_half_width"] == iv.relative_half_width
    del d["relative_half_width"]
    assert Interval(**d) == iv


# --- coverage --------------------------------------------------------------

TRIALS = 2000


def _coverage(samples: np.ndarray, true_mean: float) -> float:
    return float(np.mean([t_ci(row).contains(true_mean) for row in samples]))


@pytest.mark.parametrize("n", [10, 20, 30])
def test_t_ci_coverage_normal(n: int) -> None:
    rng = np.random.default_rng(20240 + n)
    cov = _coverage(rng.normal(5.0, 2.0, size=(TRIALS, n)), 5.0)
    assert 0.93 <= cov <= 0.97, cov  # 95 % +- 2 % (about 4 binomial SEs)


def test_t_ci_coverage_exponential() -> None:
    # The t interval undercovers for skewed data at small n (Law 2015,
    # sec. 4.5): about 0.90 at n = 10 and 0.93 at n = 30 for the exponential,
    # approaching 0.95 as n grows. We check the band and the trend.
    rng = np.random.default_rng(7)
    cov = {n: _coverage(rng.exponential(1.0, size=(TRIALS, n)), 1.0) for n in (10, 30)}
    assert 0.88 <= cov[10] <= 0.93, cov
    assert 0.91 <= cov[30] <= 0.97, cov
    assert cov[30] > cov[10]


def test_paired_diff_ci_coverage() -> None:
    # Common random numbers: a and b share a large common noise term that the
    # pairing cancels; the difference itself is normal, so coverage should be
    # 95 %. Tolerance +-2.5 % (a bit looser: n varies 10..30 per trial).
    rng = np.random.default_rng(11)
    ns = rng.integers(10, 31, size=TRIALS)
    common = rng.normal(100.0, 20.0, size=(TRIALS, 30))
    a = common + rng.normal(0.0, 1.0, size=(TRIALS, 30))
    b = common - 0.5 + rng.normal(0.0, 1.0, size=(TRIALS, 30))
    hits = [paired_diff_ci(a[i, :k], b[i, :k]).contains(-0.5) for i, k in enumerate(ns)]
    assert 0.925 <= np.mean(hits) <= 0.975


def test_ratio_ci_coverage() -> None:
    # Lognormal pairs: log-ratio normal, so "log" covers the geometric mean
    # ratio 1.1 at 95 %; "delta" targets the ratio of means 1.1*exp(0.005)
    # and is approximate (+-2.5 %). 1000 trials of n = 20.
    rng = np.random.default_rng(5)
    a = rng.lognormal(3.0, 0.3, size=(1000, 20))
    b = a * rng.lognormal(math.log(1.1), 0.1, size=(1000, 20))
    log_cov = np.mean([ratio_ci(x, y).contains(1.1) for x, y in zip(a, b)])
    true_rom = 1.1 * math.exp(0.1**2 / 2)
    delta_cov = np.mean([ratio_ci(x, y, method="delta").contains(true_rom) for x, y in zip(a, b)])
    assert 0.93 <= log_cov <= 0.97
    assert 0.925 <= delta_cov <= 0.975


# --- bootstrap --------------------------------------------------------------

def _p99(x: np.ndarray) -> float:
    """``np.percentile(x, 99)`` (linear interpolation), computed the way numpy does but from a partial
    sort of the two order statistics it needs: ~5x faster, so the coverage test's 100,000 bootstrap
    evaluations take seconds (checked equal to numpy's, bit for bit, below)."""
    n = x.size
    v = 0.99 * (n - 1)
    i = int(math.floor(v))
    if i + 1 >= n:
        return float(np.max(x))
    part = np.partition(x, (i, i + 1))
    a, b = part[i], part[i + 1]
    g = v - i
    return float(a + (b - a) * g) if g < 0.5 else float(b - (b - a) * (1 - g))


def test_the_fast_p99_is_numpys() -> None:
    rng = np.random.default_rng(5)
    for n in (2, 3, 100, 101, 2000, 20000):
        for _ in range(20):
            x = rng.exponential(1.0, n)
            assert _p99(x) == float(np.percentile(x, 99)), n


def test_bootstrap_p99_contains_truth_and_is_deterministic() -> None:
    x = np.random.default_rng(99).exponential(1.0, size=20000)
    true_p99 = math.log(100.0)  # exponential(1) quantile
    iv = bootstrap_ci(x, _p99, n_boot=1000, rng=42)
    assert iv.contains(true_p99)
    assert iv.low < iv.estimate < iv.high
    assert iv.half_width < 0.25  # the sample is large, so the CI is narrow
    same = bootstrap_ci(x, _p99, n_boot=1000, rng=np.random.default_rng(42))
    assert same == iv
    assert bootstrap_ci(x, _p99, n_boot=1000, rng=43) != iv


def test_bootstrap_percentile_mean_close_to_t() -> None:
    x = np.random.default_rng(3).normal(50.0, 5.0, size=400)
    boot = bootstrap_ci(x, np.mean, n_boot=4000, rng=1)
    t = t_ci(x)
    assert boot.low == pytest.approx(t.low, abs=0.1 * t.half_width)
    assert boot.high == pytest.approx(t.high, abs=0.1 * t.half_width)


def test_bootstrap_bca_close_to_scipy() -> None:
    x = np.random.default_rng(8).exponential(2.0, size=150)
    ours = bootstrap_ci(x, np.mean, n_boot=5000, rng=2, method="bca")
    kwargs = {"n_resamples": 5000, "method": "BCa"}
    try:  # scipy >= 1.15 spells the generator argument `rng`
        res = stats.bootstrap((x,), np.mean, rng=np.random.default_rng(4), **kwargs)
    except TypeError:
        res = stats.bootstrap((x,), np.mean, random_state=np.random.default_rng(4), **kwargs)
    ref = res.confidence_interval
    width = ref.high - ref.low
    assert ours.low == pytest.approx(ref.low, abs=0.05 * width)
    assert ours.high == pytest.approx(ref.high, abs=0.05 * width)
    # BCa shifts right for right-skewed data relative to the symmetric t interval
    assert ours.high - ours.estimate > ours.estimate - ours.low


def test_bootstrap_zero_variance() -> None:
    iv = bootstrap_ci([3.0] * 50, _p99, rng=0)
    assert iv.low == iv.high == 3.0 and iv.half_width == 0.0


@pytest.mark.slow
def test_bootstrap_p99_coverage() -> None:
    # Percentile bootstrap of a p99 on n = 2000 exponentials: coverage should
    # be near nominal; loose band because the quantile bootstrap is discrete.
    rng = np.random.default_rng(123)
    true_p99 = math.log(100.0)
    hits = [
        bootstrap_ci(rng.exponential(1.0, 2000), _p99, n_boot=500, rng=rng).contains(true_p99)
        for _ in range(200)
    ]
    assert 0.88 <= np.mean(hits) <= 0.99
