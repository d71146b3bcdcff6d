"""Replay of a recorded guest boot: each vCPU touches what the real vCPU touched, interval by interval.

A recording (:mod:`desim.record.format`) holds, per vCPU and per interval of
the recorded boot, the guest pages the vCPU read, wrote or executed, its
instruction count and how long it was halted, and every PCI BAR the guest
made QEMU map or unmap. The replay turns that into, for each simulated vCPU,
a sequence of *steps*:

* **wait until** the interval's start on the simulated timeline (the vCPU
  halts: ``kvm_vcpu_halt``, SRCU released, no IPIs). A vCPU delayed by
  faults starts its next interval late, so delays are absorbed by time the
  real vCPU spent halted and accumulate where it was busy;
* **pages**: the interval's page set, in ascending gfn order (the order
  inside an interval is not recorded), spread evenly over the vCPU's busy
  time in that interval. A page touched in several intervals is touched
  again in each: after a fast zap it re-faults where the real guest touched
  it again;
* **ioctl**: the memslot operations of the BAR changes the vCPU made in that
  interval, issued after its pages. In QEMU the vCPU thread that writes the
  PCI command register or a BAR runs ``pci_update_mappings`` and the memory
  transaction commit, i.e. the ``KVM_SET_USER_MEMORY_REGION`` ioctls, itself
  (accel/kvm/kvm-all.c ``kvm_set_phys_mem``), so the vCPU is out of the
  guest until they return. Changes made by QEMU's main thread go to vCPU 0.

**Recorded time to simulated time** (``time_map``). TCG with the recording
plugin runs guest instructions tens of times slower than a KVM vCPU, while
timers, device delays and halts take the same wall-clock time, so the
recorded intervals cannot be replayed at face value:

* ``"instructions"`` (default): a vCPU's busy time in an interval is its
  instruction count times ``ns_per_insn``; the interval lasts as long as its
  busiest vCPU's instructions plus the time in which *every* vCPU was halted
  (the shortest halted time of the interval: the guest waited for a timer
  or a device, which takes as long under KVM). Busy-wait loops that poll a
  clock (``udelay``) count as instructions and shrink with the rest.
* ``"recorded"``: the recorded wall-clock timeline times ``time_scale``
  (busy time = interval minus halted time, scaled the same way).

``experiments/recorded_time_map.py`` shows how the seed's claims move with
these choices.

**Replications.** With a list of recordings (boots of the same
configuration), replication r replays recording r modulo their number: the
replay itself draws no random numbers, so the variation between
replications is the variation between real boots.

**Memslots.** A BAR change is replayed as KVM would see it: a RAM-backed BAR
(or ROM) unmapped is a DELETE of the memslot at that address and size, mapped
is a CREATE (slot id: the lowest free one, as QEMU's ``kvm_alloc_slot``;
host address: the one the region had before, so its host pages stay
resident). A BAR the simulated VM has no memslot for (or one that would
overlap another) is skipped and counted. At the start of a ``part =
"kernel"`` replay, RAM-backed BARs that the recording shows mapped at the
kernel's entry but the VM lacks (devices absent from the firmware's memslot
trace) are created first.

Simplifications: page order within an interval; the position of a BAR
change inside its interval (always at the end); one access per page and
interval (the access count does not matter, time is carried by the busy
time); TCG's memory ordering and timing between vCPUs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import simpy

from .memslot import MemslotOp, MrChange
from .record.format import Recording, load_recording_cached
from .workload import CHUNK, AccessStream

if TYPE_CHECKING:  # pragma: no cover
    from .scenario import TouchSpec
    from .vm import Vm

MIN_ACCESS_NS = 0.01


@dataclass
class Timeline:
    """Per-interval simulated start times and per-row busy times of one part of a recording."""

    first: int                 # first interval of the part
    start_ns: np.ndarray       # start of interval (first + i), relative to the part's start
    busy_ns: np.ndarray        # per row of the recording


def part_intervals(rec: Recording, part: str) -> tuple[int, int]:
    """[first, last] intervals of ``part`` ("all", "firmware", "kernel")."""
    iv = rec.arrays["row_interval"].astype(np.int64)
    lo, hi = (int(iv.min()), int(iv.max())) if len(iv) else (0, -1)
    entry = int(rec.header.get("kernel_entry_interval", -1))
    if part == "firmware":
        return (lo, entry - 1) if entry >= 0 else (lo, lo - 1)
    if part == "kernel":
        return (max(lo, entry), hi) if entry >= 0 else (lo, hi)
    return lo, hi


def timeline(rec: Recording, part: str, time_map: str, ns_per_insn: float, time_scale: float) -> Timeline:
    a = rec.arrays
    delta = float(rec.interval_ns)
    first, last = part_intervals(rec, part)
    n = max(0, last - first + 1)
    iv = a["row_interval"].astype(np.int64)
    idle = a["row_idle_ns"].astype(np.float64)
    if time_map == "recorded":
        busy = np.maximum(delta - idle, 0.0) * time_scale
        length = np.full(n, delta * time_scale)
    else:
        busy = a["row_insns"].astype(np.float64) * ns_per_insn
        inside = (iv >= first) & (iv <= last)
        k = iv[inside] - first
        most_busy = np.zeros(n)
        np.maximum.at(most_busy, k, busy[inside])
        # the time in which every vCPU was halted: the least halted vCPU of the interval
        # (a vCPU without a row was halted throughout)
        nv = rec.vcpus
        rows_per = np.bincount(k, minlength=n)
        all_idle = np.full(n, delta)
        np.minimum.at(all_idle, k, idle[inside])
        all_idle[rows_per < nv] = np.minimum(all_idle[rows_per < nv], delta)
        length = most_busy + all_idle
    start = np.concatenate([[0.0], np.cumsum(length)[:-1]]) if n else np.zeros(0)
    return Timeline(first, start, busy)


class RecordedStream(AccessStream):
    """One vCPU's replay: steps of (wait until, pages, ioctls), see the module docstring.

    ``next_chunk`` returns an empty chunk when the next step is not pages; the
    vCPU then asks :meth:`pause` for the event to halt on.
    """

    def __init__(self, replay: "Replay", steps: list[tuple]) -> None:
        self._replay = replay
        self._steps = steps
        self._i = 0
        self._chunks: Iterator[np.ndarray] | None = None
        total = sum(len(s[1]) for s in steps if s[0] == "pages")
        super().__init__(iter(()), total, 100.0)

    def next_chunk(self) -> np.ndarray | None:
        while True:
            if self._chunks is not None:
                c = next(self._chunks, None)
                if c is not None:
                    return c
                self._chunks = None
            if self._i >= len(self._steps):
                return None
            step = self._steps[self._i]
            if step[0] != "pages":
                return np.zeros(0, dtype=np.int64)
            self._i += 1
            gfns, self.access_ns = step[1], step[2]
            self._chunks = (gfns[s:s + CHUNK] for s in range(0, len(gfns), CHUNK))

    def pause(self) -> simpy.Event | None:
        while self._chunks is None and self._i < len(self._steps) and self._steps[self._i][0] != "pages":
            step = self._steps[self._i]
            self._i += 1
            ev = self._replay.step_event(step)
            if ev is not None:
                return ev
        return None


class Replay:
    """A recording replayed on one simulated VM during one phase."""

    def __init__(self, vm: "Vm", touch: "TouchSpec", phase_name: str) -> None:
        self.vm = vm
        self.env = vm.env
        files = [touch.recording] if isinstance(touch.recording, str) else list(touch.recording)
        self.rec = load_recording_cached(files[vm.replication % len(files)])  # replication r: recorded boot r
        self.part = touch.part
        self.bar_ops = touch.bar_ops
        self.t0 = self.env.now
        self.tl = timeline(self.rec, touch.part, touch.time_map, touch.ns_per_insn, touch.time_scale)
        self.slots_lock = simpy.Resource(self.env, capacity=1)  # kvm->slots_lock: one update at a time
        self._ua_by_bar: dict[tuple[str, int], int] = {}
        self.skipped_bar_ops = 0

    # -- steps -------------------------------------------------------------------------------
    def streams(self, vcpu_ids: list[int]) -> dict[int, RecordedStream]:
        rec, tl, a = self.rec, self.tl, self.rec.arrays
        first, last = tl.first, tl.first + len(tl.start_ns) - 1
        gfns = rec.gfns()
        sl = rec.row_slices()
        bars_by = self._bars_by_vcpu_interval(first, last)
        steps: dict[int, list[tuple]] = {v: [] for v in range(rec.vcpus)}
        rv = a["row_vcpu"].astype(np.int64)
        ri = a["row_interval"].astype(np.int64)
        for r in np.flatnonzero((ri >= first) & (ri <= last)):
            v, k = int(rv[r]), int(ri[r])
            s = steps[v]
            s.append(("until", float(tl.start_ns[k - first])))
            g = gfns[sl[r]:sl[r + 1]]
            if len(g):
                s.append(("pages", g, max(float(tl.busy_ns[r]) / len(g), MIN_ACCESS_NS)))
            ops = bars_by.pop((v, k), None)
            if ops:
                s.append(("ioctl", ops))
        for (v, k), ops in sorted(bars_by.items()):  # BAR changes in intervals where the vCPU had no row
            steps[v].append(("until", float(tl.start_ns[k - first])))
            steps[v].append(("ioctl", ops))
        for v in steps:  # keep time order after the insertions above
            steps[v] = _time_ordered(steps[v])
        if self.part == "kernel" and self.bar_ops:
            pre = self._mapped_at_entry()
            if pre:
                steps[0].insert(0, ("ensure", pre))
        if rec.vcpus > len(vcpu_ids):
            from .errors import DesimInputError

            raise DesimInputError(f"recording {rec.path} has {rec.vcpus} vCPUs but the VM only {len(vcpu_ids)} "
                                  "(set vm.vcpus to at least the recording's)")
        return {vcpu_ids[v]: RecordedStream(self, st) for v, st in steps.items() if st}

    def _bars_by_vcpu_interval(self, first: int, last: int) -> dict[tuple[int, int], list[dict[str, Any]]]:
        out: dict[tuple[int, int], list[dict[str, Any]]] = {}
        if not self.bar_ops:
            return out
        delta = self.rec.interval_ns
        for ev in self.rec.bar_events():
            k = ev["time_ns"] // delta
            if ev["memslot"] and first <= k <= last:
                out.setdefault((max(ev["vcpu"], 0), int(k)), []).append(ev)
        return out

    def _mapped_at_entry(self) -> list[dict[str, Any]]:
        """RAM-backed BARs mapped when the kernel part starts, per the recorded events before it."""
        entry = self.tl.first * self.rec.interval_ns
        mapped: dict[tuple[str, int], dict[str, Any]] = {}
        for ev in self.rec.bar_events():
            if ev["time_ns"] >= entry or not ev["memslot"]:
                continue
            key = (ev["device"], ev["bar"])
            if ev["add"]:
                mapped[key] = ev
            else:
                mapped.pop(key, None)
        return list(mapped.values())

    # -- steps to SimPy events ---------------------------------------------------------------
    def step_event(self, step: tuple) -> simpy.Event | None:
        if step[0] == "until":
            t = self.t0 + step[1]
            return self.env.timeout(t - self.env.now) if t > self.env.now else None
        if step[0] == "ioctl":
            return self.env.process(self._ioctls(step[1], ensure=False))
        if step[0] == "ensure":
            return self.env.process(self._ioctls(step[1], ensure=True))
        raise ValueError(step[0])  # pragma: no cover

    def _ioctls(self, events: list[dict[str, Any]], ensure: bool):
        with self.slots_lock.request() as req:
            yield req
            for ev in events:
                op = self._memslot_op(ev, ensure)
                if op is None:
                    self.skipped_bar_ops += 0 if ensure else 1
                    continue
                yield from self.vm.vmm.set_memory_region(op)

    def _memslot_op(self, ev: dict[str, Any], ensure: bool) -> MemslotOp | None:
        """The ``KVM_SET_USER_MEMORY_REGION`` call QEMU would make for a BAR change, on the live slot set."""
        mmu = self.vm.mmu
        base, npages = ev["gpa"] >> 12, ev["size"] >> 12
        here = [ss.slot for ss in mmu.slots.values() if ss.slot.base_gfn == base and ss.slot.npages == npages]
        key = (ev["device"], ev["bar"])
        if not ev["add"]:
            if not here:
                return None
            slot = here[0]
            self._ua_by_bar[key] = slot.ua
            return MemslotOp(self.env.now, MrChange.DELETE, slot.id, slot.base_gfn << 12, slot.npages << 12,
                             slot.flags, slot.ua)
        if here or any(ss.slot.overlaps(base, npages) for ss in mmu.slots.values()):
            return None
        used = {ss.slot.id for ss in mmu.slots.values()}
        sid = next(i for i in range(len(used) + 1) if i not in used)
        ua = self._ua_by_bar.get(key)
        op = MemslotOp(self.env.now, MrChange.CREATE, sid, ev["gpa"], ev["size"], ev["flags"], 0)
        if ua is None:
            ua = self.vm.default_ua(op)
            self._ua_by_bar[key] = ua
        return MemslotOp(self.env.now, MrChange.CREATE, sid, ev["gpa"], ev["size"], ev["flags"], ua)


def _time_ordered(steps: list[tuple]) -> list[tuple]:
    """Group steps under their preceding ``until`` and sort the groups by time (stable)."""
    groups: list[tuple[float, int, list[tuple]]] = []
    for s in steps:
        if s[0] == "until" or not groups:
            groups.append((s[1] if s[0] == "until" else 0.0, len(groups), [s]))
        else:
            groups[-1][2].append(s)
    groups.sort(key=lambda g: (g[0], g[1]))
    return [s for g in groups for s in g[2]]
