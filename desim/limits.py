"""Bounds: KVM's own limits on memslots, and what one run may cost before it starts.

One policy, applied before any work, for everything that could make a run
absurd or unbounded:

**KVM's limits on a memslot** (what ``KVM_SET_USER_MEMORY_REGION`` refuses with
``-EINVAL``), checked for every slot of a scenario and every CREATE/MOVE of its
VMM script by :func:`check_memslot`:

* ``__kvm_set_memory_region`` (virt/kvm/kvm_main.c): at most
  ``KVM_MEM_MAX_NR_PAGES`` = 2^31 - 1 pages per slot (include/linux/kvm_host.h;
  8 TiB of 4 KiB pages), and ``gpa + size`` must not wrap around 2^64 (implied by the next);
* ``kvm_arch_prepare_memory_region`` (arch/x86/kvm/x86.c): the slot's last gfn
  must not exceed ``kvm_mmu_max_gfn()`` (arch/x86/kvm/mmu.h), i.e.
  ``gpa + size <= 2^max_gpa_bits`` with ``max_gpa_bits = shadow_phys_bits``
  (the host's MAXPHYADDR, CPUID 0x80000008 EAX[7:0]) when TDP (EPT/NPT) is
  enabled and 52 with shadow paging. The host MAXPHYADDR is the profile's
  ``kernel.phys_bits``; :func:`guest_phys_bits` picks the width.

**Memory** (:func:`estimate`): a run's SPTE state is one byte per mapping
unit, allocated as mappings appear (:class:`desim.mmu.RamBlock`,
:class:`desim.chunked.ChunkedBytes`), so the estimate counts, per memslot, the
level it can be mapped at: one byte per 4 KiB page where 4 KiB mappings are
possible all over it (4 KiB host backing, dirty logging at creation or by a
``flags`` op, NX huge pages with code in the guest; the share of 2 MiB
regions THP fails on with ``thp_fraction`` < 1), else one byte per 2 MiB
(THP) or 1 GiB (hugetlbfs) unit plus the 4 KiB-level chunks a misaligned head
and tail may need. Per-fault and per-stall samples add 33 bytes per access up
to :data:`desim.quantiles.EXACT_SAMPLE_LIMIT` (beyond it they are a bounded
sketch); ``zipf`` touches hold a permutation and a CDF of 8 bytes each per
page of the region. The estimate is compared with the memory this host has available
(``MemAvailable`` in ``/proc/meminfo``) times the runs that may be in memory
at once (the worker count); beyond it the run is refused with the amount it
would need.

**Work** (:func:`estimate_work`): guest accesses and memslot ioctls per run.
Beyond :data:`MAX_ACCESSES_PER_RUN` (10^9 accesses: at the ~13 million
accesses/s a run manages when they hit, and ~65,000 faults/s when they fault,
measured with ``desim run`` on a 2-core AMD EPYC VM, at least a minute and
likely hours), :data:`MAX_MEMSLOT_IOCTLS_PER_RUN` (10^6) or
:data:`MAX_IOCTL_VCPU_WORK_PER_RUN` (10^8 ioctls x vCPUs: a memslot update
may kick or IPI every vCPU) a run is refused
unless the caller allows it (``--allow-large`` on the command line). A touch
with ``until = "vmm"`` is estimated from the time its phase's VMM script takes
and the touch's ``access_ns``.

All checks raise :class:`desim.errors.DesimInputError` with one line that gives
the estimate, the limit and the way out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import DesimInputError
from .memslot import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SHIFT, MrChange
from .quantiles import EXACT_SAMPLE_LIMIT

if TYPE_CHECKING:
    from .scenario import Scenario

KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1  # include/linux/kvm_host.h
KVM_ADDRESS_SPACE_NUM = 2  # x86: normal and SMM (arch/x86/include/asm/kvm_host.h)
SHADOW_PAGING_GPA_BITS = 52  # kvm_mmu_max_gfn(): 52 when !tdp_enabled
MAX_ACCESSES_PER_RUN = 10**9
MAX_MEMSLOT_IOCTLS_PER_RUN = 10**6
MAX_IOCTL_VCPU_WORK_PER_RUN = 10**8  # memslot ioctls x vCPUs: each update may kick or IPI every vCPU
ZIPF_BYTES_PER_PAGE = 16  # workload.make_stream: an int64 permutation and a float64 CDF per page
# desim.metrics: a fault's latency, start and re-fault flag (17 bytes), a stalled access's latency and start (16)
SAMPLE_BYTES_PER_ACCESS = 33


def guest_phys_bits(mmu: str, host_phys_bits: int) -> int:
    """The guest physical address width KVM accepts for memslots (``kvm_mmu_max_gfn``).

    With TDP (the profile's ``mmu`` is ``tdp`` or ``legacy``, both over EPT/NPT)
    it is the host's MAXPHYADDR; with shadow paging 52.
    """
    return SHADOW_PAGING_GPA_BITS if mmu == "shadow" else host_phys_bits


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_memslot(gpa: int, size: int, phys_bits: int, where: str) -> None:
    """Refuse a slot ``[gpa, gpa + size)`` that ``KVM_SET_USER_MEMORY_REGION`` would refuse (-EINVAL)."""
    pages = size >> PAGE_SHIFT
    if pages > KVM_MEM_MAX_NR_PAGES:
        raise DesimInputError(f"{where}: size {_fmt_bytes(size)} is {pages:,} pages; KVM allows at most "
                              f"KVM_MEM_MAX_NR_PAGES = 2^31 - 1 pages (8 TiB) per memslot (-EINVAL)")
    end = gpa + size  # KVM also refuses a range that wraps around 2^64; phys_bits <= 52 covers that
    if end > 1 << phys_bits:
        raise DesimInputError(
            f"{where}: gpa {gpa:#x} + size {size:#x} ends at {end:#x}, beyond the {phys_bits}-bit guest "
            f"physical address space (kvm_mmu_max_gfn(): the host MAXPHYADDR, profile kernel.phys_bits, "
            f"with TDP; 52 bits with shadow paging) (-EINVAL)")


def _slot_sizes(sc: "Scenario") -> dict[int, int]:
    """The largest size each slot id ever has (initial slots and CREATEs of every phase's script)."""
    return {k: v[0] for k, v in _slots(sc).items()}


def _slots(sc: "Scenario") -> dict[int, tuple[int, str | None, bool]]:
    """Per slot id: (largest size, host backing if the slot sets one, ever dirty-logged)."""
    from .scenario import phase_ops

    out = {s.id: (s.size, s.backing, bool(s.flags & KVM_MEM_LOG_DIRTY_PAGES)) for s in sc.vm.memslots}
    for phase in sc.phases:
        for op in phase_ops(phase):
            size, backing, dirty = out.get(op.slot, (0, None, False))
            if op.op == MrChange.CREATE:
                size = max(size, op.size)
            if op.op in (MrChange.CREATE, MrChange.FLAGS_ONLY) and op.flags & KVM_MEM_LOG_DIRTY_PAGES:
                dirty = True
            out[op.slot] = (size, backing, dirty)
    return out


def _active(which: int | str, nvcpus: int) -> int:
    if which == "all":
        return nvcpus
    if which == "bsp":
        return min(1, nvcpus)
    if which == "aps":
        return max(0, nvcpus - 1)
    return int(which)


@dataclass(frozen=True)
class WorkEstimate:
    """What one run of a scenario will do, estimated before it starts."""

    accesses: int
    memslot_ioctls: int
    memory_bytes: int
    vcpus: int = 1

    def describe(self) -> str:
        return (f"{self.accesses:,} guest accesses, {self.memslot_ioctls:,} memslot ioctls, "
                f"~{_fmt_bytes(self.memory_bytes)} of model state")


def estimate(sc: "Scenario") -> WorkEstimate:
    """Accesses, memslot ioctls and memory of one run of ``sc`` (an upper-bound style estimate)."""
    from .scenario import phase_ops

    slots = _slots(sc)
    sizes = {k: v[0] for k, v in slots.items()}
    nv = sc.vm.vcpus
    accesses = ioctls = 0
    kernel = sc.host_profile().kernel
    code = kernel.nx_huge_pages and any(t.exec_fraction > 0 for p in sc.phases for t in p.touch_list())
    memory = sum(_block_bytes(size, backing or kernel.backing, kernel.thp_fraction, dirty or code)
                 for size, backing, dirty in slots.values())
    for phase in sc.phases:
        ops = phase_ops(phase)
        ioctls += len(ops)
        script_ns = max((o.time_ns for o in ops), default=0.0)
        for touch in phase.touch_list():
            k = _active(touch.vcpus, nv)
            if touch.pattern == "trace":
                continue  # bounded by the trace file's size cap
            if touch.pattern == "recorded":  # the recording's page entries and BAR memslot ops (the largest file)
                from .record.format import load_recording_cached

                files = [touch.recording] if isinstance(touch.recording, str) else list(touch.recording or [])
                recs = [load_recording_cached(f) for f in files]
                accesses += max((len(r.arrays["page_gfn_delta"]) for r in recs), default=0)
                ioctls += max((int(r.arrays["bar_memslot"].sum()) for r in recs), default=0) if touch.bar_ops else 0
                continue
            if touch.gpa is not None:
                pages = (touch.size or 0) >> PAGE_SHIFT
            else:
                pages = touch.size >> PAGE_SHIFT if touch.size is not None else max(
                    0, (sizes.get(touch.slot, 0) - touch.offset) >> PAGE_SHIFT)
            if touch.until == "vmm":
                per_vcpu = int(script_ns / touch.access_ns) + 4096  # + the chunk it is in when the VMM finishes
                accesses += k * per_vcpu
            elif touch.pattern == "sequential":
                accesses += pages * touch.passes * (k if touch.sharing == "shared" else 1)
            else:
                accesses += touch.accesses * k
            if touch.pattern == "zipf":
                memory += ZIPF_BYTES_PER_PAGE * pages * (1 if touch.sharing == "private" else k)
    memory += SAMPLE_BYTES_PER_ACCESS * min(accesses, EXACT_SAMPLE_LIMIT)
    return WorkEstimate(accesses, ioctls, memory, nv)


def _block_bytes(size: int, backing: str, thp_fraction: float, small_everywhere: bool) -> int:
    """SPTE state of a RAM block of ``size`` bytes at most (desim.mmu: a byte per mapping unit)."""
    from .mmu import CHUNK_SHIFT_4K, CHUNK_SHIFT_HUGE

    pages = size >> PAGE_SHIFT
    edges = 2 * (1 << CHUNK_SHIFT_4K) + 2 * (1 << CHUNK_SHIFT_HUGE)  # a misaligned head and tail
    if backing == "4k" or small_everywhere:
        small = pages
    elif backing == "thp":
        small = min(pages, int(pages * (1.0 - thp_fraction)) + edges)
    else:
        small = min(pages, edges)
    return small + min(pages >> 9, (pages >> 9) if backing == "thp" else edges) + (pages >> 18) + 2


def available_memory() -> int | None:
    """Bytes of memory this host can give a new process (``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def check_memory(sc: "Scenario", concurrent_runs: int = 1, est: WorkEstimate | None = None) -> WorkEstimate:
    """Refuse a scenario whose model state would not fit in this host's available memory."""
    est = est or estimate(sc)
    avail = available_memory()
    need = est.memory_bytes * max(1, concurrent_runs)
    if avail is not None and need > avail:
        runs = f" x {concurrent_runs} runs at once" if concurrent_runs > 1 else ""
        raise DesimInputError(
            f"scenario {sc.name}: would need ~{_fmt_bytes(need)} of memory ({_fmt_bytes(est.memory_bytes)} of "
            f"SPTE state, samples and access streams per run{runs}: 1 byte per 4 KiB mapping, 16 per page "
            f"of a zipf region), but this host has {_fmt_bytes(avail)} available; use smaller memslots"
            + (" or fewer workers" if concurrent_runs > 1 else ""))
    return est


def check_work(sc: "Scenario", allow_large: bool = False, concurrent_runs: int = 1) -> WorkEstimate:
    """Estimate one run of ``sc``; refuse it beyond the memory available or (unless allowed) the work limits."""
    est = check_memory(sc, concurrent_runs)
    if allow_large:
        return est
    if est.accesses > MAX_ACCESSES_PER_RUN:
        raise DesimInputError(
            f"scenario {sc.name}: one run would simulate ~{est.accesses:.3g} guest accesses, over the limit of "
            f"{MAX_ACCESSES_PER_RUN:.0e} per run (at ~1.3e7 accesses/s at best: {est.accesses / 1.3e7 / 60:,.0f}+ "
            "min); lower accesses/passes/vcpus, or give --allow-large to run it anyway")
    if est.memslot_ioctls > MAX_MEMSLOT_IOCTLS_PER_RUN:
        raise DesimInputError(
            f"scenario {sc.name}: one run would issue {est.memslot_ioctls:,} memslot ioctls, over the limit of "
            f"{MAX_MEMSLOT_IOCTLS_PER_RUN:,} per run; lower repeat, or give --allow-large to run it anyway")
    if est.memslot_ioctls * est.vcpus > MAX_IOCTL_VCPU_WORK_PER_RUN:
        raise DesimInputError(
            f"scenario {sc.name}: one run would issue {est.memslot_ioctls:,} memslot ioctls to {est.vcpus:,} vCPUs "
            f"(each may kick every vCPU), over the limit of {MAX_IOCTL_VCPU_WORK_PER_RUN:.0e} ioctl x vCPU per run; "
            "lower repeat or vm.vcpus, or give --allow-large to run it anyway")
    return est
