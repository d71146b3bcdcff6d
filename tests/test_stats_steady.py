"""Tests of desim.stats.steady: MSER-5 truncation and batch means."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import signal

from desim.stats import batch_means, lag1_autocorrelation, mser5, steady_state_ci, t_ci
from desim.stats.steady import mser_statistic


def ar1(rng: np.random.Generator, phi: float, shape: int | tuple[int, ...]) -> np.ndarray:
    """Stationary AR(1) x_t = phi x_{t-1} + e_t, e ~ N(0, 1), mean 0 (along the last axis)."""
    e = rng.normal(0.0, 1.0, shape)
    e[..., 0] /= math.sqrt(1.0 - phi * phi)  # start in the stationary distribution
    return signal.lfilter([1.0], [1.0, -phi], e, axis=-1)


def transient_series(seed: int, mu: float = 10.0) -> np.ndarray:
    """5000 AR(1) observations; the first 500 carry an offset decaying 10 -> 0."""
    t = np.arange(5000)
    offset = np.where(t < 500, 10.0 * (1.0 - t / 500.0), 0.0)
    return mu + offset + ar1(np.random.default_rng(seed), 0.7, 5000)


# --- MSER-5 ------------------------------------------------------------------

def test_mser_statistic_matches_definition() -> None:
    z = np.random.default_rng(0).normal(size=40)
    stat = mser_statistic(z, 20)
    for d in range(21):
        tail = z[d:]
        assert stat[d] == pytest.approx(((tail - tail.mean()) ** 2).sum() / tail.size**2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mser5_finds_known_transient(seed: int) -> None:
    r = mser5(transient_series(seed))
    # Truncation near the end of the transient (observation 500). MSER stops
    # a little early when the remaining offset is small next to the noise.
    assert 300 <= r.truncation <= 700, r.truncation
    assert r.truncation % 5 == 0 and r.truncation_batches == r.truncation // 5
    assert abs(r.truncated_mean - 10.0) < abs(r.untruncated_mean - 10.0)
    assert abs(r.truncated_mean - 10.0) < 0.2  # untruncated bias is 0.5
    assert not r.warning and r.message == ""


def test_mser5_warns_on_trend() -> None:
    x = 0.01 * np.arange(5000) + ar1(np.random.default_rng(4), 0.7, 5000)
    r = mser5(x)
    assert r.warning
    assert r.truncation == 2500
    assert "unreliable" in r.message


def test_mser5_stationary_series_keeps_most_data() -> None:
    rng = np.random.default_rng(5)
    results = [mser5(ar1(rng, 0.7, 2000)) for _ in range(50)]
    assert not any(r.warning for r in results)
    assert np.median([r.truncation for r in results]) < 500


def test_mser5_rejects_short_series() -> None:
    with pytest.raises(ValueError, match="at least 4 batches"):
        mser5(np.arange(19.0))


# --- batch means -------------------------------------------------------------

def test_batch_means_exact_layout() -> None:
    x = np.arange(103, dtype=float)  # 3 leftover observations dropped at the start
    r = batch_means(x, n_batches=10)
    assert r.batch_size == 10 and r.n_batches == 10 and r.n_dropped == 3
    expected = x[3:].reshape(10, 10).mean(axis=1)
    np.testing.assert_allclose(r.batch_means, expected)
    assert r.interval == replace(t_ci(expected), method="batch-means")
    assert r.interval.n == 10
    by_size = batch_means(x, batch_size=25)
    assert by_size.n_batches == 4 and by_size.n_dropped == 3


def test_lag1_autocorrelation_values() -> None:
    assert lag1_autocorrelation([1.0, -1.0, 1.0, -1.0]) == pytest.approx(-0.75)
    assert lag1_autocorrelation([1.0, 2.0, 3.0]) == pytest.approx(0.0)  # (-1*0 + 0*1) / 2
    assert math.isnan(lag1_autocorrelation([2.0, 2.0, 2.0]))
    y = np.random.default_rng(0).normal(size=50)
    c = y - y.mean()
    assert lag1_autocorrelation(y) == pytest.approx(np.sum(c[:-1] * c[1:]) / np.sum(c * c))


def test_batch_means_coverage_on_ar1() -> None:
    # AR(1) with phi = 0.9 (strongly correlated, true mean 0), 1000 runs of
    # 10000 observations, 20 batches of 500: batch means are then nearly
    # independent, so coverage should be close to 95 %. Tolerance +-3 %
    # (about 4 binomial SEs, plus the small residual correlation). The lag-1
    # autocorrelation of batch means is near its null expectation -1/k = -0.05.
    x = ar1(np.random.default_rng(10), 0.9, (1000, 10000))
    res = [batch_means(row, n_batches=20) for row in x]
    coverage = np.mean([r.interval.contains(0.0) for r in res])
    lag1 = np.mean([r.lag1_autocorrelation for r in res])
    assert 0.92 <= coverage <= 0.98, coverage
    assert abs(lag1) < 0.1, lag1
    # The naive t interval on raw observations badly undercovers here.
    naive = np.mean([t_ci(row).contains(0.0) for row in x[:200]])
    assert naive < 0.6


def test_batch_means_reports_correlation_of_short_batches() -> None:
    # Batches of 5 on phi = 0.9: batch means are strongly correlated and the
    # interval undercovers; the lag-1 statistic is what exposes it.
    x = ar1(np.random.default_rng(11), 0.9, (300, 2000))
    res = [batch_means(row, batch_size=5) for row in x]
    assert np.mean([r.lag1_autocorrelation for r in res]) > 0.5
    assert np.mean([r.interval.contains(0.0) for r in res]) < 0.8


def test_steady_state_ci_pipeline() -> None:
    trunc, bm = steady_state_ci(transient_series(6))
    assert 300 <= trunc.truncation <= 700
    assert bm.interval.contains(10.0)
    assert bm.n_batches == 20
    assert bm.to_dict()["interval"]["method"] == "batch-means"
