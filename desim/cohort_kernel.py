"""The compiled cohort kernel: many vCPUs' planned 4 KiB faults in SimPy's event order, in one numba loop.

This is the compiled twin of the planned steps of :mod:`desim.cohort` (``Cohort._begin_planned``,
``_end_planned``, ``_acquire_planned``, ``_locked_planned``) and of the model code they call, kept
equal to it, bit for bit, by ``tests/test_engines_differential.py`` and ``tests/test_cohort_kernel.py``.
Each part mirrors Python code that models a kernel mechanism, with the same float operations in the
same order:

* the event queue: SimPy's heap keyed ``(time, priority, id)``, ids from SimPy's counter, numbered in
  the order the per-event path creates events (:mod:`simpy.core`);
* ``kvm->mmu_lock`` (:class:`desim.lock.MmuLock`): the spinlock (every acquisition exclusive:
  ``spin_lock(&kvm->mmu_lock)``, the legacy MMU's faults) or the qrwlock's read side (``read_lock``,
  ``kernel/locking/qrwlock.c``: TDP MMU faults), FIFO waiters (a ring of vCPU indices and since-times),
  deferred releases (``_pending``), the timers ``_timer_cb`` / ``_release_cb``, the direct hand-over to
  a queued writer with ``handoff_ns``, the role ``fault``'s statistics and the two integrals;
* the host's first-touch allocation (:class:`desim.hostmm.HostMm`): ``zone->lock`` held per
  ``rmqueue_bulk`` refill of the per-CPU list (mm/page_alloc.c), ``lruvec->lru_lock`` per
  ``folio_batch_move_lru`` drain (mm/swap.c), and ``clear_page`` zeroings stretched by memory bandwidth;
* the vCPU's fault cycle (:mod:`desim.vcpu`): the guest run up to the fault, ``kvm_faultin_pfn``, the
  install under the lock (``kvm_tdp_mmu_map`` / ``direct_map`` linking a page-table page only where
  none is), the fault's and the access stall's records.

:func:`run` takes the steps at the head of the queue for as long as they are its own and each vCPU
has a planned fault to begin next; it stops before anything else (a foreign event's key is passed in,
a granted waiter that is not planned, a plan at its last fault, a full buffer) and
:mod:`desim.cohort_bridge` hands the state back to the Python objects.
"""
from __future__ import annotations

import numpy as np
from numba import njit

# event kinds in the kernel's heap
EV_RUN, EV_HOST, EV_GRANT, EV_XGRANT, EV_TIMER, EV_RELCB = 0, 1, 2, 3, 4, 5
NORMAL = 1  # simpy.events.NORMAL
PCP_BATCH = 63  # desim.hostmm.PCP_BATCH

# IV columns (int64 per vCPU)
I_PLANNED, I_POS, I_ENTRY_SET, I_STALLED_SET, I_KIND, I_K, I_LOCKED, I_NF, I_ACC, I_FT, I_AZ, I_OFF, \
    I_RUN_N, I_RUN_MISS, I_RUN_GFN, I_FIRST_END, I_HITS, I_CPU, I_PCP, I_LRU, I_STEP, I_FKOFF, I_HOLDING = range(23)
N_IV = 23
# kinds (I_KIND): 0 run, 1 host wait, 2 lock wait (queued), 3 lock granted (event scheduled), -1 none
# FV columns (float64 per vCPU)
F_CARRY, F_ENTRY, F_STALLED, F_RECUNTIL, F_A, F_THOST, F_TGUEST, F_STALL, F_T0, F_RNOW, F_RCARRY, \
    F_RG0, F_RENTRY, F_RG1, F_REXIT, F_HOLDSINCE = range(16)
N_FV = 16
# costs (rows of the draws array)
C_FAULT_HANDLE, C_FAULTIN_RESIDENT, C_HOST_ALLOC, C_VM_ENTRY, C_VM_EXIT, C_SPTE_INSTALL = range(6)
COST_NAMES = ("fault_handle", "faultin_resident", "host_alloc_4k", "vm_entry", "vm_exit", "spte_install")
# lock floats / ints
L_LAST, L_AREA_H, L_AREA_W, L_WAIT, L_HOLD, L_MAXWAIT, L_TIMER_AT, L_HANDOFF, L_PT_ALLOC, L_PREFETCH = range(10)
LI_READERS, LI_WRITER, LI_ACQ, LI_CONT, LI_SEQ, LI_WRITE_MODE, LI_WQ_HEAD, LI_WQ_N, LI_PEND_N = range(9)
# host mm floats / ints
H_ZONE_FREE, H_ZONE_WAIT, H_LRU_FREE, H_LRU_WAIT, H_STRETCH, H_ZONE_PAGE, H_LRU_PAGE, H_CLEAR, H_MEMBW = range(9)
HI_ZONE_HOLDS, HI_ZONE_CONT, HI_LRU_HOLDS, HI_LRU_CONT, HI_LRU_BATCH, HI_ZN = range(6)
# counters (int64)
K_STEPS, K_PLANNED, K_SPTES, K_PTPAGES, K_SHARED, K_HOSTALLOC, K_NLAT, K_NSTALL, K_NLINK, K_NEXT_ID, \
    K_EN, K_VMM, K_STOP = range(13)
N_K = 13
# why the kernel stopped (K_STOP)
STOP_FOREIGN, STOP_EMPTY, STOP_PLAN, STOP_XGRANT, STOP_FULL = 0, 1, 2, 3, 4


@njit(cache=True)
def _less(t1, p1, e1, t2, p2, e2):
    if t1 != t2:
        return t1 < t2
    if p1 != p2:
        return p1 < p2
    return e1 < e2


@njit(cache=True)
def _ev_push(K, et, ep, eid, ek, ew, ev, t, kind, who, val):
    """heapq.heappush on SimPy's key (time, NORMAL, next id)."""
    n = K[K_EN]
    i = K[K_NEXT_ID]
    K[K_NEXT_ID] = i + 1
    j = n
    K[K_EN] = n + 1
    while j > 0:
        parent = (j - 1) >> 1
        if _less(t, NORMAL, i, et[parent], ep[parent], eid[parent]):
            et[j], ep[j], eid[j], ek[j], ew[j], ev[j] = et[parent], ep[parent], eid[parent], ek[parent], ew[parent], ev[parent]
            j = parent
        else:
            break
    et[j], ep[j], eid[j], ek[j], ew[j], ev[j] = t, NORMAL, i, kind, who, val


@njit(cache=True)
def ev_insert(K, et, ep, eid, ek, ew, ev, t, prio, ident, kind, who, val):
    """Insert an event pulled from SimPy's queue (its own id)."""
    n = K[K_EN]
    j = n
    K[K_EN] = n + 1
    while j > 0:
        parent = (j - 1) >> 1
        if _less(t, prio, ident, et[parent], ep[parent], eid[parent]):
            et[j], ep[j], eid[j], ek[j], ew[j], ev[j] = et[parent], ep[parent], eid[parent], ek[parent], ew[parent], ev[parent]
            j = parent
        else:
            break
    et[j], ep[j], eid[j], ek[j], ew[j], ev[j] = t, prio, ident, kind, who, val


@njit(cache=True)
def _ev_pop(K, et, ep, eid, ek, ew, ev):
    n = K[K_EN] - 1
    K[K_EN] = n
    if n == 0:
        return
    t, p, i, k, w, v = et[n], ep[n], eid[n], ek[n], ew[n], ev[n]
    j = 0
    while True:
        c = 2 * j + 1
        if c >= n:
            break
        if c + 1 < n and _less(et[c + 1], ep[c + 1], eid[c + 1], et[c], ep[c], eid[c]):
            c += 1
        if _less(et[c], ep[c], eid[c], t, p, i):
            et[j], ep[j], eid[j], ek[j], ew[j], ev[j] = et[c], ep[c], eid[c], ek[c], ew[c], ev[c]
            j = c
        else:
            break
    et[j], ep[j], eid[j], ek[j], ew[j], ev[j] = t, p, i, k, w, v


@njit(cache=True)
def _pend_push(LI, pt, ps, pk, t, seq, tok):
    j = LI[LI_PEND_N]
    LI[LI_PEND_N] = j + 1
    while j > 0:
        parent = (j - 1) >> 1
        if t < pt[parent] or (t == pt[parent] and seq < ps[parent]):
            pt[j], ps[j], pk[j] = pt[parent], ps[parent], pk[parent]
            j = parent
        else:
            break
    pt[j], ps[j], pk[j] = t, seq, tok


@njit(cache=True)
def _pend_pop(LI, pt, ps, pk):
    n = LI[LI_PEND_N] - 1
    LI[LI_PEND_N] = n
    if n == 0:
        return
    t, s, k = pt[n], ps[n], pk[n]
    j = 0
    while True:
        c = 2 * j + 1
        if c >= n:
            break
        if c + 1 < n and (pt[c + 1] < pt[c] or (pt[c + 1] == pt[c] and ps[c + 1] < ps[c])):
            c += 1
        if pt[c] < t or (pt[c] == t and ps[c] < s):
            pt[j], ps[j], pk[j] = pt[c], ps[c], pk[c]
            j = c
        else:
            break
    pt[j], ps[j], pk[j] = t, s, k


@njit(cache=True)
def _z_push(HI, z, t):
    j = HI[HI_ZN]
    HI[HI_ZN] = j + 1
    while j > 0:
        parent = (j - 1) >> 1
        if t < z[parent]:
            z[j] = z[parent]
            j = parent
        else:
            break
    z[j] = t


@njit(cache=True)
def _z_pop(HI, z):
    n = HI[HI_ZN] - 1
    HI[HI_ZN] = n
    if n == 0:
        return
    t = z[n]
    j = 0
    while True:
        c = 2 * j + 1
        if c >= n:
            break
        if c + 1 < n and z[c + 1] < z[c]:
            c += 1
        if z[c] < t:
            z[j] = z[c]
            j = c
        else:
            break
    z[j] = t


# -- desim.lock.MmuLock ---------------------------------------------------------------------------------
@njit(cache=True)
def _advance(LF, LI, now):
    dt = now - LF[L_LAST]
    if dt:
        LF[L_AREA_H] += dt * (LI[LI_READERS] + (1 if LI[LI_WRITER] else 0))
        LF[L_AREA_W] += dt * LI[LI_WQ_N]
        LF[L_LAST] = now


@njit(cache=True)
def _drop(LF, LI, IV, FV, tok, at):
    LF[L_HOLD] += at - FV[tok, F_HOLDSINCE]
    IV[tok, I_HOLDING] = 0
    if LI[LI_WRITER]:
        LI[LI_WRITER] = 0
    else:
        LI[LI_READERS] -= 1


@njit(cache=True)
def _catch_up(LF, LI, IV, FV, pt, ps, pk, now):
    while LI[LI_PEND_N] and pt[0] <= now:
        t, tok = pt[0], pk[0]
        _pend_pop(LI, pt, ps, pk)
        _advance(LF, LI, t)
        _drop(LF, LI, IV, FV, tok, t)


@njit(cache=True)
def _grant(LI, IV, FV, tok, at):
    if LI[LI_WRITE_MODE]:
        LI[LI_WRITER] = 1
    else:
        LI[LI_READERS] += 1
    FV[tok, F_HOLDSINCE] = at
    IV[tok, I_HOLDING] = 1
    LI[LI_ACQ] += 1


@njit(cache=True)
def _admit(LF, LI, IV, FV, tok, since, at):
    wait = at - since
    LF[L_WAIT] += wait
    if wait > LF[L_MAXWAIT]:
        LF[L_MAXWAIT] = wait
    _grant(LI, IV, FV, tok, at)


@njit(cache=True)
def _arm_timer(K, LF, pt, now, et, ep, eid, ek, ew, ev):
    t = pt[0]
    if LF[L_TIMER_AT] >= now and LF[L_TIMER_AT] <= t:
        return
    LF[L_TIMER_AT] = t
    _ev_push(K, et, ep, eid, ek, ew, ev, now + (t - now), EV_TIMER, -1, 0.0)


@njit(cache=True)
def _wq_pop(LI, wq_who, wq_since):
    h = LI[LI_WQ_HEAD]
    w, s = wq_who[h], wq_since[h]
    LI[LI_WQ_HEAD] = (h + 1) % len(wq_who)
    LI[LI_WQ_N] -= 1
    return w, s


@njit(cache=True)
def _grant_event(K, IV, w, t, val, et, ep, eid, ek, ew, ev):
    """A waiter's event succeeds at ``t``: a planned vCPU's step, or a foreign one (the kernel stops there)."""
    if IV[w, I_PLANNED]:
        IV[w, I_KIND] = 3
        _ev_push(K, et, ep, eid, ek, ew, ev, t, EV_GRANT, w, val)
    else:
        _ev_push(K, et, ep, eid, ek, ew, ev, t, EV_XGRANT, w, val)


@njit(cache=True)
def _wake(K, IV, FV, LF, LI, wq_who, wq_since, now, et, ep, eid, ek, ew, ev):
    # every waiter asks for the lock's one mode (the kernel runs only faults)
    while LI[LI_WQ_N]:
        if LI[LI_WRITE_MODE]:
            if LI[LI_WRITER] or LI[LI_READERS]:
                return
        elif LI[LI_WRITER]:
            return
        w, since = _wq_pop(LI, wq_who, wq_since)
        _admit(LF, LI, IV, FV, w, since, now)
        _grant_event(K, IV, w, now + 0.0, LF[L_HANDOFF], et, ep, eid, ek, ew, ev)
        if LI[LI_WRITE_MODE]:
            return


@njit(cache=True)
def _acquire(K, IV, FV, LF, LI, pt, ps, pk, wq_who, wq_since, tok, now, et, ep, eid, ek, ew, ev):
    """MmuLock.acquire: True when granted at once, else the vCPU is queued."""
    if LI[LI_PEND_N]:
        _catch_up(LF, LI, IV, FV, pt, ps, pk, now)
    _advance(LF, LI, now)
    if LI[LI_WRITE_MODE]:
        can = not LI[LI_WRITER] and LI[LI_READERS] == 0
    else:
        can = not LI[LI_WRITER] and not LI[LI_WQ_N]
    if can and not LI[LI_WQ_N]:
        _grant(LI, IV, FV, tok, now)
        return True
    j = (LI[LI_WQ_HEAD] + LI[LI_WQ_N]) % len(wq_who)
    wq_who[j] = tok
    wq_since[j] = now
    LI[LI_WQ_N] += 1
    LI[LI_CONT] += 1
    if LI[LI_PEND_N]:
        _arm_timer(K, LF, pt, now, et, ep, eid, ek, ew, ev)
    return False


@njit(cache=True)
def _release(K, IV, FV, LF, LI, pt, ps, pk, wq_who, wq_since, tok, now, et, ep, eid, ek, ew, ev):
    if LI[LI_PEND_N]:
        _catch_up(LF, LI, IV, FV, pt, ps, pk, now)
    _advance(LF, LI, now)
    _drop(LF, LI, IV, FV, tok, now)
    _wake(K, IV, FV, LF, LI, wq_who, wq_since, now, et, ep, eid, ek, ew, ev)


@njit(cache=True)
def _release_after(K, IV, FV, LF, LI, pt, ps, pk, wq_who, wq_since, tok, delay, now, et, ep, eid, ek, ew, ev):
    if LI[LI_PEND_N]:
        _catch_up(LF, LI, IV, FV, pt, ps, pk, now)
    if not LI[LI_WQ_N]:
        LI[LI_SEQ] += 1
        _pend_push(LI, pt, ps, pk, now + delay, LI[LI_SEQ], tok)
        return
    if LI[LI_WRITE_MODE] and (LI[LI_WRITER] or LI[LI_READERS] == 1):
        _advance(LF, LI, now)
        _drop(LF, LI, IV, FV, tok, now + delay)
        w, since = _wq_pop(LI, wq_who, wq_since)
        LF[L_AREA_W] += delay
        _admit(LF, LI, IV, FV, w, since, now + delay)
        _grant_event(K, IV, w, now + delay, LF[L_HANDOFF], et, ep, eid, ek, ew, ev)
        return
    _ev_push(K, et, ep, eid, ek, ew, ev, now + delay, EV_RELCB, tok, 0.0)


@njit(cache=True)
def _timer_cb(K, IV, FV, LF, LI, pt, ps, pk, wq_who, wq_since, now, et, ep, eid, ek, ew, ev):
    LF[L_TIMER_AT] = -1.0
    _catch_up(LF, LI, IV, FV, pt, ps, pk, now)
    _advance(LF, LI, now)
    _wake(K, IV, FV, LF, LI, wq_who, wq_since, now, et, ep, eid, ek, ew, ev)
    if LI[LI_WQ_N] and LI[LI_PEND_N]:
        _arm_timer(K, LF, pt, now, et, ep, eid, ek, ew, ev)


# -- desim.hostmm.HostMm ----------------------------------------------------------------------------------
@njit(cache=True)
def _hold(HF, HI, free, waitc, holds, cont, t, h):
    """FifoServer.hold on the zone lock (free=H_ZONE_FREE...) or the LRU lock."""
    fa = HF[free]
    start = t if t >= fa else fa
    HF[free] = start + h
    HI[holds] += 1
    wait = start - t
    if wait > 0:
        HI[cont] += 1
        HF[waitc] += wait
    return wait


@njit(cache=True)
def _first_touch(IV, HF, HI, z, i, t):
    """HostMm.first_touch(cpu, t, 1)."""
    extra = 0.0
    left = IV[i, I_PCP]
    if left == 0:
        extra += _hold(HF, HI, H_ZONE_FREE, H_ZONE_WAIT, HI_ZONE_HOLDS, HI_ZONE_CONT, t, PCP_BATCH * HF[H_ZONE_PAGE])
        left = PCP_BATCH
    IV[i, I_PCP] = left - 1
    n = IV[i, I_LRU] + 1
    if n >= HI[HI_LRU_BATCH]:
        extra += _hold(HF, HI, H_LRU_FREE, H_LRU_WAIT, HI_LRU_HOLDS, HI_LRU_CONT, t + extra,
                       HI[HI_LRU_BATCH] * HF[H_LRU_PAGE])
        n = 0
    IV[i, I_LRU] = n
    # HostMm._zero(t + extra, 1)
    tz = t + extra
    while HI[HI_ZN] and z[0] <= tz:
        _z_pop(HI, z)
    k = HI[HI_ZN] + 1
    base = 1 * HF[H_CLEAR]
    alt = k * 1 * HF[H_MEMBW]
    took = base if base >= alt else alt
    _z_push(HI, z, tz + took)
    HF[H_STRETCH] += took - base
    extra += took - base
    return extra


# -- the planned steps (desim.cohort.Cohort._begin_planned ...) ------------------------------------------------
@njit(cache=True)
def _draw(CUR, D, DOFF, i, c):
    v = D[c, DOFF[i] + CUR[i, c]]
    CUR[i, c] += 1
    return v


@njit(cache=True)
def _begin(K, IV, FV, CUR, D, DOFF, fpos, gfn, res, stall_out, i, now):
    """Cohort._begin_planned: returns the delay of the guest run's event."""
    o = IV[i, I_OFF]
    k = IV[i, I_K]
    miss = fpos[o + k]
    n = miss - IV[i, I_POS]
    pre = _draw(CUR, D, DOFF, i, C_FAULT_HANDLE) + (_draw(CUR, D, DOFF, i, C_FAULTIN_RESIDENT) if res[o + k]
                                                    else _draw(CUR, D, DOFF, i, C_HOST_ALLOC))
    carry = FV[i, F_CARRY]
    FV[i, F_CARRY] = 0.0
    g0 = now + carry
    if IV[i, I_ENTRY_SET]:
        entry = FV[i, F_ENTRY]
    else:
        entry = _draw(CUR, D, DOFF, i, C_VM_ENTRY)
    IV[i, I_ENTRY_SET] = 0
    a = FV[i, F_A]
    g1 = g0 + entry + n * a
    if IV[i, I_STALLED_SET] and n > 0:
        j = K[K_NSTALL]
        K[K_NSTALL] = j + 1
        stall_out[0, j] = FV[i, F_STALLED]
        stall_out[1, j] = g0 + entry + a - FV[i, F_STALLED]
        stall_out[2, j] = a
        FV[i, F_RECUNTIL] = g0 + entry + a
        IV[i, I_STALLED_SET] = 0
    exit_ns = _draw(CUR, D, DOFF, i, C_VM_EXIT) + pre
    FV[i, F_RNOW], FV[i, F_RCARRY], FV[i, F_RG0], FV[i, F_RENTRY], FV[i, F_RG1], FV[i, F_REXIT] = \
        now, carry, g0, entry, g1, exit_ns
    IV[i, I_RUN_N], IV[i, I_RUN_MISS], IV[i, I_RUN_GFN] = n, miss, gfn[o + k]
    IV[i, I_K] = k + 1
    IV[i, I_STEP] = 1
    IV[i, I_KIND] = 0
    return g1 - now + exit_ns


@njit(cache=True)
def _locked(K, IV, FV, CUR, D, DOFF, LF, LI, pt, ps, pk, wq_who, wq_since, ever, fk_ptr, fk_id, there,
            linked, lat_out, i, now, handoff, et, ep, eid, ek, ew, ev):
    """Cohort._locked_planned (the fault under mmu_lock; the caller begins the next run)."""
    o = IV[i, I_OFF]
    k = IV[i, I_LOCKED]
    allocated = 0
    fo = IV[i, I_FKOFF]
    for q in range(fk_ptr[fo + k], fk_ptr[fo + k + 1]):
        key = fk_id[q]
        if there[key]:
            K[K_SHARED] += 1
        else:
            there[key] = 1
            linked[K[K_NLINK]] = key
            K[K_NLINK] += 1
            allocated += 1
    K[K_SPTES] += 1
    K[K_PTPAGES] += allocated
    hold = _draw(CUR, D, DOFF, i, C_SPTE_INSTALL) + allocated * LF[L_PT_ALLOC] + 0 * LF[L_PREFETCH]
    hold += handoff
    if hold:
        _release_after(K, IV, FV, LF, LI, pt, ps, pk, wq_who, wq_since, i, hold, now, et, ep, eid, ek, ew, ev)
        FV[i, F_CARRY] = hold
        FV[i, F_STALL] += hold
    else:
        _release(K, IV, FV, LF, LI, pt, ps, pk, wq_who, wq_since, i, now, et, ep, eid, ek, ew, ev)
    entry = _draw(CUR, D, DOFF, i, C_VM_ENTRY)
    FV[i, F_ENTRY] = entry
    IV[i, I_ENTRY_SET] = 1
    start = FV[i, F_RG1]
    ev_ = ever[o + k]
    if ev_:
        IV[i, I_AZ] += 1
    else:
        IV[i, I_FT] += 1
    j = K[K_NLAT]
    K[K_NLAT] = j + 1
    lat_out[0, j] = now + hold + entry - start
    lat_out[1, j] = start
    lat_out[2, j] = 1.0 if ev_ else 0.0
    IV[i, I_LOCKED] = k + 1
    IV[i, I_STEP] = 0
    K[K_PLANNED] += 1


@njit(cache=True)
def _acquire_planned(K, IV, FV, CUR, D, DOFF, LF, LI, pt, ps, pk, wq_who, wq_since, ever, fk_ptr, fk_id, there,
                     linked, lat_out, fpos, gfn, res, stall_out, i, now, et, ep, eid, ek, ew, ev):
    if _acquire(K, IV, FV, LF, LI, pt, ps, pk, wq_who, wq_since, i, now, et, ep, eid, ek, ew, ev):
        _locked(K, IV, FV, CUR, D, DOFF, LF, LI, pt, ps, pk, wq_who, wq_since, ever, fk_ptr, fk_id, there,
                linked, lat_out, i, now, 0.0, et, ep, eid, ek, ew, ev)
        d = _begin(K, IV, FV, CUR, D, DOFF, fpos, gfn, res, stall_out, i, now)
        _ev_push(K, et, ep, eid, ek, ew, ev, now + d, EV_RUN, i, 0.0)
    else:
        IV[i, I_KIND] = 2
        FV[i, F_T0] = now


@njit(cache=True)
def run(K, IV, FV, CUR, D, DOFF, VMM, LF, LI, pt, ps, pk, wq_who, wq_since, HF, HI, z,
        fpos, gfn, res, ever, fk_ptr, fk_id, there, linked, lat_out, stall_out,
        et, ep, eid, ek, ew, ev, ft, fp, fe, room):
    """Take the steps at the head of the queue while they are the kernel's (see the module docstring).
    ``(ft, fp, fe)``: the key of the first foreign event (``ft = inf``: none); ``room``: the heap's capacity."""
    while True:
        if K[K_EN] == 0:
            K[K_STOP] = STOP_EMPTY
            return
        if K[K_EN] + 8 > room or LI[LI_PEND_N] + 4 > len(pt) or HI[HI_ZN] + 4 > len(z):
            K[K_STOP] = STOP_FULL
            return
        t, kind, i = et[0], ek[0], ew[0]
        if _less(ft, fp, fe, t, ep[0], eid[0]):
            K[K_STOP] = STOP_FOREIGN
            return
        if kind == EV_XGRANT:
            K[K_STOP] = STOP_XGRANT
            return
        if kind == EV_TIMER:
            _ev_pop(K, et, ep, eid, ek, ew, ev)
            _timer_cb(K, IV, FV, LF, LI, pt, ps, pk, wq_who, wq_since, t, et, ep, eid, ek, ew, ev)
            continue
        if kind == EV_RELCB:
            _ev_pop(K, et, ep, eid, ek, ew, ev)
            _release(K, IV, FV, LF, LI, pt, ps, pk, wq_who, wq_since, i, t, et, ep, eid, ek, ew, ev)
            continue
        if IV[i, I_K] >= IV[i, I_NF]:
            K[K_STOP] = STOP_PLAN  # the next guest run needs a new plan: the Python code's step
            return
        val = ev[0]
        _ev_pop(K, et, ep, eid, ek, ew, ev)
        K[K_STEPS] += 1
        if kind == EV_RUN:
            # Cohort._end_planned
            FV[i, F_THOST] += FV[i, F_RCARRY] + FV[i, F_REXIT]
            FV[i, F_TGUEST] += FV[i, F_RG1] - FV[i, F_RG0]
            n = IV[i, I_RUN_N]
            IV[i, I_POS] += n
            IV[i, I_ACC] += n
            IV[i, I_HITS] += n
            if IV[i, I_FIRST_END] < 0:
                IV[i, I_FIRST_END] = K[K_STEPS]
            if not IV[i, I_STALLED_SET]:
                IV[i, I_STALLED_SET] = 1
                FV[i, F_STALLED] = FV[i, F_RG1]
            FV[i, F_STALL] += FV[i, F_REXIT]
            IV[i, I_STEP] = 2
            o = IV[i, I_OFF]
            if not res[o + IV[i, I_LOCKED]]:
                K[K_HOSTALLOC] += 1
                t_alloc = t - VMM[K[K_VMM]]
                K[K_VMM] += 1
                extra = _first_touch(IV, HF, HI, z, i, t_alloc)
                if extra > 0:
                    IV[i, I_KIND] = 1
                    FV[i, F_T0] = t
                    _ev_push(K, et, ep, eid, ek, ew, ev, t + extra, EV_HOST, i, 0.0)
                    continue
            _acquire_planned(K, IV, FV, CUR, D, DOFF, LF, LI, pt, ps, pk, wq_who, wq_since, ever, fk_ptr, fk_id,
                             there, linked, lat_out, fpos, gfn, res, stall_out, i, t, et, ep, eid, ek, ew, ev)
        else:
            w = t - FV[i, F_T0]
            FV[i, F_STALL] += w
            FV[i, F_THOST] += t - FV[i, F_T0]
            if kind == EV_HOST:
                _acquire_planned(K, IV, FV, CUR, D, DOFF, LF, LI, pt, ps, pk, wq_who, wq_since, ever, fk_ptr,
                                 fk_id, there, linked, lat_out, fpos, gfn, res, stall_out, i, t, et, ep, eid, ek,
                                 ew, ev)
            else:
                _locked(K, IV, FV, CUR, D, DOFF, LF, LI, pt, ps, pk, wq_who, wq_since, ever, fk_ptr, fk_id, there,
                        linked, lat_out, i, t, val, et, ep, eid, ek, ew, ev)
                d = _begin(K, IV, FV, CUR, D, DOFF, fpos, gfn, res, stall_out, i, t)
                _ev_push(K, et, ep, eid, ek, ew, ev, t + d, EV_RUN, i, 0.0)
