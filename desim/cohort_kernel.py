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
  none is; the legacy MMU's ``direct_pte_prefetch`` of the neighbours the plan found for the fault,
  charged ``prefetch_spte`` each), the fault's and the access stall's records.

:func:`run` takes the steps at the head of the queue for as long as they are its own and each vCPU
has a planned fault to begin next; it stops before anything else (a foreign event's key is passed in,
a granted waiter that is not planned, a plan at its last fault, a full buffer) and
:mod:`desim.cohort_bridge` hands the state back to the Python objects.
"""
from __future__ import annotations

from numba import njit

# event kinds in the kernel's heap
EV_RUN, EV_HOST, EV_GRANT, EV_XGRANT, EV_TIMER, EV_RELCB = 0, 1, 2, 3, 4, 5
NORMAL = 1  # simpy.events.NORMAL
PCP_BATCH = 63  # desim.hostmm.PCP_BATCH

# IV columns (int64 per vCPU)
I_PLANNED, I_POS, I_ENTRY_SET, I_STALLED_SET, I_KIND, I_K, I_LOCKED, I_NF, I_ACC, I_FT, I_AZ, I_OFF, \
    I_RUN_N, I_RUN_MISS, I_RUN_GFN, I_FIRST_END, I_HITS, I_CPU, I_PCP, I_LRU, I_STEP, I_FKOFF, I_HOLDING, \
    I_DOFF = range(24)
N_IV = 24
# kinds (I_KIND): 0 run, 1 host wait, 2 lock wait (queued), 3 lock granted (event scheduled)
# FV columns (float64 per vCPU)
F_CARRY, F_ENTRY, F_STALLED, F_RECUNTIL, F_A, F_THOST, F_TGUEST, F_STALL, F_T0, F_RNOW, F_RCARRY, \
    F_RG0, F_RENTRY, F_RG1, F_REXIT, F_HOLDSINCE = range(16)
N_FV = 16
# costs (rows of the draws array D; CUR: per vCPU, how many of each were consumed; DS: 1 where the cost is
# drawn, 0 where it is a constant, whose value is D's first entry of the vCPU)
C_FAULT_HANDLE, C_FAULTIN_RESIDENT, C_HOST_ALLOC, C_VM_ENTRY, C_VM_EXIT, C_SPTE_INSTALL = range(6)
COST_NAMES = ("fault_handle", "faultin_resident", "host_alloc_4k", "vm_entry", "vm_exit", "spte_install")
# S: the scalar floats (mmu_lock, host allocator, the foreign head's time)
L_LAST, L_AREA_H, L_AREA_W, L_WAIT, L_HOLD, L_MAXWAIT, L_TIMER_AT, L_HANDOFF, L_PT_ALLOC, L_PREFETCH, \
    H_ZONE_FREE, H_ZONE_WAIT, H_LRU_FREE, H_LRU_WAIT, H_STRETCH, H_ZONE_PAGE, H_LRU_PAGE, H_CLEAR, H_MEMBW, \
    S_FT = range(20)
N_S = 20
# SI: the scalar ints
LI_READERS, LI_WRITER, LI_ACQ, LI_CONT, LI_SEQ, LI_WRITE_MODE, LI_WQ_HEAD, LI_WQ_N, LI_PEND_N, \
    HI_ZONE_HOLDS, HI_ZONE_CONT, HI_LRU_HOLDS, HI_LRU_CONT, HI_LRU_BATCH, HI_ZN, \
    K_STEPS, K_PLANNED, K_SPTES, K_PTPAGES, K_SHARED, K_HOSTALLOC, K_NLAT, K_NSTALL, K_NLINK, K_NEXT_ID, \
    K_EN, K_VMM, K_STOP, S_FP, S_FE, K_PREFETCHED = range(31)
N_SI = 31
# why the kernel stopped (K_STOP)
STOP_FOREIGN, STOP_EMPTY, STOP_PLAN, STOP_XGRANT, STOP_FULL = 0, 1, 2, 3, 4
# the event heap: E[:, 0] time, E[:, 1] value; EI[:, 0] priority, 1 id, 2 kind, 3 vCPU
# OUT rows: fault latency, start, refault; access stall start, latency, access_ns
O_LAT, O_START, O_REFAULT, O_SSTART, O_SLAT, O_SA = range(6)


@njit(cache=True, _nrt=False)
def _less(t1, p1, e1, t2, p2, e2):
    if t1 != t2:
        return t1 < t2
    if p1 != p2:
        return p1 < p2
    return e1 < e2


@njit(cache=True, _nrt=False)
def _ev_set(E, EI, j, t, val, prio, ident, kind, who):
    """Heap slot ``j`` := the event (t, prio, ident) of ``kind`` for vCPU ``who``, carrying ``val``."""
    E[j, 0], E[j, 1] = t, val
    EI[j, 0], EI[j, 1], EI[j, 2], EI[j, 3] = prio, ident, kind, who


@njit(cache=True, _nrt=False)
def _ev_move(E, EI, dst, src):
    """Heap slot ``dst`` := slot ``src`` (a sift step)."""
    _ev_set(E, EI, dst, E[src, 0], E[src, 1], EI[src, 0], EI[src, 1], EI[src, 2], EI[src, 3])


@njit(cache=True, _nrt=False)
def _ev_push(SI, E, EI, t, kind, who, val):
    """heapq.heappush of (t, NORMAL, next id) (SimPy's Environment.schedule)."""
    ident = SI[K_NEXT_ID]
    SI[K_NEXT_ID] = ident + 1
    j = SI[K_EN]
    SI[K_EN] = j + 1
    while j > 0:
        parent = (j - 1) >> 1
        if _less(t, NORMAL, ident, E[parent, 0], EI[parent, 0], EI[parent, 1]):
            _ev_move(E, EI, j, parent)
            j = parent
        else:
            break
    _ev_set(E, EI, j, t, val, NORMAL, ident, kind, who)


@njit(cache=True, _nrt=False)
def _ev_pop(SI, E, EI):
    n = SI[K_EN] - 1
    SI[K_EN] = n
    if n == 0:
        return
    t, v = E[n, 0], E[n, 1]
    p, i, k, w = EI[n, 0], EI[n, 1], EI[n, 2], EI[n, 3]
    j = 0
    while True:
        c = 2 * j + 1
        if c >= n:
            break
        if c + 1 < n and _less(E[c + 1, 0], EI[c + 1, 0], EI[c + 1, 1], E[c, 0], EI[c, 0], EI[c, 1]):
            c += 1
        if _less(E[c, 0], EI[c, 0], EI[c, 1], t, p, i):
            _ev_move(E, EI, j, c)
            j = c
        else:
            break
    _ev_set(E, EI, j, t, v, p, i, k, w)


@njit(cache=True, _nrt=False)
def _pend_push(SI, P, PI, t, seq, tok):
    j = SI[LI_PEND_N]
    SI[LI_PEND_N] = j + 1
    while j > 0:
        parent = (j - 1) >> 1
        if t < P[parent] or (t == P[parent] and seq < PI[parent, 0]):
            P[j], PI[j, 0], PI[j, 1] = P[parent], PI[parent, 0], PI[parent, 1]
            j = parent
        else:
            break
    P[j], PI[j, 0], PI[j, 1] = t, seq, tok


@njit(cache=True, _nrt=False)
def _pend_pop(SI, P, PI):
    n = SI[LI_PEND_N] - 1
    SI[LI_PEND_N] = n
    if n == 0:
        return
    t, s, k = P[n], PI[n, 0], PI[n, 1]
    j = 0
    while True:
        c = 2 * j + 1
        if c >= n:
            break
        if c + 1 < n and (P[c + 1] < P[c] or (P[c + 1] == P[c] and PI[c + 1, 0] < PI[c, 0])):
            c += 1
        if P[c] < t or (P[c] == t and PI[c, 0] < s):
            P[j], PI[j, 0], PI[j, 1] = P[c], PI[c, 0], PI[c, 1]
            j = c
        else:
            break
    P[j], PI[j, 0], PI[j, 1] = t, s, k


# -- desim.lock.MmuLock (kvm->mmu_lock) -------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _advance(S, SI, now):
    """MmuLock._advance: the integrals of holders and waiters."""
    dt = now - S[L_LAST]
    if dt:
        S[L_AREA_H] += dt * (SI[LI_READERS] + (1 if SI[LI_WRITER] else 0))
        S[L_AREA_W] += dt * SI[LI_WQ_N]
        S[L_LAST] = now


@njit(cache=True, _nrt=False)
def _drop(S, SI, IV, FV, tok, at):
    """MmuLock._drop (every holder's role is ``fault``)."""
    S[L_HOLD] += at - FV[tok, F_HOLDSINCE]
    IV[tok, I_HOLDING] = 0
    if SI[LI_WRITER]:
        SI[LI_WRITER] = 0
    else:
        SI[LI_READERS] -= 1


@njit(cache=True, _nrt=False)
def _catch_up(S, SI, IV, FV, P, PI, now):
    """MmuLock._catch_up: the deferred releases that are due, in time order."""
    while SI[LI_PEND_N] and P[0] <= now:
        t, tok = P[0], PI[0, 1]
        _pend_pop(SI, P, PI)
        _advance(S, SI, t)
        _drop(S, SI, IV, FV, tok, t)


@njit(cache=True, _nrt=False)
def _grant(S, SI, IV, FV, tok, since, at, queued):
    """MmuLock._grant, after MmuLock._admit's wait statistics for a queued waiter (``queued``)."""
    if queued:
        wait = at - since
        S[L_WAIT] += wait
        if wait > S[L_MAXWAIT]:
            S[L_MAXWAIT] = wait
    if SI[LI_WRITE_MODE]:
        SI[LI_WRITER] = 1
    else:
        SI[LI_READERS] += 1
    FV[tok, F_HOLDSINCE] = at
    IV[tok, I_HOLDING] = 1
    SI[LI_ACQ] += 1


@njit(cache=True, _nrt=False)
def _arm_timer(S, SI, P, E, EI, now):
    """MmuLock._arm_timer: a timeout at the first deferred release."""
    t = P[0]
    if S[L_TIMER_AT] >= now and S[L_TIMER_AT] <= t:
        return
    S[L_TIMER_AT] = t
    _ev_push(SI, E, EI, now + (t - now), EV_TIMER, -1, 0.0)


@njit(cache=True, _nrt=False)
def _handover(S, SI, IV, FV, W, WS, E, EI, at, delay, direct):
    """The queue's head is admitted at ``at`` (``delay`` after now) and its event succeeds then, with the
    hand-off cost: a planned vCPU's step, or a vCPU the kernel does not run (it stops there)."""
    h = SI[LI_WQ_HEAD]
    w, since = W[h], WS[h]
    SI[LI_WQ_HEAD] = (h + 1) % len(W)
    SI[LI_WQ_N] -= 1
    if direct:
        S[L_AREA_W] += delay  # MmuLock.release_after's direct hand-over to a queued writer
    _grant(S, SI, IV, FV, w, since, at, True)
    if IV[w, I_PLANNED]:
        IV[w, I_KIND] = 3
        _ev_push(SI, E, EI, at, EV_GRANT, w, S[L_HANDOFF])
    else:
        _ev_push(SI, E, EI, at, EV_XGRANT, w, S[L_HANDOFF])


@njit(cache=True, _nrt=False)
def _wake(S, SI, IV, FV, W, WS, E, EI, now):
    """MmuLock._wake (every waiter asks for the lock's one mode: the kernel runs faults only)."""
    while SI[LI_WQ_N]:
        if SI[LI_WRITE_MODE]:
            if SI[LI_WRITER] or SI[LI_READERS]:
                return
        elif SI[LI_WRITER]:
            return
        _handover(S, SI, IV, FV, W, WS, E, EI, now + 0.0, 0.0, False)
        if SI[LI_WRITE_MODE]:
            return


@njit(cache=True, _nrt=False)
def _acquire(S, SI, IV, FV, P, PI, W, WS, E, EI, tok, now):
    """MmuLock.acquire: True when granted at once, else ``tok`` is queued (FIFO)."""
    if SI[LI_PEND_N]:
        _catch_up(S, SI, IV, FV, P, PI, now)
    _advance(S, SI, now)
    if SI[LI_WRITE_MODE]:
        can = not SI[LI_WRITER] and SI[LI_READERS] == 0
    else:
        can = not SI[LI_WRITER] and not SI[LI_WQ_N]
    if can and not SI[LI_WQ_N]:
        _grant(S, SI, IV, FV, tok, now, now, False)
        return True
    j = (SI[LI_WQ_HEAD] + SI[LI_WQ_N]) % len(W)
    W[j] = tok
    WS[j] = now
    SI[LI_WQ_N] += 1
    SI[LI_CONT] += 1
    if SI[LI_PEND_N]:
        _arm_timer(S, SI, P, E, EI, now)
    return False


@njit(cache=True, _nrt=False)
def _release(S, SI, IV, FV, P, PI, W, WS, E, EI, tok, now):
    """MmuLock.release."""
    if SI[LI_PEND_N]:
        _catch_up(S, SI, IV, FV, P, PI, now)
    _advance(S, SI, now)
    _drop(S, SI, IV, FV, tok, now)
    _wake(S, SI, IV, FV, W, WS, E, EI, now)


@njit(cache=True, _nrt=False)
def _release_after(S, SI, IV, FV, P, PI, W, WS, E, EI, tok, delay, now):
    """MmuLock.release_after: deferred, a direct hand-over to a queued writer, or a timed release."""
    if SI[LI_PEND_N]:
        _catch_up(S, SI, IV, FV, P, PI, now)
    if not SI[LI_WQ_N]:
        SI[LI_SEQ] += 1
        _pend_push(SI, P, PI, now + delay, SI[LI_SEQ], tok)
        return
    if SI[LI_WRITE_MODE] and (SI[LI_WRITER] or SI[LI_READERS] == 1):
        _advance(S, SI, now)
        _drop(S, SI, IV, FV, tok, now + delay)
        _handover(S, SI, IV, FV, W, WS, E, EI, now + delay, delay, True)
        return
    _ev_push(SI, E, EI, now + delay, EV_RELCB, tok, 0.0)


@njit(cache=True, _nrt=False)
def _timer_cb(S, SI, IV, FV, P, PI, W, WS, E, EI, now):
    """MmuLock._timer_cb."""
    S[L_TIMER_AT] = -1.0
    _catch_up(S, SI, IV, FV, P, PI, now)
    _advance(S, SI, now)
    _wake(S, SI, IV, FV, W, WS, E, EI, now)
    if SI[LI_WQ_N] and SI[LI_PEND_N]:
        _arm_timer(S, SI, P, E, EI, now)


# -- desim.hostmm.HostMm (zone->lock, lru_lock, clear_page) ---------------------------------------------------
@njit(cache=True, _nrt=False)
def _first_touch(S, SI, IV, Z, i, t):
    """HostMm.first_touch(cpu, t, 1): the FifoServer holds of zone->lock and lru_lock, then _zero."""
    extra = 0.0
    left = IV[i, I_PCP]
    if left == 0:
        h = PCP_BATCH * S[H_ZONE_PAGE]
        fa = S[H_ZONE_FREE]
        start = fa if fa > t else t
        S[H_ZONE_FREE] = start + h
        SI[HI_ZONE_HOLDS] += 1
        wait = start - t
        if wait > 0:
            SI[HI_ZONE_CONT] += 1
            S[H_ZONE_WAIT] += wait
        extra += wait
        left = PCP_BATCH
    IV[i, I_PCP] = left - 1
    n = IV[i, I_LRU] + 1
    if n >= SI[HI_LRU_BATCH]:
        tl = t + extra
        h = SI[HI_LRU_BATCH] * S[H_LRU_PAGE]
        fa = S[H_LRU_FREE]
        start = fa if fa > tl else tl
        S[H_LRU_FREE] = start + h
        SI[HI_LRU_HOLDS] += 1
        wait = start - tl
        if wait > 0:
            SI[HI_LRU_CONT] += 1
            S[H_LRU_WAIT] += wait
        extra += wait
        n = 0
    IV[i, I_LRU] = n
    # HostMm._zero(t + extra, 1): the zeroings in flight are a heap of end times
    tz = t + extra
    while SI[HI_ZN] and Z[0] <= tz:
        m = SI[HI_ZN] - 1
        SI[HI_ZN] = m
        if m:
            v = Z[m]
            j = 0
            while True:
                c = 2 * j + 1
                if c >= m:
                    break
                if c + 1 < m and Z[c + 1] < Z[c]:
                    c += 1
                if Z[c] < v:
                    Z[j] = Z[c]
                    j = c
                else:
                    break
            Z[j] = v
    k = SI[HI_ZN] + 1
    base = 1 * S[H_CLEAR]
    alt = k * 1 * S[H_MEMBW]
    took = alt if alt > base else base
    v = tz + took
    j = SI[HI_ZN]
    SI[HI_ZN] = j + 1
    while j > 0:
        parent = (j - 1) >> 1
        if v < Z[parent]:
            Z[j] = Z[parent]
            j = parent
        else:
            break
    Z[j] = v
    S[H_STRETCH] += took - base
    extra += took - base
    return extra


# -- the planned steps (desim.cohort.Cohort._begin_planned ...) ------------------------------------------------
@njit(cache=True, _nrt=False)
def _begin(SI, IV, FV, CUR, DS, D, PL, OUT, i, now):
    """Cohort._begin_planned (Vcpu._begin_run): returns the delay of the guest run's event."""
    o = IV[i, I_OFF]
    k = IV[i, I_K]
    d0 = IV[i, I_DOFF]
    miss = PL[0, o + k]
    n = miss - IV[i, I_POS]
    faults = PL[1, o + k] >= 0  # else a chunk end: the rest of the chunk, without an exit
    pre = 0.0
    if faults:
        pre = D[C_FAULT_HANDLE, d0 + CUR[i, C_FAULT_HANDLE]]
        CUR[i, C_FAULT_HANDLE] += DS[i, C_FAULT_HANDLE]
        if PL[2, o + k]:
            pre = pre + D[C_FAULTIN_RESIDENT, d0 + CUR[i, C_FAULTIN_RESIDENT]]
            CUR[i, C_FAULTIN_RESIDENT] += DS[i, C_FAULTIN_RESIDENT]
        else:
            pre = pre + D[C_HOST_ALLOC, d0 + CUR[i, C_HOST_ALLOC]]
            CUR[i, C_HOST_ALLOC] += DS[i, C_HOST_ALLOC]
    carry = FV[i, F_CARRY]
    FV[i, F_CARRY] = 0.0
    g0 = now + carry
    if IV[i, I_ENTRY_SET]:
        entry = FV[i, F_ENTRY]
    else:
        entry = D[C_VM_ENTRY, d0 + CUR[i, C_VM_ENTRY]]
        CUR[i, C_VM_ENTRY] += DS[i, C_VM_ENTRY]
    IV[i, I_ENTRY_SET] = 0
    a = FV[i, F_A]
    g1 = g0 + entry + n * a
    if IV[i, I_STALLED_SET] and n > 0:
        j = SI[K_NSTALL]
        SI[K_NSTALL] = j + 1
        OUT[O_SSTART, j] = FV[i, F_STALLED]
        OUT[O_SLAT, j] = g0 + entry + a - FV[i, F_STALLED]
        OUT[O_SA, j] = a
        FV[i, F_RECUNTIL] = g0 + entry + a
        IV[i, I_STALLED_SET] = 0
    exit_ns = 0.0
    if faults:
        exit_ns = D[C_VM_EXIT, d0 + CUR[i, C_VM_EXIT]] + pre
        CUR[i, C_VM_EXIT] += DS[i, C_VM_EXIT]
    FV[i, F_RNOW], FV[i, F_RCARRY], FV[i, F_RG0], FV[i, F_RENTRY], FV[i, F_RG1], FV[i, F_REXIT] = \
        now, carry, g0, entry, g1, exit_ns
    IV[i, I_RUN_N], IV[i, I_RUN_MISS], IV[i, I_RUN_GFN] = n, miss, PL[1, o + k]
    IV[i, I_K] = k + 1
    IV[i, I_STEP] = 1
    IV[i, I_KIND] = 0
    return g1 - now + exit_ns


@njit(cache=True, _nrt=False)
def _locked(S, SI, IV, FV, CUR, DS, D, PL, FK, THERE, LINKED, OUT, P, PI, W, WS, E, EI, i, now, handoff):
    """Cohort._locked_planned (Vcpu._fault_locked on a planned fault), then the next guest run begins."""
    o = IV[i, I_OFF]
    k = IV[i, I_LOCKED]
    allocated = 0
    fo = IV[i, I_FKOFF]
    # the page-table pages this fault links unless another fault linked them first (FK: offsets, then ids)
    for q in range(FK[fo + k], FK[fo + k + 1]):
        key = FK[q]
        if THERE[key]:
            SI[K_SHARED] += 1
        else:
            THERE[key] = 1
            LINKED[SI[K_NLINK]] = key
            SI[K_NLINK] += 1
            allocated += 1
    # direct_pte_prefetch: the neighbours the fault maps (PL row 4; their SPTEs are committed by Cohort._commit)
    prefetched = PL[4, o + k]
    SI[K_PREFETCHED] += prefetched
    SI[K_SPTES] += 1 + prefetched
    SI[K_PTPAGES] += allocated
    d0 = IV[i, I_DOFF]
    hold = D[C_SPTE_INSTALL, d0 + CUR[i, C_SPTE_INSTALL]] + allocated * S[L_PT_ALLOC] + prefetched * S[L_PREFETCH]
    CUR[i, C_SPTE_INSTALL] += DS[i, C_SPTE_INSTALL]
    hold += handoff
    if hold:
        _release_after(S, SI, IV, FV, P, PI, W, WS, E, EI, i, hold, now)
        FV[i, F_CARRY] = hold
        FV[i, F_STALL] += hold
    else:
        _release(S, SI, IV, FV, P, PI, W, WS, E, EI, i, now)
    entry = D[C_VM_ENTRY, d0 + CUR[i, C_VM_ENTRY]]
    CUR[i, C_VM_ENTRY] += DS[i, C_VM_ENTRY]
    FV[i, F_ENTRY] = entry
    IV[i, I_ENTRY_SET] = 1
    start = FV[i, F_RG1]
    ever = PL[3, o + k]
    if ever:
        IV[i, I_AZ] += 1
    else:
        IV[i, I_FT] += 1
    j = SI[K_NLAT]
    SI[K_NLAT] = j + 1
    OUT[O_LAT, j] = now + hold + entry - start
    OUT[O_START, j] = start
    OUT[O_REFAULT, j] = 1.0 if ever else 0.0
    IV[i, I_LOCKED] = k + 1
    IV[i, I_STEP] = 0
    SI[K_PLANNED] += 1
    d = _begin(SI, IV, FV, CUR, DS, D, PL, OUT, i, now)
    _ev_push(SI, E, EI, now + d, EV_RUN, i, 0.0)


@njit(cache=True, _nrt=False)
def run(S, SI, IV, FV, CUR, DS, D, VMM, PL, FK, THERE, LINKED, OUT, P, PI, W, WS, Z, E, EI):
    """Take the steps at the head of the queue while they are the kernel's (see the module docstring).
    ``S[S_FT], SI[S_FP], SI[S_FE]``: the key of the first foreign event (time ``inf``: none)."""
    ft, fp, fe = S[S_FT], SI[S_FP], SI[S_FE]
    room = len(E)
    while True:
        if SI[K_EN] == 0:
            SI[K_STOP] = STOP_EMPTY
            return
        if SI[K_EN] + 8 > room or SI[LI_PEND_N] + 4 > len(P) or SI[HI_ZN] + 4 > len(Z):
            SI[K_STOP] = STOP_FULL
            return
        t, kind, i = E[0, 0], EI[0, 2], EI[0, 3]
        if _less(ft, fp, fe, t, EI[0, 0], EI[0, 1]):
            SI[K_STOP] = STOP_FOREIGN
            return
        if kind == EV_XGRANT:
            SI[K_STOP] = STOP_XGRANT
            return
        if kind == EV_TIMER:
            _ev_pop(SI, E, EI)
            _timer_cb(S, SI, IV, FV, P, PI, W, WS, E, EI, t)
            continue
        if kind == EV_RELCB:
            _ev_pop(SI, E, EI)
            _release(S, SI, IV, FV, P, PI, W, WS, E, EI, i, t)
            continue
        if IV[i, I_K] >= IV[i, I_NF]:
            SI[K_STOP] = STOP_PLAN  # the next guest run needs a new plan: the Python code's step
            return
        val = E[0, 1]
        _ev_pop(SI, E, EI)
        SI[K_STEPS] += 1
        if kind == EV_RUN:
            # Cohort._end_planned
            FV[i, F_THOST] += FV[i, F_RCARRY] + FV[i, F_REXIT]
            FV[i, F_TGUEST] += FV[i, F_RG1] - FV[i, F_RG0]
            n = IV[i, I_RUN_N]
            IV[i, I_POS] += n
            IV[i, I_ACC] += n
            IV[i, I_HITS] += n
            if IV[i, I_FIRST_END] < 0:
                IV[i, I_FIRST_END] = SI[K_STEPS]
            if IV[i, I_RUN_GFN] < 0:
                # a chunk's end: the next chunk (the bridge moves the vCPU to it), then the next guest run
                IV[i, I_LOCKED] += 1
                IV[i, I_STEP] = 0
                d = _begin(SI, IV, FV, CUR, DS, D, PL, OUT, i, t)
                _ev_push(SI, E, EI, t + d, EV_RUN, i, 0.0)
                continue
            if not IV[i, I_STALLED_SET]:
                IV[i, I_STALLED_SET] = 1
                FV[i, F_STALLED] = FV[i, F_RG1]
            FV[i, F_STALL] += FV[i, F_REXIT]
            IV[i, I_STEP] = 2
            if not PL[2, IV[i, I_OFF] + IV[i, I_LOCKED]]:
                SI[K_HOSTALLOC] += 1
                t_alloc = t - VMM[SI[K_VMM]]
                SI[K_VMM] += 1
                extra = _first_touch(S, SI, IV, Z, i, t_alloc)
                if extra > 0:
                    IV[i, I_KIND] = 1
                    FV[i, F_T0] = t
                    _ev_push(SI, E, EI, t + extra, EV_HOST, i, 0.0)
                    continue
        else:
            FV[i, F_STALL] += t - FV[i, F_T0]
            FV[i, F_THOST] += t - FV[i, F_T0]
            if kind == EV_GRANT:
                _locked(S, SI, IV, FV, CUR, DS, D, PL, FK, THERE, LINKED, OUT, P, PI, W, WS, E, EI, i, t, val)
                continue
        # Cohort._acquire_planned
        if _acquire(S, SI, IV, FV, P, PI, W, WS, E, EI, i, t):
            _locked(S, SI, IV, FV, CUR, DS, D, PL, FK, THERE, LINKED, OUT, P, PI, W, WS, E, EI, i, t, 0.0)
        else:
            IV[i, I_KIND] = 2
            FV[i, F_T0] = t
