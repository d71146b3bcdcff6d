"""A minimal VMM: ``/dev/kvm``, a VM, its memslots and its vCPUs, each a context manager.

The ioctls, in the order ``Documentation/virt/kvm/api.rst`` describes them:

* system fd (``open("/dev/kvm")``): ``KVM_GET_API_VERSION`` (must be 12),
  ``KVM_CHECK_EXTENSION``, ``KVM_GET_VCPU_MMAP_SIZE``,
  ``KVM_GET_SUPPORTED_CPUID``, ``KVM_CREATE_VM``;
* VM fd: ``KVM_ENABLE_CAP`` (``KVM_CAP_DISABLE_QUIRKS2`` selects the zap
  policy), ``KVM_SET_USER_MEMORY_REGION`` (create, delete = size 0, move =
  same slot with a new ``guest_phys_addr``), ``KVM_CREATE_VCPU``,
  ``KVM_GET_STATS_FD``;
* vCPU fd: ``mmap`` of ``struct kvm_run``, ``KVM_SET_CPUID2``,
  ``KVM_SET_SREGS``, ``KVM_SET_REGS``, ``KVM_SET_MSRS``, ``KVM_RUN``,
  ``KVM_GET_STATS_FD``.

Teardown: every object closes what it opened in ``close()`` (idempotent) and
``__exit__``; :class:`Vm` closes its vCPUs, then its stats fd and VM fd, then
unmaps the guest memory, so a long measurement run does not grow.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from dataclasses import dataclass

from desim.errors import DesimInputError
from desim.kvm import libc
from desim.kvm import uapi as u
from desim.kvm.stats import StatsFile

KVM_DEV = "/dev/kvm"


class KvmError(RuntimeError):
    """KVM refused an operation of a VM that was set up (a harness or kernel problem)."""


def open_kvm(path: str = KVM_DEV) -> int:
    """Open ``/dev/kvm`` read-write, or raise :class:`DesimInputError` saying why not."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DesimInputError(f"{path} is missing: this host has no KVM (load kvm_intel/kvm_amd or run on bare metal)") from None
    except PermissionError:
        raise DesimInputError(f"{path} is not permitted for this user: add the user to group 'kvm' or run as root") from None
    except OSError as e:
        raise DesimInputError(f"{path} cannot be opened: {e.strerror}") from None


class Kvm:
    """The system fd: capabilities, supported CPUID, VM creation."""

    def __init__(self, path: str = KVM_DEV) -> None:
        self.path = path
        self.fd = open_kvm(path)
        try:
            try:
                self.api_version = libc.ioctl(self.fd, u.KVM_GET_API_VERSION)
            except OSError as e:
                raise DesimInputError(f"{path} is not a KVM device (KVM_GET_API_VERSION: {e.strerror})") from None
            if self.api_version != u.KVM_API_VERSION:
                raise DesimInputError(f"{path} speaks KVM API {self.api_version}, expected {u.KVM_API_VERSION}")
            self.vcpu_mmap_size = libc.ioctl(self.fd, u.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            self.close()
            raise
        self._cpuid: ctypes.Structure | None = None

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if absent, else a cap-specific value."""
        try:
            return libc.ioctl(self.fd, u.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    def supported_cpuid(self) -> ctypes.Structure:
        """``KVM_GET_SUPPORTED_CPUID``, grown until the kernel stops saying E2BIG."""
        if self._cpuid is None:
            n = 64
            while True:
                c = u.kvm_cpuid2(n)
                try:
                    libc.ioctl(self.fd, u.KVM_GET_SUPPORTED_CPUID, c)
                    break
                except OSError as e:
                    if e.errno != errno.E2BIG or n > 4096:
                        raise
                    n *= 2
            self._cpuid = c
        return self._cpuid

    def create_vm(self) -> Vm:
        return Vm(self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HostMemory:
    """Anonymous host memory backing one or more memslots (``mmap``), ``align``-aligned.

    ``thp`` asks for transparent huge pages (``madvise(MADV_HUGEPAGE)``);
    otherwise ``MADV_NOHUGEPAGE`` pins the backing to 4 KiB pages, so the
    result does not depend on the host's THP default.
    """

    def __init__(self, size: int, thp: bool = False, align: int = 1 << 21) -> None:
        self.size = size
        self._map_len = size + align
        self._map = libc.mmap(self._map_len)
        self.addr = -(-self._map // align) * align
        try:
            libc.madvise(self.addr, size, libc.MADV_HUGEPAGE if thp else libc.MADV_NOHUGEPAGE)
        except OSError:
            if thp:
                self.close()
                raise DesimInputError("madvise(MADV_HUGEPAGE) refused: this host has no transparent huge pages") from None

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError("write outside host memory")
        libc.write(self.addr + offset, data)

    def view(self, offset: int, length: int) -> memoryview:
        """A byte view of ``[offset, offset + length)`` of the host memory (no copy)."""
        if offset < 0 or offset + length > self.size:
            raise ValueError("view outside host memory")
        return memoryview((ctypes.c_ubyte * length).from_address(self.addr + offset)).cast("B")

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise ValueError("read outside host memory")
        return libc.read(self.addr + offset, length)

    def close(self) -> None:
        if self._map:
            libc.munmap(self._map, self._map_len)
            self._map = 0

    def __enter__(self) -> HostMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Slot:
    """One memslot as the VMM last set it."""

    slot: int
    gpa: int
    size: int
    hva: int
    flags: int = 0


class Vm:
    """A VM fd with its memslots, host memory and vCPUs (all released by :meth:`close`)."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        try:
            self.fd = libc.ioctl(kvm.fd, u.KVM_CREATE_VM, 0)
        except OSError as e:
            raise KvmError(f"KVM_CREATE_VM failed: {e.strerror}") from None
        self.slots: dict[int, Slot] = {}
        self.memory: list[HostMemory] = []
        self.vcpus: list[Vcpu] = []
        self._stats: StatsFile | None = None
        self._lock = threading.Lock()

    # --- configuration --------------------------------------------------
    def enable_cap(self, cap: int, *args: int) -> None:
        ec = u.KvmEnableCap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        libc.ioctl(self.fd, u.KVM_ENABLE_CAP, ec)

    def disable_quirks(self, mask: int) -> None:
        """``KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2, mask)``."""
        self.enable_cap(u.KVM_CAP_DISABLE_QUIRKS2, mask)

    def alloc(self, size: int, thp: bool = False) -> HostMemory:
        """Host memory owned (and unmapped) by this VM."""
        m = HostMemory(size, thp=thp)
        self.memory.append(m)
        return m

    # --- memslots ---------------------------------------------------------
    def set_region(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> int:
        """``KVM_SET_USER_MEMORY_REGION``; returns the ioctl's wall time in ns."""
        r = u.KvmUserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=gpa,
                                       memory_size=size, userspace_addr=hva if size else 0)
        t0 = time.perf_counter_ns()
        try:
            libc.ioctl(self.fd, u.KVM_SET_USER_MEMORY_REGION, r)
        except OSError as e:
            raise KvmError(f"KVM_SET_USER_MEMORY_REGION slot {slot} gpa {gpa:#x} size {size:#x}: {e.strerror}") from None
        dt = time.perf_counter_ns() - t0
        if size:
            self.slots[slot] = Slot(slot, gpa, size, hva, flags)
        else:
            self.slots.pop(slot, None)
        return dt

    def create_slot(self, slot: int, gpa: int, mem: HostMemory, offset: int = 0,
                    size: int | None = None, flags: int = 0) -> int:
        size = mem.size - offset if size is None else size
        return self.set_region(slot, gpa, size, mem.addr + offset, flags)

    def delete_slot(self, slot: int) -> int:
        """KVM_MR_DELETE: the same slot id with ``memory_size`` 0."""
        s = self.slots[slot]
        return self.set_region(slot, s.gpa, 0, 0, s.flags)

    def move_slot(self, slot: int, new_gpa: int) -> int:
        """KVM_MR_MOVE: the same slot id, size and hva at another gpa."""
        s = self.slots[slot]
        return self.set_region(slot, new_gpa, s.size, s.hva, s.flags)

    def set_slot_flags(self, slot: int, flags: int) -> int:
        """KVM_MR_FLAGS_ONLY: the same slot with new flags."""
        s = self.slots[slot]
        return self.set_region(slot, s.gpa, s.size, s.hva, flags)

    # --- vCPUs and stats ----------------------------------------------------
    def create_vcpu(self, index: int | None = None) -> Vcpu:
        """``KVM_CREATE_VCPU``; call it from the thread that will run the vCPU."""
        with self._lock:
            v = Vcpu(self, len(self.vcpus) if index is None else index)
            self.vcpus.append(v)
        return v

    @property
    def stats(self) -> StatsFile:
        if self._stats is None:
            self._stats = StatsFile(libc.ioctl(self.fd, u.KVM_GET_STATS_FD))
        return self._stats

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for m in self.memory:
            m.close()
        self.memory.clear()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vcpu:
    """A vCPU fd with its mmap'ed ``struct kvm_run``."""

    def __init__(self, vm: Vm, index: int) -> None:
        self.vm = vm
        self.index = index
        try:
            self.fd = libc.ioctl(vm.fd, u.KVM_CREATE_VCPU, index)
        except OSError as e:
            raise KvmError(f"KVM_CREATE_VCPU {index}: {e.strerror}") from None
        self._run_len = vm.kvm.vcpu_mmap_size
        try:
            self._run_addr = libc.mmap(self._run_len, flags=libc.MAP_SHARED, fd=self.fd)
        except OSError:
            os.close(self.fd)
            raise
        self.run_page = u.KvmRunHeader.from_address(self._run_addr)
        self.exit_io = u.KvmExitIo.from_address(self._run_addr + u.KVM_RUN_EXIT_UNION)
        self._stats: StatsFile | None = None

    def set_cpuid(self, cpuid: ctypes.Structure) -> None:
        libc.ioctl(self.fd, u.KVM_SET_CPUID2, cpuid)

    def get_sregs(self) -> u.KvmSregs:
        s = u.KvmSregs()
        libc.ioctl(self.fd, u.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, s: u.KvmSregs) -> None:
        libc.ioctl(self.fd, u.KVM_SET_SREGS, s)

    def get_regs(self) -> u.KvmRegs:
        r = u.KvmRegs()
        libc.ioctl(self.fd, u.KVM_GET_REGS, r)
        return r

    def set_regs(self, r: u.KvmRegs) -> None:
        libc.ioctl(self.fd, u.KVM_SET_REGS, r)

    def set_msrs(self, entries: list[tuple[int, int]]) -> None:
        m = u.kvm_msrs(entries)
        n = libc.ioctl(self.fd, u.KVM_SET_MSRS, m)
        if n != len(entries):
            raise KvmError(f"KVM_SET_MSRS set {n} of {len(entries)} MSRs (first refused: {entries[n][0]:#x})")

    def tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the frequency of the TSC the guest reads, in kHz."""
        return libc.ioctl(self.fd, u.KVM_GET_TSC_KHZ)

    def run(self) -> int:
        """One ``KVM_RUN`` (GIL released); returns ``exit_reason``.

        A signal (or ``immediate_exit``) makes KVM return EINTR: reported as
        ``KVM_EXIT_INTR`` so a watchdog can stop a vCPU thread.
        """
        try:
            libc.ioctl(self.fd, u.KVM_RUN, retry_eintr=False)
        except InterruptedError:
            return u.KVM_EXIT_INTR
        return self.run_page.exit_reason

    def io_data(self) -> bytes:
        """The bytes of the last KVM_EXIT_IO (``size * count`` at ``data_offset``)."""
        io = self.exit_io
        n = io.size * io.count
        if io.data_offset + n > self._run_len:
            raise KvmError(f"KVM_EXIT_IO data_offset {io.data_offset:#x} outside kvm_run")
        return libc.read(self._run_addr + io.data_offset, n)

    @property
    def stats(self) -> StatsFile:
        if self._stats is None:
            self._stats = StatsFile(libc.ioctl(self.fd, u.KVM_GET_STATS_FD))
        return self._stats

    def close(self) -> None:
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self._run_addr:
            self.run_page = None  # type: ignore[assignment]
            self.exit_io = None  # type: ignore[assignment]
            libc.munmap(self._run_addr, self._run_len)
            self._run_addr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
