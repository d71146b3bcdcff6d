"""The same experiment in the simulator: a :class:`KvmScenario` as a :class:`desim.scenario.Scenario`.

The harness's VM (:func:`desim.kvm.scenario.layout`) becomes the simulator's
memslots with the same ids, gpas and sizes; its phases become simulator
phases run back to back (``desim/vm.py``: a phase ends when its vCPUs and its
VMM script are done):

``populate``  ``sequential`` over each touched slot, ``private`` (split
              among the vCPUs like the harness splits its touched range);
``warm``      the same, one pass;
``op``        ``pattern = "none"`` and the memslot script at t = 0: DELETE,
              DELETE + CREATE (same gpa and host address) or MOVE;
``retouch``   like populate.

A position ``inside`` touches the target slot too; the simulator touches one
slot per phase, so each touch phase becomes one phase per touched slot
(``populate:1``, ``populate:2``, ...), summed back by :func:`sim_metrics`.
:func:`sim_metrics` returns the harness's metric names
(:data:`desim.kvm.measure.METRICS`) from a simulator run, so real and
simulated runs can be compared metric by metric. The hits' latency shape is
the profile's ``[harness] access_dist`` (what ``desim calibrate`` measured of
this harness's guest, :func:`harness_access_dist`), the mirrored scenario's
``access_dist`` (:mod:`desim.hitdist`). Each touch phase starts
with the guest's code page (``:code``: one first-touch fault, and the
prefetch of its neighbours, the page tables the VMM wrote). Not modelled:
``accessed=False`` (the simulator takes "was ever mapped" for the guest
PTE's Accessed bit).
"""
from __future__ import annotations

from typing import Any

from desim.errors import DesimInputError
from desim.kvm.scenario import KvmScenario, layout

TOUCH_PHASES = ("populate", "warm", "retouch")


def to_sim(sc: KvmScenario, profile: str = "shadow-pvm", access_ns: float = 30.0,
           costs: dict[str, float] | None = None, kernel: dict[str, Any] | None = None) -> Any:
    """The simulator scenario of ``sc`` on host ``profile`` (a name or a TOML path)."""
    from desim.scenario import validate_scenario

    if not sc.accessed:
        raise DesimInputError(f"kvm scenario {sc.name!r}: accessed = false is not modelled by the simulator")
    if sc.stride_kib != 4:
        raise DesimInputError(f"kvm scenario {sc.name!r}: stride_kib != 4 has no simulator pattern")
    lay = layout(sc)
    target = lay.slot(lay.target_slot)
    touched = [s for s in lay.slots if s.touched]
    backing = {"backing": "thp" if sc.host_thp else "4k"}
    hit_shape = harness_access_dist(profile, sc.host_thp)
    phases: list[dict[str, Any]] = []
    for name in ("populate", "warm", "op", "retouch"):
        if name == "op":
            if sc.op == "move":
                ops = [{"at_us": 0, "op": "move", "slot": target.slot, "gpa": lay.move_gpa}]
            else:
                ops = [{"at_us": 0, "op": "delete", "slot": target.slot}]
                if sc.op == "recreate":
                    ops.append({"at_us": 0, "op": "create", "slot": target.slot, "gpa": target.gpa,
                                "size": target.size})
            phases.append({"name": "op", "pattern": "none", "memslot_ops": ops})
            continue
        passes = 1 if name == "warm" else sc.passes
        # every pass starts by fetching the guest's code page (gpa 0, in the system slot)
        phases.append({"name": f"{name}:code", "pattern": "sequential", "gpa": lay.code_gpa, "size": 4096,
                       "sharing": "shared", "passes": passes, "access_ns": access_ns})
        for s in touched:
            phases.append({"name": name if len(touched) == 1 else f"{name}:{s.slot}", "pattern": "sequential",
                           "slot": s.slot, "sharing": "private", "passes": passes, "access_ns": access_ns})
    data = {
        "name": f"kvm-{sc.name}",
        "description": f"desim kvm scenario {sc.name} mirrored in the simulator",
        "profile": profile,
        "profile_overrides": {"kernel": {**backing, **(kernel or {})}, "costs": dict(costs or {})},
        "policy": sc.policy,
        "vm": {"vcpus": sc.vcpus, "memslots": [_memslot(s) for s in lay.slots]},
        "phases": phases,
        "access_dist": hit_shape.model_dump(exclude_none=True) if hit_shape is not None else None,
    }
    return validate_scenario(data, f"kvm scenario {sc.name} (simulated)")


def harness_access_dist(profile: str, host_thp: bool = False) -> Any:
    """The shape of the harness guest's hits that ``desim calibrate`` measured with ``profile``
    (its ``[harness] access_dist``, or ``access_dist_thp`` on host THP), or None: the mirrored
    scenario's ``access_dist``."""
    from desim.profile import load_profile

    h = load_profile(profile).harness
    return h.access_dist_thp if host_thp else h.access_dist


def _memslot(plan: Any) -> dict[str, Any]:
    """A harness memslot as a simulator one: the system slot holds the code and page tables the
    VMM wrote before the first KVM_RUN (host-resident, 4 KiB pages: TouchVm never asks THP for it)."""
    d: dict[str, Any] = {"id": plan.slot, "gpa": plan.gpa, "size": plan.size}
    if plan.role == "system":
        d.update(backing="4k", prealloc=True)
    return d


def _phase_spans(phase_end: dict[str, float]) -> dict[str, float]:
    """Duration of each harness phase, summing the per-slot sub-phases."""
    out: dict[str, float] = {}
    prev = 0.0
    for name, end in phase_end.items():  # insertion order == run order
        out[name.split(":")[0]] = out.get(name.split(":")[0], 0.0) + (end - prev)
        prev = end
    return out


def sim_metrics(sc: KvmScenario, profile: str = "shadow-pvm", seed: int = 1, replication: int = 0,
                access_ns: float = 30.0, costs: dict[str, float] | None = None) -> dict[str, float]:
    """One simulator run of ``sc``, reported in the harness's metric names."""
    from desim.vm import Vm

    sim = to_sim(sc, profile, access_ns, costs)
    vm = Vm(sim, sc.policy, seed, replication)
    res = vm.run()
    raw = res.raw
    assert raw is not None
    spans = _phase_spans(raw.phase_end_ns)
    ops = list(raw.ioctl_ops)
    lat = list(raw.ioctl_latency)
    by_op = dict(zip(ops, lat))
    m = res.metrics
    return {
        "refaults": m["faults_after_zap"],
        "retouch_ns": spans.get("retouch", 0.0),
        "retouch_extra_ns": spans.get("retouch", 0.0) - sc.passes * spans.get("warm", 0.0),
        "zap_ioctl_ns": by_op.get("delete", by_op.get("move", 0.0)),
        "create_ioctl_ns": by_op.get("create", 0.0),
        "op_ns": float(sum(lat)),
        "op_sptes_dropped": m["sptes_zapped"],
        "op_shadow_zapped": m["pt_pages_freed"],
        "populate_ns": spans.get("populate", 0.0),
        "populate_pf_fixed": m["faults_first_touch"],
        "warm_ns": spans.get("warm", 0.0),
    }


def during_competing_task(vcpus: int, host_cpus: int | None = None) -> bool:
    """Whether the VMM thread shares its CPU with a runnable task while the op runs during passes.

    :meth:`desim.kvm.machine.TouchVm.memslot_op_during_passes` runs no
    spinners: each vCPU thread is always runnable (in the guest, or spinning
    on ``mmu_lock`` with preemption disabled), so with ``vcpus + 1`` threads
    on ``host_cpus`` CPUs the VMM thread always has a competitor, and the
    scheduler's tick sets ``need_resched()`` once its slice is used
    (:class:`desim.sched.NeedResched`): ``kvm_zap_obsolete_pages`` then drops
    ``mmu_lock`` at its next ``cond_resched_rwlock_write``. Measured here
    (2 vCPUs, 1 GiB, 2 CPUs, fast zap): a vCPU stalled 3.7-6.6 ms (a 4 ms
    tick at HZ = 250 after the 1.5 ms slice), re-faulted for a while, then
    stalled again at the VMM's next hold; with 1 vCPU (2 threads on 2 CPUs)
    it stalled for the whole zap. Other processes on the host (a shared
    machine) are not counted: the harness assumes an otherwise idle host.
    """
    import os

    cpus = host_cpus if host_cpus is not None else (os.cpu_count() or 1)
    return vcpus + 1 > cpus


def to_sim_during(sc: KvmScenario, profile: str = "shadow-pvm", access_ns: float = 30.0,
                  costs: dict[str, float] | None = None, host_cpus: int | None = None) -> Any:
    """The second VM of a timed run (:func:`desim.kvm.latency.run_timed`): populate, warm, then the
    memslot operation while the vCPUs keep touching their regions (``until = "vmm"``).

    The harness issues the operation once every vCPU is back in ``KVM_RUN``
    after its first pass, i.e. at a random point of a pass: here a quarter
    into the second pass of the phase (the share of a pass is an
    estimate; what is compared, the stalls overlapping the ioctl, does not
    depend on it while the ioctl is shorter than a pass). The host's CPUs
    (``host_cpus``, default this machine's) decide whether the VMM thread
    has a competing task (:func:`during_competing_task`).
    """
    from desim.scenario import validate_scenario

    base = to_sim(sc, profile, access_ns, costs,
                  kernel={"competing_task": during_competing_task(sc.vcpus, host_cpus)}).model_dump()
    lay = layout(sc)
    touched = [s for s in lay.slots if s.touched]
    phases = [p for p in base["phases"] if p["name"].split(":")[0] in ("populate", "warm")]
    op = next(p for p in base["phases"] if p["name"] == "op")
    pages = layout(sc).touched_pages(sc.stride_kib << 10) / sc.vcpus
    at_us = 1.25 * pages * access_ns / 1e3
    touches = [{"pattern": "sequential", "slot": s.slot, "sharing": "private", "access_ns": access_ns,
                "until": "vmm"} for s in touched]
    ops = [dict(o, at_us=at_us) for o in op["memslot_ops"]]
    phases.append({"name": "during", "pattern": "none", "touches": touches, "memslot_ops": ops})
    base["phases"] = phases
    base["name"] = f"kvm-{sc.name}-during"
    return validate_scenario(base, f"kvm scenario {sc.name} (simulated, op during passes)")


def sim_latency(sc: KvmScenario, profile: str = "shadow-pvm", seed: int = 1, replication: int = 0,
                access_ns: float = 30.0, costs: dict[str, float] | None = None,
                host_cpus: int | None = None) -> dict[str, Any]:
    """The latency classes of :mod:`desim.kvm.latency` from simulator runs of ``sc``: ``first_touch``
    (accesses of the populate phase), ``refault`` (stalled accesses of retouch, as the harness's
    accesses slower than ``STALL_NS``), ``during_op`` (stalls overlapping the DELETE/MOVE) and
    ``longest_stall`` (the slowest access overlapping it; a hit if none stalled)."""
    import numpy as np

    from desim.kvm.latency import STALL_NS, ZAP_IOCTLS
    from desim.vm import Vm

    def stalls(vm: Any) -> tuple[Any, np.ndarray, np.ndarray]:
        raw = vm.run().raw
        return raw, np.frombuffer(raw.access_stall_time, dtype=np.float64), np.frombuffer(raw.access_stall,
                                                                                       dtype=np.float64)

    raw, t, lat = stalls(Vm(to_sim(sc, profile, access_ns, costs), sc.policy, seed, replication))
    out: dict[str, Any] = {}
    start = 0.0
    spans: dict[str, list[tuple[float, float]]] = {}
    for name, end in raw.phase_end_ns.items():
        if not name.endswith(":code"):
            spans.setdefault(name.split(":")[0], []).append((start, end))
        start = end

    def within(phase: str) -> np.ndarray:
        m = np.zeros(len(t), dtype=bool)
        for a, b in spans.get(phase, []):
            m |= (t >= a) & (t < b)
        return m
    out["first_touch"] = lat[within("populate")]
    r = lat[within("retouch")]
    out["refault"] = r[r > STALL_NS]
    raw, t, lat = stalls(Vm(to_sim_during(sc, profile, access_ns, costs, host_cpus), sc.policy, seed, replication))
    wins = [(a, a + b) for op, a, b in zip(raw.ioctl_ops, raw.ioctl_time, raw.ioctl_latency) if op in ZAP_IOCTLS]
    sel = np.zeros(len(t), dtype=bool)
    for a, b in wins:
        sel |= (t < b) & (t + lat > a)
    out["during_op"] = lat[sel & (lat > STALL_NS)]
    out["longest_stall"] = float(lat[sel].max()) if sel.any() else access_ns
    return out
