"""experiments/kvm_crossover.py on the real KVM (skipped where /dev/kvm is absent or unusable)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import kvm_unusable

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.kvm
def test_kvm_crossover_quick(tmp_path):
    why = kvm_unusable()
    if why:
        pytest.skip(why)
    out = tmp_path / "x"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "kvm_crossover.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in ("runs.csv", "summary.csv", "crossover.csv", "summary.json", "kvm_crossover.png", "kvm_crossover.svg"):
        assert (out / f).stat().st_size > 0
    s = pd.read_csv(out / "summary.csv")
    cost = s[(s.metric == "cost_ns") & (s.policy == "targeted")].sort_values("slot_mib")
    # the targeted zap probes every gfn of the deleted slot: 4x the slot, several times the cost,
    # on the real KVM and in the simulator alike
    for col in ("real_median", "sim"):
        assert cost[col].iloc[-1] > 2 * cost[col].iloc[0]
    refaults = s[(s.metric == "refaults")]
    assert (refaults[refaults.policy == "targeted"].real_median == 0).all()
    assert (refaults[refaults.policy == "fast"].real_median > 0).all()
    assert set(pd.read_csv(out / "crossover.csv").columns) == {"ram_mib", "real_crossover_mib", "sim_crossover_mib"}


def test_kvm_crossover_bad_sizes(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "kvm_crossover.py"), "--slot-mib", "3,x",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--slot-mib" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
