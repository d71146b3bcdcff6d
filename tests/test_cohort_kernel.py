"""The compiled cohort kernel (desim/cohort_kernel.py) against the reference engine and the Python steps it
replaces (desim/cohort.py with the kernel off): bit for bit, on the cases it is built for (an exclusive lock
storm with ties at equal times, read-locked TDP faults, the host allocator's contention among many vCPUs,
a writer arriving mid-storm), and a deliberately broken kernel must fail the comparison."""
from __future__ import annotations

import json

import numpy as np
import pytest

from desim import cohort_bridge
from desim.vm import Vm

from conftest import MiB, scenario
from test_engines_differential import assert_same, fingerprint


def _runs(sc, policy: str = "targeted", seed: int = 1):
    """Fingerprints: reference engine, fast engine with the Python cohort steps, fast engine with the kernel."""
    ref = fingerprint(Vm(sc, policy, seed=seed, engine="reference"))
    py = Vm(sc, policy, seed=seed, engine="fast")
    py.cohort.kernel = False
    fpy = fingerprint(py)
    vm = Vm(sc, policy, seed=seed, engine="fast")
    return ref, fpy, fingerprint(vm), vm


def _sc(vcpus: int, profile: str, costs: str = "sampled", ops=None, **kw):
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0, "sharing": "private", "access_ns": 1.0,
               "memslot_ops": ops or []}]
    return scenario(vcpus=vcpus, ram_mib=vcpus, phases=phases, profile=profile, kernel={"backing": "4k"},
                    costs=costs, **kw)


@pytest.mark.parametrize("profile,costs", [("legacy-2020", "mean"), ("legacy-2020", "sampled"),
                                           ("tdp-icelake", "sampled")])
def test_the_kernel_agrees(profile, costs):
    """An exclusive lock storm (legacy MMU; constant costs make hand-overs and guest runs end at equal times:
    ties broken by SimPy's ids, which the kernel numbers) and read-locked TDP faults: identical to both."""
    ref, py, fast, vm = _runs(_sc(16, profile, costs))
    assert_same(ref, py, "python cohort")
    assert_same(ref, fast, f"kernel {profile}/{costs}")
    assert vm.cohort.kernel_steps > 0.9 * json.loads(fast)["metrics"]["faults"]  # most of the faults
    if profile == "legacy-2020":
        assert json.loads(fast)["metrics"]["lock_contended_fault"] > 0.9 * json.loads(fast)["metrics"]["faults"]


def test_the_kernel_with_host_allocator_contention():
    """32 vCPUs first-touching at once with zeroing slower than the bandwidth allows: zone->lock, lru_lock and
    memory-bandwidth waits inside the kernel."""
    sc = _sc(32, "tdp-icelake", profile_overrides={"kernel": {"backing": "4k"}, "costs": {"membw_4k": 200.0}})
    ref, py, fast, vm = _runs(sc)
    assert_same(ref, py, "python cohort, host allocator contention")
    assert_same(ref, fast, "kernel, host allocator contention")
    m = json.loads(fast)["metrics"]
    assert m["membw_stretch_ns"] > 0 and vm.cohort.kernel_steps > 0


@pytest.mark.parametrize("policy", ["fast", "targeted"])
def test_a_writer_arrives_mid_storm(policy):
    """Memslot updates while 8 vCPUs storm the exclusive lock: the zap's writer queues behind the faults, the
    kernel stops at the VMM's events and declines while a non-fault holds or waits."""
    ops = [{"at_us": 10 + 20 * i, "op": op, "slot": 5, **({"gpa": 16 * MiB, "size": 2 * MiB} if op == "create" else {})}
           for i, op in enumerate(["create", "delete"] * 3)]
    ref, py, fast, vm = _runs(_sc(8, "legacy-2020", "sampled", ops), policy)
    assert_same(ref, py, f"python cohort, writer mid-storm/{policy}")
    assert_same(ref, fast, f"kernel, writer mid-storm/{policy}")
    assert json.loads(fast)["metrics"]["memslot_ioctls"] == 6 and vm.cohort.kernel_steps > 0


def test_a_broken_kernel_is_caught(monkeypatch):
    """A kernel that takes every page-table page as missing (two vCPUs both pay for a shared one) must fail."""
    sc = _sc(8, "tdp-icelake")
    sc_ref = fingerprint(Vm(sc, "targeted", seed=1, engine="reference"))
    monkeypatch.setattr(cohort_bridge, "_tables_there", lambda mmu, codes: np.zeros(len(codes), dtype=np.int64))
    vm = Vm(sc, "targeted", seed=1, engine="fast")
    assert sc_ref != fingerprint(vm) and vm.cohort.kernel_steps > 0


def _teardown_sc():
    """4 TDP vCPUs populating while the VMM deletes a memslot twice (fast zap): the teardown of the invalidated
    roots (kvm_tdp_mmu_zap_invalidated_roots) holds mmu_lock for read while the vCPUs fault on their new roots."""
    ops = []
    for at in (100, 300):
        ops += [{"at_us": at, "op": "create", "slot": 5, "gpa": 64 * MiB, "size": 2 * MiB},
                {"at_us": at + 20, "op": "delete", "slot": 5}]
    return _sc(4, "tdp-icelake", "sampled", ops)


def test_the_kernel_runs_beside_other_readers():
    """Kernel calls while a foreign reader (the teardown, a vCPU loading its root) holds the read side: they count
    among the readers (the integral of holders) and keep their hold: identical to both."""
    ref, py, fast, vm = _runs(_teardown_sc(), "fast")
    assert_same(ref, py, "python cohort, teardown reader")
    assert_same(ref, fast, "kernel, teardown reader")
    assert vm.cohort.kernel_shared > 0 and json.loads(fast)["metrics"]["zaps_fast"] == 2


def test_a_kernel_blind_to_other_readers_is_caught(monkeypatch):
    """A kernel that leaves the foreign readers out of the reader count (only the vCPUs' holds) must fail."""
    run = cohort_bridge.ck.run

    def blind(*a):
        SI, IV = a[1], a[2]
        f = int(SI[cohort_bridge.ck.LI_READERS]) - int(IV[:, cohort_bridge.ck.I_HOLDING].sum())
        SI[cohort_bridge.ck.LI_READERS] -= f
        run(*a)
        SI[cohort_bridge.ck.LI_READERS] += f

    sc = _teardown_sc()
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
    monkeypatch.setattr(cohort_bridge.ck, "run", blind)
    vm = Vm(sc, "fast", seed=1, engine="fast")
    assert ref != fingerprint(vm) and vm.cohort.kernel_shared > 0
