"""Lock breaks by preemption model and kernel version (desim/sched.py, desim/zap.py hold_with_lockbreak).

c793a62823d1 (6.11): rwlock_needbreak() is false unless preempt_model_preemptible(); before, it followed
CONFIG_PREEMPTION, which PREEMPT_DYNAMIC selects. need_resched() yields need a competing task on the CPU.
"""
from __future__ import annotations

import math

import pytest

from desim.errors import DesimInputError
from desim.profile import load_profile
from desim.scenario import validate_scenario
from desim.sched import NeedResched, needbreak_on_contention
from desim.vm import run_scenario


def kernel(**kw):
    return load_profile("tdp-icelake").with_overrides(kernel=kw).kernel


@pytest.mark.parametrize("version, preempt, dynamic, expect", [
    ("6.18", "none", True, False), ("6.18", "voluntary", True, False), ("6.18", "full", True, True),
    ("6.18", "lazy", True, True), ("6.11", "voluntary", True, False),
    # before c793a62823d1 a PREEMPT_DYNAMIC kernel breaks whatever model it booted
    ("6.10", "voluntary", True, True), ("6.10", "none", True, True), ("6.1", "none", True, True),
    # static models before 6.11: CONFIG_PREEMPTION only with PREEMPT (full)
    ("5.6", "voluntary", False, False), ("5.6", "full", False, True), ("6.10", "none", False, False),
])
def test_needbreak_by_model_and_version(version, preempt, dynamic, expect):
    k = kernel(version=version, preempt=preempt, preempt_dynamic=dynamic)
    assert needbreak_on_contention(k) is expect
    assert k.needbreak_on_contention is expect


def test_shipped_profiles_match_their_kernels():
    # tdp-icelake: 6.12 distro kernel booted voluntary; shadow-pvm: this host, "Dynamic Preempt: none" on 6.18
    assert not load_profile("tdp-icelake").kernel.needbreak_on_contention
    pvm = load_profile("shadow-pvm").kernel
    assert (pvm.version, pvm.preempt, pvm.preempt_dynamic, pvm.hz) == ("6.18", "none", True, 250)
    assert not pvm.needbreak_on_contention
    assert not load_profile("legacy-2020").kernel.needbreak_on_contention


def test_impossible_kernels_are_rejected():
    with pytest.raises(DesimInputError, match="6.13"):
        kernel(version="6.12", preempt="lazy")
    with pytest.raises(DesimInputError, match="5.12"):
        kernel(version="5.6", preempt="voluntary", preempt_dynamic=True)
    with pytest.raises(DesimInputError, match="preempt ="):
        kernel(preemption=True)


def test_need_resched_at_the_tick_after_the_slice():
    r = NeedResched(competing_task=True, tick_ns=4e6, slice_ns=3e6, lazy=False)
    assert r.at(0.0) == 4e6 and r.at(1.5e6) == 8e6
    # lazy: TIF_NEED_RESCHED_LAZY at that tick, upgraded to TIF_NEED_RESCHED at the next
    assert NeedResched(True, 4e6, 3e6, lazy=True).at(0.0) == 8e6
    assert NeedResched(False, 4e6, 3e6, lazy=False).at(0.0) == math.inf


def _big_delete(**kernel_kw):
    """A 256 MiB slot (4 KiB SPTEs) deleted under the targeted zap while 2 vCPUs fault on other memory."""
    data = {
        "name": "lockbreak", "profile": "tdp-icelake",
        "profile_overrides": {"kernel": {"backing": "4k", **kernel_kw}},
        "vm": {"vcpus": 2, "memslots": [{"id": 0, "gpa": 0, "size": "4MiB"},
                                        {"id": 1, "gpa": "4MiB", "size": "256MiB"}]},
        "phases": [{"name": "populate", "vcpus": "bsp", "slot": 1, "access_ns": 50},
                   {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 40000, "access_ns": 200,
                    "memslot_ops": [{"at_us": 100, "op": "delete", "slot": 1}]}]}
    return run_scenario(validate_scenario(data, "test"), "targeted").metrics


def test_voluntary_on_6_11_never_breaks_for_waiters_but_6_10_did():
    new = _big_delete(preempt="voluntary", version="6.12")
    old = _big_delete(preempt="voluntary", version="6.10")
    assert new["lock_breaks"] == 0 and old["lock_breaks"] > 0
    assert old["lock_wait_fault_ns"] < new["lock_wait_fault_ns"]


def test_a_competing_task_makes_even_preempt_none_yield_once_per_slice():
    m = _big_delete(preempt="none", version="6.18", competing_task=True, hz=1000,
                    sched_base_slice_ns=1_000_000)
    # the zap of 65,536 SPTEs takes ~2 ms at 30 ns each: one or two slices of 1 ms
    assert m["resched_yields"] >= 1 and m["lock_breaks"] == m["resched_yields"]
    assert _big_delete(preempt="none", version="6.18")["lock_breaks"] == 0


def test_targeted_zap_flushes_before_each_yield_the_fast_zap_does_not():
    """tdp_mmu_iter_cond_resched(..., flush): a remote flush (IPIs to the vCPUs in guest mode, waited for
    under the lock) before every lock break that follows zapped SPTEs; the final flush only for what was
    zapped after the last one. kvm_zap_obsolete_pages / tdp_mmu_zap_root yield without flushing."""
    m = _big_delete(preempt="full", version="6.18")
    assert m["lock_breaks"] > 0
    assert m["yield_flushes"] == m["lock_breaks"]  # every SPTE of the slot is present: each break flushes
    assert m["remote_flushes"] == m["yield_flushes"] + 1
    # (the waiters spin on mmu_lock in the host, so these flushes need few IPIs: only guest-mode vCPUs get one)
    quiet = _big_delete(preempt="voluntary", version="6.18")
    assert quiet["yield_flushes"] == 0 and quiet["remote_flushes"] == 1
    # legacy MMU, fast zap: lock breaks every BATCH_ZAP_PAGES shadow pages, no flush at any of them
    data = {"name": "fastbreak", "profile": "legacy-2020",
            "profile_overrides": {"kernel": {"backing": "4k", "preempt": "full"}},
            "vm": {"vcpus": 2, "memslots": [{"id": 0, "gpa": 0, "size": "4MiB"},
                                            {"id": 1, "gpa": "4MiB", "size": "64MiB"}]},
            "phases": [{"name": "populate", "vcpus": "bsp", "slot": 1, "access_ns": 50},
                       {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 40000, "access_ns": 200,
                        "memslot_ops": [{"at_us": 100, "op": "delete", "slot": 1}]}]}
    fast = run_scenario(validate_scenario(data, "test"), "fast").metrics
    assert fast["lock_breaks"] > 0 and fast["yield_flushes"] == 0
