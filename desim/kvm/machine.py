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
import threading
import time
from dataclasses import dataclass, field

from desim.errors import DesimInputError
from desim.kvm import uapi as u
from desim.kvm.guest import EXIT_PORT, EXITS, GUEST_MSRS, PAGE_4K, PageTables, set_user_mode, touch_regs
from desim.kvm.spin import BusyCpus
from desim.kvm.scenario import GUEST_PAGES, KvmScenario, Layout, layout
from desim.kvm.stats import StatDesc, delta, scalar
from desim.kvm.vm import HostMemory, Kvm, KvmError, Vcpu, Vm

KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> bool:
    """A no-op handler for :data:`KICK_SIGNAL`, so a kick gives EINTR, not death."""
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, lambda *_: None)
    return True


@dataclass
class PhaseResult:
    """Counters (deltas) and wall times of one phase."""

    name: str
    wall_ns: int
    delta: dict[str, int]
    level: dict[str, int] = field(default_factory=dict)  # instant stats after the phase
    vcpu_ns: list[int] = field(default_factory=list)     # per vCPU, in KVM_RUN
    ioctls: list[tuple[str, int]] = field(default_factory=list)  # (what, ns)

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
        v = self.vcpu
        assert v is not None
        total = 0
        for _ in range(n):
            t0 = time.perf_counter_ns()
            reason = v.run()
            total += time.perf_counter_ns() - t0
            self.passes_done += 1
            got = self._pass_byte(reason)
            if got != self.passes_done & 0xFF:
                raise KvmError(f"vCPU {self.index}: pass {self.passes_done} ended with pass byte {got}")
        return total

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

    def __init__(self, kvm: Kvm, sc: KvmScenario, exit: str = "pio", timeout_s: float = 120.0) -> None:
        if exit not in EXITS:
            raise DesimInputError(f"exit must be one of {', '.join(EXITS)} (got {exit!r})")
        self.kvm, self.sc, self.exit, self.timeout_s = kvm, sc, exit, timeout_s
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
        self.mem[0].write(lay.code_gpa, EXITS[self.exit])
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
        return v

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
        return self._phase(name, before, wall, vcpu_ns=[int(x) for x in per])

    def memslot_op(self, name: str = "op") -> PhaseResult:
        """The scenario's memslot operation, with every vCPU outside ``KVM_RUN``
        (and, with ``busy_cpus``, the other host CPUs spinning: :mod:`desim.kvm.spin`)."""
        sc, lay, vm = self.sc, self.layout, self.vm
        target = lay.target_slot
        before = self.counters()
        ioctls: list[tuple[str, int]] = []
        with BusyCpus(sc.busy_cpus):
            t0 = time.perf_counter_ns()
            if sc.op in ("delete", "recreate"):
                ioctls.append(("delete", vm.delete_slot(target)))
                if sc.op == "recreate":
                    plan = lay.slot(target)
                    ioctls.append(("create", vm.create_slot(target, plan.gpa, self.mem[target])))
            elif sc.op == "move":
                ioctls.append(("move", vm.move_slot(target, lay.move_gpa)))
            wall = time.perf_counter_ns() - t0
        return self._phase(name, before, wall, ioctls=ioctls)

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
