"""The fast engine's vectorised fault blocks across the access stream's chunk ends (desim/faultrun.py).

A chunk end is a guest run of the per-fault path (the chunk's last accesses, without a fault), then
the next chunk: a block that reaches past it must give the reference engine's numbers bit for bit,
with drawn costs, hits after the last fault of a chunk, re-faults after a zap and PTE prefetch.
"""
from __future__ import annotations

import numpy as np
import pytest

from desim import faultrun
from desim.profile import HostProfile, load_profile
from desim.vm import Vm
from desim.workload import CHUNK, AccessStream, ChainedStream, make_stream

from conftest import MiB, scenario
from test_engines_differential import assert_same, batched, fingerprint


def _crossing_blocks(monkeypatch) -> list[int]:
    """Record the faults of each vectorised block that ended on a later chunk than it began on."""
    crossed: list[int] = []
    block = faultrun.FaultRun._vector_block

    def spy(self):
        chunk = self.vcpu._chunk
        k = block(self)
        if self.vcpu._chunk is not chunk:
            crossed.append(k)
        return k
    monkeypatch.setattr(faultrun.FaultRun, "_vector_block", spy)
    return crossed


def _lone_vcpu(profile: str, costs: str):
    """One vCPU populating 24 MiB (6 chunks), then hot/cold accesses with a ROM slot created and deleted
    early (the fast zap's re-faults, between hits, land in blocks that cross chunk ends)."""
    ops = [{"at_us": 30 + 40 * i, "op": op, "slot": 5, **({"gpa": 64 * MiB, "size": 64 * 1024} if op == "create" else {})}
           for i, op in enumerate(["create", "delete"])]
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0, "access_ns": 37.3},
              {"name": "work", "pattern": "hotcold", "slot": 0, "accesses": 6 * CHUNK, "access_ns": 61.7,
               "hot_fraction": 0.5, "memslot_ops": ops}]
    return scenario(vcpus=1, ram_mib=24, phases=phases, profile=profile, kernel={"backing": "4k"}, costs=costs)


def _every_cost_drawn(name: str) -> HostProfile:
    """The profile with each cost of a fault's guest run and hold drawn (VM entry included: a run after a
    chunk end draws its own, the others use the one the last fault drew)."""
    dumped = load_profile(name).model_dump()
    for cost in ("vm_entry", "vm_exit", "fault_handle", "host_alloc_4k", "faultin_resident", "spte_install"):
        dumped["costs"][cost]["dist"] = {"kind": "lognormal", "sigma": 0.3}
    dumped["kernel"]["backing"] = "4k"  # a profile given to Vm replaces the scenario's, overrides included
    return HostProfile.model_validate(dumped)


@pytest.mark.parametrize("profile,costs", [("tdp-icelake", "drawn"), ("legacy-2020", "mean"),
                                           ("shadow-pvm", "drawn")])
@pytest.mark.parametrize("policy", ["fast", "targeted"])
def test_blocks_across_chunk_ends_agree(profile, costs, policy, monkeypatch):
    crossed = _crossing_blocks(monkeypatch)
    sc = _lone_vcpu(profile, "sampled" if costs == "drawn" else costs)
    prof = _every_cost_drawn(profile) if costs == "drawn" else None
    ref = fingerprint(Vm(sc, policy, seed=4, engine="reference", profile=prof))
    vm = Vm(sc, policy, seed=4, engine="fast", profile=prof)
    assert_same(ref, fingerprint(vm), f"{profile}/{costs}/{policy}")
    taken, vector = batched(vm)
    assert crossed and max(crossed) > CHUNK  # blocks took more faults than one chunk holds
    assert vector > 0.5 * vm.metrics.faults_by_cause()["first_touch"]


def _drain(st: AccessStream) -> list[np.ndarray]:
    out = []
    while (c := st.next_chunk()) is not None:
        out.append(c)
    return out


def test_peek_chunk_gives_the_chunks_next_chunk_gives():
    def drawn():
        return make_stream("hotcold", 100, 5000, rng=np.random.default_rng(7), accesses=3 * CHUNK + 5)
    plain = _drain(drawn())
    st = drawn()
    first = st.next_chunk()
    ahead = [st.peek_chunk(i) for i in range(5)]
    assert ahead[3] is None and ahead[4] is None  # past the stream's end
    rest = _drain(st)
    assert [c.tolist() for c in [first, *rest]] == [c.tolist() for c in plain]
    assert [c.tolist() for c in ahead[:3]] == [c.tolist() for c in rest]
    # a chained stream's next chunk may depend on when it is asked: it never looks ahead
    chained = ChainedStream([drawn(), drawn()])
    assert chained.peek_chunk(0) is None and isinstance(chained, AccessStream)


def test_a_guest_that_exits_often_is_not_rescanned_at_every_exit(monkeypatch):
    """memslot_perf_test "move active area" (shrunk): one vCPU loops over 50 pages while their slot moves
    away (MMIO exits) and back (re-faults). A vectorised block looks up to ``_VECTOR_MAX`` accesses ahead,
    across chunk ends; after a look that took nothing it backs off (FaultRun._vector_missed), so the
    accesses looked at stay a small multiple of those made (without the back-off: ~490x, and 14x the
    reference engine's time on the full file), and the numbers stay the reference engine's."""
    from pathlib import Path

    from desim.mmu import Mmu
    from desim.scenario import load_scenario

    sc = load_scenario(Path(__file__).resolve().parents[1] / "workloads" / "selftests" / "memslot_perf_test_move_active.toml").with_overrides(
        {"phases.0.passes": 1500, "phases.0.memslot_ops.0.repeat": 50, "phases.0.memslot_ops.1.repeat": 50})
    looked = [0]
    first_misses = Mmu.first_misses

    def spy(self, seg):
        looked[0] += len(seg)
        return first_misses(self, seg)
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
    monkeypatch.setattr(Mmu, "first_misses", spy)
    vm = Vm(sc, "fast", seed=1, engine="fast")
    assert_same(ref, fingerprint(vm), "move_active")
    accesses = 1500 * 50
    assert vm.metrics.summary()["mmio_exits"] > 0 and 0 < looked[0] < 50 * accesses
