"""A byte array that holds memory only where it was written: the store behind SPTE state.

A :class:`ChunkedBytes` of ``n`` entries is cut into chunks of ``2**shift``
entries; a chunk is allocated (a numpy ``uint8`` array filled with the array's
*fill* value) on the first write that changes one of its entries, and never
before. Reads of an unallocated chunk return the fill value. So a 32 TiB guest
on 1 GiB host pages, whose leaf SPTEs are nearly all 1 GiB ones, allocates its
4 KiB-granularity state only for the few regions actually mapped at 4 KiB (the
firmware's small memslots, NX huge page splits, dirty-logged slots): memory
follows the mappings, not the RAM size. Fully written, the array costs its
``n`` bytes plus two list slots per chunk.

The kernel keeps the same state in its page tables (the SPTEs themselves,
allocated per page-table page as mappings appear: ``tdp_mmu_alloc_sp``); this
is the simulator's bookkeeping, not a model of a kernel structure.

Scalar reads and writes go through a ``memoryview`` per chunk (fast indexing
from Python); range operations touch only allocated chunks unless the fill
value itself would change (then the range's chunks are allocated first).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


class ChunkedBytes:
    """``n`` bytes in chunks of ``2**shift``, each allocated on its first changing write."""

    __slots__ = ("n", "shift", "mask", "fill", "chunks", "mvs", "live")

    def __init__(self, n: int, shift: int, fill: int = 0) -> None:
        self.n = n
        self.shift = shift
        self.mask = (1 << shift) - 1
        self.fill = fill
        nchunks = (n + self.mask) >> shift
        self.chunks: list[np.ndarray | None] = [None] * nchunks
        self.mvs: list[memoryview | None] = [None] * nchunks  # the same chunks as memoryviews (scalar access)
        self.live: dict[int, np.ndarray] = {}  # allocated chunks by index

    def __len__(self) -> int:
        return self.n

    # -- chunks ------------------------------------------------------------------
    def _alloc(self, c: int) -> np.ndarray:
        arr = np.full(min(1 << self.shift, self.n - (c << self.shift)), self.fill, np.uint8)
        self.chunks[c] = arr
        self.mvs[c] = memoryview(arr)
        self.live[c] = arr
        return arr

    def _chunk_ids(self, lo: int, hi: int, alloc: bool) -> Iterator[int]:
        c0, c1 = lo >> self.shift, (hi - 1) >> self.shift
        if alloc:
            for c in range(c0, c1 + 1):
                if self.chunks[c] is None:
                    self._alloc(c)
            yield from range(c0, c1 + 1)
        elif c1 - c0 + 1 <= len(self.live):
            yield from (c for c in range(c0, c1 + 1) if self.chunks[c] is not None)
        else:  # a wide range over few allocated chunks: walk those
            yield from sorted(c for c in self.live if c0 <= c <= c1)

    def segments(self, lo: int, hi: int, alloc: bool = False) -> Iterator[tuple[np.ndarray, int]]:
        """``(view, start)`` for each allocated chunk's part of ``[lo, hi)`` (every chunk with ``alloc``)."""
        if hi <= lo:
            return
        for c in self._chunk_ids(lo, hi, alloc):
            arr = self.chunks[c]
            base = c << self.shift
            a, b = max(lo, base), min(hi, base + len(arr))
            yield arr[a - base:b - base], a

    @property
    def nbytes(self) -> int:
        """Bytes held: the allocated chunks plus the two chunk lists (8 bytes a slot each)."""
        return sum(a.nbytes for a in self.live.values()) + 16 * len(self.chunks)

    # -- scalar access -------------------------------------------------------------
    def get(self, i: int) -> int:
        mv = self.mvs[i >> self.shift]
        return self.fill if mv is None else mv[i & self.mask]

    def set(self, i: int, value: int) -> None:
        c = i >> self.shift
        mv = self.mvs[c]
        if mv is None:
            if value == self.fill:
                return
            self._alloc(c)
            mv = self.mvs[c]
        mv[i & self.mask] = value

    def or_(self, i: int, bits: int) -> None:
        self.set(i, self.get(i) | bits)

    def and_(self, i: int, bits: int) -> None:
        self.set(i, self.get(i) & bits)

    # -- vectorised access -----------------------------------------------------------
    def take(self, idx: np.ndarray) -> np.ndarray:
        """The entries at ``idx`` (an integer array), as a new ``uint8`` array."""
        if len(idx) == 0:
            return np.zeros(0, np.uint8)
        c = idx >> self.shift
        c0, c1 = int(c.min()), int(c.max())
        if c0 == c1:  # the usual case: one chunk
            arr = self.chunks[c0]
            return np.full(len(idx), self.fill, np.uint8) if arr is None else arr[idx - (c0 << self.shift)]
        out = np.full(len(idx), self.fill, np.uint8)
        for cc in np.unique(c):
            arr = self.chunks[int(cc)]
            if arr is not None:
                sel = c == cc
                out[sel] = arr[idx[sel] - (int(cc) << self.shift)]
        return out

    def window(self, lo: int, hi: int) -> np.ndarray:
        """``[lo, hi)`` to read at once: a view into the chunk holding it (read it before the store changes,
        never write it), else a dense copy."""
        c = lo >> self.shift
        if (hi - 1) >> self.shift == c and self.chunks[c] is not None:
            b = c << self.shift
            return self.chunks[c][lo - b:hi - b]
        return self.to_array(lo, hi)

    def to_array(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """A dense copy of ``[lo, hi)`` (for tests and small ranges)."""
        hi = self.n if hi is None else hi
        out = np.full(max(hi - lo, 0), self.fill, np.uint8)
        for seg, a in self.segments(lo, hi):
            out[a - lo:a - lo + len(seg)] = seg
        return out

    def count_masked(self, lo: int, hi: int, mask: int, value: int) -> int:
        """How many entries ``x`` of ``[lo, hi)`` have ``x & mask == value``."""
        n = sum(int(np.count_nonzero((seg & mask) == value)) for seg, _ in self.segments(lo, hi))
        if self.fill & mask == value:
            n += (hi - lo) - sum(len(seg) for seg, _ in self.segments(lo, hi))
        return n

    def find_masked(self, lo: int, hi: int, mask: int, value: int) -> np.ndarray:
        """Indices ``i`` in ``[lo, hi)`` with ``x[i] & mask == value`` (``value`` must differ from the fill's)."""
        assert self.fill & mask != value
        found = [np.flatnonzero((seg & mask) == value) + a for seg, a in self.segments(lo, hi)]
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def update_range(self, lo: int, hi: int, and_bits: int, or_bits: int = 0) -> None:
        """``x = (x & and_bits) | or_bits`` over ``[lo, hi)``; chunks are allocated only if the fill changes."""
        alloc = (self.fill & and_bits) | or_bits != self.fill
        for seg, _ in self.segments(lo, hi, alloc):
            if and_bits != 0xFF:
                np.bitwise_and(seg, and_bits, out=seg)
            if or_bits:
                np.bitwise_or(seg, or_bits, out=seg)

    def put(self, idx: np.ndarray, values: np.ndarray | int) -> None:
        """``x[idx] = values`` (an integer array and an array or a scalar), allocating as needed."""
        if len(idx) == 0:
            return
        if isinstance(values, np.ndarray) and values.dtype == np.uint8 and values.shape == idx.shape:
            vals = values
            c0 = int(idx[0]) >> self.shift
            arr = self.chunks[c0]
            if arr is not None and c0 == int(idx[-1]) >> self.shift and c0 == int(idx.min()) >> self.shift \
                    and c0 == int(idx.max()) >> self.shift:
                arr[idx - (c0 << self.shift)] = vals  # the usual case: one allocated chunk
                return
        else:
            vals = np.broadcast_to(np.asarray(values, dtype=np.uint8), idx.shape)
        c = idx >> self.shift
        for cc in ((int(c[0]),) if c[0] == c[-1] and (c == c[0]).all() else np.unique(c)):
            cc = int(cc)
            arr = self.chunks[cc]
            sel = c == cc
            if arr is None:
                if (vals[sel] == self.fill).all():
                    continue
                arr = self._alloc(cc)
            arr[idx[sel] - (cc << self.shift)] = vals[sel]

    def update_all(self, and_bits: int, or_bits: int = 0) -> None:
        """``x = (x & and_bits) | or_bits`` everywhere: the fill changes too, nothing is allocated."""
        for arr in self.live.values():
            np.bitwise_and(arr, and_bits, out=arr)
            if or_bits:
                np.bitwise_or(arr, or_bits, out=arr)
        self.fill = (self.fill & and_bits) | or_bits


class ChunkedView:
    """``n`` entries of a :class:`ChunkedBytes` from ``off`` on, indexed like a numpy array.

    Integer, integer-array and slice indexing read (a slice or an array gives a copy) and write
    through to the store, so ``view[idx] = view[idx] | bits`` works as on an array view."""

    __slots__ = ("store", "off", "n")

    def __init__(self, store: ChunkedBytes, off: int, n: int) -> None:
        self.store, self.off, self.n = store, off, n

    def __len__(self) -> int:
        return self.n

    def _idx(self, key) -> np.ndarray | int:
        if isinstance(key, slice):
            return np.arange(*key.indices(self.n), dtype=np.int64) + self.off
        if isinstance(key, (int, np.integer)):
            k = int(key)
            if not -self.n <= k < self.n:
                raise IndexError(k)
            return self.off + (k % self.n)
        return np.asarray(key, dtype=np.int64) + self.off

    def __getitem__(self, key):
        i = self._idx(key)
        return self.store.get(i) if isinstance(i, int) else self.store.take(i)

    def __setitem__(self, key, value) -> None:
        i = self._idx(key)
        if isinstance(i, int):
            self.store.set(i, int(value))
        else:
            self.store.put(i, value)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.store.to_array(self.off, self.off + self.n)
        return a if dtype is None else a.astype(dtype)


class SparseBytes:
    """Bytes at any non-negative integer key, 0 where never written: chunks of ``2**shift`` entries
    allocated on their first non-zero write, found by chunk number in a dict.

    For keys spread over a huge range with no size known up front (the page-table pages of a
    VM, one key per 2 MiB, 1 GiB or 512 GiB region of guest physical address space: memslots can
    be created anywhere): a written chunk costs its ``2**shift`` bytes, a key never written nothing.
    Reads and writes go one key at a time (``get``, ``d[k] = v``, ``del d[k]``, the same spelling as
    a dict) or a key array at a time (``take``, ``put``, ``find``)."""

    __slots__ = ("shift", "mask", "chunks", "mvs")

    def __init__(self, shift: int = 12) -> None:
        self.shift = shift
        self.mask = (1 << shift) - 1
        self.chunks: dict[int, np.ndarray] = {}
        self.mvs: dict[int, memoryview] = {}

    def get(self, k: int) -> int:
        mv = self.mvs.get(k >> self.shift)
        return 0 if mv is None else mv[k & self.mask]

    def __setitem__(self, k: int, value: int) -> None:
        c = k >> self.shift
        mv = self.mvs.get(c)
        if mv is None:
            if not value:
                return
            arr = self.chunks[c] = np.zeros(1 << self.shift, np.uint8)
            mv = self.mvs[c] = memoryview(arr)
        mv[k & self.mask] = value

    def __delitem__(self, k: int) -> None:
        self[k] = 0

    def clear(self) -> None:
        self.chunks.clear()
        self.mvs.clear()

    def take(self, keys: np.ndarray) -> np.ndarray:
        """The entries at ``keys`` (an integer array), as a new ``uint8`` array."""
        if len(keys) == 0 or not self.chunks:
            return np.zeros(len(keys), np.uint8)
        c = keys >> self.shift
        if (c == c[0]).all():  # the usual case: one chunk
            arr = self.chunks.get(int(c[0]))
            return np.zeros(len(keys), np.uint8) if arr is None else arr[keys & self.mask]
        out = np.zeros(len(keys), np.uint8)
        for cc in np.unique(c).tolist():
            arr = self.chunks.get(cc)
            if arr is not None:
                sel = c == cc
                out[sel] = arr[keys[sel] & self.mask]
        return out

    def put(self, keys: np.ndarray, value: int) -> None:
        """``d[k] = value`` for every key of ``keys``."""
        if len(keys) == 0:
            return
        c = keys >> self.shift
        for cc in ((int(c[0]),) if (c == c[0]).all() else np.unique(c).tolist()):
            arr = self.chunks.get(cc)
            if arr is None:
                if not value:
                    continue
                arr = self.chunks[cc] = np.zeros(1 << self.shift, np.uint8)
                self.mvs[cc] = memoryview(arr)
            arr[keys[c == cc] & self.mask] = value

    def find(self, value: int, lo: int, hi: int) -> np.ndarray:
        """The keys in ``[lo, hi]`` whose entry is ``value`` (non-zero), ascending."""
        if hi < lo or not value:
            return np.zeros(0, np.int64)
        found = []
        for cc in sorted(c for c in self.chunks if lo >> self.shift <= c <= hi >> self.shift):
            base = cc << self.shift
            a, b = max(lo - base, 0), min(hi - base, self.mask) + 1
            found.append(np.flatnonzero(self.chunks[cc][a:b] == value) + (base + a))
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.chunks.values())


__all__ = ["ChunkedBytes", "ChunkedView", "SparseBytes"]
