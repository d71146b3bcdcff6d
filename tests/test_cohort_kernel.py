"""The compiled cohort kernel (desim/cohort_kernel.py) against the reference engine and the Python steps it
replaces (desim/cohort.py with the kernel off): bit for bit, on the cases it is built for (an exclusive lock
storm with ties at equal times, read-locked TDP faults, the host allocator's contention among many vCPUs,
a writer arriving mid-storm), and a deliberately broken kernel must fail the comparison."""
from __future__ import annotations

import json

import numpy as np
import pytest

from desim import cohort_bridge
from desim.profile import HostProfile, load_profile
from desim.vm import Vm

from conftest import MiB, scenario
from test_engines_differential import assert_same, fingerprint


@pytest.fixture(autouse=True)
def _plans_under_shadow_paging(monkeypatch):
    """The fast engine makes no plans under shadow paging (a speed heuristic, desim/cohort.py); these tests
    are about the plans' exactness, shadow paging's included."""
    from desim.cohort import Cohort
    monkeypatch.setattr(Cohort, "plan_shadow", True)


def _runs(sc, policy: str = "targeted", seed: int = 1, profile=None):
    """Fingerprints: reference engine, fast engine with the Python cohort steps, fast engine with the kernel."""
    ref = fingerprint(Vm(sc, policy, seed=seed, engine="reference", profile=profile))
    py = Vm(sc, policy, seed=seed, engine="fast", profile=profile)
    py.cohort.kernel = False
    fpy = fingerprint(py)
    vm = Vm(sc, policy, seed=seed, engine="fast", profile=profile)
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


def _drawn(profile: str) -> HostProfile:
    """``profile`` with every fault-cycle cost drawn per event (lognormal), the VM entry and exit included."""
    dumped = load_profile(profile).model_dump()
    for name in ("vm_entry", "vm_exit", "fault_handle", "host_alloc_4k", "faultin_resident", "spte_install"):
        dumped["costs"][name]["dist"] = {"kind": "lognormal", "sigma": 0.3}
    dumped["kernel"]["backing"] = "4k"
    return HostProfile.model_validate(dumped)


def _across(pattern: str, profile: str = "tdp-icelake", vcpus: int = 4):
    """vCPUs each with several 4096-access chunks of their own: a sequential first touch (36 MiB each: 2.25
    chunks, every access a fault) or uniform draws over 8 MiB each (6 chunks of draws: faults and hits)."""
    if pattern == "sequential":
        phase = {"name": "populate", "pattern": "sequential", "slot": 0, "sharing": "private", "access_ns": 1.0}
        ram = 36 * vcpus
    else:
        phase = {"name": "touch", "pattern": "uniform", "slot": 0, "sharing": "private", "access_ns": 3.0,
                 "accesses": 6 * 4096}
        ram = 8 * vcpus
    return scenario(vcpus=vcpus, ram_mib=ram, phases=[phase], profile=profile, kernel={"backing": "4k"},
                    costs="sampled")


@pytest.mark.parametrize("pattern,profile,vcpus", [("sequential", "tdp-icelake", 3), ("uniform", "tdp-icelake", 4),
                                                   ("sequential", "legacy-2020", 2)])
def test_plans_run_across_chunk_ends(pattern, profile, vcpus):
    """Plans (and kernel calls) that go on across the ends of the vCPUs' 4096-access chunks (each chunk end one
    more guest run, after which the next run draws its own VM entry), with drawn costs: identical to both, and
    the kernel takes chunk ends itself."""
    ref, py, fast, vm = _runs(_across(pattern, profile, vcpus), profile=_drawn(profile))
    assert_same(ref, py, f"python cohort across chunk ends, {pattern}/{profile}")
    assert_same(ref, fast, f"kernel across chunk ends, {pattern}/{profile}")
    assert vm.cohort.kernel_steps > 0.5 * json.loads(fast)["metrics"]["faults"]
    assert vm.cohort.chunk_ends_planned > 0


def test_a_chunk_end_that_skips_the_entry_draw_is_caught(monkeypatch):
    """A kernel whose chunk-end run leaves the last fault's VM entry for the next chunk's first run (instead of
    that run drawing its own) must fail the comparison."""
    from desim import cohort_kernel as ck

    sc, prof = _across("sequential", vcpus=2), _drawn("tdp-icelake")
    ref = fingerprint(Vm(sc, "targeted", seed=1, engine="reference", profile=prof))
    begin = ck._begin.py_func

    def keep_entry(SI, IV, FV, CUR, DS, D, PL, OUT, i, now):
        chunk_end = PL[1, IV[i, ck.I_OFF] + IV[i, ck.I_K]] < 0
        entry = FV[i, ck.F_ENTRY]
        d = begin(SI, IV, FV, CUR, DS, D, PL, OUT, i, now)
        if chunk_end:
            IV[i, ck.I_ENTRY_SET], FV[i, ck.F_ENTRY] = 1, entry
        return d
    monkeypatch.setattr(ck, "_begin", keep_entry)
    monkeypatch.setattr(ck, "_locked", ck._locked.py_func)  # the kernel's steps that begin runs, interpreted
    monkeypatch.setattr(ck, "run", ck.run.py_func)
    vm = Vm(sc, "targeted", seed=1, engine="fast", profile=prof)
    assert ref != fingerprint(vm) and vm.cohort.chunk_ends_planned > 0


def test_progress_checkpoints_inside_kernel_calls(monkeypatch):
    """Progress checkpoints (Vm._checkpoints, every 100 us of simulated time here: its wall clock is made to
    tick 0.1 s a call) taken inside kernel calls see the same clock, accesses and faults as on the reference
    engine, and the results do not change."""
    import desim.vm as vm_mod

    tick = iter(range(10**9))
    monkeypatch.setattr(vm_mod.time, "perf_counter", lambda: 0.1 * next(tick))
    sc, prof = _across("sequential", vcpus=3), _drawn("tdp-icelake")
    seen = {"reference": [], "fast": []}
    runs = {}
    for engine in seen:
        vm = Vm(sc, "targeted", seed=1, engine=engine, profile=prof)
        runs[engine] = fingerprint(vm, progress=lambda s, out=seen[engine]: out.append((s.sim_ns, s.faults, s.fraction)))
    assert_same(runs["reference"], runs["fast"], "kernel with progress checkpoints")
    assert seen["fast"] == seen["reference"] and len(seen["fast"]) > 10
    assert vm.cohort.kernel_checkpoints > 0

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


def _refault_sc(sharing: str, profile: str = "legacy-2020"):
    """8 vCPUs populate, then touch their memory (hot/cold) while the VMM deletes a memslot three times: each
    fast zap leaves every SPTE obsolete and every host page resident, so each re-fault's ``direct_pte_prefetch``
    maps the resident neighbours of its group. ``shared``: the vCPUs' faults fall in each other's groups."""
    ops = [{"at_us": 20 + 150 * i, "op": op, "slot": 5, **({"gpa": 64 * MiB, "size": 64 * 1024} if op == "create" else {})}
           for i, op in enumerate(["create", "delete"] * 3)]
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0, "sharing": "private", "access_ns": 50.0},
              {"name": "work", "pattern": "hotcold", "slot": 0, "sharing": sharing, "accesses": 3000,
               "access_ns": 200.0, "memslot_ops": ops}]
    return scenario(vcpus=8, ram_mib=4, phases=phases, profile=profile, kernel={"backing": "4k"}, costs="sampled")


@pytest.mark.parametrize("sharing,profile", [("private", "legacy-2020"), ("shared", "legacy-2020"),
                                             ("private", "shadow-pvm")])
def test_refaults_with_pte_prefetch_are_planned(sharing, profile):
    """The legacy MMU's (and shadow paging's) re-faults after a fast zap, each prefetching its group's resident
    neighbours, planned and run in the Python steps and the kernel: identical to the reference engine, and the
    planned faults did prefetch."""
    ref, py, fast, vm = _runs(_refault_sc(sharing, profile), "fast")
    assert_same(ref, py, f"python cohort, re-faults with prefetch ({sharing}, {profile})")
    assert_same(ref, fast, f"kernel, re-faults with prefetch ({sharing}, {profile})")
    m = json.loads(fast)["metrics"]
    assert m["zaps_fast"] == 3 and m["faults_after_zap"] > 200
    assert vm.cohort.prefetched_planned > 100  # of about 2,000 (the rest: short runs left to the per-fault path)


def test_plans_sharing_a_prefetch_group_are_caught(monkeypatch):
    """Plans that own only their faults' gfns, not their groups (another vCPU's plan may then fault next to them
    and prefetch what they counted on, or the other way round) must fail the comparison."""
    from desim import cohort

    sc = _refault_sc("shared")
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
    monkeypatch.setattr(cohort, "_GROUP_SHIFT", 0)
    vm = Vm(sc, "fast", seed=1, engine="fast")
    assert ref != fingerprint(vm) and vm.cohort.prefetched_planned > 0


def test_a_kernel_that_prefetches_for_free_is_caught(monkeypatch):
    """A kernel that holds mmu_lock for the fault's install only (no ``prefetch_spte`` per prefetched neighbour)
    must fail the comparison."""
    run = cohort_bridge.ck.run

    def free(*a):
        a[0][cohort_bridge.ck.L_PREFETCH] = 0.0
        run(*a)

    sc = _refault_sc("private")
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
    monkeypatch.setattr(cohort_bridge.ck, "run", free)
    vm = Vm(sc, "fast", seed=1, engine="fast")
    assert ref != fingerprint(vm) and vm.cohort.prefetched_planned > 0


def _shared_touch_sc(profile: str, ram_mib: int, pattern: str, costs: str):
    phases = [{"name": "touch", "pattern": pattern, "slot": 0, "sharing": "shared", "accesses": 3000,
               "access_ns": 50.0}]
    return scenario(vcpus=16, ram_mib=ram_mib, phases=phases, profile=profile, kernel={"backing": "4k"},
                    costs=costs)


@pytest.mark.parametrize("profile,ram_mib,pattern,costs", [("legacy-2020", 4, "uniform", "sampled"),
                                                           ("shadow-pvm", 2, "hotcold", "mean")])
def test_a_plain_run_sees_the_host_page_of_a_planned_first_touch(profile, ram_mib, pattern, costs, monkeypatch):
    """16 vCPUs first-touch shared memory under an exclusive mmu_lock: a vCPU whose next miss is in another's
    plan begins its guest run the plain way, and its exit cost (Vcpu._pre_lock_ns) reads whether the host page
    is resident: the other vCPU's planned fault, past kvm_faultin_pfn and waiting for the lock, made it so
    (Cohort._flush_for). Identical to the reference engine; without that, caught."""
    sc = _shared_touch_sc(profile, ram_mib, pattern, costs)
    ref, py, fast, _ = _runs(sc, "fast")
    assert_same(ref, py, "python cohort")
    assert_same(ref, fast, "kernel")
    import inspect
    import textwrap

    from desim import cohort
    code = textwrap.dedent(inspect.getsource(cohort.Cohort._flush_for))
    stale = code.replace("self.vm.mmu.make_resident(p.ss, int(p.gfns[k]), 1)", "pass")
    assert stale != code
    ns = dict(vars(cohort))
    exec(stale, ns)
    monkeypatch.setattr(cohort.Cohort, "_flush_for", ns["_flush_for"])
    _, py2, fast2, _ = _runs(sc, "fast")
    assert ref != py2 or ref != fast2
