"""One scenario VM on the real KVM: build it, run touch passes, apply the memslot operation.

:class:`TouchVm` assembles the pieces of :mod:`desim.kvm.vm` (ioctls),
:mod:`desim.kvm.guest` (code, page tables, user-mode registers) and
:mod:`desim.kvm.scenario` (layout) into a VM whose vCPUs each run in their own
thread for their whole life (``KVM_CREATE_VCPU``, setup and every ``KVM_RUN``
from that thread, as ``Documentation/virt/kvm/api.rst`` asks). The zap policy
is chosen before any memslot exists with ``KVM_ENABLE_CAP`` of
``KVM_CAP_DISABLE_QUIRKS2`` (``args[0] = KVM_X86_QUIRK_SLOT_ZAP_ALL``).

Counters come from the binary stats fds (:mod:`desim.kvm.stats`): the VM's
stats plus the sum over vCPUs, one flat dict (the two name sets are disjoint).
A watchdog interrupts vCPU threads stuck in ``KVM_RUN`` (``immediate_exit``
and a signal) so a broken guest ends in an error, not a hang.
"""
from __future__ import annotations

import queue
import signal
from array import array
import threading
import time
from dataclasses import dataclass, field

from desim.errors import DesimInputError
from desim.kvm import uapi as u
from desim.kvm.guest import (
    EXIT_PORT, EXITS, GUEST_MSRS, LATENCY_OFFSET, PAGE_4K, PASS_OFFSET, RESULT_SLOTS, TIMED_EXITS, TSC_OFFSET,
    PageTables,
    result_offset, set_user_mode, touch_regs,
)
from desim.kvm.spin import BusyCpus
from desim.kvm.scenario import GUEST_PAGES, KvmScenario, Layout, layout
from desim.kvm.stats import StatDesc, delta, scalar
from desim.kvm.vm import HostMemory, Kvm, KvmError, Vcpu, Vm

KICK_SIGNAL = signal.SIGUSR1
UNTIL_STOPPED = -1  # a pass count: run passes until told to stop (memslot_op_during_passes)


def install_kick_handler() -> bool:
    """A no-op handler for :data:`KICK_SIGNAL`, so a kick gives EINTR, not death."""
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, lambda *_: None)
    return True


@dataclass
class PassTiming:
    """What the timed guest recorded in one pass of one vCPU (read from the touched pages)."""

    host_ns: int        # time.perf_counter_ns() just before the pass's KVM_RUN
    cycles: array       # array('I'): TSC cycles of each touch, in touch order
    tsc: array          # array('Q'): TSC just before each touch
    run_delay_ns: int = 0  # the vCPU thread's wait on a host run queue during the pass (schedstat)


def run_delay_ns() -> int:
    """This thread's total wait on a run queue (``/proc/thread-self/schedstat``, field 2), or 0."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class PhaseResult:
    """Counters (deltas) and wall times of one phase."""

    name: str
    wall_ns: int
    delta: dict[str, int]
    level: dict[str, int] = field(default_factory=dict)  # instant stats after the phase
    vcpu_ns: list[int] = field(default_factory=list)     # per vCPU, in KVM_RUN
    ioctls: list[tuple[str, int]] = field(default_factory=list)  # (what, ns)
    # timed guest only: per vCPU, per pass, (host ns just before KVM_RUN, latency cycles, TSC at each touch)
    timings: list[list[PassTiming]] = field(default_factory=list)
    windows: list[tuple[str, int, int]] = field(default_factory=list)  # (ioctl, host ns start, end)
    tsc_khz: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"wall_ns": self.wall_ns, "vcpu_ns": self.vcpu_ns,
                "ioctls": [{"op": k, "ns": v} for k, v in self.ioctls],
                "delta": self.delta, "level": self.level}


class _VcpuWorker(threading.Thread):
    """Owns one vCPU: creates it, sets it up, runs passes on command."""

    def __init__(self, tvm: TouchVm, index: int) -> None:
        super().__init__(name=f"vcpu-{index}", daemon=True)
        self.tvm, self.index = tvm, index
        self.cmd: queue.Queue[int | None] = queue.Queue()
        self.out: queue.Queue[tuple[str, object]] = queue.Queue()
        self.vcpu: Vcpu | None = None
        self.passes_done = 0
        self.timings: list[PassTiming] = []  # the current command's passes (timed guest)
        self.stop = threading.Event()  # ends a command of UNTIL_STOPPED passes
        self.in_run = threading.Event()  # set while the thread is in KVM_RUN
        self.holes = 0  # touches that found no memslot (KVM_EXIT_MMIO inside the touched range)

    def run(self) -> None:
        try:
            self.vcpu = self.tvm.setup_vcpu(self.index)
            self.out.put(("ready", None))
        except BaseException as e:  # noqa: BLE001 - reported to the owner
            self.out.put(("error", e))
            return
        while (n := self.cmd.get()) is not None:
            try:
                self.out.put(("ok", self._passes(n)))
            except BaseException as e:  # noqa: BLE001
                self.out.put(("error", e))

    def _passes(self, n: int) -> int:
        """``n`` passes (or, with :data:`UNTIL_STOPPED`, passes until :attr:`stop` is set).

        With the timed guest, the results of the last ``RESULT_SLOTS - 1``
        passes are read after the last one (the guest keeps a ring of 64 result
        slots per page): between passes the vCPU is back in ``KVM_RUN`` at
        once, as it must be when the VMM's ioctl runs meanwhile.
        """
        v = self.vcpu
        assert v is not None
        total = 0
        timed = self.tvm.timed
        ran: list[tuple[int, int, int]] = []  # (pass number, host ns before KVM_RUN, run-queue wait)
        done = 0
        while done < n or (n == UNTIL_STOPPED and not self.stop.is_set()):
            d0 = run_delay_ns() if timed else 0
            t0 = time.perf_counter_ns()
            self.in_run.set()
            reason = v.run()
            while self._hole_write(reason):
                self.holes += 1  # a write to a slot the VMM is re-creating: dropped, as a VMM drops it
                reason = v.run()
            self.in_run.clear()
            total += time.perf_counter_ns() - t0
            self.passes_done += 1
            done += 1
            got = self._pass_byte(reason)
            if got != self.passes_done & 0xFF:
                raise KvmError(f"vCPU {self.index}: pass {self.passes_done} ended with pass byte {got}")
            if timed:
                ran.append((self.passes_done, t0, run_delay_ns() - d0))
        self.timings = []
        for pass_no, t0, delay in ran[-(RESULT_SLOTS - 1):]:
            pt = self.tvm.read_timings(self.index, t0, pass_no)
            pt.run_delay_ns = delay
            self.timings.append(pt)
        return total

    def _hole_write(self, reason: int) -> bool:
        """A ``KVM_EXIT_MMIO`` write inside this vCPU's touched region: the touch ran while the
        slot under it was deleted (``memslot_op_during_passes`` of a slot inside the touched
        range). Nothing to complete for a write; the next ``KVM_RUN`` continues the pass."""
        if reason != u.KVM_EXIT_MMIO:
            return False
        rp = self.vcpu.run_page  # type: ignore[union-attr]
        base, size = self.tvm.layout.regions[self.index]
        return bool(rp.mmio_is_write) and base <= rp.mmio_phys_addr < base + size

    def _pass_byte(self, reason: int) -> int:
        """The pass counter's low byte carried by the exit; KvmError if it is the wrong exit."""
        v, lay = self.vcpu, self.tvm.layout
        assert v is not None
        if self.tvm.exit == "mmio":
            rp = v.run_page
            if reason == u.KVM_EXIT_MMIO and rp.mmio_phys_addr == lay.exit_gpa and rp.mmio_is_write:
                return int(rp.mmio_data[0])
        else:
            io = v.exit_io
            if (reason == u.KVM_EXIT_IO and io.port == EXIT_PORT and io.direction == u.KVM_EXIT_IO_OUT
                    and io.size == 1 and io.count == 1):
                return v.io_data()[0]
        raise KvmError(self._describe(reason))

    def _describe(self, reason: int) -> str:
        v = self.vcpu
        assert v is not None
        what = u.EXIT_REASONS.get(reason, str(reason))
        rp = v.run_page
        extra = ""
        if reason == u.KVM_EXIT_MMIO:
            extra = f" at gpa {rp.mmio_phys_addr:#x} (exit page {self.tvm.layout.exit_gpa:#x}, exit {self.tvm.exit})"
        elif reason == u.KVM_EXIT_IO:
            extra = f" on port {v.exit_io.port:#x} (exit {self.tvm.exit})"
        elif reason == u.KVM_EXIT_INTR:
            extra = " (interrupted by the watchdog)"
        try:
            rip = f", rip {v.get_regs().rip:#x}"
        except OSError:
            rip = ""
        return f"vCPU {self.index}: unexpected exit {what}{extra}{rip}"


class TouchVm:
    """A VM built from a :class:`KvmScenario`; use as a context manager."""

    def __init__(self, kvm: Kvm, sc: KvmScenario, exit: str = "pio", timeout_s: float = 120.0,
                 timed: bool = False) -> None:
        if exit not in EXITS:
            raise DesimInputError(f"exit must be one of {', '.join(EXITS)} (got {exit!r})")
        self.kvm, self.sc, self.exit, self.timeout_s = kvm, sc, exit, timeout_s
        self.timed = timed  # run the rdtsc-timed touch loop (guest.TIMED_EXITS)
        self.tsc_khz = 0
        self.layout: Layout = layout(sc)
        self.workers: list[_VcpuWorker] = []
        self.mem: dict[int, HostMemory] = {}
        self._can_kick = install_kick_handler()
        self.vm: Vm = kvm.create_vm()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- construction -----------------------------------------------------
    def _build(self) -> None:
        sc, lay, vm = self.sc, self.layout, self.vm
        if sc.policy == "targeted":
            supported = self.kvm.check_extension(u.KVM_CAP_DISABLE_QUIRKS2)
            if not supported & u.KVM_X86_QUIRK_SLOT_ZAP_ALL:
                raise DesimInputError("policy 'targeted' needs KVM_X86_QUIRK_SLOT_ZAP_ALL in "
                                      f"KVM_CAP_DISABLE_QUIRKS2 (Linux 6.12+); this KVM offers {supported:#x}")
            vm.disable_quirks(u.KVM_X86_QUIRK_SLOT_ZAP_ALL)
        for plan in lay.slots:
            mem = vm.alloc(plan.size, thp=sc.host_thp and plan.role != "system")
            self.mem[plan.slot] = mem
        system = lay.slot(0)
        pt = PageTables(lay.tables_gpa, GUEST_PAGES[sc.guest_page], sc.accessed)
        self._mapped = [(p.gpa, p.size) for p in lay.slots]
        self._mapped += [(lay.move_gpa, lay.slot(lay.target_slot).size), (lay.exit_gpa, PAGE_4K)]
        for start, size in self._mapped:
            pt.map(start, size)
        if lay.tables_gpa + pt.size > system.size:
            raise KvmError(f"page tables ({pt.size} bytes) overflow the system slot ({system.size} bytes)")
        self.mem[0].write(lay.code_gpa, (TIMED_EXITS if self.timed else EXITS)[self.exit])
        self.mem[0].write(lay.tables_gpa, pt.image())
        self.page_tables = pt
        self.cr3 = pt.cr3
        for plan in lay.slots:
            vm.create_slot(plan.slot, plan.gpa, self.mem[plan.slot])
        for i in range(sc.vcpus):
            w = _VcpuWorker(self, i)
            self.workers.append(w)
            w.start()
        self._collect("ready", self.timeout_s)

    def clear_accessed(self) -> None:
        """Clear the Accessed/Dirty bits of every guest PTE, as a guest's page aging would.

        The host writes the tables directly (the guest's write protection of
        its page tables does not apply to the VMM), so live SPTEs stay; shadow
        pages rebuilt later read the cleared bits and so prefetch nothing for
        4 KiB guest pages.
        """
        lay, old = self.layout, self.page_tables
        pt = PageTables(lay.tables_gpa, old.leaf_size, accessed=False)
        for start, size in self._mapped:
            pt.map(start, size)
        if pt.size != old.size:  # same ranges in the same order give the same tables
            raise KvmError("page tables changed shape while clearing Accessed bits")
        self.mem[0].write(lay.tables_gpa, pt.image())

    def setup_vcpu(self, index: int) -> Vcpu:
        """Run in the vCPU's thread: create it and load CPUID, MSRs, sregs, regs."""
        v = self.vm.create_vcpu(index)
        v.set_cpuid(self.kvm.supported_cpuid())
        s = v.get_sregs()
        set_user_mode(s, self.cr3)
        v.set_sregs(s)
        v.set_msrs(GUEST_MSRS)
        base, size = self.layout.regions[index]
        v.set_regs(touch_regs(base, size, self.layout.exit_gpa, self.sc.stride_kib << 10))
        if index == 0:
            self.tsc_khz = v.tsc_khz()
        return v

    def read_timings(self, index: int, host_ns: int, pass_no: int) -> PassTiming:
        """What the timed guest wrote into vCPU ``index``'s touched pages in pass ``pass_no``
        (one of the last 63: the guest's ring of result slots).

        Reads the host's mapping of guest memory (pages the pass just touched,
        so already resident: reading faults nothing in, on the host or in KVM).
        """
        base, size = self.layout.regions[index]
        stride = self.sc.stride_kib << 10
        cycles, tsc = array("I"), array("Q")
        for plan in self.layout.slots:
            lo, hi = max(base, plan.gpa), min(base + size, plan.gpa + plan.size)
            if lo >= hi:
                continue
            first = lo + (-(lo - base)) % stride  # the first touched address in this slot
            if first >= hi:
                continue
            n = -(-(hi - first) // stride)
            off = result_offset(pass_no)
            mv = self.mem[plan.slot].view(first - plan.gpa, (n - 1) * stride + off + 16)
            c = mv.cast("I")[(off + LATENCY_OFFSET) // 4::stride // 4].tolist()[:n]
            p = mv.cast("I")[(off + PASS_OFFSET) // 4::stride // 4].tolist()[:n]
            t = mv.cast("Q")[(off + TSC_OFFSET) // 8::stride // 8].tolist()[:n]
            mine = pass_no & 0xFFFFFFFF
            # a slot another pass wrote: this touch found no memslot (its stores went to MMIO)
            keep = [i for i in range(n) if p[i] == mine]
            cycles.extend(c[i] for i in keep)
            tsc.extend(t[i] for i in keep)
        return PassTiming(host_ns, cycles, tsc)

    # --- phases -------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """VM stats plus the sum of every vCPU's stats (scalars only)."""
        out = dict(scalar(self.vm.stats.read()))
        for w in self.workers:
            if w.vcpu is not None:
                for k, v in scalar(w.vcpu.stats.read()).items():
                    out[k] = out.get(k, 0) + v
        return out

    def descs(self) -> dict[str, StatDesc]:
        d = dict(self.vm.stats.by_name)
        if self.workers and self.workers[0].vcpu is not None:
            d.update(self.workers[0].vcpu.stats.by_name)
        return d

    def _phase(self, name: str, before: dict[str, int], wall_ns: int, **kw: object) -> PhaseResult:
        after = self.counters()
        descs = self.descs()
        level = {k: v for k, v in after.items() if k in descs and descs[k].type == "instant"}
        return PhaseResult(name, wall_ns, delta(after, before, descs), level, **kw)  # type: ignore[arg-type]

    def touch(self, passes: int, name: str = "touch") -> PhaseResult:
        """Every vCPU runs ``passes`` passes over its region, all at once."""
        before = self.counters()
        t0 = time.perf_counter_ns()
        for w in self.workers:
            w.cmd.put(passes)
        per = self._collect("ok", self.timeout_s)
        wall = time.perf_counter_ns() - t0
        return self._phase(name, before, wall, vcpu_ns=[int(x) for x in per],
                           timings=[w.timings for w in self.workers], tsc_khz=self.tsc_khz)

    def memslot_op_during_passes(self, name: str = "op-during", passes_after: int = 2,
                                 delay_ns: int = 50_000) -> PhaseResult:
        """The memslot operation while every vCPU keeps running passes over its region.

        Each vCPU runs passes back to back until told to stop; once every vCPU
        has finished one pass and all are in ``KVM_RUN``, the VMM thread waits
        ``delay_ns`` (so that they are past the VM entry; a pass of hits over
        64 MiB takes ~1 ms here, the Python between two passes ~0.2 ms) and
        issues the operation, then lets each vCPU finish
        ``passes_after`` more passes. The timed guest's results of the last 63
        passes are read at the end (:meth:`_VcpuWorker._passes`): an operation
        that lasts longer than 60 passes loses the timings of its first ones. With the timed guest, the accesses that
        overlap the ioctls (:attr:`PhaseResult.windows`) are the stalls a vCPU
        sees while the DELETE/MOVE runs.
        """
        before = self.counters()
        for w in self.workers:
            w.stop.clear()
        start_passes = [w.passes_done for w in self.workers]
        t0 = time.perf_counter_ns()
        for w in self.workers:
            w.cmd.put(UNTIL_STOPPED)
        deadline = time.monotonic() + self.timeout_s

        def wait_passes(k: int) -> None:
            while any(w.passes_done - p0 < k for w, p0 in zip(self.workers, start_passes)):
                if time.monotonic() > deadline or any(not w.out.empty() for w in self.workers):
                    break  # a worker failed (its error is collected below) or hangs
                time.sleep(0.0002)

        wait_passes(1)
        while not all(w.in_run.is_set() for w in self.workers):
            if time.monotonic() > deadline or any(not w.out.empty() for w in self.workers):
                break
            time.sleep(0.00005)
        if delay_ns:
            time.sleep(delay_ns / 1e9)
        ioctls: list[tuple[str, int]] = []
        windows: list[tuple[str, int, int]] = []
        # no spinners: the running vCPUs keep the host's CPUs busy (what busy_cpus imitates)
        self._apply_op(ioctls, windows)
        after = [w.passes_done for w in self.workers]
        start_passes = after
        wait_passes(passes_after)
        for w in self.workers:
            w.stop.set()
        per = self._collect("ok", self.timeout_s)
        wall = time.perf_counter_ns() - t0
        return self._phase(name, before, wall, vcpu_ns=[int(x) for x in per], ioctls=ioctls,
                           timings=[w.timings for w in self.workers], windows=windows, tsc_khz=self.tsc_khz)

    def _apply_op(self, ioctls: list[tuple[str, int]], windows: list[tuple[str, int, int]]) -> None:
        """The scenario's memslot ioctls, each timed, with their host-time windows."""
        sc, lay, vm = self.sc, self.layout, self.vm
        target = lay.target_slot

        def timed(what: str, fn) -> None:
            a = time.perf_counter_ns()
            ns = fn()
            windows.append((what, a, time.perf_counter_ns()))
            ioctls.append((what, ns))
        if sc.op in ("delete", "recreate"):
            timed("delete", lambda: vm.delete_slot(target))
            if sc.op == "recreate":
                plan = lay.slot(target)
                timed("create", lambda: vm.create_slot(target, plan.gpa, self.mem[target]))
        elif sc.op == "move":
            timed("move", lambda: vm.move_slot(target, lay.move_gpa))

    def memslot_op(self, name: str = "op") -> PhaseResult:
        """The scenario's memslot operation, with every vCPU outside ``KVM_RUN``
        (and, with ``busy_cpus``, the other host CPUs spinning: :mod:`desim.kvm.spin`)."""
        before = self.counters()
        ioctls: list[tuple[str, int]] = []
        windows: list[tuple[str, int, int]] = []
        with BusyCpus(self.sc.busy_cpus):
            t0 = time.perf_counter_ns()
            self._apply_op(ioctls, windows)
            wall = time.perf_counter_ns() - t0
        return self._phase(name, before, wall, ioctls=ioctls, windows=windows)

    def _collect(self, want: str, timeout_s: float) -> list[object]:
        """One message from every worker; kick them all and raise on timeout or error."""
        deadline = time.monotonic() + timeout_s
        results: list[object] = []
        first_error: BaseException | None = None
        for w in self.workers:
            try:
                kind, val = w.out.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kick()
                raise KvmError(f"vCPU {w.index} did not finish within {timeout_s:.0f} s") from None
            if kind == "error" and first_error is None:
                first_error = val  # type: ignore[assignment]
            elif kind != want and first_error is None:
                first_error = KvmError(f"vCPU {w.index}: sent {kind!r}, expected {want!r}")
            results.append(val)
        if first_error is not None:
            raise first_error
        return results

    def kick(self) -> None:
        """Force every vCPU out of ``KVM_RUN`` (``immediate_exit`` + a signal)."""
        for w in self.workers:
            if w.vcpu is not None and w.vcpu.run_page is not None:
                w.vcpu.run_page.immediate_exit = 1
            if self._can_kick and w.ident is not None and w.is_alive():
                signal.pthread_kill(w.ident, KICK_SIGNAL)

    # --- teardown -----------------------------------------------------------
    def close(self) -> None:
        """Stop the vCPU threads, then close every fd and unmap every byte (idempotent)."""
        for w in self.workers:
            w.cmd.put(None)
        for w in self.workers:
            w.join(timeout=5.0)
            if w.is_alive():
                self.kick()
                w.join(timeout=5.0)
        stuck = [w.index for w in self.workers if w.is_alive()]
        self.workers.clear()
        if stuck:  # never unmap memory a running vCPU may still use
            raise KvmError(f"vCPU threads {stuck} did not stop; VM left open")
        self.vm.close()

    def __enter__(self) -> TouchVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
