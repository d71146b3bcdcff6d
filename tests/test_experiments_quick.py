"""The experiment scripts run end to end in their --quick form and their results make sense.

Each script runs once (module-scoped fixture) as a subprocess, as a user would
start it; the tests check the exit status, the output files, the columns and
points of the tidy tables, and one property the model must show.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
KiB, MiB = 1 << 10, 1 << 20
COMMON_FILES = ["runs.csv", "summary.csv", "comparison.csv", "summary.json"]
SUMMARY_COLUMNS = {"policy", "metric", "n", "mean", "ci_low", "ci_high", "half_width"}


def run_script(name: str, out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def check_files(out: Path, extra: list[str], figures: list[str]) -> None:
    for f in COMMON_FILES + extra:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f"missing {f}"
    for stem in figures:
        png = out / f"{stem}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"bad {png.name}"
        assert (out / f"{stem}.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


@pytest.fixture(scope="module")
def vcpu_scaling(tmp_path_factory):
    out = tmp_path_factory.mktemp("vcpu_scaling")
    return run_script("vcpu_scaling", out), out


@pytest.fixture(scope="module")
def slot_size(tmp_path_factory):
    out = tmp_path_factory.mktemp("slot_size_crossover")
    return run_script("slot_size_crossover", out), out


@pytest.fixture(scope="module")
def preemption(tmp_path_factory):
    out = tmp_path_factory.mktemp("preemption_lockbreak")
    return run_script("preemption_lockbreak", out), out


def test_vcpu_scaling_outputs(vcpu_scaling):
    proc, out = vcpu_scaling
    check_files(out, [], ["vcpu_scaling"])
    runs = pd.read_csv(out / "runs.csv")
    assert {"vcpus", "profile", "policy", "replication", "fault_latency_p50_ns", "fault_latency_p99_ns",
            "vcpu_stall_ns", "stall_per_vcpu_ns", "completion_ns", "faults"} <= set(runs.columns)
    assert sorted(runs.vcpus.unique()) == [1, 2, 4]
    assert set(runs.profile) == {"tdp-icelake", "legacy-2020"} and set(runs.policy) == {"fast", "targeted"}
    # one row per point x policy x replication
    assert len(runs) == 3 * 2 * 2 * runs.replication.nunique()
    assert not runs.duplicated(["vcpus", "profile", "policy", "replication"]).any()
    summary = pd.read_csv(out / "summary.csv")
    assert SUMMARY_COLUMNS | {"vcpus", "profile"} <= set(summary.columns)
    js = json.loads((out / "summary.json").read_text())
    assert js["experiment"] == "vcpu_scaling" and js["vcpus"] == [1, 2, 4]
    assert "fault latency p99" in proc.stdout and "workload completion time" in proc.stdout


def test_vcpu_scaling_fast_zap_refaults_more(vcpu_scaling):
    """Every option-ROM delete makes the fast zap drop the whole VM's SPTEs: more faults, paired, everywhere."""
    _, out = vcpu_scaling
    runs = pd.read_csv(out / "runs.csv")
    wide = runs.pivot_table(index=["vcpus", "profile", "replication"], columns="policy", values="faults")
    assert (wide["fast"] > wide["targeted"]).all(), wide
    assert (runs[runs.policy == "targeted"].faults_after_zap == 0).all()


def test_slot_size_outputs(slot_size):
    proc, out = slot_size
    check_files(out, ["crossover.csv"], ["slot_size_crossover"])
    runs = pd.read_csv(out / "runs.csv")
    assert {"slot_bytes", "profile", "policy", "replication", "memslot_ioctl_mean_ns", "zap_duration_total_ns",
            "faults", "work_faults", "completion_ns"} <= set(runs.columns)
    assert sorted(runs.slot_bytes.unique()) == [64 * KiB, MiB, 8 * MiB, 16 * MiB]
    assert len(runs) == 4 * 2 * 2 * runs.replication.nunique()
    cross = pd.read_csv(out / "crossover.csv")
    assert {"profile", "metric", "crossover"} <= set(cross.columns)
    assert set(cross.profile) == {"tdp-icelake", "legacy-2020"}
    js = json.loads((out / "summary.json").read_text())
    assert set(js["crossover"]) == {"tdp-icelake", "legacy-2020"}
    assert "crossover" in proc.stdout


def test_slot_size_targeted_zap_grows_with_slot(slot_size):
    """The targeted zap walks the slot: its duration grows with the slot's size (strictly, per MMU)."""
    _, out = slot_size
    runs = pd.read_csv(out / "runs.csv")
    t = runs[runs.policy == "targeted"].groupby(["profile", "slot_bytes"]).zap_duration_total_ns.mean()
    for prof in ("tdp-icelake", "legacy-2020"):
        d = t.loc[prof].sort_index().to_numpy()
        assert (d[1:] > d[:-1]).all(), (prof, d)
    # at the whole-RAM end nothing else is left to re-fault: both policies fault the same
    whole = runs[runs.slot_bytes == runs.slot_bytes.max()]
    assert (whole.groupby("policy").faults_after_zap.sum() == 0).all()


def test_preemption_outputs(preemption):
    proc, out = preemption
    check_files(out, ["fault_latency_samples.csv"],
                ["preemption_lockbreak", "fault_latency_cdf", "fault_latency_tail"])
    runs = pd.read_csv(out / "runs.csv")
    assert {"profile", "model", "policy", "replication", "lock_breaks", "resched_yields",
            "work_fault_latency_p99_ns", "work_fault_latency_max_ns", "lock_wait_fault_ns",
            "zap_duration_total_ns"} <= set(runs.columns)
    # tdp-icelake (6.12, PREEMPT_DYNAMIC) runs all six models; legacy-2020 (5.6, static) no lazy, no 6.10 dynamic
    models = runs.groupby("profile").model.unique()
    assert set(models["tdp-icelake"]) == {"none", "voluntary", "full", "lazy", "voluntary-6.10", "none+task"}
    assert set(models["legacy-2020"]) == {"none", "voluntary", "full", "none+task"}
    assert len(runs) == (6 + 4) * 2 * runs.replication.nunique()
    samples = pd.read_csv(out / "fault_latency_samples.csv")
    assert set(samples.model) == set(runs.model) and (samples.fault_latency_ns > 0).all()
    assert "no lock breaks for waiters" in proc.stdout


def test_preemption_lock_breaks_follow_the_model(preemption):
    """needbreak is false on none/voluntary (6.11+, or static before); full, lazy and a PREEMPT_DYNAMIC 6.10
    kernel break the write-locked targeted zap for the faults, which cuts their worst stall."""
    _, out = preemption
    runs = pd.read_csv(out / "runs.csv")
    assert (runs[runs.model.isin(["none", "voluntary"])].lock_breaks == 0).all()
    targeted = runs[runs.policy == "targeted"]
    assert (targeted[targeted.model.isin(["full", "lazy", "voluntary-6.10"])].lock_breaks > 0).all()
    mx = targeted.groupby(["profile", "model"]).work_fault_latency_max_ns.mean()
    for prof, model in (("tdp-icelake", "full"), ("tdp-icelake", "voluntary-6.10"), ("legacy-2020", "full")):
        assert mx[(prof, model)] < mx[(prof, "voluntary")]


def test_slot_size_flags_the_whole_ram_point_and_never_calls_it_a_crossover(slot_size):
    """--quick's 16 MiB point deletes the whole RAM: no guest accesses, so it is flagged and left out."""
    proc, out = slot_size
    for f in ("runs.csv", "summary.csv", "comparison.csv"):
        t = pd.read_csv(out / f)
        assert set(t.loc[t.degenerate, "slot_bytes"]) == {16 * MiB}, f
    cross = pd.read_csv(out / "crossover.csv")
    assert not (cross.crossover_bytes == 16 * MiB).any()
    assert "16 MiB *" in proc.stdout and "left out of the crossover" in proc.stdout
    js = json.loads((out / "summary.json").read_text())
    assert list(js["degenerate_points"]) == ["16 MiB"]


@pytest.mark.parametrize("name", ["vcpu_scaling", "slot_size_crossover", "preemption_lockbreak", "seed_claims",
                                  "recorded_time_map"])
@pytest.mark.parametrize("bad,field", [(["--replications", "0"], "--replications"), (["-n", "-2"], "--replications"),
                                       (["--workers", "0"], "--workers")])
def test_bad_run_options_get_one_line_and_no_output(name, bad, field, tmp_path):
    # every experiment script parses its run options the same way: one usage error naming the option, exit 2,
    # before any run (so nothing is written); --replications 0 used to run nothing and end in a traceback
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), "--quick", "--out", str(out), *bad],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"{name}.py: error: {field} must be >= 1" and "Traceback" not in proc.stderr
    assert not out.exists()
