"""Latency tails across replications (desim/tails.py): histograms, cluster-bootstrap CIs, around-ioctl series."""
from __future__ import annotations

import numpy as np
import pytest

from desim.tails import (
    LAT_EDGES, _hist, around_band, around_ops, format_tails, hist_percentile, latency_histograms, latency_samples,
    tails_table,
)
from desim.vm import run_scenario

from conftest import scenario


def test_histogram_percentiles_are_within_the_bin_width():
    x = np.random.default_rng(1).lognormal(np.log(3000), 0.6, 50_000)
    h = _hist(x)
    for q in (50, 90, 99, 99.9):
        assert hist_percentile(h, q) == pytest.approx(np.percentile(x, q), rel=0.025)
    assert np.isnan(hist_percentile(np.zeros(len(LAT_EDGES) - 1), 50))


def _rom_toggle(costs: str = "sampled"):
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0},
              {"name": "work", "pattern": "sequential", "slot": 0, "passes": 3,
               "memslot_ops": [{"at_us": 100, "op": "delete", "slot": 1}, {"at_us": 500, "op": "delete", "slot": 2}]}]
    return scenario(vcpus=2, ram_mib=16, profile="shadow-pvm", phases=phases, name="tails", costs=costs,
                    extra_slots=[{"id": 1, "gpa": 1 << 30, "size": 2 << 20},
                                 {"id": 2, "gpa": 2 << 30, "size": 2 << 20}])


def test_access_latency_counts_every_access_once():
    sc = _rom_toggle()
    res = run_scenario(sc, "fast", seed=2)
    h = latency_histograms(res.raw)
    assert h["access/all"].sum() == res.metrics["accesses"]
    assert h["fault/all"].sum() == res.metrics["faults"]
    assert h["stall/during_delete_move"].sum() > 0  # the fast zap's kick stalls a vCPU in the ioctl


def test_around_ops_shows_the_refault_storm_of_the_fast_zap_only():
    sc = _rom_toggle()
    fast = around_ops(run_scenario(sc, "fast", seed=2).raw, before_ns=50_000, after_ns=500_000, bins=55)
    targ = around_ops(run_scenario(sc, "targeted", seed=2).raw, before_ns=50_000, after_ns=500_000, bins=55)
    after = fast["edges_ns"][:-1] >= 0
    assert fast["faults_per_us"][after].sum() > 0 and targ["faults_per_us"][after].sum() == 0
    assert fast["stalled_vcpus"][after].max() > 0.5  # most of the time some vCPU is in a re-fault
    assert fast["stalled_vcpus"].max() <= 2.0 + 1e-9  # never more than the VM's vCPUs


def test_tails_table_is_deterministic_and_paired():
    sc = _rom_toggle()
    samples = {p: {r: latency_samples(run_scenario(sc, p, seed=3, replication=r)) for r in range(3)}
               for p in ("fast", "targeted")}
    t1 = tails_table(samples, n_boot=300, seed=1)
    t2 = tails_table(samples, n_boot=300, seed=1)
    assert t1.equals(t2)
    row = t1[(t1["class"] == "fault/phase:populate") & (t1.percentile == 50.0)].iloc[0]
    assert row.fast_low <= row.fast <= row.fast_high
    # the same work under common random numbers: the populate phase's faults are the same draws
    assert row.ratio == pytest.approx(1.0)
    same = tails_table({"fast": samples["fast"], "targeted": samples["fast"]}, n_boot=300)
    assert np.allclose(same.dropna(subset=["ratio"]).ratio, 1.0)
    assert np.allclose(same.dropna(subset=["ratio_low"]).ratio_low, 1.0)
    # printed in the comparison table's format: a unit column, CIs as [low to high], no unit inside
    text = format_tails(t1).splitlines()
    assert text[1].split()[:4] == ["class", "pct", "unit", "fast"] and "[95% CI]" in text[1]
    line = next(ln for ln in text if ln.startswith("fault/phase:populate") and " p50 " in ln)
    assert line.split()[2] in ("ns", "us", "ms") and " to " in line and "," not in line.split("[")[1]
    assert not any(u in line.split(None, 3)[3] for u in ("ns", "us", "ms"))
    x, mean, lo, hi = around_band(samples["fast"], "faults_per_us")
    assert len(x) == len(mean) and np.all(lo <= mean + 1e-9) and np.all(mean <= hi + 1e-9)
