"""The timed guest on the real KVM: timing adds no fault, and the latencies sort into their classes.

Skipped where /dev/kvm is absent or cannot run both policies.
"""
from __future__ import annotations

import numpy as np
import pytest

from desim.kvm.latency import STALL_NS, not_preempted, run_timed
from desim.kvm.machine import install_kick_handler
from desim.kvm.measure import run_once
from desim.kvm.scenario import KvmScenario
from desim.kvm.vm import Kvm

from conftest import kvm_unusable

pytestmark = pytest.mark.kvm

_REASON = kvm_unusable(targeted=True)
COUNTERS = ("pf_taken", "pf_fixed", "mmu_shadow_zapped", "pages_4k", "pf_spurious", "pf_emulate", "io_exits",
            "mmio_exits", "halt_exits")


def _exits(delta: dict[str, int]) -> int:
    """Exits other than host interrupts (``irq_exits``: a timer tick lands in a pass or not, timed or not)."""
    return delta.get("exits", 0) - delta.get("irq_exits", 0)


@pytest.fixture(scope="module")
def kvm():
    if _REASON:
        pytest.skip(_REASON)
    install_kick_handler()
    with Kvm() as k:
        yield k


@pytest.mark.parametrize("policy,exit,vcpus", [("fast", "pio", 1), ("targeted", "pio", 1), ("fast", "mmio", 1),
                                               ("fast", "pio", 2)])
def test_timing_changes_no_kernel_counter(kvm, policy, exit, vcpus):
    """The same phases, untimed and timed: every fault and exit counter of the kernel's stats fd agrees.

    Exactly with one vCPU; with two, their first faults on the shared code page may race (one
    more pf_taken now and then, timed or not), so a difference of up to one per vCPU is allowed.
    """
    sc = KvmScenario(name="timed-check", ram_mib=32, vcpus=vcpus, policy=policy, passes=2)
    plain = run_once(kvm, sc, exit=exit)
    timed = run_timed(kvm, sc, exit=exit, during=False)
    slack = 0 if vcpus == 1 else vcpus
    for phase, counts in timed.counts.items():
        for k in COUNTERS:
            if k in counts:
                assert abs(counts[k] - plain["phases"][phase]["delta"].get(k, 0)) <= slack, (phase, k)
        assert abs(_exits(counts) - _exits(plain["phases"][phase]["delta"])) <= slack, phase
    assert timed.metrics["refaults"] == plain["metrics"]["refaults"]


def test_latency_classes_match_the_fault_counts(kvm):
    sc = KvmScenario(name="timed-classes", ram_mib=32, vcpus=1, policy="fast", stride_kib=32)
    r = run_timed(kvm, sc, during=False)
    n = 32 * 256 // 8  # every 8th 4 KiB page
    assert len(r.samples["hit"]) + r.preempted >= n - 1
    assert r.tsc_khz > 100_000  # a real TSC, > 100 MHz
    # every first touch and, after a fast zap with nothing to prefetch, every re-touch is a fault
    assert np.median(r.samples["first_touch"]) > STALL_NS
    assert np.median(r.samples["hit"]) < STALL_NS / 10
    # the stalls of the first retouch pass are the kernel's re-faults (pf_taken), give or take a few
    # host interrupts that made a hit slower than STALL_NS
    assert abs(r.refault_stalls - r.refault_pf_taken) <= max(16, 0.02 * r.refault_pf_taken)


@pytest.mark.parametrize("policy", ["fast", "targeted"])
def test_accesses_overlap_the_delete_that_runs_meanwhile(kvm, policy):
    sc = KvmScenario(name="timed-during", ram_mib=64, vcpus=1, policy=policy, op="delete")
    # the VMM issues the DELETE once the vCPU is in KVM_RUN; on a loaded host the vCPU thread can
    # still be off its CPU for the whole ioctl, so a run may see no access overlap it: three tries
    for _ in range(3):
        r = run_timed(kvm, sc, during=True)
        if r.longest_stall_raw_ns > 0:
            break
    # whether the host's scheduler stretched an access depends on the neighbours' load: the raw
    # longest stall includes such waits, the other one drops them
    assert r.longest_stall_raw_ns >= r.longest_stall_ns and r.longest_stall_raw_ns > 0


def test_preemption_is_attributed_to_the_slowest_accesses():
    lat = np.array([20.0, 30.0, 5000.0, 2_000_000.0, 25.0])
    keep = not_preempted(lat, 1_990_000.0)
    assert keep.tolist() == [True, True, True, False, True]
    assert not_preempted(lat, 0.0).all()
    # a wait longer than every stall together drops the stalls, never the hits
    assert not_preempted(lat, 1e9).tolist() == [True, True, False, False, True]
