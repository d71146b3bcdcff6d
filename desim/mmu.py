"""SPTE state of one VM: memslots, leaf SPTEs, page-table pages and ``mmu_valid_gen``.

What a KVM developer would find in ``struct kvm_arch`` and the TDP MMU's
paging structure, reduced to what decides the cost of a fault or a zap:

* **Leaf SPTEs** are kept per *host RAM block* (a QEMU RAM block: one hva
  range), one byte per 4 KiB page, one per 2 MiB and one per 1 GiB unit (hva
  aligned), each level a :class:`desim.chunked.ChunkedBytes` whose chunks are
  allocated only when something at that level is first written: a 1 GiB SPTE
  (or host page) is one byte at the 1 GiB level and nothing below, so the
  state follows the mappings, not the RAM size (a 32 TiB guest on 1 GiB pages
  holds ~32,768 bytes plus the few regions mapped smaller), and at most one
  byte per 4 KiB page where everything is mapped at 4 KiB. A memslot reads
  and writes its block's state at an offset, so host memory (and its
  first-touch state) outlives a DELETE and is found again when QEMU
  re-creates a slot over the same hva, as it does for a MOVE.
  Each byte packs: bits 0-5 the *root tag* of the SPTE (0 = not present),
  bit 6 "was ever mapped" at that level (tells a re-fault from a first-touch
  fault: a gfn was ever mapped if its 4 KiB byte or the byte of the 2 MiB or
  1 GiB unit holding it says so), bit 7 "host page resident" at that level
  (the host has allocated and zeroed a page of that size).
* **Root tags** stand for ``mmu_valid_gen`` plus the roots built in that
  generation: an SPTE is present iff its tag equals the current ``root_tag``.
  ``kvm_mmu_zap_all_fast`` is therefore O(1) to apply (bump the tag); its cost
  shows up later as re-faults and as teardown work proportional to what the
  obsolete roots held (counted, not walked). On wrap-around every stale tag is
  cleared, which changes nothing observable since they are all obsolete.
* **Page-table pages** (non-leaf SPTEs) are per gfn region, VM-wide: one tag
  per PDPT page (512 GiB), PD page (1 GiB) and PT page (2 MiB). A targeted zap
  keeps them, as the seed says ("upper level SPTEs are retained").

Also kept: the memslot generation and MMIO SPTEs (``check_mmio_spte``), the
NX-huge-page splits (desim/nx.py) and, for shadow paging, which PT shadow
pages shadow guest page tables in a slot (``vm.guest_page_tables``).

Simplifications: one address space (no SMM); one set of leaf SPTEs and
page-table pages shared by all vCPUs (true of the TDP MMU; with shadow paging
the guest kernel's mappings are shared by every process's root: the roots per
guest CR3, ``prev_roots`` and the write-protection faults on guest page tables
are desim/guest_as.py); no dirty bitmap (dirty logging only forces 4 KiB
mappings).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from .chunked import ChunkedBytes, ChunkedView, SparseBytes
from .errors import DesimInputError
from .memslot import KVM_MEMSLOT_INVALID, Memslot
from .nx import ExecRanges

TAG_MASK = 0x3F
EVER_MAPPED = 0x40
HOST_RESIDENT = 0x80
KEEP_BITS = EVER_MAPPED | HOST_RESIDENT
MAX_TAG = TAG_MASK

# PG_LEVEL_4K / 2M / 1G (arch/x86/include/asm/pgtable_types.h)
PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
LEVEL_SHIFT = {PG_LEVEL_4K: 0, PG_LEVEL_2M: 9, PG_LEVEL_1G: 18}
PTE_PREFETCH_NUM = 8  # arch/x86/kvm/mmu/mmu.c
# arch/x86/kvm/mmu/spte.h: MMIO SPTEs carry 8 + 11 bits of the memslot generation
MMIO_SPTE_GEN_MASK = (1 << 19) - 1
# x86 kvm_arch_nr_memslot_as_ids() with SMM: generations advance by 2 per swap (kvm_swap_active_memslots)
KVM_ADDRESS_SPACE_NUM = 2
# chunk sizes of the leaf state (entries): 4 KiB level 2^16 (256 MiB of guest, 64 KiB of state), 2 MiB and
# 1 GiB levels 2^12 (8 GiB / 4 TiB of guest, 4 KiB of state): a chunk's own overhead (~300 bytes) stays small
CHUNK_SHIFT_4K = 16
CHUNK_SHIFT_HUGE = 12
_M4K = (1 << CHUNK_SHIFT_4K) - 1
_MHUGE = (1 << CHUNK_SHIFT_HUGE) - 1
_PF_SHIFT = PTE_PREFETCH_NUM.bit_length() - 1
_PF_ROW = np.arange(PTE_PREFETCH_NUM)
_PREFETCHABLE: dict = {}


def _prefetchable(tag: int, need_accessed: bool) -> np.ndarray:
    """Per state byte: may ``direct_pte_prefetch`` map it (not present under ``tag``, host page resident, and
    with ``need_accessed`` "ever mapped")? A table indexed by the byte."""
    t = _PREFETCHABLE.get((tag, need_accessed))
    if t is None:
        v = np.arange(256)
        t = ((v & TAG_MASK) != tag) & ((v & HOST_RESIDENT) != 0)
        if need_accessed:
            t &= (v & EVER_MAPPED) != 0
        t = _PREFETCHABLE[(tag, need_accessed)] = t
    return t


_SCALAR_COMMIT = 16  # commit_install_4k writes this many installs or fewer byte by byte (a speed threshold only)


def first_index(v: np.ndarray) -> np.ndarray:
    """The positions of the first occurrence of each distinct value of the int array ``v``, in increasing order
    (``np.sort(np.unique(v, return_index=True)[1])``). Where the values span a range not much wider than ``v`` is
    long (a vCPU's accesses, a plan's faults), each value's first position is the minimum of its positions,
    found with one ``np.minimum.at`` over the range instead of a sort (exact: a minimum does not depend on the
    order it is taken in); else by np.unique's stable sort."""
    n = len(v)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lo = int(v.min())
    span = int(v.max()) - lo + 1
    if span > 4 * n + 4096:
        return np.sort(np.unique(v, return_index=True)[1])
    first = np.full(span, n, dtype=np.int64)
    np.minimum.at(first, v - lo, np.arange(n, dtype=np.int64))
    mark = np.zeros(n, dtype=bool)
    mark[first[first < n]] = True
    return np.flatnonzero(mark)


def _first_of(keys: np.ndarray, increasing: bool) -> np.ndarray:
    """:func:`first_index` of ``keys``; ``increasing``: the keys never decrease (a sorted pass: each new value's
    first position, without a sort)."""
    if len(keys) < 2:
        return np.arange(len(keys))
    if increasing:
        return np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return first_index(keys)


def _mix(x: int) -> float:
    """Deterministic hash of an integer to [0, 1) (splitmix64 finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((x ^ (x >> 31)) >> 11) / float(1 << 53)


@dataclass
class RamBlock:
    """Host memory behind one or more memslots (a QEMU RAM block; an hva range)."""

    ua: int
    npages: int
    state: ChunkedBytes  # a byte per 4 KiB page
    state2m: ChunkedBytes  # a byte per 2 MiB unit (hva-aligned)
    state1g: ChunkedBytes  # a byte per 1 GiB unit (hva-aligned)
    backing: str = "4k"  # host page size behind it: "4k", "thp" or "hugetlbfs-1g" (a QEMU memory backend)

    @classmethod
    def new(cls, ua: int, npages: int, backing: str = "4k") -> "RamBlock":
        upage = ua >> 12
        n2m = ((upage + npages - 1) >> 9) - (upage >> 9) + 1
        n1g = ((upage + npages - 1) >> 18) - (upage >> 18) + 1
        return cls(ua, npages, ChunkedBytes(npages, CHUNK_SHIFT_4K), ChunkedBytes(n2m, CHUNK_SHIFT_HUGE),
                   ChunkedBytes(n1g, CHUNK_SHIFT_HUGE), backing)

    def prealloc(self) -> None:
        """Every host page already present (QEMU ``-mem-prealloc``, or an image the VMM wrote):
        a fault then finds the page resident (``faultin_resident``, no host allocation)."""
        for arr in (self.state, self.state2m, self.state1g):
            arr.update_all(0xFF, HOST_RESIDENT)

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.state2m.nbytes + self.state1g.nbytes

    def covers(self, ua: int, npages: int) -> bool:
        return self.ua <= ua and ua + (npages << 12) <= self.ua + (self.npages << 12)


@dataclass
class SlotSptes:
    """A memslot and where its SPTE state lies in its RAM block.

    The slot's gfn ``g`` is the block's 4 KiB entry ``off + g - base_gfn``, and
    the 2 MiB / 1 GiB unit of the block holding its hva (see :meth:`unit_state`).
    """

    slot: Memslot
    block: RamBlock
    off: int = 0  # the slot's first page in the block ((ua - block.ua) >> 12)
    # gpa and hva congruent modulo the huge page size: a prerequisite of huge mappings
    congruent2m: bool = False
    congruent1g: bool = False

    @property
    def state(self) -> ChunkedView:
        """The slot's 4 KiB-level bytes, one per gfn (``state[gfn - base_gfn]``), read and written
        through to the block (integer, integer-array and slice indexing)."""
        return ChunkedView(self.block.state, self.off, self.slot.npages)

    def leaf_bytes(self) -> np.ndarray:
        """A dense copy of the slot's 4 KiB-level bytes, one per gfn (tests, small slots)."""
        return self.block.state.to_array(self.off, self.off + self.slot.npages)

    def huge_ok(self, gfn: int, level: int) -> bool:
        """Can ``gfn`` be mapped at ``level`` as far as the slot's layout goes?

        Models the memslot's ``lpage_info.disallow_lpage`` for misaligned
        heads/tails and gpa/hva incongruence (kvm_alloc_memslot_metadata).
        """
        shift = LEVEL_SHIFT[level]
        if level == PG_LEVEL_2M and not self.congruent2m:
            return False
        if level == PG_LEVEL_1G and not self.congruent1g:
            return False
        lo = (gfn >> shift) << shift
        # the block always covers the whole slot, so inside the slot means inside the VMA
        return self.slot.base_gfn <= lo and lo + (1 << shift) <= self.slot.base_gfn + self.slot.npages

    def unit_state(self, gfn: int, level: int) -> tuple[ChunkedBytes, int]:
        """(array, index) of the huge-unit byte covering ``gfn`` in the RAM block."""
        upage = (self.slot.ua >> 12) + (gfn - self.slot.base_gfn)
        if level == PG_LEVEL_2M:
            return self.block.state2m, (upage >> 9) - ((self.block.ua >> 12) >> 9)
        return self.block.state1g, (upage >> 18) - ((self.block.ua >> 12) >> 18)


@dataclass
class ObsoleteWork:
    """What a zap left to tear down: counts of SPTEs and page-table pages.

    ``pt_pages`` counts every page-table page including the root;
    ``tables_by_level`` the non-root ones by level (1 = PT, 2 = PD, 3 = PDPT)
    and ``root`` whether a root was in use, for the TDP MMU's walk cost.
    """

    leaf_sptes: int = 0
    pt_pages: int = 0
    tables_by_level: dict[int, int] = field(default_factory=dict)
    root: int = 0


@dataclass
class Mmu:
    """Memslots plus SPTE state of one VM (the parts of ``struct kvm_arch`` that matter)."""

    backing: str = "thp"  # "4k" | "thp" | "hugetlbfs-1g"
    thp_fraction: float = 1.0
    root_tag: int = 1
    mmu_valid_gen: int = 0
    slots: dict[int, SlotSptes] = field(default_factory=dict)
    blocks: list[RamBlock] = field(default_factory=list)
    _bases: list[int] = field(default_factory=list)
    _sorted: list[SlotSptes] = field(default_factory=list)
    # non-leaf: level -> region index -> tag (0: none), a byte per region where any was written (PT pages
    # by 2 MiB region, PD by 1 GiB, PDPT by 512 GiB; SparseBytes: no Python object per page-table page)
    pt_tags: dict[int, SparseBytes] = field(default_factory=lambda: {1: SparseBytes(), 2: SparseBytes(),
                                                                     3: SparseBytes()})
    present_leaf: int = 0  # leaf SPTEs present in the current roots
    present_pt: int = 0  # page-table pages present in the current roots (excl. the root)
    present_pt_level: dict[int, int] = field(default_factory=lambda: {1: 0, 2: 0, 3: 0})  # the same by level
    root_live: bool = False  # a vCPU loaded a root with the current tag (vcpu.py _service_requests)
    zap_seq: int = 0  # bumped by every zap: vCPUs recompute cached miss lists
    # kvm_memslots(kvm)->generation of address space 0, and the MMIO SPTEs: gfn -> (root tag, generation)
    memslots_generation: int = 0
    # shadow / legacy MMU: obsolete roots still loaded by vCPUs (root tag -> vCPUs holding it); the last
    # vCPU to drop one frees it (mmu_free_root_page -> kvm_mmu_commit_zap_page: a remote flush)
    obsolete_roots: dict[int, int] = field(default_factory=dict)
    # NX huge pages (desim/nx.py): code ranges when kvm.nx_huge_pages is on, and the split 2 MiB regions
    # (gfn >> 9 -> root tag), in split order (possible_nx_huge_pages is a FIFO list)
    nx_exec: ExecRanges | None = None
    nx_split: dict[int, int] = field(default_factory=dict)
    nx_fetch_splits: int = 0  # fetches that found a (non-executable) huge SPTE and split it
    mmio_sptes: dict[int, tuple[int, int]] = field(default_factory=dict)

    # -- memslots ----------------------------------------------------------
    def _reindex(self) -> None:
        self._sorted = sorted(self.slots.values(), key=lambda s: s.slot.base_gfn)
        self._bases = [s.slot.base_gfn for s in self._sorted]

    def _block_for(self, ua: int, npages: int) -> RamBlock:
        for b in self.blocks:
            if b.covers(ua, npages):
                # an hva range already mapped by another live slot gets private state (aliases)
                if any(s.block is b and _ranges_overlap(s.slot.ua, s.slot.npages, ua, npages)
                       for s in self.slots.values()):
                    break
                return b
        b = RamBlock.new(ua, npages, self.backing)
        self.blocks.append(b)
        return b

    def add_slot(self, slot: Memslot) -> SlotSptes:
        """KVM_MR_CREATE: check overlap (``kvm_check_memslot_overlap``) and attach state."""
        if slot.id in self.slots:
            raise DesimInputError(f"memslot {slot.id}: created twice without a delete")
        for s in self.slots.values():
            if s.slot.overlaps(slot.base_gfn, slot.npages):
                raise DesimInputError(
                    f"memslot {slot.id} (gfn {slot.base_gfn:#x}+{slot.npages:#x}) overlaps memslot {s.slot.id} "
                    f"(gfn {s.slot.base_gfn:#x}+{s.slot.npages:#x}); KVM returns -EEXIST")
        block = self._block_for(slot.ua, slot.npages)
        ss = SlotSptes(slot, block, (slot.ua - block.ua) >> 12)
        ss.congruent2m = ((slot.base_gfn ^ (slot.ua >> 12)) & 511) == 0
        ss.congruent1g = ((slot.base_gfn ^ (slot.ua >> 12)) & ((1 << 18) - 1)) == 0
        self.slots[slot.id] = ss
        self._reindex()
        return ss

    def remove_slot(self, slot_id: int) -> SlotSptes:
        """KVM_MR_DELETE: the slot goes; its RAM block (host memory) stays."""
        ss = self.slots.pop(slot_id)
        self._reindex()
        return ss

    def move_slot(self, slot_id: int, new_base_gfn: int) -> None:
        """KVM_MR_MOVE: same host memory at a new gfn range."""
        ss = self.slots[slot_id]
        for s in self.slots.values():
            if s is not ss and s.slot.overlaps(new_base_gfn, ss.slot.npages):
                raise DesimInputError(f"memslot {slot_id}: move to gfn {new_base_gfn:#x} overlaps memslot {s.slot.id}")
        ss.slot.base_gfn = new_base_gfn
        ss.congruent2m = ((new_base_gfn ^ (ss.slot.ua >> 12)) & 511) == 0
        ss.congruent1g = ((new_base_gfn ^ (ss.slot.ua >> 12)) & ((1 << 18) - 1)) == 0
        self._reindex()

    def slot_of(self, gfn: int) -> SlotSptes | None:
        """``gfn_to_memslot`` (a binary search, as ``search_memslots``)."""
        i = bisect.bisect_right(self._bases, gfn) - 1
        if i >= 0:
            ss = self._sorted[i]
            if gfn < ss.slot.base_gfn + ss.slot.npages:
                return ss
        return None

    # -- lookups -----------------------------------------------------------
    def is_mapped(self, gfn: int) -> bool:
        """Is there a present leaf SPTE for ``gfn`` in the current roots?"""
        ss = self.slot_of(gfn)
        if ss is None:
            return False
        return self._mapped_in(ss, gfn)

    def _mapped_in(self, ss: SlotSptes, gfn: int) -> bool:
        # hot path: scalar reads through the chunks' memoryviews. A huge tag in the block is only
        # ever set for a unit lying entirely inside a live slot (install checks huge_ok; aliasing
        # slots get private blocks; DELETE/MOVE zap first), so no bounds check is needed here.
        tag = self.root_tag
        rel = gfn - ss.slot.base_gfn
        i = ss.off + rel
        block = ss.block
        mv = block.state.mvs[i >> CHUNK_SHIFT_4K]
        if mv is not None and mv[i & _M4K] & TAG_MASK == tag:
            return True
        if block.backing == "4k":
            return False
        if self.nx_exec is not None and self.nx_exec.is_exec(gfn):
            return False  # NX huge pages: a huge SPTE is not executable, the fetch faults (desim/nx.py)
        upage = (ss.slot.ua >> 12) + rel
        bpage = block.ua >> 12
        if ss.congruent2m:
            j = (upage >> 9) - (bpage >> 9)
            mv = block.state2m.mvs[j >> CHUNK_SHIFT_HUGE]
            if mv is not None and mv[j & _MHUGE] & TAG_MASK == tag:
                return True
        if ss.congruent1g:
            j = (upage >> 18) - (bpage >> 18)
            mv = block.state1g.mvs[j >> CHUNK_SHIFT_HUGE]
            if mv is not None and mv[j & _MHUGE] & TAG_MASK == tag:
                return True
        return False

    def ever_mapped(self, ss: SlotSptes, gfn: int) -> bool:
        """Was ``gfn``'s memory ever mapped (at any level)? Tells a re-fault from a first-touch fault.

        The "was ever mapped" bit of its 4 KiB byte, or of the 2 MiB or 1 GiB
        unit holding its hva (a huge SPTE marks its unit, not each page)."""
        rel = gfn - ss.slot.base_gfn
        block = ss.block
        i = ss.off + rel
        mv = block.state.mvs[i >> CHUNK_SHIFT_4K]
        if mv is not None and mv[i & _M4K] & EVER_MAPPED:
            return True
        if not (block.state2m.live or block.state1g.live):
            return False  # nothing ever mapped huge in this block
        upage = (ss.slot.ua >> 12) + rel
        bpage = block.ua >> 12
        return bool((block.state2m.get((upage >> 9) - (bpage >> 9)) | block.state1g.get((upage >> 18) - (bpage >> 18)))
                    & EVER_MAPPED)

    def first_misses(self, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The faults a slice of an access stream would take, in stream order: the positions in ``seg``
        of the first access to each gfn without a present SPTE, and those gfns (int64); None when every
        access hits. (A 4 KiB mapping maps one gfn, so each such gfn faults once; the vectorised fault
        blocks of :mod:`desim.faultrun` and the planned faults of :mod:`desim.cohort` start from it.)"""
        unmapped = np.flatnonzero(~self.mapped_mask(seg))
        if len(unmapped) == 0:
            return None
        g = seg[unmapped]
        if len(g) < 2 or bool((g[1:] > g[:-1]).all()):
            fpos = unmapped  # increasing gfns (a sequential pass): each is a first access
        else:
            fpos = unmapped[first_index(g)]
        fg = seg[fpos]
        if fg.dtype != np.int64:
            fg = fg.astype(np.int64)
        return fpos, fg

    def mapped_mask(self, gfns: np.ndarray) -> np.ndarray:
        """Vectorised ``is_mapped`` over an array of gfns."""
        out = np.zeros(len(gfns), dtype=bool)
        if not self._sorted or len(gfns) == 0:
            return out
        ss = self.slot_of(int(gfns.min()))
        if ss is not None and int(gfns.max()) < ss.slot.end_gfn:  # the usual case: all in one slot
            return self._mapped_in_slot(ss, gfns)
        idx = np.searchsorted(np.asarray(self._bases), gfns, side="right") - 1
        lo, hi = int(idx.min()), int(idx.max())
        # usually every gfn falls in one slot: no sort (np.unique) needed to find the slots
        for i in ((lo,) if lo == hi else np.unique(idx)):
            if i < 0:
                continue
            ss = self._sorted[i]
            sel = np.flatnonzero(idx == i)
            g = gfns[sel]
            inside = g < ss.slot.end_gfn
            sel, g = sel[inside], g[inside]
            if len(g) == 0:
                continue
            out[sel] = self._mapped_in_slot(ss, g)
        return out

    def _mapped_in_slot(self, ss: SlotSptes, g: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`_mapped_in` for gfns ``g`` of slot ``ss``."""
        rel = g - ss.slot.base_gfn
        m = (ss.block.state.take(ss.off + rel) & TAG_MASK) == self.root_tag
        if ss.block.backing != "4k":
            huge = np.zeros(len(g), dtype=bool)
            if ss.congruent2m:
                huge |= self._huge_mask(ss, rel, PG_LEVEL_2M)
            if ss.congruent1g:
                huge |= self._huge_mask(ss, rel, PG_LEVEL_1G)
            if self.nx_exec is not None and huge.any():
                huge &= ~self.nx_exec.mask(g)
            m |= huge
        return m

    def _huge_mask(self, ss: SlotSptes, rel: np.ndarray, level: int) -> np.ndarray:
        arr = ss.block.state2m if level == PG_LEVEL_2M else ss.block.state1g
        shift = LEVEL_SHIFT[level]
        upage = (ss.slot.ua >> 12) + rel
        u = (upage >> shift) - ((ss.block.ua >> 12) >> shift)
        m = (arr.take(u) & TAG_MASK) == self.root_tag
        if m.any():
            # a huge SPTE counts only where the unit lies entirely in the slot
            lo = ((rel + ss.slot.base_gfn) >> shift) << shift
            m &= (lo >= ss.slot.base_gfn) & (lo + (1 << shift) <= ss.slot.end_gfn)
        return m

    # -- host backing --------------------------------------------------------
    def host_level(self, ss: SlotSptes, gfn: int) -> int:
        """Size of the host page behind ``gfn`` (``host_pfn_mapping_level``)."""
        backing = ss.block.backing
        if backing == "hugetlbfs-1g" and ss.huge_ok(gfn, PG_LEVEL_1G):
            return PG_LEVEL_1G
        if backing in ("thp", "hugetlbfs-1g") and ss.huge_ok(gfn, PG_LEVEL_2M):
            if backing == "hugetlbfs-1g" or self.thp_fraction >= 1.0:
                return PG_LEVEL_2M
            _, i = ss.unit_state(gfn, PG_LEVEL_2M)
            # whether THP succeeded for this hva unit is a fixed property of the unit
            if _mix((ss.block.ua >> 21) * 1000003 + i) < self.thp_fraction:
                return PG_LEVEL_2M
        return PG_LEVEL_4K

    def host_resident(self, ss: SlotSptes, gfn: int, hlevel: int) -> bool:
        if hlevel == PG_LEVEL_4K:
            st = ss.block.state
            i = ss.off + gfn - ss.slot.base_gfn
            mv = st.mvs[i >> CHUNK_SHIFT_4K]
            return bool((st.fill if mv is None else mv[i & _M4K]) & HOST_RESIDENT)
        arr, i = ss.unit_state(gfn, hlevel)
        return bool(arr.get(i) & HOST_RESIDENT)

    def make_resident(self, ss: SlotSptes, gfn: int, hlevel: int) -> None:
        if hlevel == PG_LEVEL_4K:
            ss.block.state.or_(ss.off + gfn - ss.slot.base_gfn, HOST_RESIDENT)
        else:
            arr, i = ss.unit_state(gfn, hlevel)
            arr.or_(i, HOST_RESIDENT)

    # -- install -------------------------------------------------------------
    def install(self, ss: SlotSptes, gfn: int, level: int) -> int:
        """Install a leaf SPTE (``kvm_tdp_mmu_map`` / ``direct_map``); returns page-table pages allocated."""
        tag = self.root_tag
        allocated = 0
        pt = self.pt_tags
        if level == PG_LEVEL_4K and pt[1].get(gfn >> 9) == tag:
            pass  # the common case: the PT page exists, so do its parents
        else:
            # a leaf at level L sits in a table of level L: PT (1) for 4K, PD (2) for 2M, PDPT (3) for 1G
            for lvl, key in ((3, gfn >> 27), (2, gfn >> 18), (1, gfn >> 9)):
                if lvl < level:
                    break
                d = pt[lvl]
                if d.get(key) != tag:
                    d[key] = tag
                    allocated += 1
                    self.present_pt_level[lvl] += 1
            self.present_pt += allocated
        if level == PG_LEVEL_4K:
            st = ss.block.state
            i = ss.off + gfn - ss.slot.base_gfn
            mv = st.mvs[i >> CHUNK_SHIFT_4K]
            if mv is None:
                st.set(i, (st.fill & KEEP_BITS) | EVER_MAPPED | tag)
            else:
                j = i & _M4K
                mv[j] = (mv[j] & KEEP_BITS) | EVER_MAPPED | tag
        else:
            # the unit's byte says "ever mapped" for each of its pages (see ever_mapped)
            arr, i = ss.unit_state(gfn, level)
            arr.set(i, (arr.get(i) & KEEP_BITS) | EVER_MAPPED | tag)
        self.present_leaf += 1
        return allocated

    def plan_install_4k(self, ss: SlotSptes, gfns: np.ndarray) -> "InstallPlan | None":
        """What :meth:`make_resident` + :meth:`install` at 4 KiB of the distinct ``gfns`` of ``ss``, in order,
        would find and allocate, without changing anything (desim/faultrun.py): each gfn's host page
        resident or not, ever mapped or not, and the page-table pages its install allocates (the first
        gfn under a table without one). None where :meth:`install`'s shortcut (a present PT page has
        present parents) would not hold."""
        tag = self.root_tag
        pt = self.pt_tags
        st = ss.state[gfns - ss.slot.base_gfn]
        increasing = len(gfns) < 2 or bool((gfns[1:] > gfns[:-1]).all())
        alloc = np.zeros(len(gfns), dtype=np.int64)
        # each level's first gfn under each table, from the level below's: a table's first gfn is the first
        # gfn of its first child table too (so the PD and PDPT levels look only at the PT level's firsts)
        fi = _first_of(gfns >> 9, increasing)
        uk = (gfns[fi] >> 9,)
        firsts = [fi]
        for _ in (2, 3):
            sub = _first_of(uk[-1] >> 9, increasing)
            firsts.append(firsts[-1][sub])
            uk += (uk[-1][sub] >> 9,)
        tagged = [pt[lvl].take(uk[lvl - 1]) == tag for lvl in (1, 2, 3)]
        if tagged[0].any() and not (tagged[1].all() and tagged[2].all()):
            k = uk[0][tagged[0]]
            if (pt[2].take(k >> 9) != tag).any() or (pt[3].take(k >> 18) != tag).any():
                return None
        new_tables = {}
        for lvl, shift in ((3, 27), (2, 18), (1, 9)):
            nf = firsts[lvl - 1][~tagged[lvl - 1]]  # increasing (each level's firsts are)
            alloc[nf] += 1
            new_tables[lvl] = (shift, nf)
        return InstallPlan(ss, gfns, st, (st & HOST_RESIDENT) != 0, (st & EVER_MAPPED) != 0, alloc, new_tables)

    def commit_install_4k(self, plan: "InstallPlan", k: int, tables: bool = True) -> int:
        """Apply the first ``k`` installs of ``plan`` (as :meth:`make_resident` + :meth:`install` would, one
        after the other); returns the page-table pages allocated. ``tables=False``: the leaves only (the
        caller linked the page-table pages as each install reached them: desim/cohort.py)."""
        ss, tag = plan.ss, self.root_tag
        if k <= _SCALAR_COMMIT:
            # a few installs (desim/cohort.py commits a plan's faults a few at a time): byte by byte through
            # the chunks' memoryviews, the same bytes as the array write below without its numpy overhead
            st = ss.block.state
            off = ss.off - ss.slot.base_gfn
            bits = HOST_RESIDENT | EVER_MAPPED | tag
            mvs = st.mvs
            for g, b in zip(plan.gfns[:k].tolist(), plan.state[:k].tolist()):
                i = off + g
                mv = mvs[i >> CHUNK_SHIFT_4K]
                if mv is None:
                    st.set(i, (b & KEEP_BITS) | bits)
                else:
                    mv[i & _M4K] = (b & KEEP_BITS) | bits
        else:
            rel = plan.gfns[:k] - ss.slot.base_gfn
            ss.state[rel] = (plan.state[:k] & KEEP_BITS) | HOST_RESIDENT | EVER_MAPPED | tag
        self.present_leaf += k
        total = 0
        if not tables:
            return total
        for lvl, (shift, nf) in plan.new_tables.items():
            nf = nf[nf < k]
            self.pt_tags[lvl].put(plan.gfns[nf] >> shift, tag)
            self.present_pt_level[lvl] += len(nf)
            total += len(nf)
        self.present_pt += total
        return total

    def plan_prefetch_4k(self, ss: SlotSptes, gfns: np.ndarray, need_accessed: bool,
                         present: np.ndarray | None = None):
        """Which of ``gfns`` fault, and what each fault prefetches, when each fault at 4 KiB runs
        :meth:`prefetch_candidates` (desim/faultrun.py's vectorised blocks, desim/cohort.py's plans).

        ``gfns``: the first accesses, in order, to distinct gfns of ``ss`` without a present SPTE.
        Only a fault of the same aligned group of ``PTE_PREFETCH_NUM`` changes a group's state, so the
        first of them in a group faults and prefetches every neighbour that is eligible then (not
        present, host page resident, and "ever mapped" for the Accessed bit) and so is as at the
        start; a later access in the group faults only if its gfn was not eligible, and prefetches
        nothing (the eligible ones are present by then). Returns ``(fault, members, take)``: a mask
        over ``gfns``, and for each fault the gfns of its group (one row of ``PTE_PREFETCH_NUM``) and
        which of them it prefetches. None where :meth:`ever_mapped` would read a huge level. ``present``:
        gfns of the slot to take as present whatever their state says (installs planned before these
        faults, not applied yet: desim/cohort.py's plan extensions); none of ``gfns`` is among them."""
        block = ss.block
        if block.state2m.live or block.state1g.live:
            return None
        base, end, tag = ss.slot.base_gfn, ss.slot.end_gfn, self.root_tag
        grp = gfns >> _PF_SHIFT
        increasing = len(grp) < 2 or bool((grp[1:] >= grp[:-1]).all())
        g_lo, g_hi = (int(grp[0]), int(grp[-1])) if increasing else (int(grp.min()), int(grp.max()))
        g_lo, g_hi = g_lo << _PF_SHIFT, (g_hi + 1) << _PF_SHIFT
        lo, hi = max(g_lo, base), min(g_hi, end)
        # the groups' bytes in one read where they lie close together (a speed heuristic only)
        win = block.state.window(ss.off + lo - base, ss.off + hi - base) if hi - lo <= 8 * len(gfns) + 4096 else None
        if win is not None and present is not None and len(present):
            near = present[(present >= lo) & (present < hi)]
            if len(near):
                win = win.copy()
                win[near - lo] = tag  # present (never one of gfns)
            present = None
        st = ss.state[gfns - base] if win is None else win[gfns - lo]
        if increasing:
            first = np.empty(len(grp), dtype=bool)
            first[0] = True
            np.not_equal(grp[1:], grp[:-1], out=first[1:])
        else:
            first = np.zeros(len(grp), dtype=bool)
            first[np.unique(grp, return_index=True)[1]] = True
        # eligible for prefetch: not present, host page resident (and "ever mapped" for the Accessed bit)
        ok = _prefetchable(tag, need_accessed)
        fault = first | ~ok[st]
        if fault.all():
            fg, ffirst = gfns, first
        else:
            fg, ffirst = gfns[fault], first[fault]
        members = (fg & ~(PTE_PREFETCH_NUM - 1))[:, None] + _PF_ROW
        look = (members != fg[:, None]) & ffirst[:, None]
        inside = lo == g_lo and hi == g_hi
        if not inside:
            look &= (members >= base) & (members < end)
        if win is not None:
            b = win.take(members - lo, mode="clip")  # outside the slot: clipped, and masked by look
        else:
            b = np.zeros(members.shape, np.uint8)
            b[look] = ss.state[members[look] - base]
        take = look & ok[b]
        if present is not None and len(present) and take.any():
            take &= ~np.isin(members, present)
        return fault, members, take

    def commit_prefetch_4k(self, ss: SlotSptes, gfns: np.ndarray) -> None:
        """:meth:`install` at 4 KiB of prefetched ``gfns`` whose page-table pages are present (their
        fault installed the leaf next to them)."""
        if len(gfns) <= _SCALAR_COMMIT:
            # a few (desim/cohort.py commits a plan's faults a few at a time): byte by byte, as install does
            st = ss.block.state
            off = ss.off - ss.slot.base_gfn
            bits = EVER_MAPPED | self.root_tag
            mvs = st.mvs
            for g in gfns.tolist():
                i = off + g
                mv = mvs[i >> CHUNK_SHIFT_4K]
                if mv is None:
                    st.set(i, (st.fill & KEEP_BITS) | bits)
                else:
                    j = i & _M4K
                    mv[j] = (mv[j] & KEEP_BITS) | bits
        else:
            rel = gfns - ss.slot.base_gfn
            ss.state[rel] = (ss.state[rel] & KEEP_BITS) | EVER_MAPPED | self.root_tag
        self.present_leaf += len(gfns)

    def prefetch_candidates(self, ss: SlotSptes, gfn: int, need_accessed: bool) -> list[int]:
        """Neighbours ``direct_pte_prefetch`` / ``FNAME(pte_prefetch)`` would map.

        The aligned group of ``PTE_PREFETCH_NUM`` gfns around the fault, inside
        the slot, not present, whose host page is resident (prefetch uses
        atomic GUP, ``kvm_prefetch_pages``). Shadow paging also needs the
        guest PTE's Accessed bit: "was ever mapped" stands in for it.
        """
        start = gfn & ~(PTE_PREFETCH_NUM - 1)
        out = []
        base, end = ss.slot.base_gfn, ss.slot.end_gfn
        tag = self.root_tag
        get = ss.block.state.get
        off = ss.off - base
        for g in range(max(start, base), min(start + PTE_PREFETCH_NUM, end)):
            if g == gfn:
                continue
            b = get(off + g)
            if b & TAG_MASK == tag or not b & HOST_RESIDENT:
                continue
            if need_accessed and not self.ever_mapped(ss, g):
                continue
            out.append(g)
        return out

    # -- zap -----------------------------------------------------------------
    def zap_all_fast(self) -> ObsoleteWork:
        """``kvm_mmu_zap_all_fast``'s state change: toggle ``mmu_valid_gen``, obsolete every root.

        O(1): the next root tag makes every SPTE obsolete. Returns what the
        obsolete roots hold, for the teardown cost.
        """
        # the root itself is zapped too (kvm_zap_obsolete_pages prepares every obsolete page, and
        # mmu_shadow_zapped counts it; being in use, it is freed when its last vCPU drops it)
        work = ObsoleteWork(self.present_leaf, self.present_pt + int(self.root_live),
                            dict(self.present_pt_level), int(self.root_live))
        if self.root_live:
            self.obsolete_roots[self.root_tag] = 0  # users are counted by the caller (vCPUs holding it)
        self.root_live = False
        self.mmu_valid_gen ^= 1
        self.present_leaf = 0
        self.present_pt = 0
        self.present_pt_level = {1: 0, 2: 0, 3: 0}
        self.root_tag += 1
        if self.root_tag > MAX_TAG:
            self._clear_all_tags()
            self.root_tag = 1
        self.zap_seq += 1
        return work

    def _clear_all_tags(self) -> None:
        for b in self.blocks:
            for arr in (b.state, b.state2m, b.state1g):
                arr.update_all(KEEP_BITS)
        for d in self.pt_tags.values():
            d.clear()
        self.mmio_sptes.clear()
        self.obsolete_roots.clear()

    def _huge_range(self, ss: SlotSptes, level: int) -> tuple[ChunkedBytes, int, int] | None:
        """The block's huge-unit bytes ``(array, lo, hi)`` for the units lying entirely inside the slot."""
        if not (ss.congruent2m if level == PG_LEVEL_2M else ss.congruent1g):
            return None
        shift = LEVEL_SHIFT[level]
        first = -(-ss.slot.base_gfn >> shift)  # ceil
        last = ss.slot.end_gfn >> shift
        if last <= first:
            return None
        arr, i0 = ss.unit_state(first << shift, level)
        return arr, i0, i0 + (last - first)

    def slot_leaf_counts(self, ss: SlotSptes) -> dict[int, int]:
        """Present leaf SPTEs of a slot by level (for the targeted zap's cost)."""
        tag = self.root_tag
        counts = {PG_LEVEL_4K: ss.block.state.count_masked(ss.off, ss.off + ss.slot.npages, TAG_MASK, tag)}
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            r = self._huge_range(ss, level)
            counts[level] = 0 if r is None else r[0].count_masked(r[1], r[2], TAG_MASK, tag)
        return counts

    # -- shadow pages of guest page tables ---------------------------------------------
    def zap_gpte_shadow_pages(self, ss: SlotSptes, gpt_base: int) -> tuple[int, int]:
        """Shadow pages whose guest page table lies in ``ss`` (``for_each_gfn_valid_sp_with_gptes`` +
        ``kvm_mmu_prepare_zap_page``): zap them and their children, wherever those map.

        The guest's last-level table for 2 MiB region ``r`` is at gfn ``gpt_base + r``; each present PT
        shadow page of a region whose table gfn is in the slot goes, with its 4 KiB SPTEs (which map
        other slots' memory: they re-fault). Simplification: only last-level tables; the guest's upper
        levels are not placed. Returns (shadow pages zapped, leaf SPTEs zapped).
        """
        lo, hi = ss.slot.base_gfn - gpt_base, ss.slot.end_gfn - gpt_base
        if hi <= 0:
            return 0, 0
        tag = self.root_tag
        d = self.pt_tags[1]
        regions = d.find(tag, max(lo, 0), hi - 1).tolist()
        children = 0
        for r in regions:
            del d[r]
            self.present_pt -= 1
            self.present_pt_level[1] -= 1
            other = self.slot_of(r << 9)
            if other is None:
                continue
            a = max(r << 9, other.slot.base_gfn) - other.slot.base_gfn + other.off
            b = min((r + 1) << 9, other.slot.end_gfn) - other.slot.base_gfn + other.off
            n = other.block.state.count_masked(a, b, TAG_MASK, tag)
            other.block.state.update_range(a, b, KEEP_BITS)
            children += n
        self.present_leaf -= children
        if regions:
            self.zap_seq += 1
        return len(regions), children

    # -- NX huge pages ---------------------------------------------------------------
    def nx_level(self, ss: SlotSptes, gfn: int, level: int) -> int:
        """The mapping level after ``disallowed_hugepage_adjust``: 4 KiB for a code page or a split region.

        A fetch from a page under a present huge SPTE splits it: the huge SPTE
        goes (its other pages re-fault at 4 KiB) and the region is tracked as an
        NX huge page split."""
        if self.nx_exec is None or level == PG_LEVEL_4K:
            return level
        region = gfn >> 9
        if self.nx_split.get(region) == self.root_tag:
            return PG_LEVEL_4K
        if not self.nx_exec.is_exec(gfn):
            return level
        if ss.congruent2m and ss.huge_ok(gfn, PG_LEVEL_2M):
            arr, i = ss.unit_state(gfn, PG_LEVEL_2M)
            if arr.get(i) & TAG_MASK == self.root_tag:
                arr.and_(i, KEEP_BITS)
                self.present_leaf -= 1
                self.zap_seq += 1
                self.nx_fetch_splits += 1
        self.nx_split.pop(region, None)
        self.nx_split[region] = self.root_tag
        return PG_LEVEL_4K

    def nx_split_regions(self) -> list[int]:
        """Split regions in the current roots, oldest first (stale ones, from before a fast zap, dropped)."""
        self.nx_split = {r: t for r, t in self.nx_split.items() if t == self.root_tag}
        return list(self.nx_split)

    def nx_recover(self, region: int) -> int:
        """``kvm_recover_nx_huge_pages`` for one split: zap its page table (and its 4 KiB SPTEs) so
        the region can be mapped huge again; returns the leaf SPTEs zapped."""
        self.nx_split.pop(region, None)
        ss = self.slot_of(region << 9)
        zapped = 0
        if ss is not None:
            lo = max(region << 9, ss.slot.base_gfn) - ss.slot.base_gfn + ss.off
            hi = min((region + 1) << 9, ss.slot.end_gfn) - ss.slot.base_gfn + ss.off
            zapped = ss.block.state.count_masked(lo, hi, TAG_MASK, self.root_tag)
            ss.block.state.update_range(lo, hi, KEEP_BITS)
        if self.pt_tags[1].get(region) == self.root_tag:
            del self.pt_tags[1][region]
            self.present_pt -= 1
            self.present_pt_level[1] -= 1
        self.present_leaf -= zapped
        self.zap_seq += 1
        return zapped

    # -- MMIO SPTEs and the memslot generation -----------------------------------
    def swap_memslots(self) -> bool:
        """``kvm_swap_active_memslots``: the generation advances; True if the MMIO generation wrapped.

        ``kvm_mmu_invalidate_mmio_sptes`` (mmu.c) strips the address-space bit
        and zaps everything (``kvm_mmu_zap_all_fast``) when what is left of the
        generation in ``MMIO_SPTE_GEN_MASK`` is 0: once every 2^18 swaps.
        Checked against Linux 6.1.176: mmu.c ``kvm_mmu_invalidate_mmio_sptes``
        does ``gen &= MMIO_SPTE_GEN_MASK; gen &= ~((u64)KVM_ADDRESS_SPACE_NUM - 1);
        if (unlikely(gen == 0)) kvm_mmu_zap_all_fast(kvm);`` with
        ``MMIO_SPTE_GEN_MASK`` = ``GENMASK_ULL(8 + 11 - 1, 0)`` (spte.h: 8 low and
        11 high generation bits in the SPTE), called from x86.c
        ``kvm_arch_memslots_updated`` with the new generation
        (virt/kvm/kvm_main.c ``kvm_swap_active_memslots``: ``gen +=
        KVM_ADDRESS_SPACE_NUM``).
        """
        self.memslots_generation += KVM_ADDRESS_SPACE_NUM
        gen = self.memslots_generation & MMIO_SPTE_GEN_MASK & ~(KVM_ADDRESS_SPACE_NUM - 1)
        return gen == 0

    def mmio_spte(self, gfn: int) -> str:
        """The MMIO SPTE of ``gfn`` in the current roots: ``"none"``, ``"valid"`` or ``"stale"``.

        ``check_mmio_spte``: valid iff its generation equals the memslots'
        (``MMIO_SPTE_GEN_MASK`` bits); every memslot update makes it stale.
        """
        e = self.mmio_sptes.get(gfn)
        if e is None or e[0] != self.root_tag:
            return "none"
        return "valid" if e[1] == self.memslots_generation & MMIO_SPTE_GEN_MASK else "stale"

    def install_mmio(self, gfn: int) -> int:
        """``make_mmio_spte`` in the fault path: an MMIO SPTE with the current generation; returns the
        page-table pages allocated on the way."""
        allocated = 0 if gfn in self.mmio_sptes and self.mmio_sptes[gfn][0] == self.root_tag else \
            self.install_tables(gfn)
        self.mmio_sptes[gfn] = (self.root_tag, self.memslots_generation & MMIO_SPTE_GEN_MASK)
        return allocated

    def tdp_walk_visits(self, lo: int, hi: int) -> int:
        """Entries ``for_each_tdp_pte_min_level(iter, root, PG_LEVEL_4K, lo, hi)`` visits (tdp_iter.c).

        The iterator visits, at every level, each entry of the range inside a
        *present* table (present or not: a non-present entry is read and
        skipped, a present non-leaf one is descended into), so a PT page
        overlapping the range costs up to 512 visits whatever it maps.
        Counted from the page-table pages present in the current roots.
        """
        if hi <= lo:
            return 0
        tag = self.root_tag
        visits = ((hi - 1) >> 27) - (lo >> 27) + 1  # root entries (512 GiB each)
        for lvl, table_shift, entry_shift in ((3, 27, 18), (2, 18, 9), (1, 9, 0)):
            k = self.pt_tags[lvl].find(tag, lo >> table_shift, (hi - 1) >> table_shift)
            a, b = np.maximum(lo, k << table_shift), np.minimum(hi, (k + 1) << table_shift)
            visits += int((((b - 1) >> entry_shift) - (a >> entry_shift) + 1).sum())
        return visits

    def zap_slot_leafs(self, ss: SlotSptes) -> dict[int, int]:
        """``kvm_unmap_gfn_range`` over the whole slot: clear its leaf SPTEs, keep non-leaf ones."""
        counts = self.slot_leaf_counts(ss)
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            r = self._huge_range(ss, level)
            if r is not None:
                r[0].update_range(r[1], r[2], KEEP_BITS)
        ss.block.state.update_range(ss.off, ss.off + ss.slot.npages, KEEP_BITS)
        self.present_leaf -= sum(counts.values())
        self.zap_seq += 1
        return counts

    def zap_slot_huge_leafs(self, ss: SlotSptes) -> int:
        """Zap a slot's 2M/1G leaves (dirty logging enabled: huge pages are split on fault)."""
        counts = self.slot_leaf_counts(ss)
        n = counts[PG_LEVEL_2M] + counts[PG_LEVEL_1G]
        for level in (PG_LEVEL_2M, PG_LEVEL_1G):
            r = self._huge_range(ss, level)
            if r is not None:
                r[0].update_range(r[1], r[2], KEEP_BITS)
        self.present_leaf -= n
        if n:
            self.zap_seq += 1
        return n

    def split_slot_huge_leafs(self, ss: SlotSptes) -> tuple[int, int]:
        """Eager page splitting (``kvm_tdp_mmu_try_split_huge_pages`` to 4K): every present huge
        leaf of the slot becomes 4 KiB leaves under new page-table pages, without faults.
        Returns (huge leaves split, page-table pages allocated)."""
        tag = self.root_tag
        split = allocated = 0
        for level in (PG_LEVEL_1G, PG_LEVEL_2M):
            r = self._huge_range(ss, level)
            if r is None:
                continue
            arr, i0, i1 = r
            shift = LEVEL_SHIFT[level]
            first = -(-ss.slot.base_gfn >> shift)
            for u in arr.find_masked(i0, i1, TAG_MASK, tag) - i0:
                arr.and_(i0 + int(u), KEEP_BITS)
                lo_gfn = (first + int(u)) << shift
                rel = lo_gfn - ss.slot.base_gfn + ss.off
                ss.block.state.update_range(rel, rel + (1 << shift), KEEP_BITS, EVER_MAPPED | tag)
                for g in range(lo_gfn, lo_gfn + (1 << shift), 512):
                    allocated += self.install_tables(g)
                split += 1
                self.present_leaf += (1 << shift) - 1
        return split, allocated

    def install_tables(self, gfn: int) -> int:
        """Allocate whatever page-table pages a 4 KiB leaf for ``gfn`` needs (no leaf installed)."""
        tag = self.root_tag
        allocated = 0
        for lvl, key in ((3, gfn >> 27), (2, gfn >> 18), (1, gfn >> 9)):
            d = self.pt_tags[lvl]
            if d.get(key) != tag:
                d[key] = tag
                allocated += 1
                self.present_pt_level[lvl] += 1
        self.present_pt += allocated
        return allocated

    def zap_gfn_leaf(self, ss: SlotSptes, gfn: int) -> bool:
        """``mmu_page_zap_pte`` on ``gfn``'s 4 KiB leaf SPTE (``kvm_mmu_pte_write``); True if it was present."""
        st = ss.block.state
        i = ss.off + gfn - ss.slot.base_gfn
        b = st.get(i)
        if b & TAG_MASK != self.root_tag:
            return False
        st.set(i, b & KEEP_BITS)
        self.present_leaf -= 1
        self.zap_seq += 1
        return True

    def slot_has_present_sptes(self, ss: SlotSptes) -> bool:
        """Invariant helper: does any current-root leaf SPTE map ``ss``'s memory?"""
        return any(self.slot_leaf_counts(ss).values())

    def memory_bytes(self) -> int:
        """Bytes of leaf SPTE state held (allocated chunks and their lists), for the memory benchmark."""
        return sum(b.nbytes for b in self.blocks)


@dataclass
class InstallPlan:
    """4 KiB installs planned by :meth:`Mmu.plan_install_4k` (per gfn: state byte, resident, ever mapped,
    page-table pages allocated; per level the indices of the gfns that allocate a table)."""

    ss: SlotSptes
    gfns: np.ndarray
    state: np.ndarray
    resident: np.ndarray
    ever_mapped: np.ndarray
    allocated: np.ndarray
    new_tables: dict


def _ranges_overlap(ua1: int, n1: int, ua2: int, n2: int) -> bool:
    return ua1 < ua2 + (n2 << 12) and ua2 < ua1 + (n1 << 12)


__all__ = ["Mmu", "RamBlock", "SlotSptes", "ObsoleteWork", "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G",
           "PTE_PREFETCH_NUM", "KVM_MEMSLOT_INVALID"]
