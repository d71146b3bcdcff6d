"""A vCPU: a SimPy process alternating guest execution and exits to the host.

It follows ``vcpu_run`` / ``vcpu_enter_guest`` (arch/x86/kvm/x86.c):

1. In the host (state HOST, holding ``kvm->srcu``), service pending requests
   (``KVM_REQ_MMU_FREE_OBSOLETE_ROOTS`` then ``kvm_mmu_reload`` to load a
   fresh root, ``KVM_REQ_TLB_FLUSH``), then enter the guest.
2. In the guest (state GUEST, SRCU released), consume the workload's access
   stream. The stream comes in numpy chunks; the vCPU finds the next access
   whose gfn has no present SPTE in the current root with one vectorised
   lookup, and runs until then in one simulation event: events scale with
   faults, not with accesses.
3. Exit on that access (an EPT violation on TDP, a shadow page fault on
   shadow paging) and run the fault path of ``kvm_tdp_mmu_page_fault`` /
   ``direct_page_fault``: ``kvm_faultin_pfn`` (host page allocation and
   zeroing on first touch), take ``mmu_lock`` (read on the TDP MMU, write
   otherwise), check staleness (``is_page_fault_stale``: obsolete root or
   INVALID slot give ``RET_PF_RETRY``; an SPTE installed meanwhile by another
   vCPU gives ``RET_PF_SPURIOUS``), install the SPTE allocating page-table
   pages on the way, prefetch neighbours (legacy/shadow MMU only), unlock.
4. A kick (IPI from ``kvm_make_all_cpus_request``) interrupts the guest run;
   the accesses done until then are consumed, the vCPU exits and acks.
5. With no work the vCPU is HALTED (SRCU released, not woken by requests).
6. Shadow paging with guest processes or page-table writes (``[guest]``,
   desim/guest_as.py): a guest run also ends at a CR3 write (``kvm_set_cr3``:
   ``prev_roots`` hit, or a root to load before re-entry), at a write to a
   write-protected guest page table (emulated: ``kvm_mmu_pte_write``) and at
   an access through a top-level entry the vCPU's root has not linked yet.

Event economy (the simulator must handle millions of faults): one guest run
is one SimPy timeout covering the rest of the previous fault's lock hold, VM
entry, the accesses up to the next miss, the VM exit and the part of the next
fault before ``mmu_lock``; the lock's release is a callback at the end of the
hold. The vCPU's state at any instant is derived from that timeline (HOST
until the guest window opens, GUEST inside it, HOST after), so kicks, SRCU
readers and time accounting see exactly what an event per step would show.
A kick that arrives before the guest window opens (the vCPU is still in the
host) interrupts the run without an IPI, as a request checked before entry.
On the fast engine, runs that end before any other event is due are taken
without an event at all, many in one step (:mod:`desim.faultrun`).

Simplifications: the cost of ``kvm_faultin_pfn`` (resident or first touch) is
fixed when the guest run begins; ``fast_page_fault`` is not modelled (only non-present SPTEs
fault); an access to a gfn outside every memslot costs an MMIO emulation and
is consumed; RET_PF_RETRY on an INVALID slot is modelled as one wait until the
memslot update finishes, counting one retry fault per exit/entry round trip
that would have fit in that time.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Generator

import numpy as np
import simpy

from .engine import FastEnvironment
from .faultrun import FaultRun
from .guest_as import VcpuAddressSpace, free_obsolete_roots, kvm_mmu_pte_write, kvm_set_cr3, load_root
from .lock import READ, WRITE
from .mmu import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from .tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, KVM_REQ_TLB_FLUSH, kvm_flush_remote_tlbs

if TYPE_CHECKING:  # pragma: no cover
    from .vm import Vm
    from .workload import AccessStream

GUEST, HOST, HALTED = "guest", "host", "halted"
_RESCAN_AFTER = 16  # cached misses found mapped before _next_miss looks the chunk up again (vectorised)
_HOST_ALLOC = {PG_LEVEL_4K: ("host_alloc_4k", "4k"), PG_LEVEL_2M: ("host_alloc_2m", "2m"),
               PG_LEVEL_1G: ("host_alloc_1g", "1g")}


def _as_sequence(chunk: np.ndarray):
    """The chunk's gfns for scalar reads (each a Python int): a ``range`` for a run of consecutive
    gfns (a sequential pattern: nothing per access), else a ``memoryview`` of the array itself (no
    Python object per access: a list would cost 36 bytes an access and a conversion per chunk,
    more than the reads of a chunk that mostly hits)."""
    n = len(chunk)
    if n > 1 and int(chunk[-1]) - int(chunk[0]) == n - 1 and bool((np.diff(chunk) == 1).all()):
        return range(int(chunk[0]), int(chunk[-1]) + 1)
    return memoryview(np.ascontiguousarray(chunk, dtype=np.int64))


class Vcpu:
    """One vCPU of a :class:`~desim.vm.Vm`."""

    def __init__(self, vm: "Vm", index: int) -> None:
        self.vm = vm
        self.env = vm.env
        self.index = index
        self.m = vm.metrics.vcpus[index]
        self.P = vm.costs.view(f"vcpu{index}")  # this vCPU's costs (desim.costs: own streams, CRN)
        self._entry: float | None = None  # the next VM entry's cost when a fault already counted it
        self._stalled_since: float | None = None  # start of the access that is stalled in the host
        # the recorded completion of the stalled access that began the current guest run (0: none)
        self._recorded_until = 0.0
        self.mode = HALTED
        self._mode_since = 0.0
        self.requests = 0
        self.root_tag = 0  # no root loaded yet: kvm_mmu_load on first entry
        self._srcu_waiters: list[simpy.Event] = []
        self.stream: AccessStream | None = None
        self.access_ns = 0.0
        self.on_done = None
        self._wake: simpy.Event | None = None
        self._ack: simpy.Event | None = None
        self._chunk: np.ndarray | None = None
        self._chunk_list: range | memoryview | list[int] = []
        self._pos = 0
        self._misses: memoryview | list[int] = []
        self._mi = 0
        self._seq = -1
        self._carry = 0.0  # host time still owed by the last fault (its lock hold)
        self._g0 = 0.0  # the current run's guest window [g0, g1)
        self._g1 = -1.0
        self._running = False
        self._retrying = False  # bouncing in and out of the guest on RET_PF_RETRY: no SRCU reader
        self.fault_run: FaultRun | None = None  # the fast engine's loop over non-interacting faults
        # what the process waits on (a guest run's timeout, or a fault's wait with (t0, ctx)), and where a
        # cohort run left the vCPU when it handed it back (desim/cohort.py)
        self._run: tuple = ()
        self._wait = None
        self._wait_ctx: tuple | None = None
        self._handback: tuple | None = None
        # shadow paging with guest processes or page-table writes: roots per CR3, prev_roots (desim/guest_as.py)
        self.gas = VcpuAddressSpace(vm.guest, vm, index) if vm.guest is not None else None
        self.proc = self.env.process(self.run())

    # -- state and SRCU --------------------------------------------------------
    def _set_mode(self, mode: str) -> None:
        now = self.env.now
        self.m.time[self.mode] += now - self._mode_since
        self.mode = mode
        self._mode_since = now

    def current_mode(self) -> str:
        """GUEST, HOST or HALTED at this instant (derived from the run's timeline)."""
        if self._running:
            return GUEST if self._g0 <= self.env.now < self._g1 else HOST
        return self.mode

    def _srcu_unlock_at(self, t: float) -> None:
        """Leave the SRCU read side at time ``t`` (guest entry or halt)."""
        if self._srcu_waiters:
            waiters, self._srcu_waiters = self._srcu_waiters, []
            delay = t - self.env.now
            if delay <= 0:
                for ev in waiters:
                    ev.succeed()
            else:
                self.env.timeout(delay).callbacks.append(lambda _e: [ev.succeed() for ev in waiters])

    def srcu_reader_gone(self) -> simpy.Event | None:
        """For ``synchronize_srcu_expedited``: an event when this vCPU leaves its read-side section."""
        if self._retrying or self.current_mode() != HOST:
            return None
        ev = self.env.event()
        if self._running and self.env.now < self._g0:
            # host side now, the guest window of this run opens at g0
            self.env.timeout(self._g0 - self.env.now).callbacks.append(lambda _e: ev.succeed())
        else:
            self._srcu_waiters.append(ev)
        return ev

    def kick(self) -> simpy.Event | None:
        """``kvm_vcpu_kick``: IPI if in guest mode; returns the ack event, or None (no IPI)."""
        if not self._running:
            return None
        now = self.env.now
        if now < self._g0:
            # still in the host before entry: vcpu_enter_guest sees the request and does not enter
            self._running = False
            self.proc.interrupt("request")
            return None
        if now >= self._g1:
            return None  # exiting already: the request is checked before the next entry
        self._running = False
        self.m.kicks += 1
        self._ack = self.env.event()
        self.proc.interrupt("kick")
        return self._ack

    def assign(self, stream: "AccessStream", on_done) -> None:
        """Give the vCPU a phase's access stream and wake it (INIT/SIPI or an interrupt)."""
        self.stream = stream
        self.on_done = on_done
        self._chunk = None
        if self._wake is not None:
            self._wake.succeed()

    # -- access stream ------------------------------------------------------------
    def _next_chunk(self) -> bool:
        chunk = self.stream.next_chunk() if self.stream is not None else None
        if chunk is None:
            return False
        if self.gas is not None:
            chunk = self.gas.new_chunk(chunk)  # page-table writes and private-page accesses (desim/guest_as.py)
        self._chunk = chunk
        self._chunk_list = _as_sequence(chunk)
        self.access_ns = self.stream.access_ns
        self.vm.metrics.accesses_assigned += len(chunk)
        self._pos = 0
        self._seq = -1
        return True

    def chunk_rewritten(self) -> None:
        """The rest of the chunk changed (a CR3 write retargeted its private-page accesses)."""
        self._chunk_list = _as_sequence(self._chunk)
        self._seq = -1

    def _unmapped(self, seg: np.ndarray) -> np.ndarray:
        """The positions in ``seg`` of the accesses without a present SPTE (compiled where the fast engine's
        cohort plans with its kernel: desim/plan_kernel.py, the same positions)."""
        cohort = self.vm.cohort
        if cohort is not None and cohort.kernel:
            from .plan_kernel import unmapped

            return unmapped(self.vm.mmu, seg)
        return np.flatnonzero(~self.vm.mmu.mapped_mask(seg))

    def _next_miss(self) -> int:
        """Index in the chunk of the next access that will fault (or len(chunk))."""
        mmu = self.vm.mmu
        if self._seq != mmu.zap_seq:
            miss = self._unmapped(self._chunk[self._pos:])
            self._misses = memoryview(miss + self._pos)  # no Python int per miss
            self._mi = 0
            self._seq = mmu.zap_seq
        misses = self._misses
        chunk = self._chunk_list
        pos = self._pos
        is_mapped = mmu.is_mapped
        skipped = 0
        while self._mi < len(misses):
            m = misses[self._mi]
            if m >= pos:
                if not is_mapped(chunk[m]):
                    return m
                skipped += 1
                if skipped == _RESCAN_AFTER:
                    # faults since the list was made mapped these (a huge page maps a whole unit):
                    # look the rest of the chunk up again at once instead of access by access
                    miss = self._unmapped(self._chunk[pos:])
                    self._misses = misses = memoryview(miss + pos)
                    self._mi = 0
                    skipped = 0
                    continue
            self._mi += 1
        return len(chunk)

    def _consume(self, n: int) -> None:
        self._pos += n
        self.m.accesses += n
        if self.gas is not None:
            self.gas.consumed(n * self.access_ns)
        hits = self.vm.metrics.hit_ns
        hits[self.access_ns] = hits.get(self.access_ns, 0) + n

    def _account(self, host_a: float, guest: float, host_b: float) -> None:
        t = self.m.time
        t[HOST] += host_a + host_b
        t[GUEST] += guest

    def _pay_carry(self) -> Generator:
        if self._carry > 0:
            c, self._carry = self._carry, 0.0
            yield self.env.timeout(c)
            self.m.time[HOST] += c

    # -- the vCPU loop -------------------------------------------------------------
    def run(self) -> Generator:
        env = self.env
        vm = self.vm
        mmu = vm.mmu
        audit = vm.audit
        fault_run = self.fault_run = (FaultRun(self) if isinstance(env, FastEnvironment) and audit is None
                                      and self.gas is None else None)
        cohort = vm.cohort
        self._mode_since = env.now
        while True:
            if self._chunk is None or self._pos >= len(self._chunk_list):
                pause = self.stream.pause() if self.stream is not None else None
                if pause is not None:
                    # the workload halts the vCPU (a replayed HLT, or the vCPU thread's own memslot ioctl)
                    yield from self._pay_carry()
                    self.mode, self._mode_since = HALTED, env.now
                    self._srcu_unlock_at(env.now)
                    yield pause
                    self.m.time[HALTED] += env.now - self._mode_since
                    self.mode, self._mode_since = HOST, env.now
                    continue
                if not self._next_chunk():
                    yield from self._pay_carry()
                    if self.stream is not None:
                        self.stream = None
                        self.m.finish_ns = env.now
                        done, self.on_done = self.on_done, None
                        if done is not None:
                            done(self)
                    # kvm_vcpu_halt: SRCU released, asleep until given work
                    self.mode, self._mode_since = HALTED, env.now
                    self._srcu_unlock_at(env.now)
                    self._wake = env.event()
                    yield self._wake
                    self._wake = None
                    self.m.time[HALTED] += env.now - self._mode_since
                    self.mode, self._mode_since = HOST, env.now
                    continue
                if not self._chunk_list:
                    continue  # an empty chunk: the stream has a pause next
            if self.requests or self.root_tag != mmu.root_tag or (self.gas is not None and not self.gas.root_usable()):
                yield from self._pay_carry()
                yield from self._service_requests()
                # per-CR3 roots: vcpu_enter_guest checks the requests again once in guest mode (a zap while
                # the vCPU was loading its root made it obsolete): service until nothing is pending
                while self.gas is not None and (self.requests or self.root_tag != mmu.root_tag
                                                or not self.gas.root_usable()):
                    yield from self._service_requests()
            if fault_run is not None:
                # the fast engine: faults that nothing can interact with, in one loop (desim/faultrun.py)
                if fault_run.backoff:
                    fault_run.backoff -= 1
                elif fault_run.batchable():
                    taken, res = fault_run.run()
                    if res is not None:
                        yield from self._fault_wait(res)
                        continue
                    if taken:
                        continue
                else:
                    fault_run.missed()
            ev = None
            if cohort is not None:
                if cohort.backoff:
                    cohort.backoff -= 1
                else:
                    # the fast engine: several vCPUs' steps in one loop, in event order (desim/cohort.py)
                    ev = cohort.run(self)
            if ev is None:
                ev = env.timeout(self._begin_run())
            self._wait, self._wait_ctx = ev, None
            try:
                got = yield ev
            except simpy.Interrupt as irq:
                yield from self._run_interrupted(irq)
                continue
            res = self._handed_back(got) if self._handback is not None else self._run_end()
            if res is not None:
                yield from self._after_run(res)

    def _begin_run(self) -> float:
        """Begin the next guest run at ``env.now`` (VM entry, the accesses up to the next miss, the VM exit
        and the fault's work before ``mmu_lock``): set the vCPU's timeline (``_run``) and return how long
        the run lasts until the fault reaches ``mmu_lock`` (the delay of its timeout)."""
        env = self.env
        vm = self.vm
        P = self.P
        audit = vm.audit
        miss = self._next_miss()
        stop = "fault"
        if self.gas is not None:
            # a CR3 write, a write to a write-protected guest page table or an unlinked root entry first?
            miss, stop = self.gas.next_stop(self, miss)
        n = miss - self._pos
        if stop == "fault":
            faults = miss < len(self._chunk_list)
            gfn = self._chunk_list[miss] if faults else -1
            pre = self._pre_lock_ns(gfn) if faults else 0.0
        else:
            faults = True
            gfn = self._chunk_list[miss] if stop != "cr3" else -1
            pre = (P.cr3_switch if stop == "cr3" else P.fault_handle + P.pt_write_emulate if stop == "wp"
                   else self._pre_lock_ns(gfn))
        if audit is not None:
            audit.guest_run_start(self, self._chunk[self._pos:miss])
        now = env.now
        carry, self._carry = self._carry, 0.0
        g0 = now + carry
        entry, self._entry = (P.vm_entry if self._entry is None else self._entry), None
        g1 = g0 + entry + n * self.access_ns
        if self._stalled_since is not None and n > 0:
            # the stalled access completes as the first access of this guest run
            self._recorded_until = g0 + entry + self.access_ns
            vm.metrics.record_access_stall(self._stalled_since, self._recorded_until - self._stalled_since,
                                           self.access_ns)
            self._stalled_since = None
        self._g0, self._g1 = g0, g1
        self._running = True
        self._srcu_unlock_at(g0)
        exit_ns = P.vm_exit + pre if faults else 0.0
        self._run = (now, carry, g0, entry, g1, n, miss, faults, stop, gfn, exit_ns)
        return g1 - now + exit_ns

    def _run_interrupted(self, irq: simpy.Interrupt) -> Generator:
        """The guest run in ``_run`` was interrupted: a request before entry, or a kick (IPI) in the guest."""
        env = self.env
        P = self.P
        self._handback = None
        now, carry, g0, entry, g1, n, miss, faults, stop, gfn, exit_ns = self._run
        t = env.now
        self._running = False
        if irq.cause == "request":
            # interrupted in the host before entry: the rest of the hold is still owed
            self._carry = g0 - t
            self._entry = entry
            self.m.time[HOST] += t - now
            return
        done = int((t - g0 - entry) // self.access_ns) if self.access_ns else n
        self._consume(min(max(done, 0), n))
        if self._stalled_since is None and t >= self._recorded_until:
            # the access in flight waits for the IPI's exit and re-entry (unless it is the one whose
            # stall was recorded at this run's start, up to its planned completion: a kick before that
            # completion is not added to it, rather than recorded as a second, overlapping stall)
            self._stalled_since = t
        self._account(carry, t - g0, 0.0)
        # IPI delivery and the VM exit it causes; the exit acks the sender
        yield env.timeout(P.ipi_ack)
        self.m.time[HOST] += P.ipi_ack
        self.m.stall_ns += P.ipi_ack
        ack, self._ack = self._ack, None
        ack.succeed(env.now)

    def _run_end(self):
        """The guest run in ``_run`` ended: account it, consume its accesses and start its fault. Returns
        None when the vCPU goes on at once, else what it must wait for (see :meth:`_after_run`)."""
        now, carry, g0, entry, g1, n, miss, faults, stop, gfn, exit_ns = self._run
        self._running = False
        self._account(carry, g1 - g0, exit_ns)
        audit = self.vm.audit
        if audit is not None:
            audit.guest_run_end(self, self._chunk[self._pos:miss], g0, g1)
        self._consume(n)
        if not faults:
            return None
        if self._stalled_since is None:
            self._stalled_since = g1
        self.m.stall_ns += exit_ns
        if stop == "cr3" or stop == "wp":
            return stop
        return self._fault_begin(gfn, g1)

    def _after_run(self, res) -> Generator:
        """What a guest run's end must wait for: a CR3 write, an emulated page-table write, RET_PF_RETRY,
        or a fault's waits (``res`` from :meth:`_run_end`)."""
        if res == "cr3":
            yield from kvm_set_cr3(self)
        elif res == "wp":
            yield from kvm_mmu_pte_write(self, self._run[9], self._run[4])
        elif res == "retry":
            yield from self._retry_wait(self._run[4])
        else:
            yield from self._fault_wait(res)

    def _handed_back(self, got):
        """Resumed after a cohort run (desim/cohort.py) took this vCPU's steps: go on from the state it
        left (``_handback``: the end of the guest run in ``_run``, of a host allocation's wait or of a
        wait for ``mmu_lock``, or the top of the loop), as the step's own code would have. Returns as
        :meth:`_run_end`."""
        kind, t0, ctx = self._handback
        self._handback = None
        if kind == "top":
            return None  # the step is done: the top of the loop
        if kind == "run":
            return self._run_end()
        now = self.env.now
        self.m.stall_ns += now - t0
        self.m.time[HOST] += now - t0
        if kind == "host":
            return self._fault_acquire(ctx[1])
        self._fault_locked(ctx, got)
        return None

    def _fault_wait(self, res: tuple) -> Generator:
        """A fault that must wait (``res`` from :meth:`_fault_begin`): the host allocation's contention,
        then ``mmu_lock``; then the part under the lock."""
        env = self.env
        ev, ctx = res
        while True:
            t0 = env.now
            self._wait, self._wait_ctx = ev, (t0, ctx)  # where desim/cohort.py finds a waiting vCPU
            try:
                got = yield ev
            except simpy.Interrupt as irq:
                # only after a cohort run handed the vCPU back inside a guest run (desim/cohort.py)
                yield from self._run_interrupted(irq)
                return
            if self._handback is not None:
                res = self._handed_back(got)
                if res is not None:
                    yield from self._after_run(res)
                return
            self.m.stall_ns += env.now - t0
            self.m.time[HOST] += env.now - t0
            if ctx[0] != "host":
                self._fault_locked(ctx, got)
                return
            res = self._fault_acquire(ctx[1])
            if res is None:
                return
            ev, ctx = res

    def _pre_lock_ns(self, gfn: int) -> float:
        """The fault path's cost before ``mmu_lock``: exit handling and ``kvm_faultin_pfn``."""
        vm = self.vm
        P = self.P
        ss = vm.mmu.slot_of(gfn)
        if ss is None:
            # handle_mmio_page_fault's fast path on a valid MMIO SPTE, else the page-fault path first
            if vm.profile.kernel.mmio_caching and vm.mmu.mmio_spte(gfn) == "valid":
                return P.mmio_emulation
            return P.fault_handle + P.mmio_emulation
        hlevel = vm.mmu.host_level(ss, gfn)
        if vm.mmu.host_resident(ss, gfn, hlevel):
            return P.fault_handle + P.faultin_resident
        return P.fault_handle + getattr(P, _HOST_ALLOC[hlevel][0])

    def _service_requests(self) -> Generator:
        """The request checks of ``vcpu_enter_guest`` and ``kvm_mmu_reload``."""
        env = self.env
        vm = self.vm
        P = self.P
        start = env.now
        reqs, self.requests = self.requests, 0
        gas = self.gas
        if gas is not None and gas.guest.per_root:
            if reqs & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS or self.root_tag != vm.mmu.root_tag or not gas.root_usable():
                # per-CR3 roots (desim/guest_as.py): kvm_mmu_free_obsolete_roots, then kvm_mmu_reload
                yield from free_obsolete_roots(self)
                if gas.root is None:
                    yield from load_root(self)
                self.root_tag = vm.mmu.root_tag
                reqs |= KVM_REQ_TLB_FLUSH
        elif reqs & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS or self.root_tag != vm.mmu.root_tag:
            # kvm_mmu_free_obsolete_roots, then kvm_mmu_load -> mmu_alloc_direct_roots; the TDP
            # MMU allocates roots under the read lock (kvm_tdp_mmu_alloc_root), the others under write
            mode = READ if vm.profile.kernel.mmu == "tdp" else WRITE
            yield from vm.lock.take(mode, "root", self)
            users = vm.mmu.obsolete_roots.get(self.root_tag)
            if users is not None and mode == WRITE:
                # mmu_free_root_page: --root_count; the last user of an invalid root zaps it for real,
                # and kvm_mmu_commit_zap_page flushes every vCPU's TLB (under the write lock)
                if users <= 1:
                    del vm.mmu.obsolete_roots[self.root_tag]
                    vm.metrics.obsolete_root_flushes += 1
                    yield from kvm_flush_remote_tlbs(vm)
                else:
                    vm.mmu.obsolete_roots[self.root_tag] = users - 1
            yield env.timeout(P.root_alloc)
            self.root_tag = vm.mmu.root_tag
            vm.mmu.root_live = True
            vm.lock.release(self)
            reqs |= KVM_REQ_TLB_FLUSH  # a new root is loaded with a flush (kvm_mmu_load)
        if reqs & KVM_REQ_TLB_FLUSH:
            yield env.timeout(P.invept)
        self.m.stall_ns += env.now - start
        self.m.time[HOST] += env.now - start

    def _fault_begin(self, gfn: int, start: float):
        """``kvm_mmu_page_fault`` after the exit and ``kvm_faultin_pfn`` (``start`` = exit time).

        Plain code for the common path (no process switch when ``mmu_lock`` is
        free). Returns None when the fault is done, ``"retry"`` when the slot is
        INVALID (the caller waits in :meth:`_retry_wait`), or ``(event, ctx)``
        when the lock must be waited for (the caller yields on the event, then
        calls :meth:`_fault_locked` with ``ctx`` and the hand-off cost).
        """
        vm = self.vm
        mmu = vm.mmu
        ss = mmu.slot_of(gfn)
        if ss is None:
            return self._mmio_begin(gfn, start)
        if ss.slot.invalid:
            return "retry"
        hlevel = mmu.host_level(ss, gfn)
        return self._faultin(ss, gfn, hlevel, mmu.host_resident(ss, gfn, hlevel), start)

    def _faultin(self, ss, gfn: int, hlevel: int, resident: bool, start: float):
        """``kvm_faultin_pfn`` on a valid slot (the host allocation on first touch), then ``mmu_lock``:
        returns as :meth:`_fault_begin` does."""
        vm = self.vm
        mmu = vm.mmu
        ctx = (ss, gfn, hlevel, self.root_tag, start)
        if not resident:
            mmu.make_resident(ss, gfn, hlevel)
            vm.metrics.host_page_allocs[_HOST_ALLOC[hlevel][1]] += 1
            # zone->lock, lru_lock and memory-bandwidth contention of the host allocation (desim/hostmm.py),
            # from when the allocation started
            t_alloc = self.env.now - getattr(vm.P, _HOST_ALLOC[hlevel][0])
            extra = vm.hostmm.first_touch(self.index, t_alloc, hlevel)
            if extra > 0:
                return self.env.timeout(extra), ("host", ctx)
        return self._fault_acquire(ctx)

    def _fault_acquire(self, ctx: tuple):
        """Take ``mmu_lock`` for the fault: None when done at once, else ``(event, ctx)`` to wait on."""
        vm = self.vm
        ev = vm.lock.acquire(vm.fault_lock_mode, "fault", self)
        if ev is not None:
            return ev, ctx
        self._fault_locked(ctx, 0.0)
        return None

    def _mmio_begin(self, gfn: int, start: float):
        """An access to a gpa without a memslot: emulated MMIO (``KVM_EXIT_MMIO`` or an in-kernel device).

        With ``mmio_caching`` (``enable_mmio_caching``): a valid MMIO SPTE
        makes the access an EPT misconfiguration handled locklessly
        (``handle_mmio_page_fault`` -> ``check_mmio_spte`` -> ``RET_PF_EMULATE``);
        a stale one (its generation predates the last memslot update) fails
        ``check_mmio_spte`` and takes the page-fault path, as does an access
        with no SPTE (an EPT violation): under ``mmu_lock`` the fault installs
        an MMIO SPTE with the current generation (``make_mmio_spte`` in
        ``tdp_mmu_map_handle_target_level`` / ``mmu_set_spte``). Without it,
        ``kvm_handle_noslot_fault`` returns ``RET_PF_EMULATE`` at once: every
        access is an EPT violation, no lock, no SPTE.
        Simplification: a memslot created over a gfn that holds an MMIO SPTE
        is faulted in as an EPT violation (the kernel sees a misconfiguration).
        """
        vm = self.vm
        self.m.mmio_exits += 1
        state = vm.mmu.mmio_spte(gfn) if vm.profile.kernel.mmio_caching else "off"
        if state == "valid" or state == "stale":
            vm.metrics.ept_misconfigs += 1
        if state == "valid" or state == "off":
            self._consume(1)
            if state == "off":
                vm.metrics.record_fault(self.index, "mmio", start, self.env.now + self.vm.P.vm_entry - start)
            return None
        if state == "stale":
            vm.metrics.mmio_spte_refreshes += 1
        ctx = (None, gfn, state == "none", self.root_tag, start)
        ev = vm.lock.acquire(vm.fault_lock_mode, "fault", self)
        if ev is not None:
            return ev, ctx
        self._fault_locked(ctx, 0.0)
        return None

    def _mmio_locked(self, ctx: tuple, handoff: float) -> None:
        """The MMIO fault under ``mmu_lock``: install the MMIO SPTE (unless the root went obsolete)."""
        _, gfn, violation, root_tag, start = ctx
        vm = self.vm
        P = vm.P
        mmu = vm.mmu
        hold = handoff
        if root_tag == mmu.root_tag and mmu.slot_of(gfn) is None:
            if self.gas is not None:
                self.gas.link(gfn)
            allocated = mmu.install_mmio(gfn)
            vm.metrics.pt_pages_allocated += allocated
            hold += P.spte_install + allocated * P.pt_page_alloc
        if hold:
            vm.lock.release_after(self, hold)
            self._carry = hold
            self.m.stall_ns += hold
        else:
            vm.lock.release(self)
        self._consume(1)
        if violation:
            vm.metrics.record_fault(self.index, "mmio", start, self.env.now + hold + P.vm_entry - start)

    def _retry_wait(self, start: float) -> Generator:
        """RET_PF_RETRY on an INVALID slot: re-enter and fault again until the VMM's second swap."""
        env = self.env
        vm = self.vm
        P = self.P
        metrics = vm.metrics
        t0 = env.now
        self._retrying = True
        self._srcu_unlock_at(t0)
        yield vm.slot_update_done()
        self._retrying = False
        period = P.vm_exit + P.vm_entry + P.fault_handle
        retries = max(1, math.ceil((env.now - start) / period))
        self.m.faults["retry"] += retries
        metrics.record_faults_alike(start, period, retries)
        self.m.stall_ns += env.now - t0
        self.m.time[HOST] += env.now - t0

    def _fault_locked(self, ctx: tuple, handoff: float) -> None:
        """The part of the fault under ``mmu_lock``: staleness checks, SPTE install, prefetch."""
        if ctx[0] is None:
            self._mmio_locked(ctx, handoff)
            return
        ss, gfn, hlevel, root_tag, start = ctx
        vm = self.vm
        P = self.P
        mmu = vm.mmu
        metrics = vm.metrics
        gas = self.gas
        # is_page_fault_stale: obsolete root, or the slot went INVALID/away meanwhile
        if (root_tag != mmu.root_tag or ss.slot.invalid or mmu.slots.get(ss.slot.id) is not ss
                or (gas is not None and not gas.root_usable())):
            cause = "retry"
            hold = 0.0
        elif mmu._mapped_in(ss, gfn):
            if gas is not None and gas.link(gfn):
                cause = "root_link"  # the SPTE was there: the fault linked the root's top-level entry
                hold = P.spte_install
            else:
                cause = "spurious"
                hold = 0.0
        else:
            if gas is not None:
                gas.link(gfn)
            kernel = vm.profile.kernel
            splits = mmu.nx_fetch_splits
            level = PG_LEVEL_4K if ss.slot.dirty_logging else mmu.nx_level(ss, gfn, hlevel)
            if mmu.nx_exec is not None and level < hlevel:
                metrics.nx_4k_maps += 1
            if mmu.nx_fetch_splits != splits:
                cause = "nx"  # a fetch from a page that a non-executable huge SPTE maps
            else:
                cause = "after_zap" if mmu.ever_mapped(ss, gfn) else "first_touch"
            allocated = mmu.install(ss, gfn, level)
            prefetched = 0
            if kernel.pte_prefetch and level == PG_LEVEL_4K:
                for g in mmu.prefetch_candidates(ss, gfn, need_accessed=kernel.mmu == "shadow"):
                    allocated += mmu.install(ss, g, PG_LEVEL_4K)
                    prefetched += 1
                metrics.sptes_prefetched += prefetched
            metrics.sptes_installed += 1 + prefetched
            metrics.pt_pages_allocated += allocated
            hold = P.spte_install + allocated * P.pt_page_alloc + prefetched * P.prefetch_spte
        hold += handoff
        if hold:
            vm.lock.release_after(self, hold)
            self._carry = hold
            self.m.stall_ns += hold
        else:
            vm.lock.release(self)
        now = self.env.now
        # the VM entry that ends this fault is the next guest run's: draw it now, use it then
        self._entry = entry = P.vm_entry
        metrics.record_fault(self.index, cause, start, now + hold + entry - start)
