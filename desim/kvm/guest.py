"""The guest: a hand-assembled 64-bit touch loop and its identity-mapped page tables.

There is no guest kernel. Each vCPU starts in 64-bit *user* mode (CPL 3) at
:data:`ENTRY`, with its region in registers, and runs the touch loop: one
byte written to every ``stride`` bytes of ``[rdi, rdi + rsi)``, then an exit
to the VMM, so that one ``KVM_RUN`` is one pass; entering ``KVM_RUN`` again
completes the exit and starts the next pass. Two exits exist
(``Documentation/virt/kvm/api.rst``, "KVM_EXIT_IO", "KVM_EXIT_MMIO"):

* ``pio`` (:data:`TOUCH_LOOP_PIO`): ``out 0x80, al``, legal at CPL 3 because
  RFLAGS.IOPL is 3; ``KVM_EXIT_IO``, no page fault;
* ``mmio`` (:data:`TOUCH_LOOP_MMIO`): a write to ``rcx``, a gpa mapped by the
  guest but in no memslot; ``KVM_EXIT_MMIO`` after one page fault
  (``pf_taken``, emulated: this host has ``kvm.mmio_caching=N``).

Why user mode: on this host's KVM (the PVM flavour, ``kvm_pvm``) only guest
user mode runs natively; supervisor code is emulated instruction by
instruction and builds no shadow PTEs. ``hlt`` at CPL 3 raises #GP, which
with no IDT ends in a triple fault (``KVM_EXIT_SHUTDOWN``).

The page tables are 4-level x86-64 tables (Intel SDM vol. 3A, 4.5) built by
the VMM in the system slot: an identity map (va == gpa) of the ranges the VMM
asks for, with 4 KiB PTEs or 2 MiB PDEs (PS bit), the U/S bit at every level,
and optionally the Accessed and Dirty bits pre-set (shadow paging only
prefetches neighbouring guest PTEs whose Accessed bit is set,
``FNAME(prefetch_gpte)`` in ``arch/x86/kvm/mmu/paging_tmpl.h``).
"""
from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field

from desim.kvm.uapi import (
    MSR_STAR, EFER_LMA, EFER_LME, EFER_SCE, X86_CR0_ET, X86_CR0_NE, X86_CR0_PE, X86_CR0_PG, X86_CR0_WP,
    X86_CR4_PAE, KvmRegs, KvmSegment, KvmSregs,
)

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30

# Register contract of the touch loop (struct kvm_regs fields):
#   rdi = region base (guest virtual == guest physical)
#   rsi = region size in bytes
#   rdx = stride in bytes (4096: one write per 4 KiB page)
#   rcx = exit address: a gpa outside every memslot (used by the MMIO exit)
#   r9  = pass counter, incremented at the start of every pass; its low byte
#         is what each page receives and what the exit carries to the VMM;
#   r11 = the stride again (the timed loop's copy: rdtsc clobbers rdx).
_LOOP_BODY = bytes([
    0x49, 0xFF, 0xC1,        # 00 start: inc  r9               ; pass += 1
    0x48, 0x89, 0xF8,        # 03        mov  rax, rdi         ; cursor = base
    0x4C, 0x8D, 0x04, 0x37,  # 06        lea  r8, [rdi+rsi]    ; end = base + size
    0x4C, 0x39, 0xC0,        # 0a loop:  cmp  rax, r8
    0x73, 0x08,              # 0d        jae  done (+8 -> 0x17)
    0x44, 0x88, 0x08,        # 0f        mov  byte [rax], r9b  ; touch one byte of the page
    0x48, 0x01, 0xD0,        # 12        add  rax, rdx         ; next page
    0xEB, 0xF3,              # 15        jmp  loop (-13 -> 0x0a)
])
# the exit, 5 bytes at 0x17 ("done"), then back to start
_EXIT_MMIO = bytes([
    0x44, 0x88, 0x09,        # 17 done:  mov  byte [rcx], r9b  ; no memslot there -> KVM_EXIT_MMIO
    0x90, 0x90,              # 1a        nop; nop
])
_EXIT_PIO = bytes([
    0x44, 0x88, 0xC8,        # 17 done:  mov  al, r9b
    0xE6, 0x80,              # 1a        out  0x80, al         ; -> KVM_EXIT_IO, port 0x80
])
_LOOP_BACK = bytes([
    0xEB, 0xE2,              # 1c        jmp  start (-30 -> 0x00)
])
TOUCH_LOOP_MMIO = _LOOP_BODY + _EXIT_MMIO + _LOOP_BACK
TOUCH_LOOP_PIO = _LOOP_BODY + _EXIT_PIO + _LOOP_BACK
TOUCH_LOOP = TOUCH_LOOP_MMIO
EXITS = {"mmio": TOUCH_LOOP_MMIO, "pio": TOUCH_LOOP_PIO}

# The timed touch loop: the same passes, each touch bracketed by ``lfence; rdtsc``
# (LFENCE waits until the earlier instructions, the touching store and the page
# fault it may take, have completed locally; Intel SDM vol. 2B "RDTSC", AMD APM
# vol. 3 "RDTSC"). RDTSC at CPL 3 needs CR4.TSD = 0, which set_user_mode keeps.
# The result goes into the touched page itself, which the touch just mapped, so
# timing adds no fault: a ring of RESULT_SLOTS 16-byte slots from RESULT_BASE,
# slot (pass & 63) for this pass, holds the touch's latency in TSC cycles (u32 at
# +0: exact below 2^32 cycles), the pass number (u32 at +4: a slot whose pass
# does not match was not written, e.g. a touch that found no memslot) and the
# TSC before the touch (u64 at +8), from which the VMM places the access in
# host time. The ring keeps the last 64
# passes readable, so the VMM can let vCPUs run passes back to back and read them
# afterwards. RDTSC clobbers rax and rdx, so this loop keeps its cursor in r10,
# its stride in r11 (touch_regs sets r11 = rdx = stride) and the slot offset in
# r12; rbx is scratch. (On kvm_pvm the slot offset is computed with movzx/and/lea:
# an equivalent mov/and/shl/add prologue made the PIO exit's emulated ``out`` end
# in a triple fault, for reasons not found; tests/test_kvm_latency.py runs both exits.)
RESULT_BASE = 16
RESULT_SLOTS = 64
LATENCY_OFFSET = 0  # within a slot
PASS_OFFSET = 4     # within a slot: the low 32 bits of the pass counter that wrote it
TSC_OFFSET = 8      # within a slot
_TIMED_BODY = bytes([
    0x49, 0xFF, 0xC1,        # 00 start: inc  r9               ; pass += 1
    0x49, 0x89, 0xFA,        # 03        mov  r10, rdi         ; cursor = base
    0x4C, 0x8D, 0x04, 0x37,  # 06        lea  r8, [rdi+rsi]    ; end = base + size
    0x45, 0x0F, 0xB6, 0xE1,  # 0a        movzx r12d, r9b
    0x41, 0x83, 0xE4, 0x3F,  # 0e        and  r12d, 63
    0x4E, 0x8D, 0x24, 0xE5, 0x08, 0x00, 0x00, 0x00,  # 12  lea r12, [r12*8+8]
    0x4E, 0x8D, 0x24, 0x65, 0x00, 0x00, 0x00, 0x00,  # 1a  lea r12, [r12*2]  ; slot = 16 + 16 * (pass & 63)
    0x4D, 0x39, 0xC2,        # 22 loop:  cmp  r10, r8
    0x73, 0x34,              # 25        jae  done (+0x34 -> 0x5b)
    0x0F, 0xAE, 0xE8,        # 27        lfence
    0x0F, 0x31,              # 2a        rdtsc                 ; edx:eax = TSC
    0x48, 0xC1, 0xE2, 0x20,  # 2c        shl  rdx, 32
    0x48, 0x09, 0xD0,        # 30        or   rax, rdx
    0x48, 0x89, 0xC3,        # 33        mov  rbx, rax         ; t0
    0x45, 0x88, 0x0A,        # 36        mov  byte [r10], r9b  ; the touch (may fault)
    0x0F, 0xAE, 0xE8,        # 39        lfence
    0x0F, 0x31,              # 3c        rdtsc
    0x48, 0xC1, 0xE2, 0x20,  # 3e        shl  rdx, 32
    0x48, 0x09, 0xD0,        # 42        or   rax, rdx
    0x48, 0x29, 0xD8,        # 45        sub  rax, rbx         ; cycles of the touch
    0x43, 0x89, 0x04, 0x22,  # 48        mov  dword [r10+r12], eax
    0x47, 0x89, 0x4C, 0x22, 0x04,  # 4c  mov  dword [r10+r12+4], r9d   ; the pass that wrote the slot
    0x4B, 0x89, 0x5C, 0x22, 0x08,  # 51  mov  qword [r10+r12+8], rbx
    0x4D, 0x01, 0xDA,        # 56        add  r10, r11         ; next page
    0xEB, 0xC7,              # 59        jmp  loop (-0x39 -> 0x22)
])
# the same 5-byte exits at 0x5b, then back to start
_TIMED_BACK = bytes([
    0xEB, 0x9E,              # 60        jmp  start (-0x62 -> 0x00)
])
TIMED_LOOP_MMIO = _TIMED_BODY + _EXIT_MMIO + _TIMED_BACK
TIMED_LOOP_PIO = _TIMED_BODY + _EXIT_PIO + _TIMED_BACK
TIMED_EXITS = {"mmio": TIMED_LOOP_MMIO, "pio": TIMED_LOOP_PIO}


def result_offset(pass_no: int) -> int:
    """Offset in each touched page of pass ``pass_no``'s result slot (the timed loop's r12)."""
    return RESULT_BASE + 16 * (pass_no % RESULT_SLOTS)
EXIT_PORT = 0x80
ENTRY = 0x0  # offset of ``start`` in the touch loop

# x86-64 paging-structure entry bits (Intel SDM vol. 3A, table 4-15 .. 4-20)
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_4K - 1)

# User-mode segments of a Linux x86-64 guest (arch/x86/include/asm/segment.h):
# __USER_CS = GDT_ENTRY_DEFAULT_USER_CS(6)*8 + 3, __USER_DS = 5*8 + 3, and
# MSR_STAR = __USER32_CS(0x23) << 48 | __KERNEL_CS(0x10) << 32 as syscall_init() sets it.
USER_CS = 0x33
USER_DS = 0x2B
STAR = (0x23 << 48) | (0x10 << 32)
GUEST_MSRS = [(MSR_STAR, STAR)]  # PVM needs STAR to know the guest's user selectors


@dataclass
class PageTables:
    """4-level identity-map tables laid out from ``base`` (a gpa) upward.

    Table pages are allocated on demand, so only the mapped ranges cost table
    memory: about 8 bytes per 4 KiB page with 4 KiB guest pages, 8 bytes per
    2 MiB with 2 MiB pages.
    """

    base: int
    leaf_size: int = PAGE_4K
    accessed: bool = True
    pages: list[bytearray] = field(default_factory=list)
    _index: dict[tuple[int, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.leaf_size not in (PAGE_4K, PAGE_2M):
            raise ValueError("leaf_size must be 4 KiB or 2 MiB")
        if self.base % PAGE_4K:
            raise ValueError("page-table base must be 4 KiB aligned")
        self._table(4, 0)  # the PML4 is the first page: cr3 == base

    @property
    def cr3(self) -> int:
        return self.base

    @property
    def size(self) -> int:
        return len(self.pages) * PAGE_4K

    def _table(self, level: int, va_prefix: int) -> int:
        """Index of the table of ``level`` covering ``va_prefix`` (allocated if new)."""
        key = (level, va_prefix)
        if key not in self._index:
            self._index[key] = len(self.pages)
            self.pages.append(bytearray(PAGE_4K))
        return self._index[key]

    def _gpa_of(self, idx: int) -> int:
        return self.base + idx * PAGE_4K

    def _leaf_flags(self) -> int:
        f = PTE_P | PTE_RW | PTE_US
        return f | PTE_A | PTE_D if self.accessed else f

    def _leaf_table(self, va: int, leaf_level: int) -> int:
        """Index of the table holding ``va``'s leaf entry, linking directories on the way."""
        dir_flags = PTE_P | PTE_RW | PTE_US | (PTE_A if self.accessed else 0)
        table = 0
        for level in range(4, leaf_level, -1):
            shift = 12 + 9 * (level - 1)
            child = self._table(level - 1, va >> shift)
            struct.pack_into("<Q", self.pages[table], ((va >> shift) & 511) * 8, self._gpa_of(child) | dir_flags)
            table = child
        return table

    def map(self, start: int, size: int) -> None:
        """Identity-map ``[start, start + size)``, rounded out to the leaf size.

        Leaf entries are written one leaf table (512 entries) at a time.
        """
        ls = self.leaf_size
        lo, hi = start // ls * ls, -(-(start + size) // ls) * ls
        if hi > 1 << 47:
            raise ValueError("identity map limited to the lower canonical half (< 128 TiB)")
        leaf_level = 1 if ls == PAGE_4K else 2
        flags = self._leaf_flags() | (PTE_PS if leaf_level == 2 else 0)
        span = ls * 512
        va = lo
        while va < hi:
            end = min(hi, (va // span + 1) * span)
            table = self._leaf_table(va, leaf_level)
            first = (va // ls) % 512
            entries = array("Q", range(va | flags, end | flags, ls))
            self.pages[table][first * 8:first * 8 + len(entries) * 8] = entries.tobytes()
            va = end

    def image(self) -> bytes:
        """The tables as bytes, to be copied to guest memory at :attr:`base`."""
        return b"".join(self.pages)

    def translate(self, va: int) -> int | None:
        """Walk the tables like the MMU: the gpa of ``va``, or None if unmapped."""
        table = 0
        for level in (4, 3, 2, 1):
            shift = 12 + 9 * (level - 1)
            (e,) = struct.unpack_from("<Q", self.pages[table], ((va >> shift) & 511) * 8)
            if not e & PTE_P:
                return None
            if level == 1 or (level == 2 and e & PTE_PS):
                size = 1 << shift
                return (e & ADDR_MASK & ~(size - 1)) | (va & (size - 1))
            table = ((e & ADDR_MASK) - self.base) // PAGE_4K
        return None  # pragma: no cover


def table_pages_needed(size: int, leaf_size: int) -> int:
    """Upper bound of the table pages that :class:`PageTables` allocates for ``size`` bytes
    mapped as a few separate ranges (used to size the system slot)."""
    pts = -(-size // PAGE_2M) if leaf_size == PAGE_4K else 0
    pds = -(-size // PAGE_1G)
    return 1 + 8 + pts + pds + 8  # PML4, PDPTs, PTs, PDs, slack for range edges


def set_user_mode(s: KvmSregs, cr3: int) -> None:
    """Put ``struct kvm_sregs`` in 64-bit user mode with paging at ``cr3``.

    CS = __USER_CS (long-mode code, DPL 3), SS/DS/ES/FS/GS = __USER_DS (data,
    DPL 3); CR0.PE|PG (and WP, ET, NE), CR4.PAE (no PCIDE: this KVM rejects
    it), EFER.LME|LMA|SCE. There is no IDT: the guest never takes an exception
    by design; if it did, KVM would report a shutdown or an internal error.
    """
    def seg(sg: KvmSegment, selector: int, type_: int, long_: int, db: int) -> None:
        sg.base, sg.limit, sg.selector, sg.type = 0, 0xFFFFFFFF, selector, type_
        sg.present, sg.dpl, sg.db, sg.s, sg.l, sg.g, sg.avl, sg.unusable = 1, 3, db, 1, long_, 1, 0, 0

    seg(s.cs, USER_CS, 0xB, 1, 0)  # execute/read, accessed; L=1 D=0
    for name in ("ss", "ds", "es", "fs", "gs"):
        seg(getattr(s, name), USER_DS, 0x3, 0, 1)  # read/write, accessed
    s.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG
    s.cr4 = X86_CR4_PAE
    s.cr3 = cr3
    s.efer = EFER_LME | EFER_LMA | EFER_SCE


RFLAGS = 0x2 | 0x200 | 0x3000  # reserved bit 1, IF, IOPL 3 (so ``out`` is legal at CPL 3)


def touch_regs(base: int, size: int, exit_gpa: int, stride: int = PAGE_4K) -> KvmRegs:
    """``struct kvm_regs`` for the touch loop over ``[base, base + size)``."""
    return KvmRegs(rip=ENTRY, rflags=RFLAGS, rdi=base, rsi=size, rdx=stride, rcx=exit_gpa, r9=0, r11=stride)
