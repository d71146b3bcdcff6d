"""NX huge pages: guest code is mapped with 4 KiB SPTEs on CPUs affected by iTLB multihit.

``kvm.nx_huge_pages`` (arch/x86/kvm/mmu/mmu.c; default ``auto`` = on when the
CPU has ``X86_BUG_ITLB_MULTIHIT``: Intel cores before Cascade Lake / Ice Lake,
see Documentation/admin-guide/hw-vuln/multihit.rst) keeps huge SPTEs
non-executable. An instruction fetch from a page that a huge SPTE maps is an
EPT violation; the fault has ``huge_page_disallowed`` set
(``kvm_mmu_hugepage_adjust`` / ``disallowed_hugepage_adjust``), so KVM
replaces the huge SPTE by a page table (the huge page is *split*: the child
is ``nx_huge_page_disallowed`` and tracked on ``possible_nx_huge_pages``) and
maps the fetched page at 4 KiB. Later faults in that 2 MiB region also map at
4 KiB (``disallowed_hugepage_adjust`` will not replace the child table). The
NX recovery worker (``kvm_nx_huge_page_recovery_worker``) wakes every
``nx_huge_pages_recovery_period_ms`` (0: 3,600,000 / ``ratio`` ms, i.e. 60 s
for the default ratio 60) and zaps ``ceil(splits / ratio)`` of the split pages,
oldest first, so that data-only regions can be mapped huge again.

A fast zap drops the split tables with everything else: the guest's text
re-faults page by page. A targeted zap keeps them.

Which pages are code is a fixed property of the page (a hash of the gfn
against a touch's ``exec_fraction``), so both policies see the same code
pages (common random numbers). Simplifications: only 2 MiB regions are
split (an exec page under a 1 GiB SPTE is mapped at 4 KiB, the 1 GiB SPTE
stays); the recovery worker zaps under the write lock (the TDP MMU uses the
read lock since 6.14) and flushes once per run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .vm import Vm

_M64 = 0xFFFFFFFFFFFFFFFF
_SALT = 0x5DEECE66D  # separates the code-page hash from other uses of the same splitmix64


def _mix_scalar(x: int) -> float:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return ((x ^ (x >> 31)) >> 11) / float(1 << 53)


def _mix_array(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return ((x ^ (x >> np.uint64(31))) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class ExecRanges:
    """Guest-physical ranges holding code: ``(first gfn, pages, fraction of the pages that are code)``."""

    ranges: list[tuple[int, int, float]] = field(default_factory=list)

    def add(self, lo: int, n: int, fraction: float) -> None:
        if fraction > 0 and n > 0 and (lo, n, fraction) not in self.ranges:
            self.ranges.append((lo, n, fraction))

    def is_exec(self, gfn: int) -> bool:
        for lo, n, frac in self.ranges:
            if lo <= gfn < lo + n and _mix_scalar(gfn ^ _SALT) < frac:
                return True
        return False

    def mask(self, gfns: np.ndarray) -> np.ndarray:
        out = np.zeros(len(gfns), dtype=bool)
        for lo, n, frac in self.ranges:
            inside = (gfns >= lo) & (gfns < lo + n)
            if inside.any():
                out[inside] |= _mix_array(gfns[inside] ^ _SALT) < frac
        return out


def recovery_period_ms(ratio: int, period_ms: float) -> float:
    """``calc_nx_huge_pages_recovery_period``: the given period, else one hour / ratio (at least 1 s)."""
    if period_ms > 0:
        return period_ms
    return 60 * 60 * 1000 / min(max(ratio, 1), 3600)


def nx_huge_page_recovery_worker(vm: "Vm") -> Generator:
    """``kvm_nx_huge_page_recovery_worker`` / ``kvm_recover_nx_huge_pages``: zap 1/ratio of the splits."""
    from .lock import WRITE
    from .tlb import kvm_flush_remote_tlbs

    k = vm.profile.kernel
    period_ns = recovery_period_ms(k.nx_recovery_ratio, k.nx_recovery_period_ms) * 1e6
    env, mmu = vm.env, vm.mmu
    while True:
        yield env.timeout(period_ns)
        splits = mmu.nx_split_regions()
        if not splits:
            continue
        to_zap = math.ceil(len(splits) / k.nx_recovery_ratio)
        token = ("nx_recovery",)
        yield from vm.lock.take(WRITE, "nx_recovery", token)
        zapped = 0
        for region in splits[:to_zap]:
            zapped += mmu.nx_recover(region)
        yield env.timeout(to_zap * vm.P.sp_free + zapped * vm.P.spte_zap)
        vm.metrics.nx_recovered += to_zap
        vm.metrics.sptes_zapped += zapped
        if zapped:
            yield from kvm_flush_remote_tlbs(vm)
        vm.lock.release(token)
