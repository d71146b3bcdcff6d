"""Common random numbers: on the default scenario the paired CI of the policy difference is narrower
with CRN (both policies draw the same guest behaviour) than with independent streams."""
from __future__ import annotations

import numpy as np

from desim.scenario import load_scenario
from desim.stats import paired_diff_ci
from desim.vm import run_scenario


def test_crn_narrows_the_paired_ci():
    sc = load_scenario().with_overrides({"phases.0.size": "16MiB", "phases.1.accesses": 8000})  # half-widths 19 vs 103
    n = 6
    fast = [run_scenario(sc, "fast", seed=21, replication=r).metrics["faults"] for r in range(n)]
    crn = [run_scenario(sc, "targeted", seed=21, replication=r).metrics["faults"] for r in range(n)]
    indep = [run_scenario(sc, "targeted", seed=22, replication=r).metrics["faults"] for r in range(n)]
    w_crn = paired_diff_ci(fast, crn).half_width
    w_indep = paired_diff_ci(fast, indep).half_width
    assert np.isfinite(w_indep) and w_crn < w_indep
