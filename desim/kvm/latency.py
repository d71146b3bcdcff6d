"""Per-access latency on the real KVM: the timed guest's rdtsc samples, sorted into classes.

The timed touch loop (:data:`desim.kvm.guest.TIMED_EXITS`) brackets every touch
with ``lfence; rdtsc`` and leaves the cycles, and the TSC before the touch, in
the touched page, where :meth:`desim.kvm.machine.TouchVm.read_timings` reads
them after the passes. An access's latency is the time from the end of the
previous touch to the end of its own (:func:`access_times`), so a stall that
lands between two brackets counts too. Cycles become nanoseconds with the guest TSC frequency
from ``KVM_GET_TSC_KHZ`` (on these hosts the PVM guest's user mode reads the
host TSC natively: ``constant_tsc nonstop_tsc tsc_known_freq``, 2445426 kHz,
the same as the host's ``tsc: Detected`` rate).

One *timed run* (:func:`run_timed`) is two VMs of the scenario:

1. ``populate, warm, op, retouch`` exactly as :func:`desim.kvm.measure.run_once`
   (vCPUs outside ``KVM_RUN`` during the op), with the timed guest. Classes:
   ``first_touch`` = the accesses of the first populate pass slower than
   :data:`STALL_NS` (the first-touch faults: every access with 4 KiB guest
   pages, one per 2 MiB with 2 MiB pages), ``hit`` = the warm pass (no fault), ``retouch`` = the
   first retouch pass, ``refault`` = its accesses slower than
   :data:`STALL_NS` (re-faults after the zap; the count is checked against
   the kernel's ``pf_taken``).
2. ``populate, warm, op-during``: the op issued while every vCPU keeps touching
   (:meth:`~desim.kvm.machine.TouchVm.memslot_op_during_passes`). Class
   ``during_op`` = accesses slower than :data:`STALL_NS` whose interval
   overlaps the DELETE/MOVE ioctl (the stalls a vCPU sees while the VMM's
   DELETE runs: the kick, waiting for ``mmu_lock`` or for the memslot update);
   ``longest_stall`` = the slowest access overlapping it, per run.

Host time and guest TSC are matched per vCPU: the offset is the smallest
``first touch TSC - host time before KVM_RUN`` over its passes (the entry's
delay, a few microseconds, is the error).

Uses numpy (the rest of ``desim.kvm`` is the standard library).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from desim.kvm.machine import PassTiming, PhaseResult, TouchVm
from desim.kvm.measure import derive
from desim.kvm.scenario import KvmScenario
from desim.kvm.vm import Kvm

STALL_NS = 1000.0  # a hit takes ~20 ns, the cheapest fault ~2 us here: slower than this is a stall
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CLASSES = ("first_touch", "hit", "retouch", "refault", "during_op")
ZAP_IOCTLS = ("delete", "move")


def cycles_ns(cycles: Any, tsc_khz: int) -> np.ndarray:
    return np.asarray(cycles, dtype=np.float64) * (1e6 / tsc_khz)


def access_times(p: PassTiming, tsc_khz: int) -> tuple[np.ndarray, np.ndarray]:
    """(start TSC in ns, latency in ns) of each access of one pass.

    An access lasts from the end of the previous touch to the end of its own:
    the rdtsc pair brackets the touch itself, but a kick, a host interrupt or
    preemption can also land on the loop's few instructions between two
    brackets, and the guest sees that time too. The first access of a pass is
    its bracket alone. (A hit so measured includes the loop's own ~10 ns.)
    """
    tsc = np.asarray(p.tsc, dtype=np.int64)
    end = tsc + np.asarray(p.cycles, dtype=np.int64)
    if len(end) == 0:
        return np.zeros(0), np.zeros(0)
    start = np.concatenate([tsc[:1], end[:-1]])
    scale = 1e6 / tsc_khz
    return start * scale, (end - start) * scale


def not_preempted(lat: np.ndarray, run_delay_ns: float) -> np.ndarray:
    """Mask of the accesses of one pass that the host's scheduler did not visibly stretch.

    The vCPU thread waited ``run_delay_ns`` on a run queue during the pass
    (another thread had its CPU: on a shared host, a neighbour; with more
    runnable threads than CPUs, the VMM or another vCPU). That wait landed inside
    some accesses; it is attributed to the slowest ones (of those slower than
    :data:`STALL_NS`): they are dropped while
    their summed latency stays within the wait (plus :data:`STALL_NS`),
    and the slowest is dropped anyway if it is at least half the wait.
    """
    keep = np.ones(len(lat), dtype=bool)
    if run_delay_ns < STALL_NS or len(lat) == 0:
        return keep
    slow = np.flatnonzero(lat > STALL_NS)  # a hit cannot hide a wait on the run queue
    if len(slow) == 0:
        return keep
    order = slow[np.argsort(lat[slow])[::-1]]
    cum = np.cumsum(lat[order])
    drop = order[cum <= run_delay_ns + STALL_NS]
    if len(drop) == 0 and lat[order[0]] >= 0.5 * run_delay_ns:
        drop = order[:1]
    keep[drop] = False
    return keep


def _pass_ns(ph: PhaseResult, pass_index: int, clean: bool = True) -> tuple[np.ndarray, int]:
    """All vCPUs' access latencies (ns) of one pass of a phase, and how many were dropped as preempted."""
    parts, dropped = [], 0
    for t in ph.timings:
        if len(t) <= pass_index:
            continue
        lat = access_times(t[pass_index], ph.tsc_khz)[1]
        if clean:
            k = not_preempted(lat, t[pass_index].run_delay_ns)
            dropped += int((~k).sum())
            lat = lat[k]
        parts.append(lat)
    return (np.concatenate(parts) if parts else np.zeros(0)), dropped


def during_op(ph: PhaseResult, clean: bool = True) -> tuple[np.ndarray, float, int]:
    """(stalls overlapping a DELETE/MOVE ioctl in ns, the longest access overlapping it, accesses
    overlapping it)."""
    wins = [(a, b) for what, a, b in ph.windows if what in ZAP_IOCTLS]
    stalls: list[np.ndarray] = []
    longest = 0.0
    overlapping = 0
    for passes in ph.timings:
        if not passes:
            continue
        offset = min(p.tsc[0] * (1e6 / ph.tsc_khz) - p.host_ns for p in passes if len(p.tsc))
        for p in passes:
            start, lat = access_times(p, ph.tsc_khz)
            start -= offset
            keep = not_preempted(lat, p.run_delay_ns) if clean else np.ones(len(lat), dtype=bool)
            for a, b in wins:
                sel = (start < b) & (start + lat > a) & keep
                if sel.any():
                    overlapping += int(sel.sum())
                    longest = max(longest, float(lat[sel].max()))
                    stalls.append(lat[sel & (lat > STALL_NS)])
    return (np.concatenate(stalls) if stalls else np.zeros(0)), longest, overlapping


@dataclass
class TimedRun:
    """One timed run: the harness's metrics (counts as untimed) and the latency samples by class."""

    metrics: dict[str, int]
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per phase, the kernel's counter deltas
    longest_stall_ns: float = 0.0      # slowest access overlapping the DELETE/MOVE, preempted ones dropped
    longest_stall_raw_ns: float = 0.0  # the same, all accesses
    during_accesses: int = 0           # accesses overlapping the DELETE/MOVE ioctl
    tsc_khz: int = 0
    refault_pf_taken: int = 0  # pf_taken of the retouch phase minus the warm baseline
    refault_stalls: int = 0    # accesses of the first retouch pass slower than STALL_NS (all of them)
    preempted: int = 0         # accesses dropped as stretched by the host scheduler (not_preempted)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"longest_stall_ns": self.longest_stall_ns,
                               "longest_stall_raw_ns": self.longest_stall_raw_ns,
                               "during_accesses": self.during_accesses, "tsc_khz": self.tsc_khz,
                               "refault_pf_taken": self.refault_pf_taken, "refault_stalls": self.refault_stalls,
                               "preempted": self.preempted}
        for c, x in self.samples.items():
            out[c] = percentiles(x)
        return out


def percentiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"n": 0}
    q = np.percentile(x, PERCENTILES)
    return {"n": int(len(x)), **{f"p{p:g}": float(v) for p, v in zip(PERCENTILES, q)}, "max": float(x.max())}


def run_timed(kvm: Kvm, sc: KvmScenario, exit: str = "pio", during: bool = True,
              step: Callable[[], None] = lambda: None) -> TimedRun:
    """The two VMs of a timed run (see the module docstring)."""
    phases: dict[str, PhaseResult] = {}
    with TouchVm(kvm, sc, exit=exit, timed=True) as tv:
        step()
        phases["populate"] = tv.touch(sc.passes, "populate")
        step()
        phases["warm"] = tv.touch(1, "warm")
        step()
        phases["op"] = tv.memslot_op("op")
        step()
        phases["retouch"] = tv.touch(sc.passes, "retouch")
        khz = tv.tsc_khz
    run = TimedRun(derive(sc, phases), tsc_khz=khz)
    run.counts = {k: dict(ph.delta) for k, ph in phases.items()}
    pop, d1 = _pass_ns(phases["populate"], 0)
    run.samples["first_touch"] = pop[pop > STALL_NS]  # the faults (with 2 MiB pages most touches hit)
    run.samples["hit"], d2 = _pass_ns(phases["warm"], 0)
    ret, d3 = _pass_ns(phases["retouch"], 0)
    run.samples["retouch"] = ret
    run.samples["refault"] = ret[ret > STALL_NS]
    raw_ret, _ = _pass_ns(phases["retouch"], 0, clean=False)
    run.refault_stalls = int((raw_ret > STALL_NS).sum())
    run.refault_pf_taken = run.metrics["refault_pf_taken"]
    run.preempted = d1 + d2 + d3
    if during:
        with TouchVm(kvm, sc, exit=exit, timed=True) as tv:
            tv.touch(sc.passes, "populate")
            tv.touch(1, "warm")
            ph = tv.memslot_op_during_passes("op-during")
        run.samples["during_op"], run.longest_stall_ns, run.during_accesses = during_op(ph)
        _, run.longest_stall_raw_ns, _ = during_op(ph, clean=False)
    return run
