"""KVM ioctl numbers, constants and C struct layouts used by the harness.

Everything here is transcribed from the kernel's user API headers:
``include/uapi/linux/kvm.h`` (ioctls, ``struct kvm_run``,
``struct kvm_userspace_memory_region``, ``struct kvm_enable_cap``, the binary
stats header) and ``arch/x86/include/uapi/asm/kvm.h`` (``struct kvm_regs``,
``struct kvm_sregs``, ``struct kvm_segment``, ``struct kvm_dtable``,
``struct kvm_cpuid_entry2``, ``struct kvm_msr_entry``, the x86 quirk bits).
The semantics are those of ``Documentation/virt/kvm/api.rst``.

The ioctl numbers are computed with the ``_IO``/``_IOR``/``_IOW``/``_IOWR``
encoding of ``include/uapi/asm-generic/ioctl.h`` from the struct sizes below,
so a wrong layout shows up as a wrong number (checked in the tests against
values printed by a C compiler on x86-64).
"""
from __future__ import annotations

import ctypes

# --- include/uapi/asm-generic/ioctl.h ---------------------------------------
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type[ctypes.Structure] | int) -> int:
    return _ioc(_IOC_READ, nr, struct if isinstance(struct, int) else ctypes.sizeof(struct))


def _iow(nr: int, struct: type[ctypes.Structure] | int) -> int:
    return _ioc(_IOC_WRITE, nr, struct if isinstance(struct, int) else ctypes.sizeof(struct))


def _iowr(nr: int, struct: type[ctypes.Structure] | int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, struct if isinstance(struct, int) else ctypes.sizeof(struct))


# --- arch/x86/include/uapi/asm/kvm.h -----------------------------------------
class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (KVM_GET_REGS / KVM_SET_REGS)."""

    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment``: one segment register as KVM sees it."""

    _fields_ = [
        ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8), ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8), ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable``: GDTR/IDTR."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs`` (KVM_GET_SREGS / KVM_SET_SREGS)."""

    _fields_ = [(n, KvmSegment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + [
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2``."""

    _fields_ = [
        ("function", ctypes.c_uint32), ("index", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32), ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32), ("padding", ctypes.c_uint32 * 3),
    ]


class KvmCpuid2Header(ctypes.Structure):
    """``struct kvm_cpuid2`` without its flexible ``entries[]`` array."""

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


def kvm_cpuid2(nent: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``nent`` entries."""

    class _Cpuid2(ctypes.Structure):
        _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                    ("entries", KvmCpuidEntry2 * nent)]

    c = _Cpuid2()
    c.nent = nent
    return c


class KvmMsrEntry(ctypes.Structure):
    """``struct kvm_msr_entry``."""

    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]


class KvmMsrsHeader(ctypes.Structure):
    """``struct kvm_msrs`` without its flexible ``entries[]`` array."""

    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def kvm_msrs(entries: list[tuple[int, int]]) -> ctypes.Structure:
    """A ``struct kvm_msrs`` holding ``(index, data)`` pairs."""

    class _Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                    ("entries", KvmMsrEntry * len(entries))]

    m = _Msrs()
    m.nmsrs = len(entries)
    for i, (index, data) in enumerate(entries):
        m.entries[i].index = index
        m.entries[i].data = data
    return m


# --- include/uapi/linux/kvm.h ------------------------------------------------
class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region`` (KVM_SET_USER_MEMORY_REGION)."""

    _fields_ = [
        ("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64), ("userspace_addr", ctypes.c_uint64),
    ]


class KvmEnableCap(ctypes.Structure):
    """``struct kvm_enable_cap`` (KVM_ENABLE_CAP)."""

    _fields_ = [("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("args", ctypes.c_uint64 * 4), ("pad", ctypes.c_uint8 * 64)]


class KvmRunHeader(ctypes.Structure):
    """The head of ``struct kvm_run`` (the mmap'ed vCPU page) and its MMIO exit.

    Offsets: ``exit_reason`` at 8, the exit union at 32. For KVM_EXIT_MMIO the
    union holds ``{__u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write;}``;
    for KVM_EXIT_INTERNAL_ERROR ``{__u32 suberror; __u32 ndata; __u64 data[16];}``.
    """

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8), ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6), ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8), ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16), ("cr8", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
        # union at offset 32, viewed as the MMIO exit
        ("mmio_phys_addr", ctypes.c_uint64), ("mmio_data", ctypes.c_uint8 * 8),
        ("mmio_len", ctypes.c_uint32), ("mmio_is_write", ctypes.c_uint8),
    ]


class KvmExitIo(ctypes.Structure):
    """The KVM_EXIT_IO member of the ``struct kvm_run`` exit union (at offset 32).

    The data (``size * count`` bytes) lies in the same mapping at ``data_offset``
    from the start of ``struct kvm_run``.
    """

    _fields_ = [("direction", ctypes.c_uint8), ("size", ctypes.c_uint8), ("port", ctypes.c_uint16),
                ("count", ctypes.c_uint32), ("data_offset", ctypes.c_uint64)]


KVM_RUN_EXIT_UNION = 32
KVM_EXIT_IO_OUT = 1

KVM_API_VERSION = 12

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, KvmCpuid2Header)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, KvmRegs)
KVM_SET_REGS = _iow(0x82, KvmRegs)
KVM_GET_SREGS = _ior(0x83, KvmSregs)
KVM_SET_SREGS = _iow(0x84, KvmSregs)
KVM_SET_MSRS = _iow(0x89, KvmMsrsHeader)
KVM_SET_CPUID2 = _iow(0x90, KvmCpuid2Header)
KVM_ENABLE_CAP = _iow(0xA3, KvmEnableCap)
KVM_GET_TSC_KHZ = _io(0xA3)  # vCPU ioctl: the guest's TSC frequency in kHz (returned as the result)
KVM_GET_STATS_FD = _io(0xCE)

# exit reasons (struct kvm_run::exit_reason)
EXIT_REASONS = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
}
KVM_EXIT_IO = 2
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

# memslot flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# capabilities probed by ``desim kvm probe`` (KVM_CHECK_EXTENSION)
CAPS = {
    "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_SET_TSS_ADDR": 4,
    "KVM_CAP_EXT_CPUID": 7,
    "KVM_CAP_NR_VCPUS": 9,
    "KVM_CAP_NR_MEMSLOTS": 10,
    "KVM_CAP_SYNC_MMU": 16,
    "KVM_CAP_MAX_VCPUS": 66,
    "KVM_CAP_READONLY_MEM": 81,
    "KVM_CAP_DISABLE_QUIRKS": 116,
    "KVM_CAP_MULTI_ADDRESS_SPACE": 118,
    "KVM_CAP_MAX_VCPU_ID": 128,
    "KVM_CAP_IMMEDIATE_EXIT": 136,
    "KVM_CAP_BINARY_STATS_FD": 203,
    "KVM_CAP_DISABLE_QUIRKS2": 213,
    "KVM_CAP_VM_TYPES": 235,
    "KVM_CAP_PRE_FAULT_MEMORY": 236,
    "KVM_CAP_USER_MEMORY2": 231,
}
KVM_CAP_NR_VCPUS = CAPS["KVM_CAP_NR_VCPUS"]
KVM_CAP_NR_MEMSLOTS = CAPS["KVM_CAP_NR_MEMSLOTS"]
KVM_CAP_MAX_VCPUS = CAPS["KVM_CAP_MAX_VCPUS"]
KVM_CAP_BINARY_STATS_FD = CAPS["KVM_CAP_BINARY_STATS_FD"]
KVM_CAP_DISABLE_QUIRKS2 = CAPS["KVM_CAP_DISABLE_QUIRKS2"]

# arch/x86/include/uapi/asm/kvm.h: quirks (KVM_CAP_DISABLE_QUIRKS2 args[0] bits)
QUIRKS = {
    "LINT0_REENABLED": 1 << 0,
    "CD_NW_CLEARED": 1 << 1,
    "LAPIC_MMIO_HOLE": 1 << 2,
    "OUT_7E_INC_RIP": 1 << 3,
    "MISC_ENABLE_NO_MWAIT": 1 << 4,
    "FIX_HYPERCALL_INSN": 1 << 5,
    "MWAIT_NEVER_UD_FAULTS": 1 << 6,
    "SLOT_ZAP_ALL": 1 << 7,
    "STUFF_FEATURE_MSRS": 1 << 8,
    "IGNORE_GUEST_PAT": 1 << 9,
    "VMCS12_ALLOW_FREEZE_IN_SMM": 1 << 10,
}
KVM_X86_QUIRK_SLOT_ZAP_ALL = QUIRKS["SLOT_ZAP_ALL"]

# arch/x86/include/asm/msr-index.h
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082

# arch/x86/include/uapi/asm/processor-flags.h, msr-index.h
X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_WP = 1 << 16
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
X86_CR4_PCIDE = 1 << 17
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NX = 1 << 11
