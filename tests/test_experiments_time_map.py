"""experiments/recorded_time_map.py --quick: the recorded boot under two mappings of TCG time."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_time_map_quick(tmp_path):
    out = tmp_path / "tm"
    p = subprocess.run([sys.executable, str(ROOT / "experiments" / "recorded_time_map.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    t = pd.read_csv(out / "time_map.csv")
    assert list(t.time_map) == ["instructions 0.5 ns (default)", "recorded x 1 (TCG wall clock)"]
    # the TCG wall clock (with the plugin) is many times longer than the instruction-time replay
    assert t.fast_linux_s.iloc[1] > 5 * t.fast_linux_s.iloc[0]
    assert t.faults_change.str.startswith("-").all()              # the targeted zap still saves faults
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs.policy) == {"fast", "targeted"} and len(runs) == 4
