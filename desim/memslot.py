"""Memslots and the VMM operations on them.

A memslot maps a range of guest-physical frames (gfn) to host virtual memory
(hva). The VMM changes the set of memslots with ``KVM_SET_USER_MEMORY_REGION``;
the kernel classifies each call in ``kvm_set_memory_region``
(virt/kvm/kvm_main.c) as ``KVM_MR_CREATE``, ``KVM_MR_DELETE``, ``KVM_MR_MOVE``
or ``KVM_MR_FLAGS_ONLY``. Only DELETE and MOVE invalidate the slot and run the
zap policy (``kvm_arch_flush_shadow_memslot``).

This module holds the plain data: :class:`Memslot` (one slot's identity and
flags) and :class:`MemslotOp` (one VMM ioctl, as read from a script or a trace).
The SPTE state of a slot lives in :mod:`desim.mmu`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# include/uapi/linux/kvm.h
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
# include/linux/kvm_host.h: set on the copy swapped in while a DELETE/MOVE is in flight
KVM_MEMSLOT_INVALID = 1 << 16
KVM_MEM_USER_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY


class MrChange(str, Enum):
    """``enum kvm_mr_change`` (include/linux/kvm_host.h)."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags"


@dataclass(frozen=True, slots=True)
class MemslotOp:
    """One ``KVM_SET_USER_MEMORY_REGION`` ioctl as the kernel classifies it.

    ``time_ns`` is when the VMM issues it, relative to the start of the script
    (or phase) that carries it. ``slot`` is the slot id as passed to the ioctl
    (``as_id << 16 | id``). ``gpa``/``size`` are in bytes; for DELETE they
    describe the slot being deleted. ``ua`` is the host virtual address: two
    slots with the same ``ua`` share host memory (QEMU re-creates a slot over
    the same RAM block), so host pages already populated stay populated.
    """

    time_ns: float
    op: MrChange
    slot: int
    gpa: int = 0
    size: int = 0
    flags: int = 0
    ua: int = 0

    @property
    def base_gfn(self) -> int:
        return self.gpa >> PAGE_SHIFT

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT


@dataclass(slots=True)
class Memslot:
    """``struct kvm_memory_slot``: id, gfn range, flags and host address."""

    id: int
    base_gfn: int
    npages: int
    flags: int = 0
    ua: int = 0

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def invalid(self) -> bool:
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def dirty_logging(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def overlaps(self, base_gfn: int, npages: int) -> bool:
        return base_gfn < self.end_gfn and self.base_gfn < base_gfn + npages
