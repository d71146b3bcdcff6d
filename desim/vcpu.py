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

Simplifications: a fault's exit cost is paid at the end of the guest run that
leads to it; ``fast_page_fault`` is not modelled (only non-present SPTEs
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

from .lock import READ, WRITE
from .mmu import EVER_MAPPED, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K
from .tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, KVM_REQ_TLB_FLUSH

if TYPE_CHECKING:  # pragma: no cover
    from .vm import Vm
    from .workload import AccessStream

GUEST, HOST, HALTED = "guest", "host", "halted"
_HOST_ALLOC = {PG_LEVEL_4K: ("host_alloc_4k", "4k"), PG_LEVEL_2M: ("host_alloc_2m", "2m"),
               PG_LEVEL_1G: ("host_alloc_1g", "1g")}


class Vcpu:
    """One vCPU of a :class:`~desim.vm.Vm`."""

    def __init__(self, vm: "Vm", index: int) -> None:
        self.vm = vm
        self.env = vm.env
        self.index = index
        self.m = vm.metrics.vcpus[index]
        self.mode = HALTED
        self._mode_since = 0.0
        self.requests = 0
        self.root_tag = 0  # no root loaded yet: kvm_mmu_load on first entry
        self.in_srcu = False
        self._srcu_waiters: list[simpy.Event] = []
        self.stream: AccessStream | None = None
        self.access_ns = 0.0
        self.on_done = None
        self._wake: simpy.Event | None = None
        self._ack: simpy.Event | None = None
        self._chunk: np.ndarray | None = None
        self._pos = 0
        self._misses: list[int] = []
        self._mi = 0
        self._seq = -1
        self.proc = self.env.process(self.run())

    # -- state and SRCU --------------------------------------------------------
    def _set_mode(self, mode: str) -> None:
        now = self.env.now
        self.m.time[self.mode] += now - self._mode_since
        self.mode = mode
        self._mode_since = now

    def _srcu_lock(self) -> None:
        self.in_srcu = True

    def _srcu_unlock(self) -> None:
        self.in_srcu = False
        if self._srcu_waiters:
            for ev in self._srcu_waiters:
                ev.succeed()
            self._srcu_waiters = []

    def srcu_reader_gone(self) -> simpy.Event | None:
        """For ``synchronize_srcu_expedited``: an event when this vCPU leaves its read-side section."""
        if not self.in_srcu:
            return None
        ev = self.env.event()
        self._srcu_waiters.append(ev)
        return ev

    def kick(self) -> simpy.Event | None:
        """``kvm_vcpu_kick``: IPI if in guest mode; returns the ack event, or None (no IPI)."""
        if self.mode != GUEST:
            return None
        self._set_mode(HOST)
        self.m.kicks += 1
        self._ack = self.env.event()
        self.proc.interrupt("kick")
        return self._ack

    def assign(self, stream: "AccessStream", access_ns: float, on_done) -> None:
        """Give the vCPU a phase's access stream and wake it (INIT/SIPI or an interrupt)."""
        self.stream = stream
        self.access_ns = access_ns
        self.on_done = on_done
        self._chunk = None
        if self._wake is not None:
            self._wake.succeed()

    # -- access stream ------------------------------------------------------------
    def _next_chunk(self) -> bool:
        chunk = self.stream.next_chunk() if self.stream is not None else None
        if chunk is None:
            return False
        self._chunk = chunk
        self._pos = 0
        self._seq = -1
        return True

    def _next_miss(self) -> int:
        """Index in the chunk of the next access that will fault (or len(chunk))."""
        mmu = self.vm.mmu
        chunk = self._chunk
        if self._seq != mmu.zap_seq:
            miss = np.flatnonzero(~mmu.mapped_mask(chunk[self._pos:]))
            self._misses = (miss + self._pos).tolist()
            self._mi = 0
            self._seq = mmu.zap_seq
        misses = self._misses
        while self._mi < len(misses):
            m = misses[self._mi]
            if m >= self._pos and not mmu.is_mapped(int(chunk[m])):
                return m
            self._mi += 1
        return len(chunk)

    def _consume(self, n: int) -> None:
        self._pos += n
        self.m.accesses += n

    # -- the vCPU loop -------------------------------------------------------------
    def run(self) -> Generator:
        env = self.env
        vm = self.vm
        P = vm.P
        mmu = vm.mmu
        audit = vm.audit
        while True:
            if self._chunk is None or self._pos >= len(self._chunk):
                if not self._next_chunk():
                    if self.stream is not None:
                        self.stream = None
                        self.m.finish_ns = env.now
                        done, self.on_done = self.on_done, None
                        if done is not None:
                            done(self)
                    # kvm_vcpu_halt: SRCU released, asleep until given work
                    self._set_mode(HALTED)
                    self._srcu_unlock()
                    self._wake = env.event()
                    yield self._wake
                    self._wake = None
                    self._set_mode(HOST)
                    self._srcu_lock()
                    continue
            if self.requests or self.root_tag != mmu.root_tag:
                yield from self._service_requests()
            miss = self._next_miss()
            n = miss - self._pos
            faults = miss < len(self._chunk)
            if audit is not None:
                audit.guest_run_start(self, self._chunk[self._pos:miss])
            self._set_mode(GUEST)
            self._srcu_unlock()
            start = env.now
            try:
                yield env.timeout(P.vm_entry + n * self.access_ns + (P.vm_exit if faults else 0.0))
            except simpy.Interrupt:
                done = int((env.now - start - P.vm_entry) // self.access_ns) if self.access_ns else n
                self._consume(min(max(done, 0), n))
                # IPI delivery and the VM exit it causes; the exit acks the sender
                yield env.timeout(P.ipi_ack)
                self._srcu_lock()
                self.m.stall_ns += P.ipi_ack
                ack, self._ack = self._ack, None
                ack.succeed(env.now)
                continue
            if audit is not None:
                audit.guest_run_end(self, self._chunk[self._pos:miss])
            self._consume(n)
            self._set_mode(HOST)
            self._srcu_lock()
            if faults:
                yield from self._page_fault(int(self._chunk[miss]), env.now - P.vm_exit)

    def _service_requests(self) -> Generator:
        """The request checks of ``vcpu_enter_guest`` and ``kvm_mmu_reload``."""
        env = self.env
        vm = self.vm
        P = vm.P
        start = env.now
        reqs, self.requests = self.requests, 0
        if reqs & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS or self.root_tag != vm.mmu.root_tag:
            # kvm_mmu_free_obsolete_roots, then kvm_mmu_load -> mmu_alloc_direct_roots; the TDP
            # MMU allocates roots under the read lock (kvm_tdp_mmu_alloc_root), the others under write
            mode = READ if vm.profile.kernel.mmu == "tdp" else WRITE
            ev = vm.lock.acquire(mode, "root", self)
            if ev is not None:
                yield ev
            yield env.timeout(P.root_alloc)
            self.root_tag = vm.mmu.root_tag
            vm.lock.release(self)
            reqs |= KVM_REQ_TLB_FLUSH  # a new root is loaded with a flush (kvm_mmu_load)
        if reqs & KVM_REQ_TLB_FLUSH:
            yield env.timeout(P.invept)
        self.m.stall_ns += env.now - start

    def _page_fault(self, gfn: int, start: float) -> Generator:
        """``kvm_mmu_page_fault`` for one access (``start`` = when the exit began)."""
        env = self.env
        vm = self.vm
        P = vm.P
        mmu = vm.mmu
        metrics = vm.metrics
        ss = mmu.slot_of(gfn)
        if ss is None:
            # no memslot: emulated MMIO (handle_mmio_page_fault / KVM_EXIT_MMIO), the access is done
            yield env.timeout(P.mmio_emulation)
            self.m.mmio_exits += 1
            self._consume(1)
            self.m.stall_ns += env.now - start
            return
        if ss.slot.invalid:
            # kvm_faultin_pfn: KVM_MEMSLOT_INVALID -> RET_PF_RETRY; the vCPU re-enters and faults
            # again until the VMM's second memslot swap
            yield vm.slot_update_done()
            period = P.vm_exit + P.vm_entry + P.fault_handle
            retries = max(1, math.ceil((env.now - start) / period))
            self.m.faults["retry"] += retries
            metrics.fault_latency.extend([period] * retries)
            metrics.fault_time.extend([start] * retries)
            metrics.fault_is_refault.extend([0] * retries)
            self.m.stall_ns += env.now - start
            return
        kernel = vm.profile.kernel
        hlevel = mmu.host_level(ss, gfn)
        resident = mmu.host_resident(ss, gfn, hlevel)
        cost_name, size = _HOST_ALLOC[hlevel]
        yield env.timeout(P.fault_handle + (P.faultin_resident if resident else getattr(P, cost_name)))
        if not resident:
            mmu.make_resident(ss, gfn, hlevel)
            metrics.host_page_allocs[size] += 1
        root_tag = self.root_tag
        ev = vm.lock.acquire(vm.fault_lock_mode, "fault", self)
        if ev is not None:
            yield ev
        # is_page_fault_stale: obsolete root, or the slot went INVALID/away meanwhile
        if root_tag != mmu.root_tag or ss.slot.invalid or mmu.slots.get(ss.slot.id) is not ss:
            cause = "retry"
            hold = 0.0
        elif mmu._mapped_in(ss, gfn):
            cause = "spurious"
            hold = 0.0
        else:
            level = PG_LEVEL_4K if ss.slot.dirty_logging else hlevel
            cause = "after_zap" if ss.state[gfn - ss.slot.base_gfn] & EVER_MAPPED else "first_touch"
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
        if hold:
            yield env.timeout(hold)
        vm.lock.release(self)
        latency = env.now - start + P.vm_entry
        metrics.record_fault(self.index, cause, start, latency)
        self.m.stall_ns += env.now - start
