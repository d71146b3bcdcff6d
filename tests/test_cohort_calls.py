"""The per-call economies of the fast engine's cohort loop (desim/cohort.py) and its kernel calls
(desim/cohort_bridge.py): each plan's gfn range kept by vCPU (the plans meeting a range found without a loop over
every plan), kernel calls that hand back only the vCPUs whose state they changed, plans extended only once a call
stopped at a plan's end. Identical to the reference engine, bit for bit, and each economy, broken, is caught."""
from __future__ import annotations

import numpy as np

from desim import cohort_bridge
from desim.cohort import Cohort
from desim.vm import Vm

from conftest import MiB, scenario
from test_engines_differential import assert_same, fingerprint


def _sc(profile: str = "tdp-icelake"):
    """8 vCPUs populating their own share, then uniform accesses over the whole (shared) RAM while the VMM
    deletes a memslot twice (fast zap: every vCPU re-faults; the vCPUs' plans meet on shared gfns)."""
    ops = []
    for at in (5, 40):
        ops += [{"at_us": at, "op": "create", "slot": 5, "gpa": 64 * MiB, "size": 2 * MiB},
                {"at_us": at + 10, "op": "delete", "slot": 5}]
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0, "sharing": "private", "access_ns": 1.0},
              {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 8000, "access_ns": 10.0,
               "sharing": "shared", "memslot_ops": ops}]
    return scenario(vcpus=8, ram_mib=2, phases=phases, profile=profile, kernel={"backing": "4k"}, costs="sampled")


def test_plan_ranges_and_partial_hand_backs_agree(monkeypatch):
    """The range arrays name exactly the plans a scan of every plan finds, at every query; kernel calls hand back
    a part of the vCPUs; the results are the reference engine's."""
    sc = _sc()
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
    seen = {"queries": 0, "met": 0, "calls": 0, "partial": 0}
    overlapping, changed = Cohort._overlapping, cohort_bridge._changed

    def checked(self, lo, hi):
        got = overlapping(self, lo, hi)
        scan = [v for v, p in self._plans.items() if p.lo <= hi and lo <= p.hi]
        assert set(got) == set(scan) and len(got) == len(scan)
        seen["queries"] += 1
        seen["met"] += len(got) > 1
        return got

    def counted(IV0, *a):
        out = changed(IV0, *a)
        seen["calls"] += 1
        seen["partial"] += len(out) < len(IV0)
        return out

    monkeypatch.setattr(Cohort, "_overlapping", checked)
    monkeypatch.setattr(cohort_bridge, "_changed", counted)
    vm = Vm(sc, "fast", seed=1, engine="fast")
    assert_same(ref, fingerprint(vm), "cohort calls")
    assert seen["queries"] > 20 and seen["met"] > 0 and seen["partial"] > 0 and vm.cohort.kernel_steps > 0


def test_forgotten_plan_ranges_are_caught(monkeypatch):
    """Plans that do not see each other's gfns (no plan's range found) must fail the comparison."""
    sc = _sc()
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
    monkeypatch.setattr(Cohort, "_overlapping", lambda self, lo, hi: [])
    assert ref != fingerprint(Vm(sc, "fast", seed=1, engine="fast"))


def test_a_hand_back_of_stepped_vcpus_only_is_caught(monkeypatch):
    """A kernel call that hands back only the vCPUs that began a guest run (not those granted mmu_lock or
    released from it meanwhile) must fail the comparison (an exclusive lock storm: grants without a run)."""
    sc = _sc("legacy-2020")
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
    from desim import cohort_kernel as ck

    monkeypatch.setattr(cohort_bridge, "_changed",
                        lambda IV0, FV0, IV, FV, CUR: np.flatnonzero(IV[:, ck.I_K] != IV0[:, ck.I_K]).tolist())
    assert ref != fingerprint(Vm(sc, "fast", seed=1, engine="fast"))


def test_a_scalar_refill_after_a_vectorised_reader_makes_no_list():
    """A cost stream read by the kernel (peek_many) and by scalar peeks in turn: a block refilled by a peek right
    after a vectorised read is not listed, one refilled after scalar reads only is; the values are those of a
    reader of single values, whatever the mix."""
    from desim.costs import BLOCK, CostSampler

    from test_costs import LOGN, _profile

    prof = _profile(fault_handle=LOGN)
    one = CostSampler(prof, "sampled", seed=4).view("vcpu0")
    xs = [one.fault_handle for _ in range(6 * BLOCK)]
    d = CostSampler(prof, "sampled", seed=4).view("vcpu0").draws("fault_handle")
    got = [float(v) for v in d.peek_many(BLOCK)]
    d.i += BLOCK
    got.append(d.peek())  # the refill after a vectorised read: no list
    assert d.buf is None
    d.i += 1
    got += [d.next() for _ in range(BLOCK - 1)]
    got.append(d.peek())  # a refill after scalar reads only: listed
    assert d.buf is not None
    d.i += 1
    got += [d.next() for _ in range(2 * BLOCK)]
    assert got == xs[:len(got)]


def _many(profile: str):
    """_sc with 48 vCPUs on 8 MiB: more plans than Cohort._SCAN_PLANS at once."""
    sc = _sc(profile)
    return sc.with_overrides({"vm.vcpus": 48, "vm.memslots.0.size": 8 * MiB, "phases.1.accesses": 1500})


def _clash_checks(monkeypatch, sc, blind: bool = False) -> dict:
    """Run ``sc`` on the fast engine, each clash check made with many plans compared with a scan of every plan
    (``blind``: the range path finds no plan); returns the counts."""
    from desim import cohort as cohort_mod

    seen = {"checks": 0, "clashes": 0, "wrong": 0}
    clashes = Cohort._clashes

    def checked(self, gfn):
        if blind and len(self._plans) > cohort_mod._SCAN_PLANS:
            self._overlapping = lambda lo, hi: []
        try:
            got = clashes(self, gfn)
        finally:
            self.__dict__.pop("_overlapping", None)
        if len(self._plans) > cohort_mod._SCAN_PLANS:
            with monkeypatch.context() as m:
                m.setattr(cohort_mod, "_SCAN_PLANS", 1 << 30)  # a loop over every plan
                scan = clashes(self, gfn)
            seen["checks"] += 1
            seen["clashes"] += scan
            seen["wrong"] += got != scan
        return got

    with monkeypatch.context() as m:
        m.setattr(Cohort, "_clashes", checked)
        seen["fingerprint"] = fingerprint(Vm(sc, "fast", seed=1, engine="fast"))
    return seen


def test_many_plans_are_found_by_their_ranges(monkeypatch):
    """With more plans than ``_SCAN_PLANS``, a plain step's clash check and a plain run's commits find the plans
    near them through the range arrays (not a loop over every plan): each clash check says what a scan of every
    plan says, and the results are the reference engine's, on the legacy MMU (PTE prefetch groups) and the TDP
    MMU. A clash check that finds no plan by range is caught."""
    for profile in ("legacy-2020", "tdp-icelake"):
        sc = _many(profile)
        ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
        seen = _clash_checks(monkeypatch, sc)
        assert_same(ref, seen["fingerprint"], f"48 vCPUs, {profile}")
        assert seen["wrong"] == 0, seen
        if profile == "legacy-2020":  # the TDP MMU's plain steps here come while fewer plans are made
            assert seen["checks"] > 20 and seen["clashes"] > 0, seen
    assert _clash_checks(monkeypatch, _many("legacy-2020"), blind=True)["wrong"] > 0
