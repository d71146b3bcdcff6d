"""The VMM: a SimPy process issuing ``KVM_SET_USER_MEMORY_REGION`` ioctls.

Models ``kvm_set_memory_region`` / ``kvm_set_memslot`` (virt/kvm/kvm_main.c),
all under ``kvm->slots_lock`` (the VMM's ioctls are serialised: one script
runs at a time, so the lock is implicit):

* Every ioctl: ``ioctl_fixed`` (syscall, checks, ``slots_lock``).
* CREATE and FLAGS_ONLY: install the new memslot array with
  ``kvm_swap_active_memslots``, which ends in ``synchronize_srcu_expedited``.
  CREATE first allocates the slot's metadata (``kvm_prepare_memory_region``
  -> ``kvm_alloc_memslot_metadata``: rmaps, ``lpage_info``), a cost per page.
* DELETE and MOVE: (a) ``kvm_invalidate_memslot``: swap in a copy of the slot
  marked ``KVM_MEMSLOT_INVALID`` and wait for SRCU readers (vCPUs in
  host-side exit handling) to leave; (b) ``kvm_arch_flush_shadow_memslot``
  runs the zap policy; (c) MOVE allocates the moved slot's metadata; (d) swap
  in the final array (slot gone, or at its new gfn) and wait for SRCU again;
  (e) ``kvm_free_memslot`` frees the old metadata (per page). vCPUs faulting
  on the INVALID slot meanwhile retry (``RET_PF_RETRY``) until (d) is done.
  ``memslot_invalidate`` is what DELETE/MOVE cost beyond that (the slot copy,
  ``kvm_replace_memslot`` twice, ``kvm_arch_guest_memory_reclaimed``): on
  the kvm_pvm hosts it was measured at several times a plain swap, for reasons
  the model does not break down.
* FLAGS_ONLY that enables dirty logging (``kvm_mmu_slot_apply_flags``):
  with eager page splitting (``kvm.eager_page_split``, TDP MMU) the slot's
  huge SPTEs are split into 4 KiB SPTEs in place, without faults; otherwise
  they are zapped (write-protected huge pages are split on the next write
  fault). Disabling it does nothing here (``kvm_mmu_zap_collapsible_sptes``
  is not modelled).

Every ioctl's latency is recorded. An ioctl that the kernel would refuse
(overlap: ``-EEXIST``; unknown slot: ``-EINVAL``) is a scenario error.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Generator, Iterable

from .errors import DesimInputError
from .lock import WRITE
from .memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEMSLOT_INVALID, Memslot, MemslotOp, MrChange
from .tlb import kvm_flush_remote_tlbs
from .zap import zap_all_fast

if TYPE_CHECKING:  # pragma: no cover
    from .vm import Vm


class Vmm:
    """The VMM thread that updates memslots."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.env = vm.env

    def run_script(self, ops: Iterable[MemslotOp]) -> Generator:
        """Issue ``ops`` at their ``time_ns`` after the script starts (or as soon as the previous ends)."""
        t0 = self.env.now
        for op in ops:
            due = t0 + op.time_ns
            if due > self.env.now:
                yield self.env.timeout(due - self.env.now)
            yield from self.set_memory_region(op)

    def kvm_swap_active_memslots(self) -> Generator:
        """Install a new memslot array: the generation advances, then ``kvm_arch_memslots_updated``.

        x86's ``kvm_arch_memslots_updated`` (arch/x86/kvm/x86.c) calls
        ``kvm_mmu_invalidate_mmio_sptes``, which on an MMIO-generation wrap runs
        ``kvm_mmu_zap_all_fast`` whatever the zap policy, and kicks every vCPU
        (``kvm_vcpu_kick``: an IPI to each vCPU in guest mode, not waited for;
        "Force re-initialization of steal_time cache"). Every MMIO SPTE is now
        stale (:meth:`Mmu.mmio_spte`).

        Checked against Linux 6.1.176 (Debian bookworm's linux source package):
        virt/kvm/kvm_main.c ``kvm_swap_active_memslots`` sets
        ``KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS`` (bit 63) on the new array, swaps
        it in, waits ``synchronize_srcu_expedited``, then takes ``gen +=
        KVM_ADDRESS_SPACE_NUM`` (2 on x86, arch/x86/include/asm/kvm_host.h) and
        calls ``kvm_arch_memslots_updated(kvm, gen)`` before storing it;
        ``kvm_create_vm`` starts address space i at generation i. x86.c
        ``kvm_arch_memslots_updated`` is exactly the two steps above (the same
        text in every copy of x86.c the search index holds; 6.12+ could not be
        fetched here). Swaps per ioctl (kvm_set_memslot): CREATE and FLAGS_ONLY
        one (``kvm_activate_memslot``), DELETE and MOVE two
        (``kvm_invalidate_memslot``, then ``kvm_activate_memslot``).
        Simplifications: the generation advances at the swap, not after the
        SRCU wait (``check_mmio_spte`` fails during the update anyway, because
        of the in-progress bit, so an MMIO access then takes the fault path in
        both); ``kvm_vcpu_kick`` also wakes a halted vCPU
        (``kvm_vcpu_wake_up``), which finds nothing to do and blocks again:
        host CPU time only, not modelled.
        """
        vm = self.vm
        vm.metrics.memslot_swaps += 1
        if vm.mmu.swap_memslots():
            vm.metrics.mmio_gen_wraps += 1
            yield from zap_all_fast(vm)
        kicked = sum(1 for v in vm.vcpus if v.kick() is not None)
        if kicked:
            vm.metrics.ipis_sent += kicked
            yield self.env.timeout(kicked * vm.P.ipi_send)

    def synchronize_srcu_expedited(self) -> Generator:
        """Wait for every vCPU now in an SRCU read-side section (host-side exit handling)."""
        env = self.env
        vm = self.vm
        start = env.now
        waits = [ev for ev in (v.srcu_reader_gone() for v in vm.vcpus) if ev is not None]
        yield env.timeout(vm.P.srcu_sync)
        if waits:
            yield env.all_of(waits)
        vm.metrics.srcu_syncs += 1
        vm.metrics.srcu_wait_ns += env.now - start

    def set_memory_region(self, op: MemslotOp) -> Generator:
        """One ``KVM_SET_USER_MEMORY_REGION``."""
        env = self.env
        vm = self.vm
        mmu = vm.mmu
        start = env.now
        yield env.timeout(vm.P.ioctl_fixed)
        if op.op == MrChange.CREATE:
            yield env.timeout(op.npages * vm.P.memslot_alloc_page)  # kvm_alloc_memslot_metadata
            mmu.add_slot(Memslot(op.slot, op.base_gfn, op.npages, op.flags, op.ua or vm.default_ua(op)))
            yield from self.kvm_swap_active_memslots()
            yield from self.synchronize_srcu_expedited()
        elif op.op in (MrChange.DELETE, MrChange.MOVE):
            ss = mmu.slots.get(op.slot)
            if ss is None:
                raise DesimInputError(f"memslot ioctl at {op.time_ns:.0f} ns: {op.op.value} of slot {op.slot}, "
                                      "which does not exist (KVM returns -EINVAL)")
            yield env.timeout(vm.P.memslot_invalidate)
            ss.slot.flags |= KVM_MEMSLOT_INVALID
            yield from self.kvm_swap_active_memslots()
            yield from self.synchronize_srcu_expedited()
            yield from vm.policy.flush_shadow_memslot(vm, ss)
            if op.op == MrChange.MOVE:
                yield env.timeout(ss.slot.npages * vm.P.memslot_alloc_page)  # kvm_alloc_memslot_metadata
            if op.op == MrChange.DELETE:
                mmu.remove_slot(op.slot)
                if vm.audit is not None:
                    vm.audit.slot_deleted(ss)
            else:
                mmu.move_slot(op.slot, op.base_gfn)
            ss.slot.flags &= ~KVM_MEMSLOT_INVALID
            yield from self.kvm_swap_active_memslots()
            yield from self.synchronize_srcu_expedited()
            vm.memslot_update_finished()
            yield env.timeout(ss.slot.npages * vm.P.memslot_free_page)  # kvm_free_memslot
        else:  # FLAGS_ONLY
            ss = mmu.slots.get(op.slot)
            if ss is None:
                raise DesimInputError(f"memslot ioctl at {op.time_ns:.0f} ns: flags change of slot {op.slot}, "
                                      "which does not exist (KVM returns -EINVAL)")
            enabling = op.flags & KVM_MEM_LOG_DIRTY_PAGES and not ss.slot.flags & KVM_MEM_LOG_DIRTY_PAGES
            ss.slot.flags = op.flags
            yield from self.kvm_swap_active_memslots()
            yield from self.synchronize_srcu_expedited()
            if enabling:
                token = self
                yield from vm.lock.take(WRITE, "zap", token)
                if vm.profile.kernel.eager_page_split and vm.profile.kernel.mmu == "tdp":
                    # kvm_mmu_slot_try_split_huge_pages (under the read lock in the kernel; the
                    # write lock here is a simplification): 512 new SPTEs per huge page split
                    split, allocated = mmu.split_slot_huge_leafs(ss)
                    yield env.timeout(split * 512 * vm.P.spte_install + allocated * vm.P.pt_page_alloc)
                    vm.metrics.pt_pages_allocated += allocated
                    vm.metrics.sptes_installed += split * 511
                    n = split  # the huge SPTEs replaced: the TLB must drop them
                else:
                    n = mmu.zap_slot_huge_leafs(ss)
                    if vm.audit is not None and n:
                        vm.audit.sptes_zapped(env.now)
                    yield env.timeout(n * vm.P.spte_zap)
                    vm.metrics.sptes_zapped += n
                if n:
                    yield from kvm_flush_remote_tlbs(vm)
                vm.lock.release(token)
        vm.metrics.record_ioctl(op.op.value, start, env.now - start)
