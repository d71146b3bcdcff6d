"""The quantile sketch keeps its stated relative-error bound, merges exactly, and a run beyond the
exact-sample limit reports sketched percentiles within that bound while holding bounded memory."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from desim.errors import DesimInputError
from desim.metrics import Metrics
from desim.quantiles import LatencySamples, LogSketch, TimeHistogram

QS = (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)


def lower_quantile(x: np.ndarray, q: float) -> float:
    return float(np.sort(x)[math.floor(q * (len(x) - 1))])


@pytest.mark.parametrize("alpha", [0.005, 0.02])
@pytest.mark.parametrize("dist", ["lognormal", "pareto", "bimodal"])
def test_sketch_quantiles_are_within_alpha_of_the_exact_ones(alpha, dist):
    rng = np.random.default_rng(7)
    x = {"lognormal": rng.lognormal(8.0, 1.5, 50_000),
         "pareto": (rng.pareto(1.2, 50_000) + 1.0) * 900.0,
         "bimodal": np.concatenate([rng.normal(1500, 50, 40_000), rng.normal(2e6, 1e5, 10_000)])}[dist]
    sk = LogSketch(alpha)
    sk.add_many(x)
    for q, est in zip(QS, sk.quantiles(QS)):
        exact = lower_quantile(x, q)
        assert abs(est - exact) <= alpha * exact * (1 + 1e-12), (q, est, exact)
    assert sk.n == len(x) and sk.vmax == x.max() and sk.vmin == x.min()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.5, 1e9, allow_nan=False), min_size=1, max_size=300),
       st.lists(st.floats(0.5, 1e9, allow_nan=False), min_size=0, max_size=300))
def test_merge_equals_the_sketch_of_the_union_and_keeps_the_bound(a, b):
    sa, sb, su = LogSketch(), LogSketch(), LogSketch()
    sa.add_many(np.array(a))
    sb.add_many(np.array(b))
    su.add_many(np.array(b + a))
    sa.merge(sb)
    assert sa.n == su.n and sa.zeros == su.zeros
    assert np.array_equal(np.trim_zeros(sa.counts), np.trim_zeros(su.counts))
    assert sa.quantiles(QS) == su.quantiles(QS)
    x = np.array(a + b)
    for q, est in zip(QS, sa.quantiles(QS)):
        exact = lower_quantile(x, q)
        assert abs(est - exact) <= sa.alpha * exact * (1 + 1e-12)


def test_merging_different_accuracies_is_refused():
    with pytest.raises(ValueError):
        LogSketch(0.01).merge(LogSketch(0.02))


def test_zeros_and_weighted_counts():
    sk = LogSketch()
    sk.add_many(np.array([0.0, 0.0, 0.0, 100.0]))
    assert sk.quantiles([0.5]) == [0.0] and abs(sk.quantiles([1.0])[0] - 100.0) <= 0.5
    sk.add_weighted(200.0, 1000)
    assert abs(sk.quantiles([0.5])[0] - 200.0) <= 200.0 * sk.alpha and sk.n == 1004


def test_samples_are_exact_below_the_limit_and_sketched_beyond():
    rng = np.random.default_rng(3)
    x = rng.lognormal(9.0, 1.0, 5000)
    exact = LatencySamples(limit=10_000)
    for v in x:
        exact.values.append(v)
    assert exact.exact and exact.percentiles([50, 99]) == [float(p) for p in np.percentile(x, [50, 99])]
    small = LatencySamples(limit=1000)
    buf = small.values
    for i, v in enumerate(x):
        buf.append(v)
        if len(buf) > 1000:
            small.spill()
    assert not small.exact and len(small) == len(x) and small.values is buf
    assert small.max() == x.max() and abs(small.mean() - x.mean()) < 1e-6 * x.mean()
    for p, est in zip((50, 99), small.percentiles([50, 99])):
        ex = lower_quantile(x, p / 100)
        assert abs(est - ex) <= 0.005 * ex * (1 + 1e-12)


def test_time_histogram_widens_and_rebins():
    h = TimeHistogram(bins=16, width=1.0)
    t = np.arange(0.0, 100.0, 0.5)  # 200 events, 2 per ns
    h.add_many(t[:10])
    h.add_many(t[10:])
    assert h.counts.sum() == 200 and h.width == 8.0
    got = h.rebin(np.linspace(0.0, 128.0, 5))
    assert got.tolist() == [64, 64, 64, 8]
    other = TimeHistogram(bins=16, width=1.0)
    other.add_many(np.array([3.0]))
    h.merge(other)
    assert h.counts.sum() == 201 and h.counts[0] == 17


def test_a_run_beyond_the_limit_keeps_summary_metrics_and_refuses_raw_samples():
    m = Metrics(2, sample_limit=1000)
    rng = np.random.default_rng(5)
    lat = rng.lognormal(8.0, 1.0, 50_000)
    for i, v in enumerate(lat):
        m.record_fault(i % 2, "after_zap" if i % 3 == 0 else "first_touch", float(i) * 100.0, float(v))
        m.record_access_stall(float(i) * 100.0, float(v) + 50.0, 100.0)
    m.hit_ns[100.0] = m.hit_ns.get(100.0, 0) + 200_000
    m.completion_ns = 5_000_000.0
    s = m.summary()
    assert not m.exact and s["faults"] == 50_000
    for key, q in (("fault_latency_p50_ns", 0.5), ("fault_latency_p99_ns", 0.99), ("fault_latency_p999_ns", 0.999)):
        ex = lower_quantile(lat, q)
        assert abs(s[key] - ex) <= 0.005 * ex * (1 + 1e-12), key
    assert s["fault_latency_max_ns"] == lat.max() and abs(s["fault_latency_mean_ns"] - lat.mean()) < 1e-6 * lat.mean()
    assert s["access_stall_max_ns"] == lat.max() + 50.0
    assert s["access_latency_p50_ns"] == 100.0  # 150,000 hits of 100 ns dominate the 50,000 stalls
    edges, per_bin, refaults = m.faults_over_time(10)
    assert per_bin.sum() == 50_000 and refaults.sum() == 16_667 and edges[-1] == 5_000_000.0
    assert abs(per_bin[0] - 5000) <= 50  # uniform in time: 5,000 per bin, up to a native bin's width
    assert m.samples_nbytes < 200_000  # bounded: the last batch, sketches and histograms, not 50,000 x 33 bytes
    with pytest.raises(DesimInputError, match="sketch"):
        m.fault_latency  # noqa: B018
    with pytest.raises(DesimInputError):
        m.access_stall_time  # noqa: B018


def test_an_exact_run_reports_numpy_percentiles():
    m = Metrics(1)
    x = np.random.default_rng(1).lognormal(8.0, 1.0, 999)
    for i, v in enumerate(x):
        m.record_fault(0, "first_touch", float(i), float(v))
    s = m.summary()
    assert m.exact and s["fault_latency_p99_ns"] == float(np.percentile(x, 99))
    assert np.array_equal(np.frombuffer(m.fault_latency, dtype=np.float64), x)


def test_batched_recording_equals_one_by_one_and_spills_alike():
    rng = np.random.default_rng(2)
    t, lat = np.cumsum(rng.exponential(100.0, 3000)), rng.lognormal(7.0, 1.0, 3000)
    ref = rng.random(3000) < 0.3
    for limit in (10_000, 500):
        one, many = Metrics(1, sample_limit=limit), Metrics(1, sample_limit=limit)
        for a, b, r in zip(t, lat, ref):
            one.record_fault(0, "after_zap" if r else "first_touch", float(a), float(b))
            one.record_access_stall(float(a), float(b), 50.0)
        for s in range(0, 3000, 700):
            sl = slice(s, s + 700)
            many.record_faults(0, {"after_zap": int(ref[sl].sum()), "first_touch": int((~ref[sl]).sum())},
                               t[sl], lat[sl], ref[sl].astype(np.int8))
            many.record_access_stalls(t[sl], lat[sl], 50.0)
        assert one.summary() == many.summary() and one.exact == (limit > 3000)


def test_a_run_beyond_the_limit_is_sketched_alike_on_both_engines(monkeypatch):
    """A real run past the exact-sample limit (lowered here): both engines give the same sketched
    metrics, within the sketch's bound of the exact run's percentiles, the same counts."""
    from desim import quantiles
    from desim.vm import Vm

    from conftest import scenario

    sc = scenario(vcpus=2, ram_mib=8, kernel={"backing": "4k"},
                  phases=[{"name": "populate", "pattern": "sequential", "slot": 0, "sharing": "private"},
                          {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 3000,
                           "memslot_ops": [{"at_us": 50, "op": "toggle", "slot": 5, "gpa": 64 << 20,
                                            "size": 1 << 20, "hold_us": 20}]}])
    exact = Vm(sc, "fast", seed=3).run().metrics
    monkeypatch.setattr(quantiles, "EXACT_SAMPLE_LIMIT", 700)
    runs = {e: Vm(sc, "fast", seed=3, engine=e).run() for e in ("reference", "fast")}
    ref, fast = (runs[e].metrics for e in ("reference", "fast"))
    assert ref == fast and not runs["fast"].raw.exact and ref["faults"] > 2000
    for k in ("fault_latency_p50_ns", "fault_latency_p99_ns", "access_latency_p99_ns"):
        assert abs(ref[k] - exact[k]) <= 0.0051 * exact[k] or ref[k] == exact[k], k
    assert all(ref[k] == exact[k] for k in ("faults", "faults_after_zap", "completion_ns", "fault_latency_max_ns"))
