"""Invariants of the model under hypothesis-generated memslot scripts and access patterns.

Run with ``audit=True`` the model itself raises :class:`InvariantViolation` if

* a vCPU executes an access through a zapped or obsolete SPTE without a fault,
  or keeps running in the guest across a zap without being kicked;
* a flush returns before every vCPU that was in guest mode acked;
* anything still maps a slot after its DELETE returned.

On top, the tests check counter consistency and that a targeted zap leaves
other slots' SPTEs present.
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desim.metrics import FAULT_CAUSES
from desim.mmu import TAG_MASK
from desim.vm import Vm

from conftest import MiB, scenario

# candidate places for the extra slots 1..3 (non-overlapping, above the 8 MiB of RAM)
SLOT_PLACES = [(16 * MiB, 64 << 10), (20 * MiB, 256 << 10), (24 * MiB, 2 * MiB), (32 * MiB, 4 * MiB)]
PROFILES = ["tdp-icelake", "legacy-2020", "shadow-pvm"]


@st.composite
def scripts(draw):
    """Phases touching existing slots while the VMM creates/deletes/moves/reflags extra slots."""
    present: dict[int, int] = {}  # slot id -> place index
    phases = []
    for p in range(draw(st.integers(1, 3))):
        ops = []
        t = 0.0
        for _ in range(draw(st.integers(0, 5))):
            t += draw(st.floats(1.0, 300.0))
            sid = draw(st.integers(1, 3))
            free = [i for i in range(len(SLOT_PLACES)) if i not in present.values()]
            if sid in present:
                kind = draw(st.sampled_from(["delete", "move", "flags"] if free else ["delete", "flags"]))
                if kind == "delete":
                    ops.append({"at_us": t, "op": "delete", "slot": sid})
                    del present[sid]
                elif kind == "move":
                    place = draw(st.sampled_from(free))
                    if SLOT_PLACES[place][1] != SLOT_PLACES[present[sid]][1]:
                        continue  # a move keeps the size
                    ops.append({"at_us": t, "op": "move", "slot": sid, "gpa": SLOT_PLACES[place][0]})
                    present[sid] = place
                else:
                    ops.append({"at_us": t, "op": "flags", "slot": sid, "flags": draw(st.sampled_from([0, 1]))})
            elif free:
                place = draw(st.sampled_from(free))
                gpa, size = SLOT_PLACES[place]
                ops.append({"at_us": t, "op": "create", "slot": sid, "gpa": gpa, "size": size})
                present[sid] = place
        # touch RAM or an extra slot that exists at the phase start
        touch = draw(st.sampled_from([0] + sorted(_existing_at_start(phases, present, ops))))
        pattern = draw(st.sampled_from(["sequential", "uniform", "hotcold"]))
        phase = {"name": f"p{p}", "pattern": pattern, "slot": touch, "memslot_ops": ops,
                 "sharing": draw(st.sampled_from(["private", "shared"])),
                 "access_ns": draw(st.sampled_from([50.0, 500.0]))}
        if pattern != "sequential":
            phase["accesses"] = draw(st.integers(200, 3000))
        else:
            phase["passes"] = draw(st.integers(1, 2))
        phases.append(phase)
    return phases


def _existing_at_start(phases, present_after, ops):
    # slots present before this phase's ops: undo this phase's ops on a copy of the state after
    state = dict(present_after)
    for op in reversed(ops):
        if op["op"] == "create":
            state.pop(op["slot"], None)
        elif op["op"] == "delete":
            state[op["slot"]] = -1
    return {s for s in state}


def _run(phases, profile, policy, vcpus, backing):
    sc = scenario(vcpus=vcpus, ram_mib=8, phases=phases, profile=profile, kernel={"backing": backing})
    vm = Vm(sc, policy, seed=7, audit=True)
    res = vm.run()
    return vm, res


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phases=scripts(), profile=st.sampled_from(PROFILES), policy=st.sampled_from(["fast", "targeted"]),
       vcpus=st.integers(1, 4), backing=st.sampled_from(["4k", "thp"]))
def test_invariants_hold_for_any_script(phases, profile, policy, vcpus, backing):
    vm, res = _run(phases, profile, policy, vcpus, backing)   # audit raises on a violation
    m = res.metrics
    assert m["faults"] == sum(m[f"faults_{c}"] for c in FAULT_CAUSES)
    assert m["faults"] == len(vm.metrics.fault_latency)
    # every access of every stream is consumed exactly once (MMIO accesses included)
    assert m["accesses"] == vm.metrics.accesses_assigned > 0
    n_deletes = sum(op["op"] == "delete" for p in phases for op in p["memslot_ops"])
    assert vm.audit.deletes == n_deletes
    if policy == "targeted":
        assert m["zaps_fast"] == 0
    else:
        assert m["zaps_targeted"] == 0
    # time by state (guest + host + halted) adds up to the run's length for every vCPU
    for v in vm.metrics.vcpus:
        assert abs(sum(v.time.values()) - m["completion_ns"]) <= 1e-6 * max(1.0, m["completion_ns"])


def test_targeted_zap_leaves_other_slots_present_and_unmaps_the_deleted_one():
    rom_ops = [{"at_us": 50, "op": "create", "slot": 5, "gpa": 16 * MiB, "size": 64 << 10, "flags": 2},
               {"at_us": 4000, "op": "delete", "slot": 5}]
    phases = [{"name": "ram", "pattern": "sequential", "slot": 0},
              {"name": "rom", "pattern": "sequential", "slot": 0, "size": 64 << 10, "memslot_ops": rom_ops[:1]},
              {"name": "read-rom", "pattern": "sequential", "slot": 5, "memslot_ops": rom_ops[1:]}]
    for profile in PROFILES:
        sc = scenario(vcpus=2, ram_mib=8, phases=phases, profile=profile, kernel={"backing": "4k"})
        vm = Vm(sc, "targeted", seed=1, audit=True)
        vm.run()
        ram = vm.mmu.slots[0]
        assert np.all((ram.leaf_bytes() & TAG_MASK) == vm.mmu.root_tag), profile   # every RAM SPTE survived
        assert 5 not in vm.mmu.slots and vm.audit.deletes == 1
        vm_fast = Vm(sc, "fast", seed=1, audit=True)
        vm_fast.run()
        assert not np.any((vm_fast.mmu.slots[0].leaf_bytes() & TAG_MASK) == vm_fast.mmu.root_tag), profile


def test_audit_catches_a_vcpu_that_is_not_kicked(monkeypatch):
    """The invariant checks can fail: break kvm_vcpu_kick and the audit must notice."""
    import pytest

    from desim.audit import InvariantViolation
    from desim.vcpu import Vcpu

    monkeypatch.setattr(Vcpu, "kick", lambda self: None)
    ops = [{"at_us": 100, "op": "create", "slot": 5, "gpa": 16 * MiB, "size": 64 << 10},
           {"at_us": 300, "op": "delete", "slot": 5}]
    phases = [{"name": "work", "pattern": "uniform", "slot": 0, "accesses": 20000, "sharing": "shared",
               "memslot_ops": ops}]
    sc = scenario(vcpus=2, ram_mib=1, phases=phases, kernel={"backing": "4k"})
    with pytest.raises(InvariantViolation):
        Vm(sc, "fast", seed=1, audit=True).run()


def test_flush_waits_for_every_guest_mode_vcpu():
    ops = [{"at_us": 100, "op": "create", "slot": 5, "gpa": 16 * MiB, "size": 64 << 10},
           {"at_us": 300, "op": "delete", "slot": 5, "repeat": 1}]
    phases = [{"name": "work", "pattern": "uniform", "slot": 0, "accesses": 20000, "sharing": "shared",
               "memslot_ops": ops}]
    sc = scenario(vcpus=4, ram_mib=1, phases=phases, kernel={"backing": "4k"})
    vm = Vm(sc, "fast", seed=1, audit=True)
    res = vm.run()
    assert vm.audit.flushes >= 1 and res.metrics["ipis_sent"] >= 1
