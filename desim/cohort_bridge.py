"""Hand a cohort run's planned steps to the compiled kernel and back (desim/cohort_kernel.py).

:func:`take` is called by :meth:`desim.cohort.Cohort.run` when the head of SimPy's queue is a planned
step. It translates the state the kernel reads and writes into arrays: the planned vCPUs (their
plans, timelines, pending events and cost draws: ``_Draws.peek_many``, consumed with ``i += n``
afterwards), ``mmu_lock`` (:class:`desim.lock.MmuLock`: holders, FIFO waiters, deferred releases,
timers), the host allocator (:class:`desim.hostmm.HostMm`) and the page-table pages the plans link;
pulls the kernel's events out of SimPy's queue (their own ids); runs the kernel up to the first
event it does not own; and puts everything back: the same Python state, records and events (their
ids from SimPy's counter, which is advanced past them) as the Python steps would have left. It
declines (returns 0 without changing anything) where the lock holds anything but faults.
"""
from __future__ import annotations

import itertools
from collections import deque
from heapq import heapify
from typing import TYPE_CHECKING

import numpy as np
from simpy.events import Event

from . import cohort_kernel as ck
from .lock import WRITE, MmuLock, _Waiter

if TYPE_CHECKING:  # pragma: no cover
    from .cohort import Cohort

import os
_DEBUG = os.environ.get("H15J_DEBUG")
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
    for tok, (_, role) in lock._hold_since.items():
        if role != "fault" or tok not in idx:
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
        if p is None or x.requests or x.root_tag != root or x._srcu_waiters or p.fk_code is None:
            continue
        if kind == "run":
            if p.step != "run":
                continue
        elif p.step != "pending":
            continue
        planned.append((idx[x], x, p, kind, t0, ctx, ev))
    if not planned:
        return 0
    IV = np.zeros((N, ck.N_IV), dtype=np.int64)
    FV = np.zeros((N, ck.N_FV), dtype=np.float64)
    IV[:, ck.I_FIRST_END] = -1
    hm = vm.hostmm
    pcp, lrup = hm._pcp, hm._lru_pending
    n_planned = len(planned)
    nfs = np.empty(n_planned, dtype=np.int64)
    for j, (i, x, p, kind, t0, ctx, ev) in enumerate(planned):
        nfs[j] = len(p.fpos) - p.locked
    lens = nfs + 2
    doffs = np.concatenate(([0], np.cumsum(lens)))
    D = np.empty((6, int(doffs[-1])), dtype=np.float64)
    DOFF = np.zeros(N, dtype=np.int64)
    parts_f, parts_g, parts_r, parts_e, parts_ptr, parts_code = [], [], [], [], [], []
    off = 0
    fkoff = 0
    codeoff = 0
    nonres = 0
    evmap = {}  # eid -> the Event pulled from the queue
    for j, (i, x, p, kind, t0, ctx, ev) in enumerate(planned):
        b = p.locked
        nf = int(nfs[j])
        iv = IV[i]
        fv = FV[i]
        iv[ck.I_PLANNED] = 1
        iv[ck.I_POS] = x._pos
        if x._entry is not None:
            iv[ck.I_ENTRY_SET] = 1
            fv[ck.F_ENTRY] = x._entry
        if x._stalled_since is not None:
            iv[ck.I_STALLED_SET] = 1
            fv[ck.F_STALLED] = x._stalled_since
        fv[ck.F_RECUNTIL] = x._recorded_until
        fv[ck.F_CARRY] = x._carry
        fv[ck.F_A] = x.access_ns
        m = x.m
        fv[ck.F_THOST] = m.time["host"]
        fv[ck.F_TGUEST] = m.time["guest"]
        fv[ck.F_STALL] = m.stall_ns
        iv[ck.I_K] = p.k - b
        iv[ck.I_NF] = nf
        iv[ck.I_OFF] = off
        iv[ck.I_FKOFF] = fkoff
        iv[ck.I_STEP] = 1 if p.step == "run" else 2
        iv[ck.I_CPU] = x.index
        iv[ck.I_PCP] = pcp.get(x.index, 0)
        iv[ck.I_LRU] = lrup.get(x.index, 0)
        r = x._run
        fv[ck.F_RNOW], fv[ck.F_RCARRY], fv[ck.F_RG0], fv[ck.F_RENTRY], fv[ck.F_RG1] = r[0], r[1], r[2], r[3], r[4]
        iv[ck.I_RUN_N], iv[ck.I_RUN_MISS], iv[ck.I_RUN_GFN] = r[5], r[6], r[9]
        fv[ck.F_REXIT] = r[10]
        fv[ck.F_T0] = t0 if t0 is not None else 0.0
        if kind == "run":
            iv[ck.I_KIND] = 0
        elif kind == "host":
            iv[ck.I_KIND] = 1
        else:
            iv[ck.I_KIND] = 3 if ev.triggered else 2
        afpos, fg, res, ever = p.arrays
        parts_f.append(afpos[b:])
        parts_g.append(fg[b:])
        parts_r.append(res[b:])
        parts_e.append(ever[b:])
        nonres += int(nf - np.count_nonzero(res[b:]))
        ptr = p.fk_ptr[b:]
        parts_ptr.append(ptr - ptr[0] + codeoff)
        parts_code.append(p.fk_code[ptr[0]:])
        codeoff += len(p.fk_code) - int(ptr[0])
        fkoff += nf + 1
        off += nf
        d0 = int(doffs[j])
        DOFF[i] = d0
        L = int(lens[j])
        for c, name in enumerate(ck.COST_NAMES):
            d = x.P.draws(name)
            if d is None:
                D[c, d0:d0 + L] = getattr(x.P, name)
            else:
                D[c, d0:d0 + L] = d.peek_many(L)
    fpos = np.concatenate(parts_f).astype(np.int64, copy=False)
    gfn = np.concatenate(parts_g).astype(np.int64, copy=False)
    res = np.concatenate(parts_r).astype(np.bool_, copy=False)
    ever = np.concatenate(parts_e).astype(np.bool_, copy=False)
    fk_ptr = np.concatenate(parts_ptr).astype(np.int64, copy=False)
    codes = np.concatenate(parts_code).astype(np.int64, copy=False)
    if len(codes):
        ucodes, fk_id = np.unique(codes, return_inverse=True)
        fk_id = fk_id.astype(np.int64).ravel()
        there = np.zeros(len(ucodes), dtype=np.int64)
        for lvl in (1, 2, 3):
            sel = np.flatnonzero((ucodes & 3) == lvl)
            if len(sel):
                there[sel] = mmu.pt_tags[lvl].take(ucodes[sel] >> 2) == root
    else:
        ucodes = fk_id = np.zeros(0, dtype=np.int64)
        there = np.zeros(0, dtype=np.int64)
    linked = np.zeros(len(ucodes) + 1, dtype=np.int64)
    vd = vm.P.draws("host_alloc_4k")
    VMM = vd.peek_many(nonres + 1).copy() if vd is not None else np.full(nonres + 1, vm.P.host_alloc_4k)
    # mmu_lock
    LF = np.zeros(10)
    LI = np.zeros(9, dtype=np.int64)
    st = lock._role("fault")
    LF[ck.L_LAST], LF[ck.L_AREA_H], LF[ck.L_AREA_W] = lock._last_t, lock._area_holders, lock._area_waiters
    LF[ck.L_WAIT], LF[ck.L_HOLD], LF[ck.L_MAXWAIT] = st.wait_ns, st.hold_ns, st.max_wait_ns
    LF[ck.L_TIMER_AT], LF[ck.L_HANDOFF] = lock._timer_at, lock.handoff_ns
    x0P = planned[0][1].P
    LF[ck.L_PT_ALLOC], LF[ck.L_PREFETCH] = x0P.pt_page_alloc, x0P.prefetch_spte
    LI[ck.LI_READERS], LI[ck.LI_WRITER] = lock.readers, 1 if lock.writer else 0
    LI[ck.LI_ACQ], LI[ck.LI_CONT], LI[ck.LI_SEQ] = st.acquisitions, st.contended, lock._seq
    LI[ck.LI_WRITE_MODE] = 1 if write_mode else 0
    for tok, (since, _) in lock._hold_since.items():
        i = idx[tok]
        FV[i, ck.F_HOLDSINCE] = since
        IV[i, ck.I_HOLDING] = 1
    pcap = 4 * N + len(lock._pending) + 64
    pt = np.zeros(pcap)
    ps = np.zeros(pcap, dtype=np.int64)
    pk = np.zeros(pcap, dtype=np.int64)
    for n, (t, seq, tok) in enumerate(sorted(lock._pending)):
        pt[n], ps[n], pk[n] = t, seq, idx[tok]
    LI[ck.LI_PEND_N] = len(lock._pending)
    wq_who = np.zeros(N + 1, dtype=np.int64)
    wq_since = np.zeros(N + 1)
    fwait = {}  # vCPU index -> the waiter's event (a queued waiter, planned or not)
    for n, w in enumerate(lock.waiters):
        i = idx[w.event.token]
        wq_who[n], wq_since[n] = i, w.since
        fwait[i] = w.event
    LI[ck.LI_WQ_N] = len(lock.waiters)
    # the host allocator
    HF = np.zeros(9)
    HI = np.zeros(6, dtype=np.int64)
    HF[ck.H_ZONE_FREE], HF[ck.H_ZONE_WAIT] = hm.zone.free_at, hm.zone.wait_ns
    HF[ck.H_LRU_FREE], HF[ck.H_LRU_WAIT] = hm.lru.free_at, hm.lru.wait_ns
    HF[ck.H_STRETCH], HF[ck.H_ZONE_PAGE], HF[ck.H_LRU_PAGE] = hm.stretch_ns, hm.zone_lock_page, hm.lru_lock_page
    HF[ck.H_CLEAR], HF[ck.H_MEMBW] = hm.clear_page_4k, hm.membw_4k
    HI[ck.HI_ZONE_HOLDS], HI[ck.HI_ZONE_CONT] = hm.zone.holds, hm.zone.contended
    HI[ck.HI_LRU_HOLDS], HI[ck.HI_LRU_CONT], HI[ck.HI_LRU_BATCH] = hm.lru.holds, hm.lru.contended, hm.lru_batch
    zl = hm._zeroing
    z = np.zeros(len(zl) + 4 * N + 64)
    z[:len(zl)] = zl  # a heap list is a heap array
    HI[ck.HI_ZN] = len(zl)
    # the events: the planned vCPUs' and the lock's timers move to the kernel's heap
    queue = env._queue
    pidx = {ev: i for (i, x, p, kind, t0, ctx, ev) in planned}
    room = 4 * N + len(queue) + 1024
    et = np.zeros(room)
    ep = np.zeros(room, dtype=np.int64)
    eid = np.zeros(room, dtype=np.int64)
    ek = np.zeros(room, dtype=np.int64)
    ew = np.zeros(room, dtype=np.int64)
    evv = np.zeros(room)
    K = np.zeros(ck.N_K, dtype=np.int64)
    rest = []
    for item in queue:
        t, prio, ident, ev = item
        i = pidx.get(ev)
        if i is not None:
            kind = ck.EV_RUN if IV[i, ck.I_KIND] == 0 else ck.EV_HOST if IV[i, ck.I_KIND] == 1 else ck.EV_GRANT
            val = ev._value if kind == ck.EV_GRANT else 0.0
            ck.ev_insert(K, et, ep, eid, ek, ew, evv, t, prio, ident, kind, i, val)
            continue
        lk = _lock_cb_kind(ev, lock)
        if lk >= 0:
            who = idx.get(ev._value, -2) if lk == ck.EV_RELCB else -1
            if who != -2:
                ck.ev_insert(K, et, ep, eid, ek, ew, evv, t, prio, ident, lk, who, 0.0)
                evmap[ident] = ev
                continue
        rest.append(item)
    if len(rest) != len(queue):
        heapify(rest)
        queue[:] = rest
    ft, fp, fe = (queue[0][0], queue[0][1], queue[0][2]) if queue else (np.inf, 0, 0)
    first_id = next(env._eid)
    K[ck.K_NEXT_ID] = first_id
    # run
    lat_out = np.empty((3, max(off, 1)))
    stall_out = np.empty((3, max(off, 1)))
    CUR = np.zeros((N, 6), dtype=np.int64)
    ck.run(K, IV, FV, CUR, D, DOFF, VMM, LF, LI, pt, ps, pk, wq_who, wq_since, HF, HI, z,
           fpos, gfn, res, ever, fk_ptr, fk_id, there, linked, lat_out, stall_out,
           et, ep, eid, ek, ew, evv, float(ft), int(fp), int(fe), room)
    env._eid = itertools.count(int(K[ck.K_NEXT_ID]))
    steps = int(K[ck.K_STEPS])
    if _DEBUG: print("take", len(planned), steps, int(K[ck.K_STOP]), int(K[ck.K_PLANNED]))
    # -- back to the Python objects --------------------------------------------------------------------
    co.planned += int(K[ck.K_PLANNED])
    co.shared_tables += int(K[ck.K_SHARED])
    metrics = vm.metrics
    metrics.sptes_installed += int(K[ck.K_SPTES])
    metrics.pt_pages_allocated += int(K[ck.K_PTPAGES])
    metrics.host_page_allocs["4k"] += int(K[ck.K_HOSTALLOC])
    if vd is not None:
        vd.i += int(K[ck.K_VMM])
    nl = int(K[ck.K_NLINK])
    if nl:
        pts, ppl = mmu.pt_tags, mmu.present_pt_level
        for code in ucodes[linked[:nl]].tolist():
            lvl = code & 3
            pts[lvl][code >> 2] = root
            ppl[lvl] += 1
        mmu.present_pt += nl
    n = int(K[ck.K_NLAT])
    if n:
        co._lat.extend(lat_out[0, :n].tolist())
        co._start.extend(lat_out[1, :n].tolist())
        co._refault.extend(lat_out[2, :n].astype(np.int64).tolist())
    n = int(K[ck.K_NSTALL])
    if n:
        co._stall_start.extend(stall_out[0, :n].tolist())
        co._stall_lat.extend(stall_out[1, :n].tolist())
        co._stall_a.extend(stall_out[2, :n].tolist())
    hits = metrics.hit_ns
    ends = [(int(IV[i, ck.I_FIRST_END]), i) for (i, *_r) in planned if IV[i, ck.I_FIRST_END] >= 0]
    ends.sort()
    for _, i in ends:
        a = vcpus[i].access_ns
        hits[a] = hits.get(a, 0) + int(IV[i, ck.I_HITS])
    # the lock
    lock._last_t, lock._area_holders, lock._area_waiters = float(LF[ck.L_LAST]), float(LF[ck.L_AREA_H]), float(LF[ck.L_AREA_W])
    st.wait_ns, st.hold_ns, st.max_wait_ns = float(LF[ck.L_WAIT]), float(LF[ck.L_HOLD]), float(LF[ck.L_MAXWAIT])
    st.acquisitions, st.contended = int(LI[ck.LI_ACQ]), int(LI[ck.LI_CONT])
    lock._timer_at = float(LF[ck.L_TIMER_AT])
    lock.readers, lock.writer = int(LI[ck.LI_READERS]), bool(LI[ck.LI_WRITER])
    lock._seq = int(LI[ck.LI_SEQ])
    hs = lock._hold_since
    hs.clear()  # every holder is a vCPU's fault (checked above)
    for i in np.flatnonzero(IV[:, ck.I_HOLDING]).tolist():
        hs[vcpus[i]] = (float(FV[i, ck.F_HOLDSINCE]), "fault")
    npend = int(LI[ck.LI_PEND_N])
    order = np.lexsort((ps[:npend], pt[:npend]))
    lock._pending = [(float(pt[q]), int(ps[q]), vcpus[int(pk[q])]) for q in order.tolist()]
    # the host allocator
    hm.zone.free_at, hm.zone.wait_ns = float(HF[ck.H_ZONE_FREE]), float(HF[ck.H_ZONE_WAIT])
    hm.lru.free_at, hm.lru.wait_ns = float(HF[ck.H_LRU_FREE]), float(HF[ck.H_LRU_WAIT])
    hm.stretch_ns = float(HF[ck.H_STRETCH])
    hm.zone.holds, hm.zone.contended = int(HI[ck.HI_ZONE_HOLDS]), int(HI[ck.HI_ZONE_CONT])
    hm.lru.holds, hm.lru.contended = int(HI[ck.HI_LRU_HOLDS]), int(HI[ck.HI_LRU_CONT])
    hm._zeroing = z[:int(HI[ck.HI_ZN])].tolist()
    # the vCPUs and their plans
    newev = {}
    for (i, x, p, kind0, t0, ctx0, ev0) in planned:
        iv = IV[i].tolist()
        fv = FV[i].tolist()
        b = p.locked
        for c, name in enumerate(ck.COST_NAMES):
            d = x.P.draws(name)
            if d is not None:
                d.i += int(CUR[i, c])
        pcp[x.index] = iv[ck.I_PCP]
        lrup[x.index] = iv[ck.I_LRU]
        x._pos = iv[ck.I_POS]
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
                  iv[ck.I_RUN_MISS], True, "fault", iv[ck.I_RUN_GFN], fv[ck.F_REXIT])
        x._g0, x._g1 = fv[ck.F_RG0], fv[ck.F_RG1]
        kind = iv[ck.I_KIND]
        x._running = kind == 0
        p.k = b + iv[ck.I_K]
        p.locked = b + iv[ck.I_LOCKED]
        p.step = ("idle", "run", "pending")[iv[ck.I_STEP]]
        owned.pop(ev0, None)
        if kind == 0:
            state[x] = ("run", None, None, None)
        else:
            ctx = (p.ss, p.gfns[p.locked], 1, x.root_tag, fv[ck.F_RG1])
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
    # the lock's waiters, in order (a waiter's event: its own if it was queued before, else a new one)
    waiters = deque()
    h = int(LI[ck.LI_WQ_HEAD])
    cap = len(wq_who)
    for q in range(int(LI[ck.LI_WQ_N])):
        i = int(wq_who[(h + q) % cap])
        ev = newev.get(i) or fwait[i]
        waiters.append(_Waiter(mode, "fault", float(wq_since[(h + q) % cap]), ev))
    lock.waiters = waiters
    # the kernel's pending events back into SimPy's queue, with their ids
    ne = int(K[ck.K_EN])
    for q in range(ne):
        t, prio, ident, kind, who, val = float(et[q]), int(ep[q]), int(eid[q]), int(ek[q]), int(ew[q]), float(evv[q])
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
        queue.append((t, prio, ident, ev))
    heapify(queue)
    return steps


__all__ = ["take"]
