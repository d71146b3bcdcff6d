"""Compiled helpers of the fast engine's planning (:meth:`desim.cohort.Cohort._plan_seg`), in numba.

Each function is the compiled twin of a numpy expression of :class:`desim.mmu.Mmu` for the usual case
of a plan (one memslot backed by 4 KiB pages, its state bytes in one window) and returns exactly what
that expression returns; the callers fall back to the numpy code in every other case. They model no
kernel mechanism of their own: which SPTEs are present is :meth:`desim.mmu.Mmu.mapped_mask`
(``is_shadow_present_pte`` of the current roots), what an install finds and allocates is
:meth:`desim.mmu.Mmu.plan_install_4k` (``kvm_tdp_mmu_map`` / ``direct_map``). A plan costs a few
compiled calls instead of some sixty numpy calls on short arrays. Used only where a cohort plans with
its compiled kernel (``Cohort.kernel``) and imported on first use there, so the reference engine never
loads numba.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .mmu import EVER_MAPPED, HOST_RESIDENT, PTE_PREFETCH_NUM, TAG_MASK, InstallPlan, _prefetchable

_ZERO_CHUNKS: dict[int, np.ndarray] = {}  # per SparseBytes shift: a chunk never written


@njit(cache=True)
def first_misses_win(seg, win, lo, tag):  # pragma: no cover - compiled
    """:meth:`desim.mmu.Mmu.first_misses`'s positions where every gfn of ``seg`` lies in ``[lo, lo +
    len(win))`` of one 4 KiB-backed slot whose state bytes are ``win``: the position of the first access to
    each gfn whose SPTE is not present in the current roots (tag ``tag``), in increasing order. (A gfn is
    mapped or not at all its accesses, so its first unmapped access is its first access.)"""
    n = len(seg)
    seen = np.zeros(len(win), np.uint8)
    out = np.empty(n, np.int64)
    k = 0
    for i in range(n):
        r = seg[i] - lo
        if seen[r] == 0:
            seen[r] = 1
            if (win[r] & TAG_MASK) != tag:
                out[k] = i
                k += 1
    return out[:k]


@njit(cache=True)
def unmapped_win(seg, win, lo, tag):  # pragma: no cover - compiled
    """``np.flatnonzero(~mapped_mask(seg))`` where every gfn of ``seg`` lies in ``[lo, lo + len(win))`` of one
    4 KiB-backed slot whose state bytes are ``win``: the positions of the accesses whose SPTE is not present."""
    out = np.empty(len(seg), np.int64)
    k = 0
    for i in range(len(seg)):
        if (win[seg[i] - lo] & TAG_MASK) != tag:
            out[k] = i
            k += 1
    return out[:k]


def _window(mmu, seg: np.ndarray):
    """``(win, lo)``: the state bytes under ``seg`` where it lies in one 4 KiB-backed slot within a span not
    much wider than it is long, else None."""
    lo, hi = int(seg.min()), int(seg.max())
    ss = mmu.slot_of(lo)
    if ss is None or hi >= ss.slot.end_gfn or ss.block.backing != "4k" or hi - lo > 8 * len(seg) + 4096:
        return None
    base = ss.slot.base_gfn
    return ss.block.state.window(ss.off + lo - base, ss.off + hi + 1 - base), lo


def unmapped(mmu, seg: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(~mmu.mapped_mask(seg))`` (:meth:`desim.vcpu.Vcpu._next_miss`), compiled where
    :func:`first_misses` is; the same positions."""
    got = _window(mmu, seg) if len(seg) and mmu._sorted else None
    if got is None:
        return np.flatnonzero(~mmu.mapped_mask(seg))
    return unmapped_win(seg, got[0], got[1], mmu.root_tag)


@njit(cache=True)
def _not_in(a, b, lo, span):  # pragma: no cover - compiled
    mark = np.zeros(span, np.uint8)
    for v in b:
        if lo <= v < lo + span:
            mark[v - lo] = 1
    out = np.empty(len(a), np.bool_)
    for i in range(len(a)):
        out[i] = mark[a[i] - lo] == 0
    return out


def not_in(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``~np.isin(a, b)`` for integer arrays, compiled where ``a`` spans a range not much wider than it is long
    (a plan's faults against the gfns its vCPU's plan maps already)."""
    if len(a) == 0 or len(b) == 0:
        return ~np.isin(a, b)
    lo = int(a.min())
    span = int(a.max()) - lo + 1
    if span > 8 * len(a) + 4096:
        return ~np.isin(a, b)
    return _not_in(a, b, lo, span)


def first_misses(mmu, seg: np.ndarray):
    """:meth:`desim.mmu.Mmu.first_misses`, compiled where the accesses lie in one 4 KiB-backed slot within a
    span not much wider than they are; the same ``(fpos, fg)`` or None."""
    got = _window(mmu, seg) if len(seg) and mmu._sorted else None
    if got is None:
        return mmu.first_misses(seg)
    fpos = first_misses_win(seg, got[0], got[1], mmu.root_tag)
    if len(fpos) == 0:
        return None
    fg = seg[fpos]
    if fg.dtype != np.int64:
        fg = fg.astype(np.int64)
    return fpos, fg


@njit(cache=True)
def prefetch_win(gfns, win, lo, base, end, ok):  # pragma: no cover - compiled
    """:meth:`desim.mmu.Mmu.plan_prefetch_4k`'s ``(fault, members, take)`` where ``win`` holds the state bytes
    of ``[lo, lo + len(win))``, every gfn's aligned group clipped to the slot ``[base, end)``; ``ok``: the
    prefetchable table of the byte (:func:`desim.mmu._prefetchable`). The first fault in a group maps its
    eligible neighbours; a later gfn of the group faults only if it was not eligible."""
    n = len(gfns)
    g0 = lo // PTE_PREFETCH_NUM
    seen = np.zeros((lo + len(win) - 1) // PTE_PREFETCH_NUM - g0 + 1, np.uint8)
    first = np.empty(n, np.bool_)
    fault = np.empty(n, np.bool_)
    k = 0
    for i in range(n):
        j = gfns[i] // PTE_PREFETCH_NUM - g0
        f = seen[j] == 0
        seen[j] = 1
        first[i] = f
        fault[i] = f or not ok[win[gfns[i] - lo]]
        if fault[i]:
            k += 1
    members = np.empty((k, PTE_PREFETCH_NUM), np.int64)
    take = np.zeros((k, PTE_PREFETCH_NUM), np.bool_)
    r = 0
    for i in range(n):
        if fault[i]:
            g = gfns[i]
            m0 = g - g % PTE_PREFETCH_NUM
            for c in range(PTE_PREFETCH_NUM):
                m = m0 + c
                members[r, c] = m
                if first[i] and m != g and m >= base and m < end:
                    take[r, c] = ok[win[m - lo]]
            r += 1
    return fault, members, take


def plan_prefetch_4k(mmu, ss, gfns: np.ndarray, need_accessed: bool, present: np.ndarray | None = None):
    """:meth:`desim.mmu.Mmu.plan_prefetch_4k`, compiled where the groups' bytes lie close together (the
    numpy code reads them in one window there too); the same result."""
    block = ss.block
    if block.state2m.live or block.state1g.live or len(gfns) == 0:
        return mmu.plan_prefetch_4k(ss, gfns, need_accessed, present)
    base, end, tag = ss.slot.base_gfn, ss.slot.end_gfn, mmu.root_tag
    g_lo = (int(gfns.min()) // PTE_PREFETCH_NUM) * PTE_PREFETCH_NUM
    g_hi = (int(gfns.max()) // PTE_PREFETCH_NUM + 1) * PTE_PREFETCH_NUM
    lo, hi = max(g_lo, base), min(g_hi, end)
    if hi - lo > 8 * len(gfns) + 4096:
        return mmu.plan_prefetch_4k(ss, gfns, need_accessed, present)
    win = block.state.window(ss.off + lo - base, ss.off + hi - base)
    if present is not None and len(present):
        near = present[(present >= lo) & (present < hi)]
        if len(near):
            win = win.copy()
            win[near - lo] = tag  # present (never one of gfns)
    return prefetch_win(gfns, win, lo, base, end, _prefetchable(tag, need_accessed))


@njit(cache=True)
def install_win(gfns, win, lo, pts, cs, tag):  # pragma: no cover - compiled
    """:meth:`desim.mmu.Mmu.plan_install_4k` where ``win`` holds the state bytes of ``[lo, lo + len(win))``
    and each page-table level's keys lie in one chunk of its tags (``pts``: the PT, PD and PDPT levels'
    chunks, holding keys from ``cs``): ``(ok, st, alloc, nf3, nf2, nf1)``, ``ok`` False where the shortcut
    of :meth:`desim.mmu.Mmu.install` would not hold (a present PT page under an absent parent)."""
    n = len(gfns)
    st = np.empty(n, np.uint8)
    alloc = np.zeros(n, np.int64)
    hi = lo + len(win) - 1
    seen = (np.zeros((hi >> 9) - (lo >> 9) + 1, np.uint8), np.zeros((hi >> 18) - (lo >> 18) + 1, np.uint8),
            np.zeros((hi >> 27) - (lo >> 27) + 1, np.uint8))
    nf = np.empty((3, n), np.int64)
    cnt = np.zeros(3, np.int64)
    ok = True
    for i in range(n):
        g = gfns[i]
        st[i] = win[g - lo]
        for lvl in range(3):  # PT, PD, PDPT: the first gfn under each table allocates it if it is absent
            shift = 9 * (lvl + 1)
            k = g >> shift
            s = seen[lvl]
            if s[k - (lo >> shift)] == 0:
                s[k - (lo >> shift)] = 1
                if pts[lvl][k - cs[lvl]] != tag:
                    nf[lvl, cnt[lvl]] = i
                    cnt[lvl] += 1
                    alloc[i] += 1
                elif lvl == 0 and (pts[1][(g >> 18) - cs[1]] != tag or pts[2][(g >> 27) - cs[2]] != tag):
                    ok = False
    return ok, st, alloc, nf[2, :cnt[2]].copy(), nf[1, :cnt[1]].copy(), nf[0, :cnt[0]].copy()


def _level_chunk(sb, kmin: int, kmax: int):
    """``(chunk, first key)`` of a page-table level's tags (:class:`desim.chunked.SparseBytes`) holding keys
    ``kmin..kmax``, or None where they span two chunks."""
    c = kmin >> sb.shift
    if kmax >> sb.shift != c:
        return None
    arr = sb.chunks.get(c)
    if arr is None:
        arr = _ZERO_CHUNKS.get(sb.shift)
        if arr is None:
            arr = _ZERO_CHUNKS[sb.shift] = np.zeros(1 << sb.shift, np.uint8)
    return arr, c << sb.shift


def plan_install_4k(mmu, ss, gfns: np.ndarray):
    """:meth:`desim.mmu.Mmu.plan_install_4k`, compiled where the gfns' bytes lie close together and each
    level's tables in one chunk of its tags; the same plan."""
    if len(gfns) == 0:
        return mmu.plan_install_4k(ss, gfns)
    lo, hi = int(gfns.min()), int(gfns.max())
    base = ss.slot.base_gfn
    pt = mmu.pt_tags
    chunks = [_level_chunk(pt[lvl], lo >> shift, hi >> shift) for lvl, shift in ((1, 9), (2, 18), (3, 27))]
    if hi - lo > 8 * len(gfns) + 4096 or None in chunks:
        return mmu.plan_install_4k(ss, gfns)
    win = ss.block.state.window(ss.off + lo - base, ss.off + hi + 1 - base)
    ok, st, alloc, nf3, nf2, nf1 = install_win(gfns, win, lo, tuple(c[0] for c in chunks), tuple(c[1] for c in chunks),
                                               mmu.root_tag)
    if not ok:
        return None
    return InstallPlan(ss, gfns, st, (st & HOST_RESIDENT) != 0, (st & EVER_MAPPED) != 0, alloc,
                       {3: (27, nf3), 2: (18, nf2), 1: (9, nf1)})
