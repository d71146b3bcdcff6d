"""Differential test: the ``fast`` and ``reference`` engines give identical results, bit for bit.

Not a tolerance: every metric, every per-vCPU row and every fault-latency sample of a run must be
the same float on both engines (compared as their exact JSON/bytes representations), on

* hypothesis-generated scenarios (the memslot scripts and access patterns of
  ``tests/test_invariants.py``, all three profiles, all host backings, sampled and mean costs,
  mostly 1-2 vCPUs so that the fast engine's fault runs (``desim/faultrun.py``) are long and get
  split by the VMM's memslot updates and kicks);
* every shipped workload (``workloads/**.toml`` and the built-in default), shrunk with the same
  overrides their own tests use, the long recorded boots compared on a prefix of simulated time
  that includes their memslot deletions and the re-faults after them;
* targeted cases of each batched path: a lone vCPU's vectorised populate split by memslot
  updates (both policies), the scalar loop (sampled costs, shadow paging, PTE prefetch), a lock
  storm of exclusive faults, host-allocator waits inside a run, progress checkpoints;
* cohort runs (``desim/cohort.py``: many vCPUs' steps in one loop): lock storms of exclusive faults,
  many read-locked TDP vCPUs, identical vCPUs faulting at identical times (integer constant costs:
  ties broken by scheduling order), runs split by memslot updates, kicks and the zap's writer,
  drawn costs, host-allocator waits, page-table pages shared between vCPUs' plans.

A deliberately broken fast engine (one that processes a yielded event even when another event
is due first), a broken fault run (one that ignores the event queue) and broken cohort runs (one
that schedules its events in the wrong order at equal times, one that lets two vCPUs both pay for
a shared page-table page) must fail the comparison: the test can fail.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desim import cohort, cohort_bridge, faultrun
from desim.mmu import Mmu
from desim.profile import HostProfile, load_profile
from desim.scenario import load_scenario
from desim.vm import Vm

from conftest import MiB, scenario

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _module(name: str):
    """A sibling test module (for its shrink overrides and strategies), loaded without collecting it."""
    spec = importlib.util.spec_from_file_location(f"_diff_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


INV = _module("test_invariants")
SELFTESTS = _module("test_workloads_selftests").SHRINK
STEADY = _module("test_workloads_steady").SHRINK
BOOT_SHORT = _module("test_workloads_boot").SHORT
SCALE = _module("test_workloads_scale").SHRINK


def fingerprint(vm: Vm, until_ns: float | None = None, progress=None) -> str:
    """Everything a run reports, as exact text: metrics, per-vCPU rows, raw latency and time samples.

    ``until_ns``: stop the run at that simulated time (a prefix of a long workload) and report the
    state there, as :meth:`Vm.run` would at the end.
    """
    if until_ns is None:
        res = vm.run(progress=progress)
        d = res.to_dict()
        d.pop("model_version")
    else:
        vm.env.process(vm._run_phases())
        vm.env.run(until=until_ns)
        for v in vm.vcpus:
            v._set_mode(v.mode)
        summary = vm.metrics.summary(vm.lock.summary())
        summary.update(vm.hostmm.summary())
        d = {"metrics": summary, "per_vcpu": vm.metrics.per_vcpu_rows(), "now": vm.env.now}
    raw = vm.metrics
    d["raw"] = {k: bytes(getattr(raw, k)).hex() for k in ("fault_latency", "fault_time", "fault_is_refault",
                                                           "ioctl_latency", "ioctl_time", "zap_duration",
                                                           "access_stall", "access_stall_time")}
    d["ioctl_ops"] = list(raw.ioctl_ops)
    d["hit_ns"] = sorted(raw.hit_ns.items())
    d["lock"] = vm.lock.summary()
    return json.dumps(d, sort_keys=True, default=repr)


def both(sc, policy: str, seed: int = 1, until_ns: float | None = None, progress=None,
         audit: bool = False) -> tuple[str, str, Vm]:
    """Fingerprints on both engines (``audit``: with the invariant audit, which turns fault runs off)."""
    ref = fingerprint(Vm(sc, policy, seed=seed, audit=audit, engine="reference"), until_ns, progress)
    fast_vm = Vm(sc, policy, seed=seed, audit=audit, engine="fast")
    return ref, fingerprint(fast_vm, until_ns, progress), fast_vm


def in_cohorts(vm: Vm) -> tuple[int, int]:
    """(vCPU steps taken in cohort runs, of those planned faults' steps)."""
    return (vm.cohort.steps, vm.cohort.planned) if vm.cohort is not None else (0, 0)


def batched(vm: Vm) -> tuple[int, int]:
    """(faults taken in fault runs, of those in vectorised blocks) over the VM's vCPUs."""
    runs = [v.fault_run for v in vm.vcpus if v.fault_run is not None]
    return sum(r.faults for r in runs), sum(r.vector_faults for r in runs)


def _first_difference(a: str, b: str) -> str:
    da, db = json.loads(a), json.loads(b)
    for k in da["metrics"]:
        if da["metrics"][k] != db["metrics"].get(k):
            return f"metrics[{k}]: reference {da['metrics'][k]!r} fast {db['metrics'].get(k)!r}"
    return "elsewhere (per-vCPU rows, raw samples or lock summary)"


def assert_same(ref: str, fast: str, what: str) -> None:
    assert ref == fast, f"{what}: engines differ at {_first_difference(ref, fast)}"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phases=INV.scripts(), profile=st.sampled_from(INV.PROFILES), policy=st.sampled_from(["fast", "targeted"]),
       vcpus=st.sampled_from([1, 1, 1, 2, 3, 6]), backing=st.sampled_from(["4k", "4k", "thp", "hugetlbfs-1g"]),
       costs=st.sampled_from(["sampled", "mean"]), seed=st.integers(0, 2**32 - 1))
def test_engines_agree_on_generated_scenarios(phases, profile, policy, vcpus, backing, costs, seed):
    sc = scenario(vcpus=vcpus, ram_mib=8, phases=phases, profile=profile, kernel={"backing": backing}, costs=costs)
    ref, fast, _ = both(sc, policy, seed=seed)
    assert_same(ref, fast, f"{profile}/{policy}/{backing}/{costs}/{vcpus} vCPUs")


# the long boots are compared up to a simulated time (ns) just past memslot deletions and the faults after
# them: boot-6g's PCI probe (VRAM BAR deletions at 10.34 s), the other boots' firmware (SeaBIOS's PAM and BAR
# updates) and boot-32g-churn's BAR churn (4.27 s recorded; 0.57 s in the assumed, shrunk boot)
PREFIX_NS = {"workloads/boot/boot-6g.toml": 10.4e9, "workloads/boot/boot-6g-userspace.toml": 3.6e9,
             "workloads/boot/boot-6g-q35.toml": 4.5e9, "workloads/boot/boot-32g-churn.toml": 4.3e9,
             "workloads/boot/assumed/boot-32g-churn.toml": 0.582e9}
# the built-in default populates 256 MiB with 4 vCPUs: 32 MiB shows the same (two ROM toggles in the work phase)
DEFAULT_SHRINK = {"vm.memslots.0.size": "32MiB", "phases.1.accesses": 20000}


def _shipped() -> list[tuple[str, dict]]:
    out = [("desim/scenarios/default.toml", DEFAULT_SHRINK)]
    out += [(f"workloads/selftests/{k}.toml", v) for k, v in sorted(SELFTESTS.items())]
    out += [(f"workloads/steady/{k}.toml", v) for k, v in sorted(STEADY.items())
            if (ROOT / f"workloads/steady/{k}.toml").exists()]
    out += [(f"workloads/boot/assumed/{p.name}", BOOT_SHORT)
            for p in sorted((ROOT / "workloads/boot/assumed").glob("*.toml"))]
    out += [(f"workloads/boot/{p.name}", {}) for p in sorted((ROOT / "workloads/boot").glob("*.toml"))]
    out += [(f"workloads/scale/{k}.toml", v) for k, v in sorted(SCALE.items())]
    return out


def test_every_shipped_workload_is_covered():
    covered = {p for p, _ in _shipped()}
    # every scenario file (workloads/sweeps/ holds sweep definitions over scenarios, not scenarios)
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "workloads").rglob("*.toml")
               if p.parent.name != "sweeps"}
    assert shipped <= covered, f"shipped workloads without a differential run: {sorted(shipped - covered)}"


@pytest.mark.parametrize("path,shrink", _shipped(), ids=[p for p, _ in _shipped()])
def test_engines_agree_on_shipped_workloads(path, shrink):
    sc = load_scenario(ROOT / path)
    if shrink:
        sc = sc.with_overrides(shrink)
    for policy in ("fast", "targeted"):
        ref, fast, _ = both(sc, policy, until_ns=PREFIX_NS.get(path))
        assert_same(ref, fast, f"{path} ({policy})")


def _populate_with_churn(profile: str, **top):
    """One vCPU populating 8 MiB while the VMM creates and deletes a 2 MiB slot every 300 us."""
    ops = [{"at_us": 150 + 300 * i, "op": op, "slot": 5, **({"gpa": 16 * MiB, "size": 2 * MiB} if op == "create" else {})}
           for i, op in enumerate(["create", "delete"] * 8)]
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0, "passes": 2, "access_ns": 50.0,
               "memslot_ops": ops}]
    return scenario(vcpus=1, ram_mib=8, phases=phases, profile=profile, kernel={"backing": "4k"}, **top)


def test_a_lone_vcpu_populates_in_vectorised_blocks():
    """One vCPU populating alone: every fault is taken in a vectorised block, none through the event queue."""
    sc = scenario(vcpus=1, ram_mib=16, kernel={"backing": "4k"})
    ref, fast, vm = both(sc, "fast")
    assert_same(ref, fast, "lone vCPU")
    faults = vm.metrics.vcpus[0].total_faults
    assert faults == 4096 and batched(vm) == (faults, faults)


@pytest.mark.parametrize("policy", ["fast", "targeted"])
def test_vectorised_blocks_are_split_by_memslot_updates(policy):
    """The VMM's ioctls, the fast zap's kicks and the re-faults after it split the lone vCPU's blocks."""
    sc = _populate_with_churn("tdp-icelake")
    ref, fast, vm = both(sc, policy)
    assert_same(ref, fast, policy)
    m = json.loads(fast)["metrics"]
    taken, vector = batched(vm)
    assert m["memslot_ioctls"] == 16 and vector > 0 and taken < m["faults"]
    if policy == "fast":
        assert m["faults_after_zap"] > 0 and m["ipis_sent"] > 0


@pytest.mark.parametrize("policy", ["fast", "targeted"])
def test_vectorised_blocks_with_drawn_costs(policy):
    """Fault costs drawn per event (lognormal) and a fractional access time: the block's timeline is the
    per-fault float loop, its draws are peeked and only those of the faults taken consumed."""
    dumped = load_profile("tdp-icelake").model_dump()
    for name in ("vm_entry", "vm_exit", "fault_handle", "host_alloc_4k", "faultin_resident", "spte_install"):
        dumped["costs"][name]["dist"] = {"kind": "lognormal", "sigma": 0.3}
    dumped["kernel"]["backing"] = "4k"
    prof = HostProfile.model_validate(dumped)
    sc = _populate_with_churn("tdp-icelake")
    sc = sc.with_overrides({"phases.0.access_ns": 37.3})
    ref = fingerprint(Vm(sc, policy, seed=2, engine="reference", profile=prof))
    vm = Vm(sc, policy, seed=2, engine="fast", profile=prof)
    assert_same(ref, fingerprint(vm), policy)
    taken, vector = batched(vm)
    assert vector > 0.5 * vm.metrics.faults_by_cause()["first_touch"]


@pytest.mark.parametrize("profile,costs", [("shadow-pvm", "sampled"), ("legacy-2020", "mean"),
                                           ("tdp-icelake", "sampled")])
def test_scalar_fault_runs_agree(profile, costs, monkeypatch):
    """Drawn costs (peeked, consumed only when a fault is taken), shadow paging, PTE prefetch: the scalar
    loop, with the vectorised blocks turned off."""
    monkeypatch.setattr(faultrun, "_VECTOR_MIN", float("inf"))
    sc = _populate_with_churn(profile, costs=costs)
    ref, fast, vm = both(sc, "fast", seed=3)
    assert_same(ref, fast, f"{profile}/{costs}")
    taken, vector = batched(vm)
    assert taken > 0 and vector == 0


@pytest.mark.parametrize("policy", ["fast", "targeted"])
@pytest.mark.parametrize("profile,costs", [("shadow-pvm", "sampled"), ("legacy-2020", "mean"),
                                           ("legacy-2020", "sampled")])
def test_vectorised_blocks_with_pte_prefetch(profile, costs, policy, monkeypatch):
    """Shadow paging and the legacy MMU prefetch a fault's neighbours (the Accessed bit on shadow
    paging): the re-faults of the second pass after a zap find resident neighbours to prefetch, and
    those accesses then hit, in vectorised blocks (desim.mmu.Mmu.plan_prefetch_4k)."""
    in_blocks = []
    commit = Mmu.commit_prefetch_4k
    monkeypatch.setattr(Mmu, "commit_prefetch_4k", lambda self, ss, g: (in_blocks.append(len(g)), commit(self, ss, g)))
    sc = _populate_with_churn(profile, costs=costs)
    ref, fast, vm = both(sc, policy, seed=3)
    assert_same(ref, fast, f"{profile}/{costs}/{policy}")
    m = json.loads(fast)["metrics"]
    taken, vector = batched(vm)
    assert vector > 0.5 * m["faults_first_touch"]
    if policy == "fast":
        assert m["faults_after_zap"] > 0 and sum(in_blocks) > 0.5 * m["sptes_prefetched"] > 100


def test_runs_are_split_where_another_process_intervenes():
    """vCPUs kicked out of their runs by zaps (IPIs, requests, retries on INVALID slots): same results."""
    ops = [{"at_us": 20 + 40 * i, "op": op, "slot": 5, **({"gpa": 16 * MiB, "size": 2 * MiB} if op == "create" else {})}
           for i, op in enumerate(["create", "delete"] * 6)]
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0},
              {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 20000, "access_ns": 20.0,
               "sharing": "shared", "memslot_ops": ops}]
    for profile in INV.PROFILES:
        sc = scenario(vcpus=4, ram_mib=8, phases=phases, profile=profile, kernel={"backing": "4k"})
        ref, fast, vm = both(sc, "fast")
        assert_same(ref, fast, profile)
        m = json.loads(fast)["metrics"]
        assert m["ipis_sent"] > 0 and vm.env.inlined > 0, profile


def test_a_lock_storm_agrees():
    """32 vCPUs faulting back to back on the legacy MMU's exclusive mmu_lock, all at identical times (constant
    integer costs): the storm is drained in cohort runs, FIFO hand-over after hand-over."""
    sc = scenario(vcpus=32, ram_mib=4, profile="legacy-2020", kernel={"backing": "4k"},
                  phases=[{"name": "populate", "pattern": "sequential", "slot": 0, "access_ns": 1.0}])
    ref, fast, vm = both(sc, "targeted")
    assert_same(ref, fast, "lock storm")
    assert json.loads(fast)["metrics"]["lock_contended_fault"] > 900
    steps, planned = in_cohorts(vm)
    assert steps > 1500 and planned > 800  # of 1,024 faults (two steps each: the guest run, the hand-over)


def _many(vcpus: int, profile: str, costs: str = "mean", ops: list | None = None, **kw):
    """``vcpus`` vCPUs populating their own 512 KiB, the VMM's ``ops`` meanwhile; then random accesses to their
    own 1.5 MiB of a slot at 1 GiB (page tables shared by two vCPUs' regions, first reached in cohort runs);
    then a few uniform accesses."""
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0, "access_ns": 20.0, "memslot_ops": ops or []},
              {"name": "second", "pattern": "uniform", "slot": 1, "accesses": 300, "sharing": "private",
               "access_ns": 20.0},
              {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 400, "access_ns": 20.0}]
    return scenario(vcpus=vcpus, ram_mib=vcpus // 2, phases=phases, profile=profile, kernel={"backing": "4k"},
                    costs=costs, extra_slots=[{"id": 1, "gpa": 1 << 30, "size": vcpus * 1536 * 1024}], **kw)


@pytest.mark.parametrize("profile,costs", [("tdp-icelake", "mean"), ("tdp-icelake", "sampled"),
                                           ("legacy-2020", "sampled"), ("shadow-pvm", "sampled")])
def test_cohort_runs_agree(profile, costs, monkeypatch):
    """Many vCPUs faulting at once: read-locked TDP faults (no waits on each other) and exclusive ones (a lock
    storm), constant and drawn costs; with constant costs the identical vCPUs fault at identical times. (Shadow
    paging's faults are planned here although the fast engine does not plan them by default: desim/cohort.py.)"""
    from desim.cohort import Cohort
    monkeypatch.setattr(Cohort, "plan_shadow", True)
    sc = _many(16, profile, costs)
    ref, fast, vm = both(sc, "fast")
    assert_same(ref, fast, f"{profile}/{costs}")
    steps, planned = in_cohorts(vm)
    faults = json.loads(fast)["metrics"]["faults"]
    assert planned > 0.8 * faults and steps >= planned
    if costs == "mean":
        t = np.frombuffer(vm.metrics.fault_time, dtype=np.float64)
        assert len(np.unique(t)) < len(t)  # ties (the first faults at least): SimPy's scheduling order decides


@pytest.mark.parametrize("profile", ["tdp-icelake", "legacy-2020"])
@pytest.mark.parametrize("policy", ["fast", "targeted"])
def test_cohort_runs_are_split_by_memslot_updates(profile, policy):
    """The VMM's ioctls, the zap's write lock (a writer among the readers), its kicks and requests end cohort
    runs where they are due; the vCPUs are handed back mid-run, mid-wait or holding the lock."""
    ops = [{"at_us": 15 + 25 * i, "op": op, "slot": 5, **({"gpa": 16 * MiB, "size": 2 * MiB} if op == "create" else {})}
           for i, op in enumerate(["create", "delete"] * 4)]
    sc = _many(8, profile, "sampled", ops)
    ref, fast, vm = both(sc, policy)
    assert_same(ref, fast, f"{profile}/{policy}")
    m = json.loads(fast)["metrics"]
    assert m["memslot_ioctls"] == 8 and vm.cohort.runs > 4 and in_cohorts(vm)[1] > 0
    if policy == "fast":
        assert m["ipis_sent"] > 0 and m["faults_after_zap"] > 0


def test_cohort_runs_with_host_allocator_waits():
    """Zeroing slower than the memory bandwidth allows, with 8 vCPUs: first touches wait inside cohort runs."""
    sc = _many(8, "tdp-icelake", profile_overrides={"kernel": {"backing": "4k"}, "costs": {"membw_4k": 200.0}})
    ref, fast, vm = both(sc, "targeted")
    assert_same(ref, fast, "host allocator waits")
    assert json.loads(fast)["metrics"]["membw_stretch_ns"] > 0 and in_cohorts(vm)[1] > 0


def test_a_broken_cohort_order_is_caught(monkeypatch):
    """A cohort run numbering the events it schedules with its own (decreasing) counter instead of SimPy's:
    at equal times (constant integer costs make ties) they are taken in another order than the reference
    takes them, and the comparison must fail."""
    ops = [{"at_us": 15 + 25 * i, "op": op, "slot": 5, **({"gpa": 16 * MiB, "size": 2 * MiB} if op == "create" else {})}
           for i, op in enumerate(["create", "delete"] * 4)]
    sc = _many(8, "tdp-icelake", "mean", ops)
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
    own = iter(range(0, -10**9, -1))
    push = cohort.heappush
    monkeypatch.setattr(cohort, "heappush", lambda queue, item: push(
        queue, (*item[:2], next(own), item[3]) if queue is vm.env._queue else item))
    vm = Vm(sc, "fast", seed=1, engine="fast")
    assert ref != fingerprint(vm) and vm.cohort.steps > 0


def test_a_broken_cohort_plan_is_caught(monkeypatch):
    """Planned faults that ignore who allocated a shared page-table page first (both vCPUs pay for it): the
    comparison must fail."""
    sc = _many(8, "tdp-icelake")
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
    vm = Vm(sc, "fast", seed=1, engine="fast")
    assert ref == fingerprint(vm) and vm.cohort.shared_tables > 0
    monkeypatch.setattr(cohort.Cohort, "_table_there", lambda self, lk: False)
    monkeypatch.setattr(cohort_bridge, "_tables_there", lambda mmu, codes: np.zeros(len(codes), dtype=np.int64))
    vm = Vm(sc, "fast", seed=1, engine="fast")
    assert ref != fingerprint(vm)
