"""Fault runs: a vCPU's faults that nothing else can interact with, processed in one loop (fast engine).

A vCPU's loop (:meth:`desim.vcpu.Vcpu.run`) turns each guest run that ends in a
fault into one SimPy timeout: VM entry, the accesses up to the miss, the VM exit
and ``kvm_faultin_pfn``, then the part under ``mmu_lock``. When no other process
has an event due before that timeout ends, nothing can interact with the fault:
no writer can arrive at ``mmu_lock``, no request or kick be made, no memslot
update start, no progress checkpoint be taken. :class:`FaultRun` then advances
the clock itself and goes on to the vCPU's next fault, in one Python loop, for as
long as the vCPU's next step is due strictly before the head of the event queue
(SimPy would process it next, with the same clock: see :mod:`desim.engine`). It
stops, and hands back to the per-fault path with the vCPU in exactly the state
that path would have reached, where

* another event is due first (a writer, a kick, a request, a memslot update, a
  lock hand-over, a checkpoint): the split point; the per-fault path yields its
  timeout and the other process intervenes as in the reference engine;
* the fault must wait: ``mmu_lock`` is contended (a lock storm's waiters queue
  as usual), or the host allocation's contention (``desim.hostmm``) ends after
  the next event;
* the run is anything else: the chunk ends (a vectorised block goes on into the
  next chunks of a plain stream, the chunk end one more guest run of its
  timeline), the next miss is MMIO or on an INVALID slot (``RET_PF_RETRY``), a
  request is pending, the vCPU's root is obsolete, an SRCU writer waits for the
  vCPU, the audit is on, or the engine is ``reference``.

:meth:`FaultRun.batchable` is that predicate: whatever it does not accept runs on
the per-fault path, so a model feature added there stays exact by default. The
fault's own semantics are not copied: each fault still goes through
:meth:`~desim.vcpu.Vcpu._faultin`, :meth:`~desim.vcpu.Vcpu._fault_acquire` and
:meth:`~desim.vcpu.Vcpu._fault_locked`. What the loop replaces is the guest run's
timeline (the same float operations in the same order) and the event round trip.
Costs are looked at before they are used (:meth:`desim.costs.CostView.draws`):
a fault that is not taken consumes no draw, so every named stream gives the same
numbers in the same order as in the reference engine.
"""
from __future__ import annotations

from heapq import heappop
from typing import TYPE_CHECKING

import numpy as np

from .timeline import run_ends

if TYPE_CHECKING:  # pragma: no cover
    from .vcpu import Vcpu

_VECTOR_MIN = 32  # a vectorised block pays off when about this many faults fit before the next event
_VECTOR_MAX = 32768  # accesses looked at per vectorised block
_BACKOFF_MAX = 16  # at most this many guest runs go by without a check (see FaultRun.missed)
_VECTOR_BACKOFF_MAX = 64  # at most this many per-fault steps go by without a vectorised block after a block
# that looked at the accesses and found nothing to take (a speed heuristic: the per-fault path is exact)


def next_event_at(queue: list) -> float:
    """When the event queue's head is due (SimPy's queue: a heap of (time, priority, id, event))."""
    return queue[0][0] if queue else _NEVER


_NEVER = float("inf")


_PRE_COST = {1: "host_alloc_4k", 2: "host_alloc_2m", 3: "host_alloc_1g"}  # first touch, by host level


class FaultRun:
    """Advances one vCPU through its run of non-interacting faults (see the module docstring)."""

    def __init__(self, vcpu: "Vcpu") -> None:
        self.vcpu = vcpu
        P = vcpu.P
        # a drawn cost is peeked, then consumed only if the fault is taken; a constant one is its value
        self._costs = {name: (P.draws(name), None if P.draws(name) is not None else getattr(P, name))
                       for name in ("vm_entry", "vm_exit", "fault_handle", "faultin_resident", *_PRE_COST.values())}
        # lower bounds of a guest run's VM entry and of its exit up to mmu_lock (a drawn cost counts as 0)
        const = {name: c for name, (d, c) in self._costs.items() if d is None}
        self._least_entry = const.get("vm_entry", 0.0)
        self._least_exit = (const.get("vm_exit", 0.0) + const.get("fault_handle", 0.0)
                            + min(const.get(name, 0.0) for name in ("faultin_resident", *_PRE_COST.values())))
        mean = vcpu.vm.costs.mean  # the mean time of a fault, to size vectorised blocks (never a result)
        self._mean_fault = max(mean("vm_entry") + mean("vm_exit") + mean("fault_handle") + mean("spte_install")
                               + min(mean("faultin_resident"), mean("host_alloc_4k")), 1.0)
        self.faults = 0  # faults taken in this loop (for benchmarks and tests)
        self.backoff = 0  # guest runs to leave to the per-fault path before checking again (missed())
        self._misses = 0
        self._vskip = 0  # vectorised blocks to skip (a block found nothing to take: _vector_missed)
        self._vmisses = 0
        self.vector_faults = 0  # of those, taken in vectorised blocks
        self._vector = self._vector_costs()
        kernel = vcpu.vm.profile.kernel
        # PTE prefetch at 4 KiB (Vcpu._fault_locked): None when off, else whether it needs the Accessed bit
        self._prefetch = (kernel.mmu == "shadow") if kernel.pte_prefetch else None

    def _vector_costs(self) -> dict[str, tuple] | None:
        """Where a vectorised block reads its costs: ``name -> (draws, None)`` for a drawn cost, ``(None,
        value)`` for a constant; None when no block may be used (NX huge pages: the per-fault path)."""
        v = self.vcpu
        vm = v.vm
        if vm.mmu.nx_exec is not None:
            return None
        out = {}
        for view, name, key in ((v.P, "vm_entry", "vm_entry"), (v.P, "vm_exit", "vm_exit"),
                                (v.P, "fault_handle", "fault_handle"), (v.P, "faultin_resident", "faultin_resident"),
                                (v.P, "host_alloc_4k", "host_alloc_4k"), (v.P, "spte_install", "spte_install"),
                                (v.P, "pt_page_alloc", "pt_page_alloc"), (v.P, "prefetch_spte", "prefetch_spte"),
                                (vm.P, "host_alloc_4k", "vmm_host_alloc_4k")):
            d = view.draws(name)
            out[key] = (d, None) if d is not None else (None, float(getattr(view, name)))
        if out["pt_page_alloc"][0] is not None or out["prefetch_spte"][0] is not None:
            return None  # per-unit costs are never drawn (desim.costs.PER_UNIT_COSTS)
        return out

    def missed(self) -> None:
        """The next guest run could not be taken: skip the next few checks (1, 2, 4, ... up to
        ``_BACKOFF_MAX`` guest runs; a run taken resets it). Among busy vCPUs the check fails nearly
        always and costs more than it saves; skipping it is always exact (the per-fault path runs)."""
        self._misses = min(2 * self._misses + 1, _BACKOFF_MAX)
        self.backoff = self._misses

    def batchable(self) -> bool:
        """Can the vCPU's next guest run be taken here? (The checks that do not need the run itself:
        among them that the next event is not due before the least time a guest run ending in a fault
        takes, so that a vCPU among many busy ones does not try in vain at every fault.)"""
        v = self.vcpu
        env = v.env
        least = v._carry + (self._least_entry if v._entry is None else v._entry) + self._least_exit
        return (env._last_callback and next_event_at(env._queue) > env._now + least and not v.requests
                and v.root_tag == v.vm.mmu.root_tag and not v._srcu_waiters and v._chunk is not None
                and v._pos < len(v._chunk_list))

    def run(self) -> tuple[int, tuple | None]:
        """Take the vCPU's faults while they are batchable: ``(faults taken, wait)``.

        ``wait`` is None when the loop stopped before a guest run (the per-fault
        path takes it from there), else the ``(event, ctx)`` of a fault taken
        here that must wait (:meth:`~desim.vcpu.Vcpu._fault_wait` finishes it).
        """
        v = self.vcpu
        env = v.env
        mmu = v.vm.mmu
        queue = env._queue
        m = v.m
        t = m.time
        costs = self._costs
        taken = 0
        chunk_end = False  # stopped at the end of the chunk, not for another process: no back-off
        while self.batchable():
            if self._vector is not None:
                if self._vskip:
                    self._vskip -= 1
                else:
                    k = self._vector_block()
                    if k:
                        self._vmisses = 0
                        taken += k
                        continue
            miss = v._next_miss()
            chunk = v._chunk_list
            if miss >= len(chunk):
                chunk_end = True
                break  # the run ends without a fault (end of chunk): the per-fault path
            gfn = chunk[miss]
            ss = mmu.slot_of(gfn)
            if ss is None or ss.slot.invalid:
                break  # MMIO or RET_PF_RETRY: the per-fault path
            hlevel = mmu.host_level(ss, gfn)
            resident = mmu.host_resident(ss, gfn, hlevel)
            # the guest run's timeline, as Vcpu.run computes it (same operations, same order)
            now = env._now
            carry = v._carry
            g0 = now + carry
            de, ce = costs["vm_entry"]
            entry = v._entry if v._entry is not None else (ce if de is None else de.peek())
            n = miss - v._pos
            g1 = g0 + entry + n * v.access_ns
            dh, ch = costs["fault_handle"]
            dp, cp = costs["faultin_resident" if resident else _PRE_COST[hlevel]]
            dx, cx = costs["vm_exit"]
            pre = (ch if dh is None else dh.peek()) + (cp if dp is None else dp.peek())
            exit_ns = (cx if dx is None else dx.peek()) + pre
            t1 = now + (g1 - now + exit_ns)
            if next_event_at(queue) <= t1:
                break  # another event comes first: the split point
            # taken: consume the draws looked at, then what Vcpu.run does around its timeout
            if v._entry is None:
                if de is not None:
                    de.i += 1
            v._entry = None
            for d in (dh, dp, dx):
                if d is not None:
                    d.i += 1
            v._carry = 0.0
            if v._stalled_since is not None and n > 0:
                v._recorded_until = g0 + entry + v.access_ns  # as Vcpu._begin_run
                v.vm.metrics.record_access_stall(v._stalled_since, v._recorded_until - v._stalled_since,
                                                 v.access_ns)
                v._stalled_since = None
            v._g0, v._g1 = g0, g1
            env._now = t1
            env.inlined += 1
            t["host"] += carry + exit_ns
            t["guest"] += g1 - g0
            v._consume(n)
            if v._stalled_since is None:
                v._stalled_since = g1
            m.stall_ns += exit_ns
            taken += 1
            res = v._faultin(ss, gfn, hlevel, resident, g1)
            if res is None:
                continue
            ev, ctx = res
            if ctx[0] != "host" or not queue or queue[0][3] is not ev:
                self.faults += taken
                self._misses = 0
                return taken, res  # waits for mmu_lock, or another event comes first
            # the host allocation's contention ends next: as Vcpu._fault_wait, without the round trip
            t0 = env._now
            env._now = queue[0][0]
            heappop(queue)
            ev.callbacks = None
            env.inlined += 1
            m.stall_ns += env._now - t0
            t["host"] += env._now - t0
            res = v._fault_acquire(ctx[1])
            if res is not None:
                self.faults += taken
                self._misses = 0
                return taken, res
        self.faults += taken
        if taken or chunk_end:
            self._misses = 0
        else:
            self.missed()
        return taken, None


    def _vector_missed(self) -> int:
        """A vectorised block looked at the vCPU's next accesses (up to ``_VECTOR_MAX``, across chunk ends)
        and took nothing: its next miss is MMIO, on another kind of slot, or waits. Skip the next
        1, 3, 7, ... up to ``_VECTOR_BACKOFF_MAX`` attempts (a block taken resets it), so that a guest that
        exits often (a small loop over a slot that moves away: memslot_perf_test) does not pay the look
        at every exit. Always exact: the per-fault path takes those steps."""
        self._vmisses = min(2 * self._vmisses + 1, _VECTOR_BACKOFF_MAX)
        self._vskip = self._vmisses
        return 0

    def _vector_block(self) -> int:
        """Take the vCPU's next faults in one vectorised step: 4 KiB faults of one 4 KiB-backed slot
        (TDP MMU, legacy MMU or shadow paging without guest address spaces; PTE prefetch groups
        included, :meth:`desim.mmu.Mmu.plan_prefetch_4k`), with the vCPU alone on ``mmu_lock``. Returns
        the faults taken (0: none, the scalar loop takes the next one).

        A block reaches past the end of the vCPU's chunk into the next chunks of a plain stream
        (:meth:`desim.workload.AccessStream.peek_chunk`): each chunk end is one more guest run in the
        timeline, the one :meth:`desim.vcpu.Vcpu.run` makes there (the chunk's last accesses, from the
        entry the last fault drew, without an exit or a fault), after which the next chunk's first run
        draws its own VM entry and pays no hold. The block ends at a fault, on the chunk of that fault.

        Exactness: each quantity is computed with the per-fault path's float operations in its order.
        The only sequential dependency, the timeline (each guest run starts where the last fault
        ended), is computed without a loop by :func:`desim.timeline.run_ends`, with the loop's bits.
        Accumulators (time by
        state, stall time, the lock's integrals and hold time) are summed with ``np.add.accumulate``,
        which adds left to right exactly as ``+=`` does. Drawn costs are peeked and only the draws of
        the faults taken are consumed.
        """
        v = self.vcpu
        env = v.env
        vm = v.vm
        mmu = vm.mmu
        lock = vm.lock
        src = self._vector
        now = env._now
        head = next_event_at(env._queue)
        # the vCPU alone on mmu_lock: nobody waits, nobody else holds it or has a release pending
        if lock.waiters or mmu.nx_exec is not None:
            return 0
        pend = lock._pending
        own = pend[0] if len(pend) == 1 and pend[0][2] is v else None
        if (pend and own is None) or lock.readers + int(lock.writer) != (1 if own else 0):
            return 0
        expect = (head - now) / self._mean_fault  # about how many faults fit before the next event
        if expect < _VECTOR_MIN:
            return 0
        # the faults: the first access to each gfn without a present SPTE (4 KiB mappings map one gfn)
        pos = v._pos
        window = int(min(_VECTOR_MAX, max(256.0, 4 * expect)))
        seg = v._chunk[pos:pos + window]
        # where the window reaches past the chunk's end, the next chunks of a plain stream follow (each
        # chunk end is a guest run without a fault, see below); bounds = where each next chunk starts in seg
        bounds: list[int] = []
        if len(seg) < window and v.stream is not None:
            parts = [seg]
            total = len(seg)
            while total < window:
                ch = v.stream.peek_chunk(len(bounds))
                if ch is None or len(ch) == 0:
                    break
                bounds.append(total)
                parts.append(ch[:window - total])
                total += len(parts[-1])
            if bounds:
                seg = np.concatenate(parts)
        misses = mmu.first_misses(seg)
        if misses is None:
            return self._vector_missed()
        fpos, fg = misses
        ss = mmu.slot_of(int(fg[0]))
        if ss is None or ss.slot.invalid or ss.slot.dirty_logging or ss.block.backing != "4k":
            return self._vector_missed()
        base, end = ss.slot.base_gfn, ss.slot.end_gfn
        if int(fg.min()) >= base and int(fg.max()) < end:
            K = len(fg)
        else:
            outside = np.flatnonzero((fg < base) | (fg >= end))
            K = int(outside[0])
        if K == 0:
            return 0
        fpos, fg = fpos[:K], fg[:K]
        pf_members = pf_take = None
        prefetched = 0
        if self._prefetch is not None:
            # PTE prefetch: a fault maps its group's eligible neighbours, whose accesses then hit
            pp = mmu.plan_prefetch_4k(ss, fg, self._prefetch)
            if pp is None:
                return 0
            fault, pf_members, pf_take = pp
            fpos, fg = fpos[fault], fg[fault]
            K = len(fg)
            prefetched = pf_take.sum(axis=1)
        plan = mmu.plan_install_4k(ss, fg)
        if plan is None:
            return 0
        resident, ever, alloc = plan.resident, plan.ever_mapped, plan.allocated
        # the guest runs: one per fault, and one per chunk end crossed before the last fault (the rest of
        # the chunk, without a fault: Vcpu._begin_run with the miss at the chunk's end, then the next chunk)
        n_ends = int(np.searchsorted(bounds, int(fpos[-1]), side="right")) if bounds else 0
        R = K + n_ends
        if n_ends:
            posr = np.concatenate((fpos, np.asarray(bounds[:n_ends], dtype=fpos.dtype)))
            # by position; a chunk's end comes before a fault on the next chunk's first access
            order = np.argsort(2 * posr + np.concatenate((np.ones(K, np.int64), np.zeros(n_ends, np.int64))),
                               kind="stable")
            is_f = order < K
            P = posr[order]
            fr = np.flatnonzero(is_f)  # the run of each fault
        else:
            is_f = np.ones(K, dtype=bool)
            P = fpos
            fr = np.arange(K)
        # the costs of K faults, in each stream's order (peeked, consumed below for the faults taken)
        n_res = int(np.count_nonzero(resident))
        n_ft = K - n_res
        need_entry = v._entry is None

        def costs(name: str, k: int):
            d, c = src[name]
            return c if d is None else d.peek_many(k)

        # VM entry: drawn at a run's start when none is held (the first run, unless one is; a run after a
        # chunk end), and by each fault under mmu_lock for the next run (Vcpu._fault_locked), in that order
        begin = np.zeros(R, dtype=bool)
        begin[0] = need_entry
        begin[1:] = ~is_f[:-1]
        slots = np.empty(2 * R, dtype=bool)
        slots[0::2] = begin
        slots[1::2] = is_f
        n_draws = int(np.count_nonzero(slots))
        draws_entry = costs("vm_entry", n_draws)
        if isinstance(draws_entry, float):
            draws_entry = np.full(n_draws, draws_entry)
        slot_draw = np.cumsum(slots) - 1  # the draw each slot takes
        E = draws_entry[slot_draw[2 * fr + 1]]  # the entry each fault draws for the next run
        entry = np.empty(R)
        bi = np.flatnonzero(begin)
        entry[bi] = draws_entry[slot_draw[2 * bi]]
        ai = np.flatnonzero(~begin[1:]) + 1  # runs after a fault: its entry
        entry[ai] = draws_entry[slot_draw[2 * ai - 1]]
        if not need_entry:
            entry[0] = v._entry
        fh = costs("fault_handle", K)
        ha = costs("host_alloc_4k", n_ft)
        fr_ = costs("faultin_resident", n_res)
        if n_res == 0:  # all first touches (a populate)
            pre = fh + ha
        elif n_ft == 0:  # all resident (re-faults after a zap)
            pre = fh + fr_
        else:
            ft_idx = np.cumsum(~resident) - 1  # index of each first touch among the first touches
            res_idx = np.cumsum(resident) - 1
            ha_k = ha if isinstance(ha, float) else ha[np.maximum(ft_idx, 0)]
            fr_k = fr_ if isinstance(fr_, float) else fr_[np.maximum(res_idx, 0)]
            pre = np.where(resident, fh + fr_k, fh + ha_k)
        exit_f = costs("vm_exit", K) + pre
        if np.ndim(exit_f) == 0:  # every cost constant
            exit_f = np.full(K, exit_f)
        hold_f = costs("spte_install", K) + alloc * src["pt_page_alloc"][1] + prefetched * src["prefetch_spte"][1]
        if not (hold_f > 0).all():
            return 0  # a zero hold releases mmu_lock at once (MmuLock.release): the per-fault path
        a = v.access_ns
        n = np.diff(P, prepend=0)
        # per run: a chunk end's run has no exit (the next chunk follows at once) and leaves no hold to pay
        exit_ns = np.zeros(R)
        exit_ns[fr] = exit_f
        hold = np.zeros(R)
        hold[fr] = hold_f
        carry = np.empty(R)
        carry[0] = v._carry
        carry[1:] = hold[:-1]
        # the timeline, as Vcpu.run computes it: g0 = now + carry, g1 = g0 + entry + n * access_ns,
        # the run's end at t1 = now + (g1 - now + exit_ns); strictly before the next event (desim/timeline.py:
        # the same bits as that loop)
        stalled = v._stalled_since
        t1 = run_ends(now, carry, entry, n * a, exit_ns, head)
        K = int(np.searchsorted(fr, len(t1)))  # the faults whose run ends before the next event
        if K == 0:
            return 0
        t1f = t1[fr[:K]]
        if own is not None and not own[0] <= t1f[0]:
            return 0
        # each acquire must find the previous fault's release due (MmuLock._catch_up): true unless rounding
        late = np.flatnonzero((t1f[:-1] + hold_f[:K - 1]) > t1f[1:])
        if len(late):
            K = int(late[0]) + 1
        ft = np.flatnonzero(~resident[:K])
        if len(ft):
            vmm_alloc = costs("vmm_host_alloc_4k", len(ft))
            slack = 0.0 if isinstance(vmm_alloc, float) else float(vmm_alloc.max() - vmm_alloc.min())
            m = vm.hostmm.first_touches_4k(v.index, t1f[ft] - vmm_alloc, t1f[ft], slack)
            if m < len(ft):
                K = int(ft[m])  # that first touch waits for the host allocator: the per-fault path
                ft = ft[:m]
            if K == 0:
                return 0
        # -- commit K faults and the R runs up to the last of them -----------------------------
        R = int(fr[K - 1]) + 1
        fr = fr[:K]
        n_ends = R - K
        fpos, fg, alloc, ever = fpos[:K], fg[:K], alloc[:K], ever[:K]
        exit_f, hold_f, E, t1f = exit_f[:K], hold_f[:K], E[:K], t1f[:K]
        P, n, carry, entry, exit_ns, t1 = P[:R], n[:R], carry[:R], entry[:R], exit_ns[:R], t1[:R]
        n_ft = len(ft)
        n_res = K - n_ft
        for name, used in (("vm_entry", int(slot_draw[2 * R - 1]) + 1), ("fault_handle", K), ("vm_exit", K),
                           ("host_alloc_4k", n_ft), ("faultin_resident", n_res), ("spte_install", K),
                           ("vmm_host_alloc_4k", n_ft)):
            d = src[name][0]
            if d is not None:
                d.i += used
        t0 = np.empty(R)
        t0[0] = now
        t0[1:] = t1[:-1]
        g0 = t0 + carry
        g1 = g0 + entry + n * a
        g1f = g1[fr]
        metrics = vm.metrics
        m_ = v.m
        total_alloc = mmu.commit_install_4k(plan, K)  # Mmu.make_resident + Mmu.install, K times
        metrics.host_page_allocs["4k"] += n_ft
        metrics.sptes_installed += K
        metrics.pt_pages_allocated += total_alloc
        if pf_take is not None:
            pg = pf_members[:K][pf_take[:K]]
            mmu.commit_prefetch_4k(ss, pg)  # Mmu.install of each prefetched neighbour
            metrics.sptes_prefetched += len(pg)
            metrics.sptes_installed += len(pg)
        # fault records: latency = exit .. the next VM entry (now + hold + entry - start)
        refaults = int(ever.sum())
        lat = t1f + hold_f + E - g1f
        metrics.record_faults(v.index, {"after_zap": refaults, "first_touch": K - refaults}, g1f, lat,
                              ever.astype(np.int8))
        # accesses: the access that faulted completes as the first access of the next guest run; a run
        # after a chunk end has none waiting (the chunk end's run completed it)
        prev = np.empty(R)
        prev[1:] = g1[:-1]
        has = np.empty(R, dtype=bool)
        has[1:] = is_f[:R - 1]
        has[0] = stalled is not None
        keep = stalled is not None and n[0] == 0  # not completed by an empty run: still the same stalled access
        prev[0] = 0.0 if stalled is None else stalled
        if keep and R > 1:
            prev[1] = stalled
        rec = (n > 0) & has
        done_at = g0 + entry + a
        metrics.record_access_stalls(prev[rec], (done_at - prev)[rec], a)
        if rec.any():
            v._recorded_until = float(done_at[rec][-1])  # as Vcpu._begin_run
        consumed = int(n.sum())
        m_.accesses += consumed
        hits = metrics.hit_ns
        hits[a] = hits.get(a, 0) + consumed
        # per-vCPU time and stall, summed left to right as the per-fault path adds them
        tm = m_.time
        tm["host"] = _accumulate(tm["host"], carry + exit_ns)
        tm["guest"] = _accumulate(tm["guest"], g1 - g0)
        inter = np.empty(2 * K)
        inter[0::2] = exit_f
        inter[1::2] = hold_f
        m_.stall_ns = _accumulate(m_.stall_ns, inter)
        # mmu_lock: each acquire applies the previous fault's deferred release (MmuLock._catch_up: the
        # integral of holders over the hold, its hold time), then holds until its own release_after
        rel_t = t1f + hold_f
        stats = lock._role("fault")
        if own is not None:
            since, role = lock._hold_since.pop(v)
            dt = own[0] - lock._last_t
            if dt:
                lock._area_holders += dt * 1
            lock._role(role).hold_ns += own[0] - since
        if K > 1:
            dts = rel_t[:-1] - t1f[:-1]
            lock._area_holders = _accumulate(lock._area_holders, dts[dts != 0] * 1)
            stats.hold_ns = _accumulate(stats.hold_ns, dts)
        lock._last_t = float(t1f[-1])
        stats.acquisitions += K
        if own is None:
            if lock._mode(vm.fault_lock_mode) == "write":
                lock.writer = True
            else:
                lock.readers += 1
        lock._hold_since[v] = (float(t1f[-1]), "fault")
        lock._seq += K
        lock._pending[:] = [(float(rel_t[-1]), lock._seq, v)]
        # the vCPU after its last fault, as the per-fault path leaves it: on the chunk of that fault (each
        # chunk end crossed takes the next chunk, as Vcpu.run's loop does), at that fault's access
        last = int(P[-1])
        for _ in range(n_ends):
            v._next_chunk()
        v._pos = pos + last if n_ends == 0 else last - bounds[n_ends - 1]
        v._carry = float(hold_f[-1])
        v._entry = float(E[-1])
        v._stalled_since = stalled if keep and R == 1 else float(g1[-1])
        v._g0, v._g1 = float(g0[-1]), float(g1[-1])
        v._seq = -1  # the cached miss list predates these faults
        env._now = float(t1[-1])
        env.inlined += R
        self.vector_faults += K
        return K


def _accumulate(start: float, increments: np.ndarray) -> float:
    """``start`` plus each increment in turn, left to right (the bit pattern of a loop of ``+=``)."""
    if len(increments) == 0:
        return start
    return float(np.add.accumulate(np.concatenate(([start], increments)))[-1])


__all__ = ["FaultRun"]
