"""experiments/seed_claims.py --quick: the table of the seed's claims vs the simulation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_seed_claims_quick(tmp_path):
    out = tmp_path / "claims"
    p = subprocess.run([sys.executable, str(ROOT / "experiments" / "seed_claims.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "The seed's claims vs desim" in p.stdout
    claims = pd.read_csv(out / "claims.csv")
    assert set(claims.claim) == {"6g-thp", "6g-4k", "32g-faults", "32g-boot"}
    assert list(claims.seed_claim[:4]) == [-0.14, -0.07, -0.50, -0.25]
    # the model must at least get the direction of every claim: targeted zap never costs more here
    assert (claims.simulated < 0).all()
    assert (claims.ci_low <= claims.simulated).all() and (claims.simulated <= claims.ci_high).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and len(summary["claims"]) == len(claims)
    runs = pd.read_csv(out / "runs.csv")
    assert {"workload", "backing", "policy", "replication", "faults", "after_firmware_ns"} <= set(runs.columns)
    assert (out / "claims.png").stat().st_size > 1000
