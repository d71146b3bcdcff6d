"""Latency tails of `desim validate`: the simulated classes, rows, summary and plot (no KVM needed)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from desim.cli import main
from desim.profile import load_profile
from desim.kvm.latency import STALL_NS, TimedRun
from desim.kvm.scenario import named
from desim.kvm.simbridge import during_competing_task, sim_latency, to_sim_during
from desim.kvm.validate_tails import tail_rows, tails_summary, tails_why


def test_sim_latency_classes_of_a_small_scenario():
    sc = replace(named("outside"), name="small", ram_mib=16, vcpus=1)
    fast = sim_latency(sc.with_policy("fast"), access_ns=20.0)
    targ = sim_latency(sc.with_policy("targeted"), access_ns=20.0)
    assert len(fast["first_touch"]) == 16 * 256 and np.all(fast["first_touch"] > STALL_NS)
    assert len(fast["refault"]) > 0 and len(targ["refault"]) == 0  # the targeted zap of an untouched slot
    # the targeted zap's only stall is the kick of each memslot swap (kvm_arch_memslots_updated):
    # IPI delivery and exit, then VM entry, around one access; the fast zap's re-faults stall far longer
    costs = load_profile("shadow-pvm").costs  # sim_latency's default profile
    kick = costs["ipi_ack"].value + costs["vm_entry"].value
    assert targ["longest_stall"] == pytest.approx(20.0 + kick)
    assert fast["longest_stall"] > 10 * targ["longest_stall"]


def test_op_during_passes_gives_the_vmm_thread_a_competitor_when_threads_outnumber_cpus():
    """The harness runs no spinners during the op: each vCPU thread stays runnable, so with more threads
    (vCPUs + the VMM) than host CPUs the zapping thread gets need_resched() at a tick (desim.sched)."""
    assert during_competing_task(2, host_cpus=2) and not during_competing_task(1, host_cpus=2)
    assert not during_competing_task(7, host_cpus=8) and during_competing_task(8, host_cpus=8)
    sc = replace(named("outside"), name="small", ram_mib=16, vcpus=2)
    assert to_sim_during(sc, host_cpus=2).model_dump()["profile_overrides"]["kernel"]["competing_task"] is True
    assert to_sim_during(sc, host_cpus=4).model_dump()["profile_overrides"]["kernel"]["competing_task"] is False


def _run(first: float, refault: float, hit: float, longest: float) -> TimedRun:
    rng = np.random.default_rng(1)
    r = TimedRun(metrics={"warm_ns": 0}, longest_stall_ns=longest / 100, longest_stall_raw_ns=longest,
                 during_accesses=10)  # the row takes the raw slowest access (spins hide from the filter)
    r.samples = {"first_touch": first * rng.lognormal(0, 0.1, 2000), "refault": refault * rng.lognormal(0, 0.1, 2000),
                 "hit": np.full(2000, hit), "during_op": np.zeros(0)}
    return r


def test_rows_compare_pooled_percentiles_against_targets(monkeypatch, tmp_path):
    sc = replace(named("outside"), name="fake", ram_mib=16, vcpus=1)

    def fake_sim(sc, profile, seed, replication, access_ns):
        rng = np.random.default_rng(2)
        return {"first_touch": 4000 * rng.lognormal(0, 0.1, 3000), "refault": 9000 * rng.lognormal(0, 0.1, 3000),
                "during_op": np.zeros(0), "longest_stall": 50_000.0}
    monkeypatch.setattr("desim.kvm.validate_tails.sim_latency", fake_sim)
    real = [{p: [_run(4000, 3000, 20, 50_000), _run(4000, 3000, 20, 60_000)] for p in ("fast", "targeted")}]
    rows = tail_rows([sc], real, "legacy-2020")  # a profile without [harness]: hits at their mean
    by = {(r["policy"], r["class"], r["stat"]): r for r in rows}
    assert by[("fast", "first_touch", "p50")]["within"]
    assert not by[("fast", "refault", "p50")]["within"] and by[("fast", "refault", "p50")]["rel_error"] > 1.5
    assert by[("fast", "hit", "p50")]["within"]  # the model's hits take the real hits' mean
    assert by[("fast", "during_op", "longest")]["real"] == pytest.approx(55_000)
    assert ("fast", "first_touch", "p99.9") in by and ("fast", "during_op", "p50") not in by  # too few
    line = tails_summary(rows)
    assert line.startswith("tails: ") and "p50 " in line and "worst" in line and "refault" in line
    from desim.tailplots import plot_validation_tails

    # what misses says why: here the re-faults' body (the fault path fitted in another session)
    why = tails_why(rows)
    assert any("refault p50" in w and "another session" in w for w in why)
    assert not any("hits are drawn" in w for w in why)  # the hit rows are within target here
    plot_validation_tails(rows, tmp_path / "t.png", notes=why)
    assert (tmp_path / "t.png").stat().st_size > 1000


@pytest.mark.parametrize("args,msg", [(["--no-tails", "--tails-only"], "at most one"),
                                      (["--tail-repeats", "0"], "--tail-repeats must be >= 1")])
def test_validate_tail_options_are_checked_before_any_vm(args, msg, capsys):
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_simulated_hits_follow_the_profiles_harness_shape(monkeypatch, tmp_path):
    """The hit rows: the shape calibrate measured of the harness's guest (the profile's [harness]
    access_dist) at the scenario's mean hit; the mirrored scenario carries it as its access_dist."""
    from importlib import resources

    from desim.hitdist import shape_percentiles
    from desim.kvm.simbridge import to_sim

    base = resources.files("desim.profiles").joinpath("shadow-pvm.toml").read_text()
    base = base.split("\n[harness]")[0]  # this test's own shape, whatever the shipped profile has
    prof = tmp_path / "p.toml"
    prof.write_text(base + '\n[harness]\naccess_dist = { kind = "quantiles", p = [0.0, 0.5, 0.9, 0.99, 1.0], '
                    'ns = [30.0, 45.0, 55.0, 250.0, 700.0] }\n')
    sc = replace(named("outside"), name="fake", ram_mib=16, vcpus=1)
    shape = to_sim(sc, str(prof)).access_dist
    assert shape is not None and shape.ns[3] == 250.0
    assert to_sim(sc, "legacy-2020").access_dist is None  # no [harness]: every hit takes access_ns
    assert to_sim(replace(named("thp"), ram_mib=16, vcpus=1), str(prof)).access_dist is None  # no THP shape here
    monkeypatch.setattr("desim.kvm.validate_tails.sim_latency",
                        lambda *a, **k: {"first_touch": np.full(3000, 5000.0), "refault": np.full(3000, 9000.0),
                                         "during_op": np.zeros(0), "longest_stall": 1.0})
    rng = np.random.default_rng(3)
    real_hits = np.interp(rng.random(5000), [0.0, 0.5, 0.9, 0.99, 1.0], [30.0, 45.0, 55.0, 250.0, 700.0])
    runs = [_run(5000, 9000, 50, 1.0) for _ in range(2)]
    for r in runs:
        r.samples["hit"] = real_hits
    rows = tail_rows([sc], [{p: runs for p in ("fast", "targeted")}], str(prof))
    hit = {r["stat"]: r for r in rows if r["class"] == "hit" and r["policy"] == "fast"}
    want = shape_percentiles(shape, float(real_hits.mean()))
    assert [hit[s]["sim"] for s in ("p50", "p90", "p99", "p99.9")] == pytest.approx(want)
    assert all(hit[s]["within"] for s in ("p50", "p90", "p99", "p99.9"))
