"""Hand a cohort run's planned steps to the compiled kernel and back (desim/cohort_kernel.py).

:func:`take` is called by :meth:`desim.cohort.Cohort.run` when the head of SimPy's queue is a planned
step. It translates the state the kernel reads and writes into arrays: the planned vCPUs (their
plans, timelines, pending events and cost draws: ``_Draws.peek_many``, consumed with ``i += n``
afterwards), ``mmu_lock`` (:class:`desim.lock.MmuLock`: holders, FIFO waiters, deferred releases,
timers), the host allocator (:class:`desim.hostmm.HostMm`) and the page-table pages the plans link;
pulls the kernel's events out of SimPy's queue (their own ids); runs the kernel up to the first
event it does not own; and puts everything back: the same Python state, records and events (their
ids from SimPy's counter, which is advanced past them) as the Python steps would have left. It
declines (returns 0 without changing anything) where the lock is held or awaited by anything but faults,
except other readers of the qrwlock's read side (the TDP MMU's teardown of invalidated roots, a vCPU loading
its root), which the kernel counts among the readers until their own code, an event it does not own,
releases them.
"""
from __future__ import annotations

import itertools
from collections import deque
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING

import numpy as np
from simpy.events import Event

from . import cohort_kernel as ck
from .lock import WRITE, MmuLock, _Waiter

if TYPE_CHECKING:  # pragma: no cover
    from .cohort import Cohort

_LOCK_CBS = (MmuLock._timer_cb, MmuLock._release_cb)


def _lock_cb_kind(ev, lock) -> int:
    cbs = ev.callbacks
    if cbs and len(cbs) == 1 and getattr(cbs[0], "__self__", None) is lock:
        f = cbs[0].__func__
        if f is MmuLock._timer_cb:
            return ck.EV_TIMER
        if f is MmuLock._release_cb:
            return ck.EV_RELCB
    return -1


def _tables_there(mmu, codes: np.ndarray) -> np.ndarray:
    """Which page-table pages (level + 4 * index) are linked in the current root (Cohort._table_there)."""
    there = np.zeros(len(codes), dtype=np.int64)
    for lvl in (1, 2, 3):
        sel = np.flatnonzero((codes & 3) == lvl)
        if len(sel):
            there[sel] = mmu.pt_tags[lvl].take(codes[sel] >> 2) == mmu.root_tag
    return there


def _changed(IV0: np.ndarray, FV0: np.ndarray, IV: np.ndarray, FV: np.ndarray, CUR: np.ndarray) -> list:
    """The planned vCPUs (positions in the call's rows) whose state a kernel call changed: a step, a draw, a grant
    or release of ``mmu_lock``; any other vCPU's row, draws and event are as they came in."""
    return np.flatnonzero((IV != IV0).any(axis=1) | (FV != FV0).any(axis=1) | CUR.any(axis=1)).tolist()


def take(co: "Cohort", owned: dict, state: dict) -> int:
    """Run the kernel from the head of the queue; returns the vCPU steps it took (0: declined)."""
    vm = co.vm
    env = co.env
    lock = vm.lock
    mmu = vm.mmu
    vcpus = vm.vcpus
    N = len(vcpus)
    mode = lock._mode(vm.fault_lock_mode)
    write_mode = mode == WRITE
    if not write_mode and (lock.writer or lock.waiters):
        return 0
    idx = co._vidx
    if idx is None:
        idx = co._vidx = {x: i for i, x in enumerate(vcpus)}
    # other holders (not a vCPU's fault): with the qrwlock's read side, readers the kernel does not run (the
    # teardown of invalidated roots, a vCPU loading its root): they only count among the readers (the integral of
    # holders) until their own code releases them, which is an event the kernel stops at; exclusive: decline
    foreign = [(tok, hs) for tok, hs in lock._hold_since.items() if hs[1] != "fault" or tok not in idx]
    if foreign and write_mode:
        return 0
    for w in lock.waiters:
        if w.role != "fault" or w.mode != mode or getattr(w.event, "token", None) not in idx:
            return 0
    for _, _, tok in lock._pending:
        if tok not in idx:
            return 0
    plans = co._plans
    root = mmu.root_tag
    # the planned vCPUs: in a state of the fault cycle that their plan is in
    planned = []
    for x, (kind, t0, ctx, ev) in state.items():
        p = plans.get(x)
        if p is None or x.requests or x.root_tag != root or x._srcu_waiters:
            continue
        if kind == "run":
            if p.step != "run":
                continue
            k = 0
        elif p.step != "pending":
            continue
        else:
            k = 1 if kind == "host" else (3 if ev.triggered else 2)
        planned.append((idx[x], x, p, k, t0, ev))
    if not planned:
        return 0
    if foreign and {tok for tok, _ in foreign} & {q[1] for q in planned}:
        return 0  # a planned vCPU holds the lock in another role (not seen: its own code runs then)
    hm = vm.hostmm
    pcp, lrup = hm._pcp, hm._lru_pending
    ivr, fvr, pls, fks, codes_l = [], [], [], [], []
    off = fkoff = codeoff = nonres = doff = 0
    lens, doffs, shifts = [], [], []
    seg = co._kseg
    # the plans go on past their ends (the kernel is then not stopped there), once a call of this loop stopped at
    # a plan's end: a loop that ends before (a memslot update, a vCPU's own step: often within a few steps of a
    # fast zap's re-faults) does not pay for extensions it drops (a speed heuristic only)
    grow = co._kgrow
    for (i, x, p, k, t0, ev) in planned:
        if grow and len(p.fpos) - p.locked < 2 * seg and not p.noext:
            co._extend(x, p)
        b = p.locked
        nf = min(len(p.fpos) - b, seg)  # the kernel stops (STOP_PLAN) where a vCPU's segment ends
        r = x._run
        e, ss = x._entry, x._stalled_since
        m = x.m
        ivr.append((1, x._pos + p.cbase, e is not None, ss is not None, k, p.k - b, 0, nf, 0, 0, 0, off, r[5], r[6] + p.cbase, r[9], -1, 0,
                    x.index, pcp.get(x.index, 0), lrup.get(x.index, 0), 1 if p.step == "run" else 2, fkoff, 0, doff))
        fvr.append((x._carry, e or 0.0, ss or 0.0, x._recorded_until, x.access_ns, m.time["host"], m.time["guest"],
                    m.stall_ns, t0 or 0.0, r[0], r[1], r[2], r[3], r[4], r[10], 0.0))
        pls.append(p.arrays[:, b:b + nf])
        nres = p.nres
        nonres += nf - (nres.item(b) if b < len(nres) else 0) + (nres.item(b + nf) if b + nf < len(nres) else 0)
        ptr = p.fk_ptr[b:b + nf + 1]
        c0, c1 = ptr.item(0), ptr.item(-1)
        fks.append(ptr)
        shifts.append(codeoff - c0)  # the segment's offsets into the joined codes (added below, at once)
        codes_l.append(p.fk_code[c0:c1])
        codeoff += c1 - c0
        fkoff += nf + 1
        off += nf
        lens.append(nf + 2)
        doffs.append(doff)
        doff += nf + 2
    IV = np.zeros((N, ck.N_IV), dtype=np.int64)
    FV = np.zeros((N, ck.N_FV), dtype=np.float64)
    rows = [q[0] for q in planned]
    IV[rows] = ivr
    FV[rows] = fvr
    IV0, FV0 = IV[rows], FV[rows]  # copies: the vCPUs the kernel leaves as they were need no hand-back
    # the cost draws: the next values of each stream (a constant cost: its value)
    D = np.empty((6, doff), dtype=np.float64)
    DS = np.zeros((N, 6), dtype=np.int64)
    kc = co._kcosts
    css = []
    for q in planned:
        x = q[1]
        cs = kc.get(x)
        if cs is None:
            P = x.P
            cs = kc[x] = [(c, P.draws(name), getattr(P, name) if P.draws(name) is None else None)
                          for c, name in enumerate(ck.COST_NAMES)]
        css.append(cs)
    for c in range(len(ck.COST_NAMES)):
        ds = [cs[c][1] for cs in css]
        if all(d is not None for d in ds):
            # drawn for every vCPU: each one's next values side by side, in one copy
            got = [d.peek_many(L) for d, L in zip(ds, lens)]
            D[c] = np.concatenate(got) if len(got) > 1 else got[0]
            DS[rows, c] = 1
            continue
        if all(d is None for d in ds):
            # a constant for every vCPU: its value where each vCPU's draws begin, in one assignment
            D[c, doffs] = [cs[c][2] for cs in css]
            continue
        for (i, x, p, k, t0, ev), cs, L, d0 in zip(planned, css, lens, doffs):
            _, d, value = cs[c]
            if d is None:
                D[c, d0] = value
            else:
                D[c, d0:d0 + L] = d.peek_many(L)
                DS[i, c] = 1
    # always C-contiguous (a lone plan's columns are a strided view): numba compiles run() once, for one layout,
    # not a second time (about 12 CPU seconds) the first time a call plans a single vCPU
    PL = np.concatenate(pls, axis=1) if len(pls) > 1 else np.ascontiguousarray(pls[0])
    fk_ptr = np.concatenate(fks) + np.repeat(np.array(shifts, dtype=np.int64), [len(f) for f in fks])
    codes = np.concatenate(codes_l)
    if len(codes):
        ucodes, fk_id = np.unique(codes, return_inverse=True)
        THERE = _tables_there(mmu, ucodes)
    else:
        ucodes = fk_id = np.zeros(0, dtype=np.int64)
        THERE = np.zeros(0, dtype=np.int64)
    FK = np.concatenate((fk_ptr + len(fk_ptr), fk_id.ravel())).astype(np.int64, copy=False)
    LINKED = np.zeros(len(ucodes) + 1, dtype=np.int64)
    vd = vm.P.draws("host_alloc_4k")
    VMM = vd.peek_many(nonres + 1) if vd is not None else np.full(nonres + 1, vm.P.host_alloc_4k)
    S = np.zeros(ck.N_S)
    SI = np.zeros(ck.N_SI, dtype=np.int64)
    # mmu_lock
    st = lock._role("fault")
    S[ck.L_LAST], S[ck.L_AREA_H], S[ck.L_AREA_W] = lock._last_t, lock._area_holders, lock._area_waiters
    S[ck.L_WAIT], S[ck.L_HOLD], S[ck.L_MAXWAIT] = st.wait_ns, st.hold_ns, st.max_wait_ns
    S[ck.L_TIMER_AT], S[ck.L_HANDOFF] = lock._timer_at, lock.handoff_ns
    P0 = planned[0][1].P
    S[ck.L_PT_ALLOC], S[ck.L_PREFETCH] = P0.pt_page_alloc, P0.prefetch_spte
    SI[ck.LI_READERS], SI[ck.LI_WRITER] = lock.readers, 1 if lock.writer else 0
    SI[ck.LI_ACQ], SI[ck.LI_CONT], SI[ck.LI_SEQ] = st.acquisitions, st.contended, lock._seq
    SI[ck.LI_WRITE_MODE] = 1 if write_mode else 0
    for tok, (since, role) in lock._hold_since.items():
        if role != "fault" or tok not in idx:
            continue  # a foreign reader
        i = idx[tok]
        FV[i, ck.F_HOLDSINCE] = since
        IV[i, ck.I_HOLDING] = 1
    pend = lock._pending
    pcap = 4 * N + len(pend) + 64
    PT = np.zeros(pcap)
    PI = np.zeros((pcap, 2), dtype=np.int64)
    if pend:
        srt = sorted(pend)  # a sorted list is a heap
        PT[:len(srt)] = [q[0] for q in srt]
        PI[:len(srt)] = [(q[1], idx[q[2]]) for q in srt]
    SI[ck.LI_PEND_N] = len(pend)
    W = np.zeros(N + 1, dtype=np.int64)
    WS = np.zeros(N + 1)
    fwait = {}  # vCPU index -> a queued waiter's event
    for n, w in enumerate(lock.waiters):
        i = idx[w.event.token]
        W[n], WS[n] = i, w.since
        fwait[i] = w.event
    SI[ck.LI_WQ_N] = len(lock.waiters)
    # the host allocator
    S[ck.H_ZONE_FREE], S[ck.H_ZONE_WAIT] = hm.zone.free_at, hm.zone.wait_ns
    S[ck.H_LRU_FREE], S[ck.H_LRU_WAIT] = hm.lru.free_at, hm.lru.wait_ns
    S[ck.H_STRETCH], S[ck.H_ZONE_PAGE], S[ck.H_LRU_PAGE] = hm.stretch_ns, hm.zone_lock_page, hm.lru_lock_page
    S[ck.H_CLEAR], S[ck.H_MEMBW] = hm.clear_page_4k, hm.membw_4k
    SI[ck.HI_ZONE_HOLDS], SI[ck.HI_ZONE_CONT] = hm.zone.holds, hm.zone.contended
    SI[ck.HI_LRU_HOLDS], SI[ck.HI_LRU_CONT], SI[ck.HI_LRU_BATCH] = hm.lru.holds, hm.lru.contended, hm.lru_batch
    zl = hm._zeroing
    Z = np.zeros(len(zl) + 4 * N + 64)
    Z[:len(zl)] = zl  # a heap list is a heap array
    SI[ck.HI_ZN] = len(zl)
    # the events: the planned vCPUs' and the lock's timers move to the kernel's heap (their own ids)
    queue = env._queue
    pidx = {ev: (i, k) for (i, x, p, k, t0, ev) in planned}
    evmap = {}  # id -> an Event pulled from the queue (a lock timer, a planned vCPU's): it goes back if still pending
    mine, rest = [], []
    for item in queue:
        t, prio, ident, ev = item
        q = pidx.get(ev)
        if q is not None:
            i, k = q
            kind = ck.EV_RUN if k == 0 else ck.EV_HOST if k == 1 else ck.EV_GRANT
            mine.append((t, prio, ident, kind, i, ev._value if kind == ck.EV_GRANT else 0.0))
            evmap[ident] = ev
            continue
        lk = _lock_cb_kind(ev, lock)
        if lk >= 0:
            who = idx.get(ev._value, -2) if lk == ck.EV_RELCB else -1
            if who != -2:
                mine.append((t, prio, ident, lk, who, 0.0))
                evmap[ident] = ev
                continue
        rest.append(item)
    if mine:
        heapify(rest)
        queue[:] = rest
    room = 4 * N + len(mine) + 1024
    E = np.zeros((room, 2))
    EI = np.zeros((room, 4), dtype=np.int64)
    mine.sort()  # a sorted array is a heap
    if mine:
        E[:len(mine)] = [(q[0], q[5]) for q in mine]
        EI[:len(mine)] = [(q[1], q[2], q[3], q[4]) for q in mine]
    SI[ck.K_EN] = len(mine)
    if queue:
        S[ck.S_FT], SI[ck.S_FP], SI[ck.S_FE] = queue[0][0], queue[0][1], queue[0][2]
    else:
        S[ck.S_FT] = np.inf
    SI[ck.K_NEXT_ID] = next(env._eid)
    OUT = np.empty((6, max(off, 1)))
    CUR = np.zeros((N, 6), dtype=np.int64)
    ck.run(S, SI, IV, FV, CUR, DS, D, VMM, PL, FK, THERE, LINKED, OUT, PT, PI, W, WS, Z, E, EI)
    env._eid = itertools.count(int(SI[ck.K_NEXT_ID]))
    ckp = vm.checkpoints
    while SI[ck.K_STOP] == ck.STOP_FOREIGN and ckp is not None and queue:
        t, _, _, ev = queue[0]
        cbs = ev.callbacks
        if not (cbs and len(cbs) == 1 and getattr(cbs[0], "__self__", None) is ckp
                and cbs[0].__func__ is ckp._resume.__func__):
            break
        # a progress checkpoint (Vm._checkpoints: it reads the clock and the vCPUs' accesses and faults, nothing
        # else): those counted so far handed over, its step taken as Environment.step would, the kernel going on
        # from where it stopped
        heappop(queue)
        env._now = t
        ev.callbacks = None
        co.kernel_checkpoints += 1
        for i, (acc, ft, az) in zip(rows, IV[rows][:, (ck.I_ACC, ck.I_FT, ck.I_AZ)].tolist()):
            m = vcpus[i].m
            m.accesses += acc
            if ft:
                m.faults["first_touch"] += ft
            if az:
                m.faults["after_zap"] += az
        IV[rows, ck.I_ACC] = 0
        IV[rows, ck.I_FT] = 0
        IV[rows, ck.I_AZ] = 0
        # the kernel's next event stands in SimPy's queue while the checkpoint runs (its process takes its next
        # timeout at once only if that is due first: desim/engine.py)
        mark = (E[0, 0], int(EI[0, 0]), int(EI[0, 1]), Event(env)) if SI[ck.K_EN] else None
        if mark is not None:
            heappush(queue, mark)
        active = env._active_proc
        ckp._resume(ev)
        env._active_proc = active
        if mark is not None:
            queue.remove(mark)
            heapify(queue)
        SI[ck.K_NEXT_ID] = next(env._eid)  # the checkpoint's next timeout took an id
        if queue:
            S[ck.S_FT], SI[ck.S_FP], SI[ck.S_FE] = queue[0][0], queue[0][1], queue[0][2]
        else:
            S[ck.S_FT] = np.inf
        ck.run(S, SI, IV, FV, CUR, DS, D, VMM, PL, FK, THERE, LINKED, OUT, PT, PI, W, WS, Z, E, EI)
        env._eid = itertools.count(int(SI[ck.K_NEXT_ID]))
    steps = int(SI[ck.K_STEPS])
    co._kgrow = SI[ck.K_STOP] == ck.STOP_PLAN
    if foreign:
        co.kernel_shared += steps
    # -- back to the Python objects --------------------------------------------------------------------
    SIl = SI.tolist()
    Sl = S.tolist()
    co.planned += SIl[ck.K_PLANNED]
    co.shared_tables += SIl[ck.K_SHARED]
    metrics = vm.metrics
    metrics.sptes_installed += SIl[ck.K_SPTES]
    metrics.sptes_prefetched += SIl[ck.K_PREFETCHED]
    co.prefetched_planned += SIl[ck.K_PREFETCHED]
    metrics.pt_pages_allocated += SIl[ck.K_PTPAGES]
    metrics.host_page_allocs["4k"] += SIl[ck.K_HOSTALLOC]
    if vd is not None:
        vd.i += SIl[ck.K_VMM]
    nl = SIl[ck.K_NLINK]
    if nl:
        pts, ppl = mmu.pt_tags, mmu.present_pt_level
        for code in ucodes[LINKED[:nl]].tolist():
            lvl = code & 3
            pts[lvl][code >> 2] = root
            ppl[lvl] += 1
        mmu.present_pt += nl
    # the hits of the planned guest runs (each access_ns counted in the order the runs ended)
    # only the vCPUs whose state the kernel changed (a step, a grant of the lock, a release) are handed back: the
    # others' rows, draws and events are as they came (their Python state, plan and pending event stay)
    IVr, FVr, CURr = IV[rows], FV[rows], CUR[rows]
    chg = _changed(IV0, FV0, IVr, FVr, CURr)
    moved = [planned[j] for j in chg]
    ivs = IVr[chg].tolist()
    hits = metrics.hit_ns
    ends = sorted((iv[ck.I_FIRST_END], j) for j, iv in enumerate(ivs) if iv[ck.I_FIRST_END] >= 0)
    for _, j in ends:
        a = moved[j][1].access_ns
        hits[a] = hits.get(a, 0) + ivs[j][ck.I_HITS]
    # the records, after the Python steps' (Cohort._flush_records: the same samples in the same order)
    nlat, nst = SIl[ck.K_NLAT], SIl[ck.K_NSTALL]
    if nlat or nst:
        co._flush_records()
    if nlat:
        metrics.record_faults(0, {}, OUT[ck.O_START, :nlat], OUT[ck.O_LAT, :nlat],
                              OUT[ck.O_REFAULT, :nlat].astype(np.int8))
    if nst:
        sa = OUT[ck.O_SA, :nst]
        a0 = float(sa[0])
        metrics.record_access_stalls(OUT[ck.O_SSTART, :nst], OUT[ck.O_SLAT, :nst], a0)
        other = sa != a0
        if other.any():  # counted against a0 above: move each stall to its own access time
            hits = metrics.hit_ns
            for a in sa[other].tolist():
                hits[a0] += 1
                hits[a] = hits.get(a, 0) - 1
    # the lock
    lock._last_t, lock._area_holders, lock._area_waiters = Sl[ck.L_LAST], Sl[ck.L_AREA_H], Sl[ck.L_AREA_W]
    st.wait_ns, st.hold_ns, st.max_wait_ns = Sl[ck.L_WAIT], Sl[ck.L_HOLD], Sl[ck.L_MAXWAIT]
    st.acquisitions, st.contended = SIl[ck.LI_ACQ], SIl[ck.LI_CONT]
    lock._timer_at = Sl[ck.L_TIMER_AT]
    lock.readers, lock.writer = SIl[ck.LI_READERS], bool(SIl[ck.LI_WRITER])
    lock._seq = SIl[ck.LI_SEQ]
    hs = lock._hold_since
    hs.clear()
    hs.update(foreign)  # the foreign readers still hold (the kernel never releases them)
    for i in np.flatnonzero(IV[:, ck.I_HOLDING]).tolist():
        hs[vcpus[i]] = (float(FV[i, ck.F_HOLDSINCE]), "fault")
    npend = SIl[ck.LI_PEND_N]
    if npend:
        order = np.lexsort((PI[:npend, 0], PT[:npend]))
        lock._pending = [(t, sq, vcpus[tk]) for t, sq, tk in zip(PT[order].tolist(), PI[order, 0].tolist(),
                                                                   PI[order, 1].tolist())]
    else:
        lock._pending = []
    # the host allocator
    hm.zone.free_at, hm.zone.wait_ns = Sl[ck.H_ZONE_FREE], Sl[ck.H_ZONE_WAIT]
    hm.lru.free_at, hm.lru.wait_ns = Sl[ck.H_LRU_FREE], Sl[ck.H_LRU_WAIT]
    hm.stretch_ns = Sl[ck.H_STRETCH]
    hm.zone.holds, hm.zone.contended = SIl[ck.HI_ZONE_HOLDS], SIl[ck.HI_ZONE_CONT]
    hm.lru.holds, hm.lru.contended = SIl[ck.HI_LRU_HOLDS], SIl[ck.HI_LRU_CONT]
    hm._zeroing = Z[:SIl[ck.HI_ZN]].tolist()
    # the vCPUs and their plans
    fvs = FVr[chg].tolist()
    curs = CURr[chg].tolist()
    newev = {}
    for (i, x, p, k0, t0, ev0), iv, fv, cur in zip(moved, ivs, fvs, curs):
        for c, d, _ in kc[x]:
            if d is not None:
                d.i += cur[c]
        b = p.locked
        pcp[x.index] = iv[ck.I_PCP]
        lrup[x.index] = iv[ck.I_LRU]
        locked = b + iv[ck.I_LOCKED]
        ends = p.gfns[b:locked]
        for c in np.flatnonzero(ends < 0).tolist():
            # a chunk end the kernel crossed: the top of Vcpu.run's loop took the next chunk (Cohort._end_planned)
            p.cbase = int(p.fpos[b + c])
            x._next_chunk()
            co.chunk_ends_planned += 1
        x._pos = iv[ck.I_POS] - p.cbase
        x._carry = fv[ck.F_CARRY]
        x._entry = fv[ck.F_ENTRY] if iv[ck.I_ENTRY_SET] else None
        x._stalled_since = fv[ck.F_STALLED] if iv[ck.I_STALLED_SET] else None
        x._recorded_until = fv[ck.F_RECUNTIL]
        m = x.m
        m.time["host"] = fv[ck.F_THOST]
        m.time["guest"] = fv[ck.F_TGUEST]
        m.stall_ns = fv[ck.F_STALL]
        m.accesses += iv[ck.I_ACC]
        if iv[ck.I_FT]:
            m.faults["first_touch"] += iv[ck.I_FT]
        if iv[ck.I_AZ]:
            m.faults["after_zap"] += iv[ck.I_AZ]
        x._run = (fv[ck.F_RNOW], fv[ck.F_RCARRY], fv[ck.F_RG0], fv[ck.F_RENTRY], fv[ck.F_RG1], iv[ck.I_RUN_N],
                  iv[ck.I_RUN_MISS] - p.cbase, iv[ck.I_RUN_GFN] >= 0, "fault", iv[ck.I_RUN_GFN], fv[ck.F_REXIT])
        x._g0, x._g1 = fv[ck.F_RG0], fv[ck.F_RG1]
        kind = iv[ck.I_KIND]
        x._running = kind == 0
        p.k = b + iv[ck.I_K]
        p.locked = locked
        p.step = ("idle", "run", "pending")[iv[ck.I_STEP]]
        owned.pop(ev0, None)
        if kind == 0:
            state[x] = ("run", None, None, None)
        else:
            ctx = (p.ss, int(p.gfns[p.locked]), 1, x.root_tag, fv[ck.F_RG1])
            t0 = fv[ck.F_T0]
            if kind == 1:
                state[x] = ("host", t0, ("host", ctx), None)
            elif kind == 3:
                state[x] = ("lock", t0, ctx, None)
            else:
                ev = Event(env)
                ev.token = x
                newev[i] = ev
                owned[ev] = x
                state[x] = ("lock", t0, ctx, ev)
    # the lock's waiters, in order (a waiter the kernel did not run keeps its event)
    if SIl[ck.LI_WQ_N] or lock.waiters:
        waiters = deque()
        h = SIl[ck.LI_WQ_HEAD]
        cap = len(W)
        for q in range(SIl[ck.LI_WQ_N]):
            i = int(W[(h + q) % cap])
            waiters.append(_Waiter(mode, "fault", float(WS[(h + q) % cap]), newev.get(i) or fwait[i]))
        lock.waiters = waiters
    # the kernel's pending events back into SimPy's queue, with their ids
    ne = SIl[ck.K_EN]
    for (t, val), (prio, ident, kind, who) in zip(E[:ne].tolist(), EI[:ne].tolist()):
        ev = evmap.get(ident)
        if ev is None:
            if kind == ck.EV_XGRANT:
                ev = fwait[who]
                ev._ok, ev._value = True, val
            else:
                ev = Event(env)
                ev._ok = True
                if kind == ck.EV_TIMER:
                    ev._value = None
                    ev.callbacks.append(lock._timer_cb)
                elif kind == ck.EV_RELCB:
                    ev._value = vcpus[who]
                    ev.callbacks.append(lock._release_cb)
                else:
                    x = vcpus[who]
                    ev._value = val if kind == ck.EV_GRANT else None
                    if kind == ck.EV_GRANT:
                        ev.token = x
                    s = state[x]
                    state[x] = (s[0], s[1], s[2], ev)
                    owned[ev] = x
        elif kind <= ck.EV_GRANT:
            # a planned vCPU's event the kernel did not reach: where the vCPU was handed back (its lock released
            # meanwhile), its state waits on this event again
            x = vcpus[who]
            s = state[x]
            if s[3] is not ev:
                state[x] = (s[0], s[1], s[2], ev)
                owned[ev] = x
        queue.append((t, prio, ident, ev))
    heapify(queue)
    return steps


__all__ = ["take"]
