"""Zap policies: what ``kvm_arch_flush_shadow_memslot`` does when a memslot is deleted or moved.

A policy is a strategy object with one method, :meth:`ZapPolicy.flush_shadow_memslot`,
a SimPy generator run by the VMM's ioctl between the two memslot swaps.
Policies live in :data:`ZAP_POLICIES`; adding one needs nothing else changed.

* ``fast`` — ``kvm_mmu_zap_all_fast`` (arch/x86/kvm/mmu/mmu.c), the x86
  default: ``write_lock(mmu_lock)``, toggle ``mmu_valid_gen`` and invalidate
  every TDP MMU root (``kvm_tdp_mmu_invalidate_roots``),
  ``kvm_make_all_cpus_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)`` (IPIs, wait
  for the acks, under the lock), ``kvm_zap_obsolete_pages`` for the legacy /
  shadow MMU's pages in batches of ``BATCH_ZAP_PAGES`` with
  ``cond_resched_rwlock_write`` lock breaks, ``kvm_mmu_commit_zap_page``
  (a remote flush), ``write_unlock``; then, TDP MMU only,
  ``kvm_tdp_mmu_zap_invalidated_roots`` tears the invalid roots down under the
  *read* lock (``tdp_mmu_zap_root``: :func:`tdp_zap_root_visits` entries
  visited, ``handle_removed_pt`` per table), yielding when contended. Every
  vCPU then loads a new empty root and re-faults everything it touches, in
  every memslot.
* ``targeted`` — the seed's ``kvm_mmu_zap_memslot`` (``KVM_ZAP_ONLY_MEMSLOT_SPTES``;
  6.12+: ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` disabled): ``write_lock``, zap the
  slot's *leaf* SPTEs (``kvm_unmap_gfn_range``; the seed's
  ``slot_handle_all_level(kvm_zap_rmapp)`` probes every gfn's rmap at every
  level, so the cost is proportional to the slot's size), for the legacy and
  shadow MMUs on 6.12+ also the per-gfn hash walk of
  ``kvm_mmu_zap_memslot_pages_and_flush`` (:func:`hash_walk_probes`, and the
  shadow pages of guest page tables in the slot with their children), one
  remote flush, ``write_unlock``. The TDP MMU's walk (``tdp_mmu_zap_leafs``)
  visits every entry of the range in each present table
  (:meth:`desim.mmu.Mmu.tdp_walk_visits`), not only what it zaps.
  Upper-level SPTEs and other slots' SPTEs survive.

Lock breaks (:func:`hold_with_lockbreak`): the kernel's walks check
``need_resched() || rwlock_needbreak(&kvm->mmu_lock)`` every iteration
(``tdp_mmu_iter_cond_resched``, ``__walk_slot_rmaps``,
``kvm_mmu_zap_memslot_pages_and_flush``; ``kvm_zap_obsolete_pages`` every
``BATCH_ZAP_PAGES`` pages through ``cond_resched_rwlock_write``). Which of the
two can be true depends on the preemption model and the kernel version
(:mod:`desim.sched`): on 6.11+ booted ``none``/``voluntary`` a zap never breaks
the lock for a waiter, only for ``need_resched``. The targeted zap flushes
remote TLBs before each break that follows zapped SPTEs; the fast zap does not.

What a vCPU waiting on ``mmu_lock`` sees during a fast zap on the legacy or
shadow MMU: ``kvm_zap_obsolete_pages`` calls ``cond_resched_rwlock_write``
only after ``BATCH_ZAP_PAGES`` (10) zapped pages, and that drops the lock only
if ``rwlock_needbreak()`` or ``need_resched()`` (``__cond_resched_rwlock_write``,
kernel/sched/core.c). A batch is therefore the *granularity of the check*,
not the length of a hold: on 6.11+ booted ``none`` or ``voluntary`` (this
project's kvm_pvm hosts: 6.18, ``Dynamic Preempt: none``) no waiter ever
breaks the lock, and a vCPU that needs it (a fault, or
``kvm_mmu_free_obsolete_roots`` after the ``KVM_REQ_MMU_FREE_OBSOLETE_ROOTS``
kick, both ``write_lock`` on a shadow MMU) spins until the whole zap ends or
until the scheduler's tick sets ``need_resched()`` for the zapping thread,
which needs another runnable task on its CPU (:class:`desim.sched.NeedResched`,
``kernel.competing_task``). Measured with the timed guest on these hosts
(``desim.kvm.latency``, the op issued while the vCPUs touch; a loaded host):
one vCPU on 256 MiB (VMM and vCPU threads on the 2 CPUs): the vCPU stalled
8.1, 8.2 and 12.2 ms in one piece, the whole zap, then re-faulted; two vCPUs
on 1 GiB (three threads on 2 CPUs: the VMM thread always has a competitor):
stalls of 3.7 to 6.6 ms (a 4 ms tick at HZ = 250 after the 1.5 ms slice), a
few hundred microseconds of re-faults, then the next hold. The earlier reading
that a vCPU waits one batch (~190 us) came from a model that let waiters break
the lock; the real harness's 50-120 us "longest stalls" were the run-queue
filter (:func:`desim.kvm.latency.not_preempted`) dropping these spins on a
loaded host, where a pass's run-queue wait covers them.

Simplifications: the per-SPTE and per-probe work is charged as time in
slices of ``ZAP_SLICE`` units; a lock break can only happen at a slice end
(the kernel checks every iteration).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Generator

from .errors import DesimInputError
from .guest_as import zap_roots_in_slot
from .lock import READ, WRITE
from .mmu import SlotSptes
from .tlb import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, kvm_flush_remote_tlbs, kvm_make_all_cpus_request

if TYPE_CHECKING:  # pragma: no cover
    from .vm import Vm

BATCH_ZAP_PAGES = 10  # arch/x86/kvm/mmu/mmu.c
KVM_MMU_HASH_BUCKETS = 1 << 12  # 1 << KVM_MMU_HASH_SHIFT (arch/x86/include/asm/kvm_host.h)
HASH_WALK_SINCE = (6, 12)  # kvm_mmu_zap_memslot_pages_and_flush came with KVM_X86_QUIRK_SLOT_ZAP_ALL
ZAP_SLICE = 512  # SPTEs or gfns charged between two needbreak checks (one page table's worth)
KVM_ZAP_ONLY_MEMSLOT_SPTES = 1 << 0  # the seed's include/uapi/linux/kvm.h


def hold_with_lockbreak(vm: "Vm", token: object, mode: str, role: str, units: int, unit_ns: float,
                        slice_units: int, zapped: int = 0, flush_on_yield: bool = False,
                        flush_pending: bool = False) -> Generator:
    """Hold ``mmu_lock`` (already taken) for ``units * unit_ns``, yielding it when the kernel would.

    Models ``cond_resched_rwlock_write`` / ``cond_resched_rwlock_read``
    (kernel/sched/core.c) as called by ``tdp_mmu_iter_cond_resched`` and the
    rmap / hash walks: at each check, if ``rwlock_needbreak`` (waiters, and a
    preemptible model: :attr:`MmuLock.needbreak`) or ``need_resched()`` (a
    competing task used up the holder's slice: :class:`desim.sched.NeedResched`),
    drop the lock, let the waiters in (FIFO) and queue again behind them; after
    a ``need_resched`` yield the holder first waits for its CPU back.

    Flush before yielding (``flush_on_yield``, the write-locked targeted zap):
    ``tdp_mmu_iter_cond_resched(kvm, &iter, flush, shared)`` calls
    ``kvm_flush_remote_tlbs`` before it drops the lock if it zapped anything
    since the last flush, as do ``__walk_slot_rmaps(..., flush_on_yield)`` and
    ``kvm_mmu_zap_memslot_pages_and_flush`` (``kvm_mmu_remote_flush_or_zap``):
    a vCPU let in must not keep using a zapped SPTE from its TLB. Each such
    flush is a round of IPIs and acks under the lock. ``zapped`` SPTEs are
    taken as spread evenly over the ``units`` of the walk; ``flush_pending``
    carries a flush owed by an earlier walk under the same hold. The fast zap's
    yields (``kvm_zap_obsolete_pages``, ``tdp_mmu_zap_root``) do not flush:
    obsolete roots are unreachable. Returns whether a flush is still owed (the
    caller's final flush).
    """
    env = vm.env
    lock = vm.lock
    if units <= 0 or unit_ns <= 0:
        return flush_pending or zapped > 0
    resched = vm.need_resched
    resched_at = resched.at(env.now)
    if not lock.preemption and resched_at == math.inf:
        yield env.timeout(units * unit_ns)
        return flush_pending or zapped > 0
    left = units
    flushed = 0  # zapped SPTEs covered by a flush so far
    while left > 0:
        step = min(slice_units, left)
        yield env.timeout(step * unit_ns)
        left -= step
        if left <= 0:
            break
        scheduler = env.now >= resched_at
        if scheduler or lock.needbreak():
            done = zapped * (units - left) // units
            if flush_on_yield and (flush_pending or done > flushed):
                yield from kvm_flush_remote_tlbs(vm)
                vm.metrics.yield_flushes += 1
                flushed, flush_pending = done, False
            vm.metrics.lock_breaks += 1
            lock.release(token)
            if scheduler:
                vm.metrics.resched_yields += 1
                yield env.timeout(resched.off_cpu_ns)
            yield from lock.take(mode, role, token)
            resched_at = resched.at(env.now)
    return flush_pending or zapped > flushed


def tdp_zap_root_visits(tables_by_level: dict[int, int], root_level: int, root: int) -> int:
    """Entries ``tdp_mmu_zap_root`` visits tearing down one root (arch/x86/kvm/mmu/tdp_mmu.c).

    It zaps in passes of decreasing granularity, ``__tdp_mmu_zap_root`` at
    4 KiB, 2 MiB, 1 GiB and the root's level, each a full walk
    (``for_each_tdp_pte_min_level``) over every entry of every present table at
    or above that pass's level: a PT page is walked once, a PD page twice, a
    PDPT page three times and the root four times, 512 entries each.
    Simplification: the walk is bounded at host MAXPHYADDR
    (``tdp_mmu_max_gfn_exclusive``), which the model ignores (all 512 root
    entries are counted); a 5-level root's PML4 pages count as one.
    """
    if not root:
        return 0
    tables = {lvl: n for lvl, n in tables_by_level.items()}
    if root_level == 5:
        tables[4] = 1 if any(tables.values()) else 0
    tables[root_level] = 1
    return 512 * sum(sum(n for lvl, n in tables.items() if lvl >= m) for m in (1, 2, 3, root_level))


def hash_walk_probes(npages: int, shadow_pages: int) -> int:
    """Hash-chain probes of ``kvm_mmu_zap_memslot_pages_and_flush`` over a slot (arch/x86/kvm/mmu/mmu.c).

    For each gfn of the slot, ``for_each_gfn_valid_sp_with_gptes`` walks the
    bucket ``mmu_page_hash[kvm_page_table_hashfn(gfn)]`` (``KVM_MMU_HASH_SHIFT``
    = 12: 4096 buckets, ``hash_64`` spreads the shadow pages evenly): one load of
    the bucket head plus one probe per shadow page chained there, on average
    ``shadow_pages / 4096``. Skipped entirely when ``active_mmu_pages`` is empty.
    The shadow pages it finds (those shadowing guest page tables inside the
    slot) are zapped with their children: :meth:`desim.mmu.Mmu.zap_gpte_shadow_pages`.
    """
    if shadow_pages <= 0 or npages <= 0:
        return 0
    return npages + (npages * shadow_pages) // KVM_MMU_HASH_BUCKETS


class ZapPolicy:
    """Base class: ``kvm_arch_flush_shadow_memslot`` for one memslot."""

    name = "?"

    def flush_shadow_memslot(self, vm: "Vm", ss: SlotSptes) -> Generator:  # pragma: no cover
        raise NotImplementedError


def zap_all_fast(vm: "Vm") -> Generator:
    """``kvm_mmu_zap_all_fast`` (the fast policy, and an MMIO-generation wrap under any policy)."""
    env, lock, P = vm.env, vm.lock, vm.P
    token = vm.vmm
    start = env.now
    yield from lock.take(WRITE, "zap", token)
    old_tag = vm.mmu.root_tag
    work = vm.mmu.zap_all_fast()
    if vm.guest is not None and vm.guest.per_root:
        # shadow paging with per-CR3 roots (desim/guest_as.py): every process's root is obsolete too
        work.pt_pages += vm.guest.zap_all_fast()
    if old_tag in vm.mmu.obsolete_roots:
        vm.mmu.obsolete_roots[old_tag] = sum(1 for v in vm.vcpus if v.root_tag == old_tag)
    if vm.audit is not None:
        vm.audit.sptes_zapped(env.now)
    vm.metrics.zaps["fast"] = vm.metrics.zaps.get("fast", 0) + 1
    yield from kvm_make_all_cpus_request(vm, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    leaf_cost = P.spte_zap
    if vm.profile.kernel.mmu == "tdp":
        # the legacy list holds no TDP MMU page: kvm_zap_obsolete_pages finds nothing to zap
        lock.release(token)
        # kvm_tdp_mmu_zap_invalidated_roots: read lock, tdp_mmu_zap_root with yielding
        yield from lock.take(READ, "teardown", token)
        visits = tdp_zap_root_visits(work.tables_by_level, vm.profile.kernel.root_level, work.root)
        tables = sum(work.tables_by_level.values())
        # each leaf and each table's parent entry: one cmpxchg + handle_changed_spte; each non-root table:
        # handle_removed_pt's 512 atomic writes and call_rcu (sp_free)
        cost = visits * P.spte_visit + (work.leaf_sptes + tables) * leaf_cost + tables * P.sp_free
        vm.metrics.zap_spte_visits += visits
        yield from hold_with_lockbreak(vm, token, READ, "teardown", visits, cost / visits if visits else 0.0,
                                       ZAP_SLICE)
        lock.release(token)
    else:
        # kvm_zap_obsolete_pages: shadow pages in batches of BATCH_ZAP_PAGES; each prepare-zap
        # unlinks the page's children (its present SPTEs)
        pages = work.pt_pages
        per_page = P.sp_free + (work.leaf_sptes * leaf_cost / pages if pages else 0.0)
        yield from hold_with_lockbreak(vm, token, WRITE, "zap", pages, per_page, BATCH_ZAP_PAGES)
        if pages:
            # kvm_mmu_commit_zap_page -> kvm_flush_remote_tlbs
            yield from kvm_flush_remote_tlbs(vm)
        lock.release(token)
    vm.metrics.sptes_zapped += work.leaf_sptes
    vm.metrics.pt_pages_freed += work.pt_pages
    vm.metrics.zap_duration.append(env.now - start)


class FastZap(ZapPolicy):
    """``kvm_mmu_zap_all_fast``: obsolete every root, re-fault everything later."""

    name = "fast"

    def flush_shadow_memslot(self, vm: "Vm", ss: SlotSptes) -> Generator:
        yield from zap_all_fast(vm)


class TargetedZap(ZapPolicy):
    """The seed's ``kvm_mmu_zap_memslot``: zap only this slot's leaf SPTEs."""

    name = "targeted"

    def flush_shadow_memslot(self, vm: "Vm", ss: SlotSptes) -> Generator:
        env, lock, P = vm.env, vm.lock, vm.P
        kernel = vm.profile.kernel
        token = vm.vmm
        start = env.now
        yield from lock.take(WRITE, "zap", token)
        npages = ss.slot.npages
        # the slot is INVALID, so no fault can map it meanwhile: count now, clear at the walk's end
        zapped = sum(vm.mmu.slot_leaf_counts(ss).values())
        vm.metrics.zaps["targeted"] = vm.metrics.zaps.get("targeted", 0) + 1
        if kernel.mmu == "tdp":
            # kvm_tdp_mmu_unmap_gfn_range -> tdp_mmu_zap_leafs: the iterator visits every entry of the
            # range in every present table (512 per PT page), zapping the present leaves
            units = vm.mmu.tdp_walk_visits(ss.slot.base_gfn, ss.slot.end_gfn)
            unit_ns = (units * P.spte_visit + zapped * P.spte_zap) / units
            vm.metrics.zap_spte_visits += units
        else:
            # slot_handle_level(..., PG_LEVEL_4K, KVM_MAX_HUGEPAGE_LEVEL): probe every gfn's rmap
            # at each level (4K, 2M, 1G units of the slot), zapping what is present
            probes = npages + (npages >> 9) + (npages >> 18) + 2
            units = probes
            unit_ns = (probes * P.rmap_probe + zapped * P.spte_zap) / probes
        # tdp_mmu_zap_leafs / __walk_slot_rmaps flush before each yield if they zapped anything
        pending = yield from hold_with_lockbreak(vm, token, WRITE, "zap", units, unit_ns, ZAP_SLICE,
                                                 zapped=zapped, flush_on_yield=True)
        if kernel.mmu != "tdp" and kernel.version_tuple >= HASH_WALK_SINCE:
            # kvm_mmu_zap_memslot_pages_and_flush: for_each_gfn_valid_sp_with_gptes per gfn; the leaf walk's
            # flush is owed until its first yield (kvm_mmu_remote_flush_or_zap) or its end
            roots = len(vm.guest.roots) if vm.guest is not None else int(vm.mmu.root_live)
            probes = hash_walk_probes(npages, vm.mmu.present_pt + roots)
            vm.metrics.hash_probes += probes
            pending = yield from hold_with_lockbreak(vm, token, WRITE, "zap", npages,
                                                     probes * P.hash_probe / npages, ZAP_SLICE,
                                                     flush_on_yield=True, flush_pending=pending)
            gpt = vm.scenario.vm.guest_page_tables
            if kernel.mmu == "shadow" and gpt is not None:
                pages, children = vm.mmu.zap_gpte_shadow_pages(ss, gpt >> 12)
                if pages:
                    # kvm_mmu_prepare_zap_page on each: unlink its children, then commit (the flush below)
                    yield env.timeout(pages * P.sp_free + children * P.spte_zap)
                    vm.metrics.gpte_sp_zapped += pages
                    vm.metrics.sptes_zapped += children
                    vm.metrics.pt_pages_freed += pages
                    pending = pending or children > 0
            if kernel.mmu == "shadow" and vm.guest is not None and vm.guest.per_root:
                # the roots of processes whose top-level guest table is in the slot go too
                if (yield from zap_roots_in_slot(vm, ss.slot)):
                    pending = True
        vm.mmu.zap_slot_leafs(ss)
        if vm.audit is not None and zapped:
            vm.audit.sptes_zapped(env.now)
        if pending:
            yield from kvm_flush_remote_tlbs(vm)
        lock.release(token)
        vm.metrics.sptes_zapped += zapped
        vm.metrics.zap_duration.append(env.now - start)


ZAP_POLICIES: dict[str, type[ZapPolicy]] = {"fast": FastZap, "targeted": TargetedZap}


def make_policy(name: str) -> ZapPolicy:
    try:
        return ZAP_POLICIES[name]()
    except KeyError:
        raise DesimInputError(f"policy '{name}': unknown (choose one of: {', '.join(ZAP_POLICIES)})") from None


def policy_from_zap_control(args0: int) -> str:
    """The seed's ``KVM_CAP_MEMSLOT_ZAP_CONTROL`` semantics (``kvm_vm_ioctl_enable_cap``).

    Only ``KVM_ZAP_ONLY_MEMSLOT_SPTES`` (bit 0) is valid; any other bit is
    ``-EINVAL``. Bit 0 set selects the targeted zap; clear, the fast zap.
    """
    if args0 < 0 or args0 & ~KVM_ZAP_ONLY_MEMSLOT_SPTES:
        raise DesimInputError(
            f"zap_control = {args0:#x}: -EINVAL, only KVM_ZAP_ONLY_MEMSLOT_SPTES (bit 0, value 1) is a valid flag")
    return "targeted" if args0 & KVM_ZAP_ONLY_MEMSLOT_SPTES else "fast"
