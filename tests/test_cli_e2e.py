"""End to end: the two main commands through the installed console script."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd


def _desim(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("desim")
    cmd = [exe] if exe else [sys.executable, "-m", "desim.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)


def test_run_writes_summary_and_per_vcpu_csv(tmp_path):
    out = tmp_path / "run"
    p = _desim("run", "--policy", "targeted", "--seed", "2", "--out", str(out), "--set", "phases.1.accesses=20000")
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy"] == "targeted" and summary["seed"] == 2
    assert summary["metrics"]["faults"] > 0
    vc = pd.read_csv(out / "vcpus.csv")
    assert len(vc) == 4 and vc["faults"].sum() == summary["metrics"]["faults"]


def test_compare_prints_paired_cis_and_writes_tables(default_compare):
    stdout, stderr, code, out = default_compare  # `desim compare -n 2 --out DIR` (tests/conftest.py)
    assert code == 0, stderr
    assert "paired replications" in stdout and "faults" in stdout and "[" in stdout
    table = pd.read_csv(out / "comparison.csv")
    row = table.set_index("metric").loc["faults"]
    assert row["mean_targeted"] < row["mean_fast"] and row["diff_high"] < 0
    assert (out / "comparison.png").stat().st_size > 1000
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs.policy.unique()) == ["fast", "targeted"] and runs.replication.nunique() == 2
    # latency tails: percentile CIs over replications, per phase, around each DELETE
    assert "latency tails, pooled over replications" in stdout
    tails = pd.read_csv(out / "tails.csv")
    assert {"access/all", "fault/all", "fault/phase:populate", "stall/during_delete_move"} <= set(tails["class"])
    assert set(tails.percentile) == {50.0, 90.0, 99.0, 99.9}
    assert ((tails.fast_low <= tails.fast + 1e-9) & (tails.fast <= tails.fast_high + 1e-9)).all()
    for name in ("latency_percentiles.png", "latency_around_ops.png"):
        assert (out / name).stat().st_size > 1000
