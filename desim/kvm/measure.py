"""Measure a scenario on the real KVM under both zap policies.

One *run* is one VM (:class:`desim.kvm.machine.TouchVm`) through four phases:

``populate``  every vCPU touches its region ``passes`` times (first touch:
              host page allocation + one shadow-paging fault per page);
``warm``      one more pass: the steady-state baseline (on this host one
              ``pf_taken`` per vCPU with the MMIO exit, none with PIO);
(``accessed=False``: the guest PTEs' Accessed bits are cleared here)
``op``        the memslot operation (``KVM_SET_USER_MEMORY_REGION``), vCPUs
              outside ``KVM_RUN``; the zap happens inside the ioctl;
``retouch``   ``passes`` passes again: the re-faults the zap caused.

Counters are deltas of the binary stats (``KVM_GET_STATS_FD``, VM plus sum
of vCPUs); times are ``time.perf_counter_ns`` wall times. Derived metrics
subtract the ``warm`` baseline, so ``refaults`` counts only faults the zap
caused. ``measure`` runs ``vms`` VMs at once (their phases kept in step by a
barrier) for ``repeats`` rounds per policy, alternating which policy goes
first, and summarizes each metric by median and min-max.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from desim.errors import DesimInputError
from desim.kvm import uapi as u
from desim.kvm.machine import PhaseResult, TouchVm, install_kick_handler
from desim.kvm.probe import mem_available, mmu_kind, module_params
from desim.kvm.scenario import POLICIES, KvmScenario, layout
from desim.kvm.vm import Kvm

MEM_FRACTION = 0.8  # at most this share of MemAvailable goes to guest memory

# metric name -> (unit, description); the order is the print order
METRICS: dict[str, tuple[str, str]] = {
    "refaults": ("count", "pf_fixed in retouch minus the warm baseline: SPTEs rebuilt by faults"),
    "refault_pf_taken": ("count", "pf_taken in retouch minus the warm baseline"),
    "retouch_ns": ("ns", "wall time of the retouch phase"),
    "retouch_extra_ns": ("ns", "retouch wall time minus passes x warm wall time"),
    "zap_ioctl_ns": ("ns", "the DELETE or MOVE ioctl (where the zap runs)"),
    "create_ioctl_ns": ("ns", "the re-CREATE ioctl of op 'recreate'"),
    "op_ns": ("ns", "wall time of all memslot ioctls of the operation"),
    "op_shadow_zapped": ("count", "mmu_shadow_zapped during the operation"),
    "retouch_shadow_zapped": ("count", "mmu_shadow_zapped during retouch"),
    "op_sptes_4k_dropped": ("count", "fall of pages_4k during the operation"),
    "op_sptes_2m_dropped": ("count", "fall of pages_2m during the operation"),
    "op_remote_tlb_flush_requests": ("count", "remote_tlb_flush_requests during the operation"),
    "populate_ns": ("ns", "wall time of the populate phase"),
    "populate_pf_fixed": ("count", "pf_fixed during populate"),
    "warm_ns": ("ns", "wall time of one steady-state pass"),
    "warm_pf_taken": ("count", "pf_taken of one steady-state pass (one per vCPU with the MMIO exit)"),
    "sptes_4k": ("count", "pages_4k after populate"),
    "sptes_2m": ("count", "pages_2m after populate"),
}


def derive(sc: KvmScenario, phases: dict[str, PhaseResult]) -> dict[str, int]:
    """The :data:`METRICS` of one run from its phases."""
    pop, warm, op, ret = (phases[k] for k in ("populate", "warm", "op", "retouch"))
    d = lambda ph, k: ph.delta.get(k, 0)  # noqa: E731
    ioctl = dict(op.ioctls)
    return {
        "refaults": d(ret, "pf_fixed") - sc.passes * d(warm, "pf_fixed"),
        "refault_pf_taken": d(ret, "pf_taken") - sc.passes * d(warm, "pf_taken"),
        "retouch_ns": ret.wall_ns,
        "retouch_extra_ns": ret.wall_ns - sc.passes * warm.wall_ns,
        "zap_ioctl_ns": ioctl.get("delete", ioctl.get("move", 0)),
        "create_ioctl_ns": ioctl.get("create", 0),
        "op_ns": sum(ioctl.values()),
        "op_shadow_zapped": d(op, "mmu_shadow_zapped"),
        "retouch_shadow_zapped": d(ret, "mmu_shadow_zapped"),
        "op_sptes_4k_dropped": -d(op, "pages_4k"),
        "op_sptes_2m_dropped": -d(op, "pages_2m"),
        "op_remote_tlb_flush_requests": d(op, "remote_tlb_flush_requests"),
        "populate_ns": pop.wall_ns,
        "populate_pf_fixed": d(pop, "pf_fixed"),
        "warm_ns": warm.wall_ns,
        "warm_pf_taken": d(warm, "pf_taken"),
        "sptes_4k": pop.level.get("pages_4k", 0),
        "sptes_2m": pop.level.get("pages_2m", 0),
    }


def run_once(kvm: Kvm, sc: KvmScenario, step: Callable[[], None] = lambda: None,
             exit: str = "pio") -> dict[str, Any]:
    """One VM through populate, warm, op, retouch; ``step`` is called between phases."""
    phases: dict[str, PhaseResult] = {}
    with TouchVm(kvm, sc, exit=exit) as tv:
        step()
        phases["populate"] = tv.touch(sc.passes, "populate")
        step()
        phases["warm"] = tv.touch(1, "warm")
        if not sc.accessed:
            tv.clear_accessed()
        step()
        phases["op"] = tv.memslot_op("op")
        step()
        phases["retouch"] = tv.touch(sc.passes, "retouch")
    return {"metrics": derive(sc, phases), "phases": {k: v.to_dict() for k, v in phases.items()}}


def check_resources(kvm: Kvm, sc: KvmScenario, vms: int) -> None:
    """Refuse (DesimInputError) what the host cannot hold or KVM cannot create."""
    if vms < 1:
        raise DesimInputError(f"--vms must be >= 1 (got {vms})")
    need = layout(sc).guest_bytes * vms
    avail = mem_available()
    if avail and need > avail * MEM_FRACTION:
        raise DesimInputError(
            f"scenario {sc.name!r} needs {need >> 20} MiB of guest memory for {vms} VM(s), more than "
            f"{int(MEM_FRACTION * 100)}% of MemAvailable ({avail >> 20} MiB): lower ram_mib or --vms")
    max_vcpus = kvm.check_extension(u.KVM_CAP_MAX_VCPUS) or kvm.check_extension(u.KVM_CAP_NR_VCPUS)
    if max_vcpus and sc.vcpus > max_vcpus:
        raise DesimInputError(f"vcpus {sc.vcpus} exceeds this KVM's KVM_CAP_MAX_VCPUS ({max_vcpus})")
    slots = kvm.check_extension(u.KVM_CAP_NR_MEMSLOTS)
    if slots and sc.extra_slots + 2 > slots:
        raise DesimInputError(f"extra_slots {sc.extra_slots} + 2 exceeds KVM_CAP_NR_MEMSLOTS ({slots})")
    if not kvm.check_extension(u.KVM_CAP_DISABLE_QUIRKS2) & u.KVM_X86_QUIRK_SLOT_ZAP_ALL:
        raise DesimInputError("this KVM cannot disable KVM_X86_QUIRK_SLOT_ZAP_ALL (needs Linux 6.12+), "
                              "so the targeted policy cannot be measured")


def run_round(kvm: Kvm, sc: KvmScenario, vms: int, exit: str = "pio") -> list[dict[str, Any]]:
    """``vms`` VMs of ``sc`` at once, phases in step; one result dict per VM.

    With several VMs their VMM threads issue their memslot ioctls together and keep the CPUs busy
    themselves, so ``busy_cpus`` is turned off (one spinner set per VM would pin every VMM thread
    to the same CPU)."""
    if vms > 1 and sc.busy_cpus:
        sc = replace(sc, busy_cpus=False)
    barrier = threading.Barrier(vms)
    results: list[dict[str, Any] | None] = [None] * vms
    errors: list[BaseException] = []

    def step() -> None:
        try:
            barrier.wait(timeout=600)
        except threading.BrokenBarrierError:
            raise RuntimeError("another VM of this round failed") from None

    def one(i: int) -> None:
        try:
            results[i] = run_once(kvm, sc, step if vms > 1 else (lambda: None), exit=exit)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)
            barrier.abort()

    if vms == 1:
        one(0)
    else:
        threads = [threading.Thread(target=one, args=(i,), name=f"vm-{i}") for i in range(vms)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        # the first error that is not just "another VM failed"
        raise next((e for e in errors if not isinstance(e, RuntimeError)), errors[0])
    return [r for r in results if r is not None]


@dataclass
class Measurement:
    """All runs of one scenario under both policies, and their summary."""

    scenario: KvmScenario
    vms: int
    repeats: int
    exit: str = "pio"
    runs: list[dict[str, Any]] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def samples(self, policy: str, metric: str) -> list[int]:
        return [r["metrics"][metric] for r in self.runs if r["policy"] == policy]

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for pol in POLICIES:
            out[pol] = {}
            for m in METRICS:
                xs = self.samples(pol, m)
                if xs:
                    out[pol][m] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "desim kvm measure",
            "host": self.host,
            "scenario": {k: v for k, v in self.scenario.to_dict().items() if k != "policy"},
            "vms": self.vms,
            "repeats": self.repeats,
            "exit": self.exit,
            "elapsed_s": round(self.elapsed_s, 3),
            "metrics": {k: {"unit": unit, "description": desc} for k, (unit, desc) in METRICS.items()},
            "summary": self.summary(),
            "runs": self.runs,
        }


def host_info(kvm: Kvm) -> dict[str, Any]:
    params = module_params()
    return {
        "kernel": os.uname().release,
        "modules": sorted(params),
        "mmu": mmu_kind(params),
        "cpus": os.cpu_count(),
        "api_version": kvm.api_version,
    }


def measure(sc: KvmScenario, vms: int = 1, repeats: int = 3, progress: Callable[[str], None] | None = None,
            kvm_path: str = "/dev/kvm", exit: str = "pio", warmup: int = 0) -> Measurement:
    """Run ``sc`` ``repeats`` times per policy with ``vms`` VMs at once.

    ``exit`` is how a pass returns to the VMM: ``pio`` (``out`` to port 0x80,
    no fault) or ``mmio`` (a write to a gpa without memslot: one extra
    ``pf_taken`` per vCPU per pass, subtracted as the warm baseline).
    ``warmup`` rounds run first and are discarded (e.g. so that host THP runs
    find free huge pages instead of paying for compaction).
    """
    if repeats < 1:
        raise DesimInputError(f"--repeats must be >= 1 (got {repeats})")
    if warmup < 0:
        raise DesimInputError(f"--warmup must be >= 0 (got {warmup})")
    if vms > 1 and sc.busy_cpus:  # as run_round does: recorded as it is run
        sc = replace(sc, busy_cpus=False)
    install_kick_handler()
    t0 = time.monotonic()
    with Kvm(kvm_path) as kvm:
        check_resources(kvm, sc, vms)
        m = Measurement(sc, vms, repeats, exit=exit, host=host_info(kvm))
        for _ in range(warmup):
            run_round(kvm, sc, vms, exit)
        for rep in range(repeats):
            order = POLICIES if rep % 2 == 0 else tuple(reversed(POLICIES))
            for pol in order:
                for i, r in enumerate(run_round(kvm, sc.with_policy(pol), vms, exit)):
                    m.runs.append({"policy": pol, "repeat": rep, "vm": i, **r})
                if progress:
                    last = m.runs[-1]["metrics"]
                    progress(f"repeat {rep + 1}/{repeats} {pol:8s}: refaults {last['refaults']}, "
                             f"zap ioctl {last['zap_ioctl_ns'] / 1e3:.0f} us, retouch {last['retouch_ns'] / 1e6:.2f} ms")
    m.elapsed_s = time.monotonic() - t0
    return m


def measure_interleaved(scenarios: list[KvmScenario], repeats: int = 5,
                        progress: Callable[[str], None] | None = None,
                        kvm_path: str = "/dev/kvm") -> list[Measurement]:
    """One :class:`Measurement` per scenario (one VM each), with the repeats interleaved.

    Round ``r`` runs every scenario once under each policy, so a slow spell of the host (on
    these machines neighbour load slows kernel work by 20-30% for seconds) lands on one or two
    repeats of many scenarios, where the median absorbs it, not on every repeat of one. Host-THP
    scenarios run last, back to back after one discarded warm-up round: the first THP VM after
    4 KiB-heavy ones pays for compaction (2.7 ms instead of 0.19 ms per 2 MiB first touch), which
    the model does not have.
    """
    if repeats < 1:
        raise DesimInputError(f"--repeats must be >= 1 (got {repeats})")
    install_kick_handler()
    t0 = time.monotonic()
    with Kvm(kvm_path) as kvm:
        for sc in scenarios:
            check_resources(kvm, sc, 1)
        host = host_info(kvm)
        out = [Measurement(sc, 1, repeats, host=host) for sc in scenarios]

        def one_round(i: int, rep: int) -> None:
            order = POLICIES if rep % 2 == 0 else tuple(reversed(POLICIES))
            for pol in order:
                r = run_round(kvm, scenarios[i].with_policy(pol), 1)[0]
                out[i].runs.append({"policy": pol, "repeat": rep, "vm": 0, **r})

        plain = [i for i, sc in enumerate(scenarios) if not sc.host_thp]
        for rep in range(repeats):
            for i in plain:
                one_round(i, rep)
            if progress and plain:
                progress(f"round {rep + 1}/{repeats} of {len(plain)} scenario(s) done")
        for i, sc in enumerate(scenarios):
            if sc.host_thp:
                run_round(kvm, sc, 1)  # warm-up, discarded
                for rep in range(repeats):
                    one_round(i, rep)
                if progress:
                    progress(f"{sc.name}: {repeats} round(s) done")
    elapsed = time.monotonic() - t0
    for m in out:
        m.elapsed_s = elapsed
    return out


def _fmt(v: float, unit: str) -> str:
    if unit == "ns":
        if abs(v) >= 1e6:
            return f"{v / 1e6:.2f}ms"
        return f"{v / 1e3:.1f}us"
    return f"{v:g}"


def format_summary(m: Measurement) -> str:
    """A table: metric, then median [min-max] per policy."""
    s = m.summary()
    sc = m.scenario
    head = (f"scenario {sc.name}: ram {sc.ram_mib} MiB, {sc.vcpus} vCPU, {sc.extra_slots} extra slot(s) of "
            f"{sc.extra_slot_mib} MiB, op {sc.op} of extra slot {sc.target} ({sc.position} the touched range), "
            f"guest pages {sc.guest_page}, host THP {'on' if sc.host_thp else 'off'}, passes {sc.passes}; "
            f"{m.vms} VM(s) x {m.repeats} repeat(s) per policy, {m.exit} exit")
    rows = [head, f"{'metric':30s} {'fast: median [min-max]':>32s} {'targeted: median [min-max]':>32s}"]
    for name, (unit, _) in METRICS.items():
        cells = []
        for pol in POLICIES:
            st = s.get(pol, {}).get(name)
            cells.append("-" if st is None else
                         f"{_fmt(st['median'], unit)} [{_fmt(st['min'], unit)}-{_fmt(st['max'], unit)}]")
        rows.append(f"{name:30s} {cells[0]:>32s} {cells[1]:>32s}")
    return "\n".join(rows)
