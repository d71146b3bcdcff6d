"""Guest address spaces under shadow paging: one root per guest CR3, ``prev_roots``, write-protected tables.

With shadow paging (``kernel.mmu = "shadow"``) KVM shadows each guest page
table with a shadow page keyed by (gfn of the guest table, role) in
``kvm->arch.mmu_page_hash``. Each guest process (one CR3, one top-level guest
table) gets its own *root* shadow page; what the processes share (the guest
kernel's mappings, one set of guest tables linked from every process's top
level) is shadowed once and linked from every root. This module models, from
arch/x86/kvm/mmu/mmu.c (Linux 6.1.176, Debian bookworm's source; the same
functions in 6.12+, where ``kvm_mmu_pte_write`` is ``kvm_mmu_track_write``):

* **Roots per CR3** (:class:`GuestAddressSpaces`, :class:`ShadowRoot`):
  ``mmu_alloc_shadow_roots`` -> ``mmu_alloc_root`` ->
  ``kvm_mmu_get_shadow_page``: the root of a CR3 is *found* in the hash
  (``kvm_mmu_find_shadow_page``, another vCPU or an earlier run of the process
  built it) or *created* (``kvm_mmu_alloc_shadow_page``), then
  ``++root_count``. A root whose ``root_count`` drops to 0 stays in the hash,
  valid, with its links (``mmu_free_root_page`` only zaps an *invalid* root).
  A created root has no entries: the first access through each top-level entry
  faults and links the shadow pages below it, found in the hash
  (``FNAME(fetch)`` -> ``kvm_mmu_get_child_sp``): a ``root_link`` fault.
* **prev_roots** (:class:`VcpuAddressSpace`): each vCPU caches its current
  root and ``KVM_MMU_NUM_PREV_ROOTS`` = 3 previous ones. A guest CR3 write
  (``kvm_set_cr3`` -> ``kvm_mmu_new_pgd`` -> ``fast_pgd_switch``) to a cached,
  usable root (``is_root_usable``: same pgd, valid role) is cheap
  (``cached_root_find_and_keep_current`` rotates the cache); otherwise the
  LRU root is dropped (``kvm_mmu_free_roots(KVM_MMU_ROOT_CURRENT)``, write
  ``mmu_lock``) and ``kvm_mmu_reload`` -> ``kvm_mmu_load`` finds or creates
  the new root under write ``mmu_lock`` before the next entry. Without PCID
  every CR3 write also requests ``KVM_REQ_MMU_SYNC`` and
  ``KVM_REQ_TLB_FLUSH_CURRENT`` (``kvm_invalidate_pcid`` in x86.c): a flush
  before re-entry.
* **Obsolete roots**: ``kvm_mmu_zap_all_fast`` makes every root obsolete, the
  cached ones included (a zapped root's role has ``invalid`` set, so it is
  never usable again). On ``KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`` each vCPU drops
  its obsolete current and previous roots in one ``kvm_mmu_free_roots`` call
  (``__kvm_mmu_free_obsolete_roots``); the last user of an obsolete root zaps
  it for real and ``kvm_mmu_commit_zap_page`` flushes every vCPU's TLB; then
  it rebuilds its root by faults. A targeted zap keeps every root, except the
  roots whose top-level guest table lies in the slot
  (``kvm_mmu_zap_memslot_pages_and_flush`` finds them by gfn): an in-use root
  zapped that way asks every vCPU to free obsolete roots
  (``__kvm_mmu_prepare_zap_page``: ``KVM_REQ_MMU_FREE_OBSOLETE_ROOTS``).
* **Write-protected guest page tables** (:func:`kvm_mmu_pte_write`):
  ``account_shadowed`` write-protects every guest page table that has a
  shadow page. A guest write to one takes a write-protection fault; this
  module models the *emulation* path: ``page_fault_handle_page_track`` ->
  ``RET_PF_EMULATE`` -> ``x86_emulate_instruction`` -> ``kvm_page_track_write``
  -> ``kvm_mmu_pte_write``: under write ``mmu_lock`` the SPTE shadowing the
  written guest entry is zapped (``mmu_page_zap_pte``) and, if it was present,
  every vCPU's TLB flushed (``kvm_mmu_remote_flush_or_zap``). It is the path of
  every write to an upper-level guest table (write-tracked by
  ``account_shadowed``); a write to a last-level table can instead make its
  shadow page *unsync* (``mmu_try_to_unsync_pages``: one fault, then free
  writes until ``kvm_mmu_sync_roots`` at the next CR3 write): not modelled, nor
  write flooding (``detect_write_flooding``) or unprotect-and-retry
  (``kvm_mmu_unprotect_page``).

Simplifications: the shadow pages below the roots are those of
:class:`desim.mmu.Mmu`, keyed by the gfn region they map rather than by (guest
table, role): the phases' accesses go through mappings every process shares
(the guest kernel's), and each process's private pages (``process_pages``, at
their own gfns) get their own leaf SPTEs and last-level shadow pages, while the
upper levels are shared; a root is the only shadow page per process; a write hits the last-level guest table that maps the
accessed gfn, write-protected while its shadow page (the PT page of the gfn's
2 MiB region in :class:`desim.mmu.Mmu`) exists; a
top-level entry maps 512 GiB (4-level) or 256 TiB (5-level); the lockless
MMIO fast path ignores unlinked top-level entries. The CR3 write happens after
``context_switch_us`` of the vCPU's guest time (accesses), to a process drawn
uniformly from the others (the vCPU's own stream: both policies see the same
schedule). Only the shadow-paging MMU has any of this: with TDP the guest's CR3
writes do not exit and the roots are per MMU role, not per CR3.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generator

import numpy as np

from .lock import WRITE
from .streams import stream
from .tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, KVM_REQ_TLB_FLUSH, kvm_flush_remote_tlbs, kvm_make_all_cpus_request

if TYPE_CHECKING:  # pragma: no cover
    from .memslot import Memslot
    from .vcpu import Vcpu
    from .vm import Vm

KVM_MMU_NUM_PREV_ROOTS = 3  # arch/x86/include/asm/kvm_host.h
KVM_MMU_HASH_BUCKETS = 1 << 12  # 1 << KVM_MMU_HASH_SHIFT
# gfn bits below one top-level entry: 9 bits per level under the root, 4 KiB pages (PT64_LEVEL_BITS)
TOP_ENTRY_SHIFT = {4: 27, 5: 36}


@dataclass(eq=False)
class ShadowRoot:
    """A root shadow page: the shadow of one process's top-level guest table (``struct kvm_mmu_page``)."""

    pgd: int  # the process; its top-level guest table is at GuestAddressSpaces.pgd_gfn(pgd)
    root_count: int = 0  # vCPUs holding it as current or previous root
    invalid: bool = False  # role.invalid: zapped, never usable again
    linked: set[int] = field(default_factory=set)  # top-level entries present (gfn >> TOP_ENTRY_SHIFT)


class GuestAddressSpaces:
    """VM-wide: the root shadow pages in ``mmu_page_hash``, one per process (pgd)."""

    def __init__(self, processes: int, switch_ns: float, pt_write_share: float, pgd_gfn: int | None,
                 root_level: int, process_pages: int = 0, process_gfn: int = 0, user_share: float = 0.0) -> None:
        self.processes = processes
        self.process_pages = process_pages  # private pages per process, from process_gfn + p * process_pages
        self.process_gfn = process_gfn
        self.user_share = user_share
        self.switch_ns = switch_ns if processes > 1 else 0.0
        self.pt_write_share = pt_write_share
        self._pgd_gfn = pgd_gfn
        self.shift = TOP_ENTRY_SHIFT[root_level]
        self.roots: dict[int, ShadowRoot] = {}  # valid roots by pgd (in the hash)
        self.per_root = processes > 1  # roots are per CR3 (else the single shared root of desim.vcpu)
        self.zapped_in_use: list[ShadowRoot] = []  # invalid roots some vCPU still holds

    def pgd_gfn(self, pgd: int) -> int | None:
        """gfn of process ``pgd``'s top-level guest table (``guest.pgd_gpa`` + 4 KiB per process)."""
        return None if self._pgd_gfn is None else self._pgd_gfn + pgd

    # -- kvm_mmu_get_shadow_page / mmu_free_root_page -------------------------------
    def get_root(self, pgd: int) -> tuple[ShadowRoot, bool]:
        """``mmu_alloc_root``: find the valid root of ``pgd`` in the hash, or create it; ``++root_count``."""
        r = self.roots.get(pgd)
        created = r is None
        if created:
            r = self.roots[pgd] = ShadowRoot(pgd)
        r.root_count += 1
        return r, created

    def put_root(self, r: ShadowRoot) -> bool:
        """``mmu_free_root_page``: ``--root_count``; True if it was the last user of an invalid root
        (``kvm_mmu_prepare_zap_page``: the caller's commit flushes)."""
        r.root_count -= 1
        if r.root_count == 0 and r.invalid:
            self.zapped_in_use.remove(r)
            return True
        return False

    def _invalidate(self, r: ShadowRoot) -> None:
        r.invalid = True
        r.linked.clear()
        if r.root_count:
            self.zapped_in_use.append(r)

    def zap_all_fast(self) -> int:
        """``kvm_zap_obsolete_pages`` on the roots: every root obsolete; returns the root pages zapped."""
        n = len(self.roots)
        for r in self.roots.values():
            self._invalidate(r)
        self.roots = {}
        return n

    def zap_roots_in(self, slot: "Memslot") -> tuple[int, bool]:
        """Roots whose top-level guest table lies in ``slot`` (``for_each_gfn_valid_sp_with_gptes``):
        zapped. Returns (roots zapped, whether one was in use)."""
        if self._pgd_gfn is None:
            return 0, False
        hit = [r for pgd, r in self.roots.items() if slot.base_gfn <= self.pgd_gfn(pgd) < slot.end_gfn]
        for r in hit:
            del self.roots[r.pgd]
            self._invalidate(r)
        return len(hit), any(r.root_count for r in hit)

    def hash_probes(self, shadow_pages: int) -> int:
        """Probes of ``kvm_mmu_find_shadow_page``: the bucket head plus its chain (``hash_64`` spreads evenly)."""
        return 1 + shadow_pages // KVM_MMU_HASH_BUCKETS


class VcpuAddressSpace:
    """One vCPU's side: the process it runs, ``mmu->root`` and ``mmu->prev_roots``, the CR3-write clock and
    the accesses of the current chunk that write guest page tables."""

    def __init__(self, guest: GuestAddressSpaces, vm: "Vm", index: int) -> None:
        self.guest = guest
        self.process = index % guest.processes
        self.root: ShadowRoot | None = None
        self.prev: list[ShadowRoot | None] = [None] * KVM_MMU_NUM_PREV_ROOTS
        self.left_ns = guest.switch_ns if guest.switch_ns > 0 else math.inf
        self._cr3_rng = stream(vm.seed, vm.replication, f"guest/cr3/vcpu{index}")
        self._ptw_rng = stream(vm.seed, vm.replication, f"guest/pt_write/vcpu{index}")
        self._user_rng = stream(vm.seed, vm.replication, f"guest/user/vcpu{index}")
        self._ptw: list[int] = []  # chunk positions of accesses that write a guest page table
        self._user_pos = np.zeros(0, np.int64)  # chunk positions of accesses to the process's private pages
        self._user_idx = np.zeros(0, np.int64)  # and which private page each touches
        self.dropping: ShadowRoot | None = None  # the LRU root evicted by a CR3 write, until mmu_free_root_page

    # -- the access stream --------------------------------------------------------------
    def new_chunk(self, chunk: np.ndarray) -> np.ndarray:
        """A new chunk of the vCPU's stream: draw its page-table writes and its accesses to the running
        process's private pages (returned in a copy of the chunk, the stream's own arrays untouched)."""
        g = self.guest
        n = len(chunk)
        if g.pt_write_share > 0:
            self._ptw = np.flatnonzero(self._ptw_rng.random(n) < g.pt_write_share).tolist()
        if g.user_share > 0:
            self._user_pos = np.flatnonzero(self._user_rng.random(n) < g.user_share)
            self._user_idx = self._user_rng.integers(0, g.process_pages, len(self._user_pos), dtype=np.int64)
            chunk = chunk.copy()
            self.retarget(chunk, 0)
        return chunk

    def retarget(self, chunk: np.ndarray, pos: int) -> None:
        """Point the private-page accesses of ``chunk`` from ``pos`` on at the running process's pages."""
        g = self.guest
        i = int(np.searchsorted(self._user_pos, pos))
        if i < len(self._user_pos):
            chunk[self._user_pos[i:]] = g.process_gfn + self.process * g.process_pages + self._user_idx[i:]

    def next_stop(self, v: "Vcpu", miss: int) -> tuple[int, str]:
        """Where the guest run from ``v._pos`` ends, and why: ``"cr3"`` (a CR3 write before that access),
        ``"link"`` (an access through an unlinked top-level entry), ``"wp"`` (a write to a write-protected
        guest page table) or ``"fault"`` (``miss``: the vCPU's own miss, or the chunk's end)."""
        pos = v._pos
        stop, kind = miss, "fault"
        if self.left_ns != math.inf:
            k = max(0, math.ceil(self.left_ns / v.access_ns)) if v.access_ns > 0 else 0
            if pos + k <= stop:
                stop, kind = pos + k, "cr3"  # before the access at pos + k: earlier stops still come first
        root = self.root
        if self.guest.per_root and root is not None and stop > pos:
            top = v._chunk[pos:stop] >> self.guest.shift
            lo, hi = int(top.min()), int(top.max())
            if not (lo == hi and lo in root.linked):
                linked = np.fromiter(root.linked, dtype=np.int64, count=len(root.linked))
                bad = np.flatnonzero(~np.isin(top, linked))
                if len(bad):
                    stop, kind = pos + int(bad[0]), "link"
        if self._ptw:
            mmu = v.vm.mmu
            d = mmu.pt_tags[1]
            tag = mmu.root_tag
            chunk = v._chunk_list
            i = bisect.bisect_left(self._ptw, pos)
            while i < len(self._ptw) and self._ptw[i] < stop:
                p = self._ptw[i]
                if d.get(chunk[p] >> 9) == tag and mmu.slot_of(chunk[p]) is not None:
                    return p, "wp"
                i += 1
        return stop, kind

    def consumed(self, guest_ns: float) -> None:
        self.left_ns -= guest_ns

    def link(self, gfn: int) -> bool:
        """``FNAME(fetch)`` links the top-level entry of ``gfn`` in the current root; True if it was missing."""
        root = self.root
        if root is None or not self.guest.per_root:
            return False
        top = gfn >> self.guest.shift
        if top in root.linked:
            return False
        root.linked.add(top)
        return True

    def root_usable(self) -> bool:
        return not self.guest.per_root or (self.root is not None and not self.root.invalid)

    # -- fast_pgd_switch ------------------------------------------------------------------
    def _usable(self, r: ShadowRoot | None, pgd: int) -> bool:
        """``is_root_usable``: a valid root page for the same pgd and role."""
        return r is not None and not r.invalid and r.pgd == pgd

    def fast_pgd_switch(self, pgd: int) -> tuple[bool, ShadowRoot | None]:
        """``fast_pgd_switch``: (hit, root to free). On a miss the current root is left empty and the LRU
        root is returned for ``kvm_mmu_free_roots(KVM_MMU_ROOT_CURRENT)``."""
        if self.root is not None:
            # cached_root_find_and_keep_current: C 0 1 2 -> rotate until usable; else C becomes the old LRU
            if self._usable(self.root, pgd):
                return True, None
            for i in range(KVM_MMU_NUM_PREV_ROOTS):
                self.root, self.prev[i] = self.prev[i], self.root
                if self._usable(self.root, pgd):
                    return True, None
            lru, self.root = self.root, None
            return False, lru
        # cached_root_find_without_current
        for i in range(KVM_MMU_NUM_PREV_ROOTS):
            if self._usable(self.prev[i], pgd):
                self.root, self.prev[i] = self.prev[i], None
                for j in range(i, KVM_MMU_NUM_PREV_ROOTS - 1):
                    self.prev[j] = self.prev[j + 1]
                self.prev[-1] = None
                return True, None
        return False, None

    def held(self) -> list[ShadowRoot]:
        """The roots this vCPU holds a ``root_count`` reference on."""
        return [r for r in [self.root, *self.prev, self.dropping] if r is not None]


def kvm_set_cr3(v: "Vcpu") -> Generator:
    """A guest CR3 write, after its exit (``handle_cr`` -> ``kvm_set_cr3`` -> ``kvm_mmu_new_pgd``).

    The exit and ``cr3_switch`` are charged by the vCPU's run; here the switch
    of roots, the LRU root's release under write ``mmu_lock`` on a miss, and the
    requests for the next entry: ``KVM_REQ_TLB_FLUSH_CURRENT`` (no PCID:
    ``kvm_invalidate_pcid``) and, on a miss, a root load (:func:`load_root`).
    """
    st = v.gas
    vm = v.vm
    g = st.guest
    st.left_ns = g.switch_ns
    o = int(st._cr3_rng.integers(g.processes - 1))
    st.process = o if o < st.process else o + 1
    vm.metrics.cr3_switches += 1
    if g.user_share > 0 and v._chunk is not None:
        # the rest of the chunk's private-page accesses are the new process's
        st.retarget(v._chunk, v._pos)
        v.chunk_rewritten()
    if not g.per_root:
        v.requests |= KVM_REQ_TLB_FLUSH
        return
    hit, lru = st.fast_pgd_switch(st.process)
    if hit:
        vm.metrics.prev_root_hits += 1
    elif lru is not None:
        # kvm_mmu_free_roots(KVM_MMU_ROOT_CURRENT): write_lock, mmu_free_root_page, commit, unlock
        t0 = v.env.now
        st.dropping = lru
        yield from vm.lock.take(WRITE, "root", v)
        st.dropping = None
        if g.put_root(lru):
            vm.metrics.obsolete_root_flushes += 1
            yield from kvm_flush_remote_tlbs(vm)
        vm.lock.release(v)
        v.m.stall_ns += v.env.now - t0
        v.m.time["host"] += v.env.now - t0
    v.requests |= KVM_REQ_TLB_FLUSH


def free_obsolete_roots(v: "Vcpu") -> Generator:
    """``kvm_mmu_free_obsolete_roots``: drop the obsolete current and previous roots in one
    ``kvm_mmu_free_roots`` (write ``mmu_lock``); if this vCPU was the last user of any, commit the zap
    (``kvm_mmu_commit_zap_page``: a remote flush)."""
    st = v.gas
    vm = v.vm
    obsolete = [r for r in [st.root, *st.prev] if r is not None and r.invalid]
    if not obsolete:
        return
    yield from vm.lock.take(WRITE, "root", v)
    freed = sum(1 for r in obsolete if st.guest.put_root(r))
    if st.root is not None and st.root.invalid:
        st.root = None
    st.prev = [None if (r is not None and r.invalid) else r for r in st.prev]
    if freed:
        vm.metrics.obsolete_root_flushes += 1
        yield from kvm_flush_remote_tlbs(vm)
    vm.lock.release(v)


def load_root(v: "Vcpu") -> Generator:
    """``kvm_mmu_load`` -> ``mmu_alloc_shadow_roots`` under write ``mmu_lock``: the root of the vCPU's
    process, found in the hash (``hash_probe`` per probe) or created (``root_alloc``)."""
    st = v.gas
    vm = v.vm
    P = v.P
    yield from vm.lock.take(WRITE, "root", v)
    g = st.guest
    probes = g.hash_probes(vm.mmu.present_pt + len(g.roots))
    r, created = g.get_root(st.process)
    st.root = r
    if created:
        vm.metrics.shadow_roots_created += 1
        yield v.env.timeout(probes * P.hash_probe + P.root_alloc)
    else:
        yield v.env.timeout(probes * P.hash_probe)
    vm.lock.release(v)


def kvm_mmu_pte_write(v: "Vcpu", gfn: int, start: float) -> Generator:
    """The write-protection fault of a guest write to the page table that maps ``gfn`` (emulated).

    After the exit, ``fault_handle`` and ``pt_write_emulate`` (charged by the
    vCPU's run): ``kvm_mmu_pte_write`` under write ``mmu_lock`` zaps the SPTE of
    the written entry (``gfn``'s 4 KiB leaf, if present) and flushes every
    vCPU's TLB if it was present. The write itself is the access: consumed.
    """
    vm = v.vm
    mmu = vm.mmu
    env = v.env
    t0 = env.now
    yield from vm.lock.take(WRITE, "fault", v)
    ss = mmu.slot_of(gfn)
    zapped = ss is not None and mmu.zap_gfn_leaf(ss, gfn)
    if zapped:
        yield env.timeout(v.P.spte_zap)
        vm.metrics.sptes_zapped += 1
        if vm.audit is not None:
            vm.audit.sptes_zapped(env.now)
        yield from kvm_flush_remote_tlbs(vm)
    vm.lock.release(v)
    v.m.stall_ns += env.now - t0
    v.m.time["host"] += env.now - t0
    v._consume(1)
    v._entry = entry = v.P.vm_entry
    vm.metrics.record_fault(v.index, "wp", start, env.now + entry - start)


def zap_roots_in_slot(vm: "Vm", slot: "Memslot") -> Generator:
    """The targeted zap's hash walk meets the roots whose top-level guest table is in ``slot``: zap them;
    an in-use one makes every vCPU free obsolete roots (``__kvm_mmu_prepare_zap_page``)."""
    n, in_use = vm.guest.zap_roots_in(slot)
    if n:
        yield vm.env.timeout(n * vm.P.sp_free)
        vm.metrics.gpte_sp_zapped += n
        vm.metrics.pt_pages_freed += n
        if in_use:
            yield from kvm_make_all_cpus_request(vm, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    return n


__all__ = ["GuestAddressSpaces", "ShadowRoot", "VcpuAddressSpace", "KVM_MMU_NUM_PREV_ROOTS", "kvm_set_cr3",
           "free_obsolete_roots", "load_root", "kvm_mmu_pte_write", "zap_roots_in_slot"]
