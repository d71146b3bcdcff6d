"""The assumption-based boot workloads (workloads/boot/assumed/): they load, run (short versions, audited), and the fast-vs-targeted difference
comes from memslot deletions made after memory was populated."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from desim.scenario import load_scenario
from desim.vm import Vm

BOOT = Path(__file__).resolve().parents[1] / "workloads" / "boot" / "assumed"
SHORT = {"phases.0.accesses": 20000, "phases.0.touches.0.accesses": 5000, "phases.0.memslot_trace.scale": 0.05,
         "phases.1.size": "16MiB", "phases.1.touches.0.size": "16MiB", "phases.1.touches.1.size": "32MiB",
         "phases.3.accesses": 20000, "phases.4.size": "64MiB", "phases.4.touches.0.accesses": 10000}


_RUNS: dict[str, tuple] = {}


def _run(name, policy, backing="thp", **extra):
    """(the Vm, its metrics); each distinct run once per session (several tests use the same runs)."""
    key = json.dumps([name, policy, backing, extra], sort_keys=True)
    if key not in _RUNS:
        sc = load_scenario(BOOT / name).with_overrides({**SHORT, "profile_overrides.kernel.backing": backing, **extra})
        vm = Vm(sc, policy, seed=2, audit=True)
        _RUNS[key] = vm, vm.run().metrics
    return _RUNS[key]


@pytest.mark.parametrize("name", ["boot-6g.toml", "boot-32g-churn.toml"])
def test_boot_workload_runs_and_targeted_needs_fewer_faults(name):
    _, fast = _run(name, "fast")
    vm, targeted = _run(name, "targeted")
    assert targeted["faults"] < fast["faults"]
    assert fast["faults_first_touch"] == targeted["faults_first_touch"]      # same guest behaviour
    # the difference is re-faults after zaps (and the retries/spurious faults they cause), MMIO SPTEs included:
    # the fast zap drops them with the roots, so the next MMIO access is an EPT violation again
    diff = fast["faults"] - targeted["faults"]
    zap_related = sum(fast[f"faults_{c}"] - targeted[f"faults_{c}"]
                      for c in ("after_zap", "retry", "spurious", "mmio"))
    assert zap_related == diff
    assert fast["faults_after_zap"] > targeted["faults_after_zap"]
    assert vm.audit.deletes == fast["zaps_fast"] == targeted["zaps_targeted"] > 14   # the trace's 14 + probe churn


def test_the_difference_comes_from_deletions_after_memory_was_populated():
    """Without the device-probe churn (after the kernel populated memory) the gap nearly vanishes."""
    probe_ops = {"phases.3.memslot_ops": []}
    _, fast = _run("boot-32g-churn.toml", "fast", backing="thp")
    _, targeted = _run("boot-32g-churn.toml", "targeted", backing="thp")
    _, fast_nochurn = _run("boot-32g-churn.toml", "fast", backing="thp", **probe_ops)
    _, targeted_nochurn = _run("boot-32g-churn.toml", "targeted", backing="thp", **probe_ops)
    gap = fast["faults_after_zap"] - targeted["faults_after_zap"]
    gap_nochurn = fast_nochurn["faults_after_zap"] - targeted_nochurn["faults_after_zap"]
    assert gap > 10 * max(gap_nochurn, 1)
    assert fast_nochurn["zaps_fast"] == 14     # only the firmware trace's deletions remain


def test_thp_changes_the_fault_count_not_the_direction():
    _, fast4k = _run("boot-6g.toml", "fast", backing="4k")
    _, fastthp = _run("boot-6g.toml", "fast", backing="thp")
    assert fastthp["faults"] < fast4k["faults"] / 10
    assert fastthp["host_page_allocs_2m"] > 0 and fast4k["host_page_allocs_2m"] == 0
