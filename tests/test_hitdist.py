"""Hits as a distribution (desim/hitdist.py): exact mixture statistics, no effect on any timing, fitted shapes."""
from __future__ import annotations

import numpy as np
import pytest

from desim.hitdist import hit_histogram, mixture_percentiles, quantile_function, shape_percentiles
from desim.metrics import Metrics
from desim.profile import Dist
from desim.tails import LAT_EDGES, _hist, hist_percentile, latency_histograms
from desim.vm import run_scenario

from conftest import scenario

SHAPE = {"kind": "quantiles", "p": [0.0, 0.25, 0.5, 0.9, 0.99, 1.0], "ns": [20.0, 40.0, 40.0, 50.0, 230.0, 600.0]}
QS = (50, 90, 99, 99.9)


@pytest.mark.parametrize("dist", [Dist(**SHAPE), Dist(kind="lognormal", sigma=0.8)], ids=["table", "lognormal"])
def test_mixture_percentiles_are_those_of_drawing_every_hit(dist):
    rng = np.random.default_rng(0)
    hits = {100.0: 200_000, 50.0: 100_000}
    stalls = rng.lognormal(np.log(3000), 0.5, 20_000)
    draws = []
    for a, c in hits.items():
        p, x = quantile_function(dist, a)
        assert np.sum(np.diff(p) * (x[1:] + x[:-1]) / 2) == pytest.approx(a)  # access_ns stays the mean
        draws.append(np.interp(rng.random(c), p, x))
    pooled = np.concatenate(draws + [stalls])
    exact = mixture_percentiles(hits, dist, stalls, QS)
    assert exact == pytest.approx(list(np.percentile(pooled, QS)), rel=0.01)
    h = hit_histogram(hits, dist, LAT_EDGES) + _hist(stalls)
    assert h.sum() == pytest.approx(len(pooled))
    for q, e in zip(QS, exact):
        assert hist_percentile(h, q) == pytest.approx(e, rel=0.025)
    # an atom (the table's flat 40 ns between p 0.25 and 0.5) is a point mass
    assert shape_percentiles(Dist(**SHAPE), float(np.sum(np.diff(SHAPE["p"]) * (np.array(SHAPE["ns"][1:])
                             + np.array(SHAPE["ns"][:-1])) / 2)), (30, 45))[0] == pytest.approx(40.0)
    assert shape_percentiles(None, 51.0) == [51.0] * 4


def _scenario(**top):
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0, "access_ns": 50.0},
              {"name": "work", "pattern": "sequential", "slot": 0, "passes": 2, "access_ns": 80.0,
               "memslot_ops": [{"at_us": 50, "op": "delete", "slot": 1}]}]
    return scenario(vcpus=2, ram_mib=4, profile="shadow-pvm", phases=phases,
                    extra_slots=[{"id": 1, "gpa": 1 << 30, "size": 2 << 20}], **top)


def test_a_hit_shape_changes_only_the_access_latency_statistics():
    """access_ns stays a hit's mean: every time, count and fault latency of the run is unchanged; the
    per-access percentiles become those of the mixture; with costs = "mean" the shape is ignored."""
    plain = run_scenario(_scenario(), "fast", seed=4)
    shaped = run_scenario(_scenario(access_dist=SHAPE), "fast", seed=4)
    differ = {k for k in plain.metrics if plain.metrics[k] != shaped.metrics[k]}
    assert differ and differ <= {f"access_latency_{q}_ns" for q in ("p50", "p90", "p99", "p999")}
    m = shaped.raw
    stalls = np.frombuffer(m.access_stall, dtype=np.float64)
    assert [shaped.metrics[f"access_latency_{q}_ns"] for q in ("p50", "p90", "p99", "p999")] == \
        mixture_percentiles(m.hit_ns, Dist(**SHAPE), stalls, QS)
    # the shape's median is below its mean (the hits of the 80 ns touch dominate)
    assert shaped.metrics["access_latency_p50_ns"] < plain.metrics["access_latency_p50_ns"] == 80.0
    assert latency_histograms(m)["access/all"].sum() == pytest.approx(shaped.metrics["accesses"])
    mean = run_scenario(_scenario(access_dist=SHAPE, costs="mean"), "fast", seed=4)
    plain_mean = run_scenario(_scenario(costs="mean"), "fast", seed=4)
    assert mean.metrics == plain_mean.metrics


def test_the_sketch_of_a_long_run_reads_hits_from_their_shape():
    shape = Dist(**SHAPE)
    rng = np.random.default_rng(3)
    exact, sketched = Metrics(1), Metrics(1, sample_limit=500)
    stalls = rng.lognormal(8.0, 1.0, 5000)
    for m in (exact, sketched):
        m.hit_dist = shape
        for i, v in enumerate(stalls):
            m.record_access_stall(float(i), float(v), 60.0)
        m.hit_ns[60.0] += 50_000
    assert not sketched.exact and exact.exact
    for a, b in zip(sketched.access_latency_percentiles(), exact.access_latency_percentiles()):
        assert a == pytest.approx(b, rel=0.02)  # the sketch's 0.5% plus the hits' 4096 strata


def test_fitted_hit_shape_spreads_the_guest_clock_steps():
    """The timed guest's clock advances in 10 ns steps: 49.8% of hits read 40 ns, 42% 50 ns. Spread over
    their step, the median is ~45 ns, whichever side of 50% a run falls; the mean is kept."""
    from desim.kvm.fitdist import dequantize, fit_hit_dist, tick_ns

    rng = np.random.default_rng(1)
    steps = rng.choice([4, 5, 6, 25, 40], size=40_000, p=[0.498, 0.42, 0.052, 0.02, 0.01])
    x = steps * 10.0187 + rng.choice([0.0, 0.41], size=len(steps))  # whole cycles: 24.5-cycle steps
    assert tick_ns(x) == pytest.approx(10.0187, abs=0.3)
    assert tick_ns(rng.lognormal(4.0, 0.5, 10_000)) == 0.0  # a continuous clock has no step
    d = dequantize(x, tick_ns(x))
    assert d.mean() == pytest.approx(x.mean()) and 42 < np.median(d) < 48
    fit = fit_hit_dist([{"hit": x[:20_000]}, {"hit": x[20_000:]}], "test", resamples=20)
    dist = Dist(**{k: v for k, v in fit.items()})
    assert dist.table_mean() == pytest.approx(x.mean(), rel=0.02)
    assert 42 < shape_percentiles(dist, x.mean())[0] < 48 and "calibration scenario A" in dist.source


def test_thp_first_touch_table_is_the_host_allocation():
    from desim.kvm import fitdist
    from desim.profile import load_profile

    costs = {k: c.value for k, c in load_profile("shadow-pvm").costs.items()}
    access = 30.0
    const = access + sum(costs[k] for k in fitdist.EXIT_PATH) - costs["faultin_resident"]
    rng = np.random.default_rng(2)
    runs = [{"first_touch": np.concatenate([rng.gamma(20.0, 10_000.0, 256) + const,  # THP faults ~200 us
                                            np.full(5, 5_000.0)])} for _ in range(4)]  # 4 KiB page-table faults
    t = fitdist.fit_thp_table(runs, costs, access)
    allocs = np.concatenate([r["first_touch"][:256] for r in runs]) - const
    assert Dist(kind="quantiles", p=list(fitdist.P_GRID), ns=list(t)).table_mean() == pytest.approx(allocs.mean(), rel=0.01)
    assert t[fitdist.P_GRID.index(0.5)] == pytest.approx(np.median(allocs), rel=0.01)
    rd = fitdist.rdtsc_fault_means([{"refault": np.full(10, 3000.0), "first_touch": np.full(10, 5000.0)}],
                                   [{"retouch": np.full(4, access), "hit": np.full(4, access),
                                     "refaults": np.array([0])}], access, runs)
    assert rd["F2M"] == pytest.approx(allocs.mean() + const - access, rel=1e-3)
