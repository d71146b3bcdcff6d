"""Operational laws (Little, utilisation) hold exactly on every run of every shipped scenario."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from desim.laws import lock_laws_of_run
from desim.scenario import load_scenario

from test_engines_differential import assert_same, both

ROOT = Path(__file__).resolve().parents[1]
SHRINK = {  # small versions: the laws are exact, size does not matter
    "default": {"phases.0.size": "16MiB", "phases.1.accesses": 5000},
    "boot-6g": {"phases.0.accesses": 2000, "phases.0.touches.0.accesses": 1000, "phases.0.memslot_trace.scale": 0.02,
                "phases.1.size": "8MiB", "phases.1.touches.0.size": "8MiB", "phases.1.touches.1.size": "8MiB",
                "phases.3.accesses": 5000, "phases.4.size": "16MiB", "phases.4.touches.0.accesses": 2000},
}
SHRINK["boot-32g-churn"] = SHRINK["boot-6g"]
CASES = [("default", None), ("boot-6g", ROOT / "workloads/boot/assumed/boot-6g.toml"),
         ("boot-32g-churn", ROOT / "workloads/boot/assumed/boot-32g-churn.toml")]


@pytest.mark.parametrize("name,path", CASES)
@pytest.mark.parametrize("policy", ["fast", "targeted"])
@pytest.mark.parametrize("profile", ["tdp-icelake", "legacy-2020", "shadow-pvm"])
def test_lock_operational_laws(name, path, policy, profile):
    """The laws hold on the fast engine's run, and that run is the reference engine's, bit for bit (every shipped
    scenario here under every profile: shadow paging's boot with the targeted zap once differed)."""
    sc = load_scenario(path).with_overrides({**SHRINK[name], "profile": profile})
    ref, fast, _ = both(sc, policy)
    assert_same(ref, fast, f"{name}/{profile}/{policy}")
    m = json.loads(fast)["metrics"]
    for law, (lhs, rhs) in lock_laws_of_run(m).items():
        assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-12), law
