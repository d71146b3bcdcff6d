"""experiments/recorded_time_map.py --quick: the recorded boot under two mappings of TCG time."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _run(out, *more):
    p = subprocess.run([sys.executable, str(ROOT / "experiments" / "recorded_time_map.py"), "--quick", "--out", str(out),
                        *more], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    return p


def test_time_map_quick(tmp_path):
    out, store = tmp_path / "tm", tmp_path / "store"
    first = _run(out, "--store", str(store), "--progress")
    assert "task/s" in first.stderr  # the progress bar of runs computed now
    t = pd.read_csv(out / "time_map.csv")
    assert list(t.time_map) == ["instructions 0.5 ns (default)", "recorded x 1 (TCG wall clock)"]
    # the TCG wall clock (with the plugin) is many times longer than the instruction-time replay
    assert t.fast_linux_s.iloc[1] > 5 * t.fast_linux_s.iloc[0]
    assert t.faults_change.str.startswith("-").all()              # the targeted zap still saves faults
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs.policy) == {"fast", "targeted"} and len(runs) == 4

    # --store keeps the 4 runs; a second run with that store takes them from there (it computes nothing, so it
    # shows no progress bar) and writes the same tables
    with sqlite3.connect(store / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4
    again = _run(tmp_path / "again", "--store", str(store), "--progress")
    assert "task/s" not in again.stderr, again.stderr[-2000:]
    assert (tmp_path / "again" / "runs.csv").read_text() == (out / "runs.csv").read_text()
    assert (tmp_path / "again" / "time_map.csv").read_text() == (out / "time_map.csv").read_text()

    # on a local Dask cluster: one cluster for all its runs (not one per time mapping), the same tables
    p = _run(tmp_path / "dask", "--workers", "2")
    assert p.stderr.count("desim: Dask") == 1, p.stderr[-2000:]
    assert (tmp_path / "dask" / "time_map.csv").read_text() == (out / "time_map.csv").read_text()
