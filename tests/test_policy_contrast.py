"""Fast vs targeted zap on the default scenario, and the seed's capability semantics."""
from __future__ import annotations

import numpy as np
import pytest

from desim.errors import DesimInputError
from desim.scenario import load_scenario
from desim.vm import run_scenario
from desim.zap import KVM_ZAP_ONLY_MEMSLOT_SPTES, ZAP_POLICIES, policy_from_zap_control

from conftest import MiB, scenario


@pytest.fixture(scope="module")
def default_runs():
    sc = load_scenario()
    return {p: run_scenario(sc, p, seed=3).metrics for p in ("fast", "targeted")}


def test_targeted_has_strictly_fewer_faults_on_the_default(default_runs):
    fast, targeted = default_runs["fast"], default_runs["targeted"]
    assert targeted["faults"] < fast["faults"]
    # the difference is re-faults after the fast zaps of the ROM deletions
    assert fast["faults_after_zap"] > 0 and targeted["faults_after_zap"] == 0
    assert fast["faults_first_touch"] == targeted["faults_first_touch"]
    assert fast["zaps_fast"] == 4 and targeted["zaps_targeted"] == 4
    assert targeted["completion_ns"] < fast["completion_ns"]


@pytest.mark.parametrize("profile", ["tdp-icelake", "legacy-2020", "shadow-pvm"])
def test_equal_faults_without_delete_or_move(profile):
    ops = [{"at_us": 10, "op": "create", "slot": 5, "gpa": 64 * MiB, "size": 64 << 10, "flags": 2},
           {"at_us": 50, "op": "flags", "slot": 5, "flags": 2}]
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0, "memslot_ops": ops},
              {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 5000, "sharing": "shared"}]
    sc = scenario(vcpus=3, ram_mib=16, phases=phases, profile=profile, kernel={"backing": "4k"})
    fast = run_scenario(sc, "fast", seed=5).metrics
    targeted = run_scenario(sc, "targeted", seed=5).metrics
    assert fast["faults"] == targeted["faults"] > 0
    assert fast["completion_ns"] == targeted["completion_ns"]


def test_zap_control_semantics_follow_the_seed():
    assert policy_from_zap_control(0) == "fast"          # default: x86 zaps everything
    assert policy_from_zap_control(KVM_ZAP_ONLY_MEMSLOT_SPTES) == "targeted"
    for bad in (2, 3, 1 << 7, -1):
        with pytest.raises(DesimInputError, match="EINVAL"):
            policy_from_zap_control(bad)
    assert set(ZAP_POLICIES) >= {"fast", "targeted"}


def test_scenario_zap_control_selects_the_policy():
    sc = scenario(zap_control=1)
    assert sc.resolved_policy() == "targeted"
    assert scenario().resolved_policy() == "fast"


def test_until_vmm_keeps_the_vcpus_busy_until_the_script_ends():
    ops = [{"at_us": 100, "op": "toggle", "slot": 5, "gpa": 64 * MiB, "size": 64 << 10, "hold_us": 100,
            "repeat": 20, "every_us": 1000}]
    phases = [{"name": "loop", "pattern": "sequential", "slot": 0, "until": "vmm", "memslot_ops": ops}]
    sc = scenario(vcpus=2, ram_mib=4, phases=phases, kernel={"backing": "4k"})
    res = run_scenario(sc, "fast", seed=1, audit=True)
    m = res.metrics
    pages = 4 * MiB >> 12
    # the 1024 pages are touched again and again for the ~19 ms of the script: many passes, and
    # every fast zap costs a round of re-faults
    assert m["accesses"] > 10 * pages
    assert m["faults_after_zap"] >= 15 * pages // 2
    ioctl_end = max(np.frombuffer(res.raw.ioctl_time) + np.frombuffer(res.raw.ioctl_latency))
    # stops at the end of its current chunk: at most 4096 accesses, each possibly a ~2.3 us fault
    assert ioctl_end <= m["completion_ns"] <= ioctl_end + 4096 * (100 + 2300)


def test_until_vmm_needs_a_script():
    with pytest.raises(DesimInputError, match="until = 'vmm' needs a VMM script"):
        scenario(phases=[{"name": "p", "pattern": "sequential", "slot": 0, "until": "vmm"}])
