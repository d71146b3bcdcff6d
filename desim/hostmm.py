"""Host-side contention of first-touch faults: the page allocator, the LRU and memory bandwidth.

A first-touch fault allocates and zeroes a host page in ``kvm_faultin_pfn`` ->
``hva_to_pfn`` -> ``get_user_pages`` -> ``handle_mm_fault`` (mm/memory.c
``do_anonymous_page`` / ``do_huge_pmd_anonymous_page``). A profile's
``host_alloc_4k`` / ``host_alloc_2m`` is that path on an otherwise idle host;
with hundreds of vCPUs faulting at once, three resources they all share make
it slower (the per-VMA lock and split page-table locks are per VMA / per page
table and are not modelled):

* **zone->lock** (mm/page_alloc.c): each CPU allocates 4 KiB pages from its
  per-CPU list and refills it with ``rmqueue_bulk``, which takes the zone's
  spinlock once per ``pcp->batch`` pages (``zone_batchsize``: 63 on a zone of
  more than 1 GiB) and moves them one by one; order-9 THP pages come from the
  zone (or a short per-CPU THP list) with one ``zone->lock`` hold each.
  Modelled as a FIFO lock held ``batch x zone_lock_page`` per refill.
* **lru_lock** (mm/swap.c ``folio_add_lru`` -> ``folio_batch_move_lru``): new
  folios are queued per CPU and added to the LRU under the node's
  ``lruvec->lru_lock`` once the per-CPU batch is full (``PAGEVEC_SIZE`` 15;
  ``FOLIO_BATCH_SIZE`` 31 since 6.5). A FIFO lock held
  ``batch x lru_lock_page`` per drain; a THP is one folio.
* **memory bandwidth**: ``clear_page`` / ``folio_zero_user`` zero 4 KiB per
  page at one core's speed (``clear_page_4k``) until the zeroing cores together
  saturate the host's memory bandwidth (``membw_4k``: 4 KiB at the full
  bandwidth); then each zeroing slows to ``k x membw_4k`` per 4 KiB with ``k``
  zeroings in flight.

The *extra* time a fault pays (the queueing for the two locks and the
stretched zeroing) is added to the fault's host time before ``mmu_lock``; the
uncontended work is already in ``host_alloc_*``. Simplifications: each vCPU's
thread runs on its own host CPU (its own per-CPU lists); the locks are single
FIFO servers fed in the order faults reach them; the number of zeroings in
flight is taken when a zeroing starts and its rate is not revised as others
start or finish (no processor sharing); one NUMA node, one zone.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

PCP_BATCH = 63  # zone_batchsize() for zones above 1 GiB (mm/page_alloc.c)
# folio_batch size: PAGEVEC_SIZE 15, FOLIO_BATCH_SIZE 31 since 6.5 (include/linux/pagevec.h)
LRU_BATCH_OLD, LRU_BATCH_NEW, LRU_BATCH_SINCE = 15, 31, (6, 5)
_LAGS_MAX = 64  # first_touches_4k: at most this many earlier calls looked at per call (else cut there)


@dataclass
class FifoServer:
    """A spinlock as a FIFO single server: a hold requested at ``t`` starts when the lock is free."""

    free_at: float = 0.0
    holds: int = 0
    contended: int = 0
    wait_ns: float = 0.0

    def hold(self, t: float, hold_ns: float) -> float:
        """Queue a hold of ``hold_ns`` at time ``t``; returns the wait."""
        start = max(t, self.free_at)
        self.free_at = start + hold_ns
        self.holds += 1
        wait = start - t
        if wait > 0:
            self.contended += 1
            self.wait_ns += wait
        return wait


def _first_busy(t: np.ndarray, at: np.ndarray, free_at: float, hold_ns: float, m: int) -> int:
    """The first of the lock holds at calls ``at`` (indices into ``t``, in order, each held ``hold_ns``
    from its call's time; the lock free from ``free_at``) that would find the lock held: its index
    (the calls from there are not taken), else ``m``."""
    if len(at) == 0:
        return m
    ta = t[at]
    free = np.empty(len(at))
    free[0] = free_at
    free[1:] = ta[:-1] + hold_ns
    busy = np.flatnonzero(ta < free)
    return int(at[busy[0]]) if len(busy) else m


@dataclass
class HostMm:
    """The host's page allocator, LRU and memory bandwidth as first-touch faults see them."""

    zone_lock_page: float
    lru_lock_page: float
    clear_page_4k: float
    membw_4k: float
    lru_batch: int = LRU_BATCH_NEW
    zone: FifoServer = field(default_factory=FifoServer)
    lru: FifoServer = field(default_factory=FifoServer)
    _pcp: dict[int, int] = field(default_factory=dict)  # per CPU: 4 KiB pages left on its per-CPU list
    _lru_pending: dict[int, int] = field(default_factory=dict)  # per CPU: folios waiting in its batch
    _zeroing: list[float] = field(default_factory=list)  # end times of zeroings in flight (a heap)
    stretch_ns: float = 0.0

    def first_touch(self, cpu: int, t: float, level: int) -> float:
        """Extra ns a first touch pays at time ``t`` for a host page of ``level`` (1: 4 KiB, 2: 2 MiB THP,
        3: 1 GiB hugetlbfs, which comes from the hugetlb pool: no zone->lock, no LRU)."""
        extra = 0.0
        if level == 1:
            pages = 1
            left = self._pcp.get(cpu, 0)
            if left == 0:
                extra += self.zone.hold(t, PCP_BATCH * self.zone_lock_page)  # rmqueue_bulk
                left = PCP_BATCH
            self._pcp[cpu] = left - 1
        elif level == 2:
            pages = 512
            extra += self.zone.hold(t, self.zone_lock_page)  # one order-9 block off the free lists
        else:
            pages = 1 << 18
        if level <= 2:
            n = self._lru_pending.get(cpu, 0) + 1
            if n >= self.lru_batch:
                extra += self.lru.hold(t + extra, self.lru_batch * self.lru_lock_page)
                n = 0
            self._lru_pending[cpu] = n
        extra += self._zero(t + extra, pages)
        return extra

    def first_touches_4k(self, cpu: int, t: "np.ndarray", order: "np.ndarray", slack: float) -> int:
        """:meth:`first_touch` of 4 KiB pages by ``cpu`` at the times ``t``, in one step, for as long as none
        of them waits: returns how many were applied (the first one that might wait is not).

        ``order`` is an increasing array with ``t[j] = order[j] - x[j]`` and ``slack`` bounds the spread
        of the ``x`` (the times come from faults in order; their allocations started a drawn cost
        earlier). The same state changes as that many calls (desim/faultrun.py relies on it): a per-CPU
        list refill every ``PCP_BATCH`` pages and an LRU drain every ``lru_batch`` that find their lock
        free, and zeroings that do not saturate the memory bandwidth: the zeroings in flight when
        the j-th starts (those :meth:`_zero` finds in its heap) are counted exactly, the ones from
        before that no call so far has popped plus each earlier call's whose end lies above every
        later call's time, looked for among the calls less than ``clear_page_4k + slack`` of
        ``order`` earlier (no earlier one can still be running).
        """
        m = len(t)
        if m == 0:
            return 0
        base = 1 * self.clear_page_4k
        z = self._zeroing
        # in flight at the j-th call, from before: entries above the time of every call up to j
        old = np.sort(np.array(z, dtype=np.float64))
        flight = len(old) - np.searchsorted(old, np.maximum.accumulate(t), side="right")
        # and of this CPU's earlier calls: t[j - L] + base above t[j - L + 1 .. j], for the lags L that
        # can hold one (started within base + slack of order earlier; a margin for rounding)
        window = (base + slack) * (1 + 1e-9) + 1e-6
        gap = float(np.diff(order).min()) if m > 1 else math.inf
        lag_max = int(window // gap) + 1 if gap > 0 else m  # no more calls than that fit in the window
        if lag_max > _LAGS_MAX:  # calls close together: count them
            lags = np.arange(m) - np.searchsorted(order, order - window, side="left")
            if int(lags.max()) > _LAGS_MAX:
                m = int(np.argmax(lags > _LAGS_MAX))
                if m == 0:
                    return 0
                t, order, flight = t[:m], order[:m], flight[:m]
            lag_max = int(lags[:m].max())
        W = t.copy()  # max(t[j - L + 1 .. j])
        for L in range(1, min(lag_max, m - 1) + 1):
            if L > 1:
                W[L - 1:] = np.maximum(W[L - 1:], t[:m - L + 1])
            flight[L:] += (t[:m - L] + base) > W[L:]
        stretched = (flight + 1) * 1 * self.membw_4k > base  # _zero: took = max(base, k * pages * membw_4k)
        if stretched.any():
            m = int(np.argmax(stretched))
            if m == 0:
                return 0
        # per-CPU list refills (rmqueue_bulk) every PCP_BATCH calls and LRU drains every lru_batch, each
        # at a call's time: stop at the first one whose lock is still held (by the previous one)
        left = self._pcp.get(cpu, 0)
        refill_hold = PCP_BATCH * self.zone_lock_page
        refills = np.arange(left, m, PCP_BATCH)
        m = _first_busy(t, refills, self.zone.free_at, refill_hold, m)
        pend = self._lru_pending.get(cpu, 0)
        drain_hold = self.lru_batch * self.lru_lock_page
        drains = np.arange(max(self.lru_batch - pend - 1, 0), m, self.lru_batch)
        m = _first_busy(t, drains, self.lru.free_at, drain_hold, m)
        refills, drains = refills[refills < m], drains[drains < m]
        if m == 0:
            return 0
        if len(refills):
            self.zone.free_at = float(t[refills[-1]]) + refill_hold
        self.zone.holds += len(refills)
        self._pcp[cpu] = (left - m) % PCP_BATCH if left < m else left - m
        if len(drains):
            self.lru.free_at = float(t[drains[-1]]) + drain_hold
        self.lru.holds += len(drains)
        self._lru_pending[cpu] = (pend + m) % self.lru_batch if pend + m >= self.lru_batch else pend + m
        # the heap after the m-th call: an entry is gone once a call's time reached it (each call pops
        # every entry <= its time), so what is left is each entry above every later call's time
        tm = t[:m]
        after = np.maximum.accumulate(tm[::-1])[::-1]  # max of t[j:] for each j
        latest = float(after[0])
        left_old = [e for e in z if e > latest]
        ends = tm + base  # heapq.heappush(z, t + took), took = base (no stretch)
        later = np.append(after[1:], -np.inf)  # max of the calls after each one
        self._zeroing = left_old + ends[ends > later].tolist()
        heapq.heapify(self._zeroing)
        return m

    def _zero(self, t: float, pages: int) -> float:
        """Extra zeroing time when the zeroings in flight saturate the memory bandwidth."""
        z = self._zeroing
        while z and z[0] <= t:
            heapq.heappop(z)
        k = len(z) + 1
        base = pages * self.clear_page_4k
        took = max(base, k * pages * self.membw_4k)
        heapq.heappush(z, t + took)
        self.stretch_ns += took - base
        return took - base

    def summary(self) -> dict[str, float]:
        return {"zone_lock_wait_ns": self.zone.wait_ns, "zone_lock_contended": self.zone.contended,
                "lru_lock_wait_ns": self.lru.wait_ns, "lru_lock_contended": self.lru.contended,
                "membw_stretch_ns": self.stretch_ns}
