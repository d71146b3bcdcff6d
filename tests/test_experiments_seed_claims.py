"""experiments/seed_claims.py --quick: the seed's claims vs the simulation of recorded boots, explained."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

import desim

ROOT = Path(__file__).resolve().parents[1]


def test_seed_claims_quick(tmp_path):
    out = tmp_path / "claims"
    p = subprocess.run([sys.executable, str(ROOT / "experiments" / "seed_claims.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    assert "The seed's claims vs desim on recorded boots" in p.stdout
    claims = pd.read_csv(out / "claims.csv")
    assert set(claims.claim) == {"6g-thp", "6g-4k", "32g-faults", "32g-boot"}
    assert list(claims.seed_claim[:4]) == [-0.14, -0.07, -0.50, -0.25]
    # EPT violations: the targeted zap removes re-faults after the recorded BAR deletions
    faults = claims[claims.metric == "faults"]
    assert (faults.simulated < 0).all()
    assert (claims.ci_low <= claims.simulated).all() and (claims.simulated <= claims.ci_high).all()
    # every claim is explained: faults by cause, re-faults per deletion, and for boot time where the time goes
    assert "Where the differences come from:" in p.stdout
    for cid in ("6g-thp", "6g-4k", "32g-faults", "32g-boot"):
        assert f"[{cid}]" in p.stdout
    assert "re-faults" in p.stdout and "per Linux deletion" in p.stdout and "memslot ioctls" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and len(summary["claims"]) == len(claims)
    assert summary["model_version"] == desim.model_fingerprint()  # which code made it, as every summary.json says
    assert set(summary["explanations"]) == {"6g-thp", "6g-4k", "32g-faults", "32g-boot"}
    runs = pd.read_csv(out / "runs.csv")
    assert {"workload", "backing", "policy", "replication", "faults", "after_firmware_ns"} <= set(runs.columns)
    assert sorted(runs.replication.unique()) == [0, 1]              # two different recorded boots
    assert (out / "claims.png").stat().st_size > 1000
