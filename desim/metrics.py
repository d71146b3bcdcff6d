"""Metrics: counters, latency samples and time series, without per-event objects.

Everything a run reports is either a plain counter, a float accumulator, or a
sample appended to an ``array('d')`` (8 bytes a sample, no Python object per
event). Percentiles and time series are computed once, in :meth:`Metrics.summary`.

Fault causes partition the faults exactly:
``faults = first_touch + after_zap + retry + spurious`` where
*first_touch* is the first fault on a gfn in the VM's life, *after_zap* a
re-fault of a gfn that was mapped before and lost its SPTE to a zap,
*retry* a fault that ended in ``RET_PF_RETRY`` (memslot INVALID during a
DELETE/MOVE, or a stale fault whose root became obsolete) and *spurious* a
fault that found the SPTE already installed by another vCPU
(``RET_PF_SPURIOUS``) and *mmio* an access to a gpa without a memslot that
found no MMIO SPTE (with ``mmio_caching`` it installs one; without, every MMIO
access is such a fault), and *nx* an instruction fetch from a page that a
non-executable huge SPTE maps (NX huge pages, desim/nx.py: the huge page is
split; its other pages then re-fault as *after_zap*), and, with shadow paging and guest processes
(desim/guest_as.py), *wp* a guest write to a write-protected guest page table (emulated,
``kvm_mmu_pte_write``) and *root_link* a fault that found its SPTE present but the top-level entry
of the vCPU's root (one root per guest CR3) not yet linked. Faults are EPT violations (``kvm:kvm_page_fault``
from ``handle_ept_violation``), as the seed counts them. An access that hits an
MMIO SPTE is an EPT *misconfiguration* (``handle_ept_misconfig``), counted
apart in ``ept_misconfigs``: emulated at once if the SPTE's generation is
current, else refreshed through the fault path (``mmio_spte_refreshes``).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import numpy as np

FAULT_CAUSES = ("first_touch", "after_zap", "retry", "spurious", "mmio", "nx", "wp", "root_link")
VCPU_STATES = ("guest", "host", "halted")
HOST_PAGE_SIZES = ("4k", "2m", "1g")
# who takes mmu_lock: a vCPU's fault, a vCPU loading a fresh root, a zap, the teardown of obsolete roots
LOCK_ROLES = ("fault", "root", "zap", "teardown", "nx_recovery")


def metric_names(phase_names: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every metric :meth:`Metrics.summary` can report for a scenario with these phases.

    The catalogue that ``--metrics`` is checked against before any run; a test
    keeps it equal to what runs report.
    """
    names = ["faults", *(f"faults_{c}" for c in FAULT_CAUSES)]
    names += [f"fault_latency_{s}_ns" for s in ("mean", "p50", "p95", "p99", "max", "p90", "p999")]
    names += [f"access_latency_{s}_ns" for s in ("p50", "p90", "p99", "p999")] + ["access_stall_max_ns"]
    names += ["accesses", "mmio_exits", *(f"host_page_allocs_{k}" for k in HOST_PAGE_SIZES)]
    names += ["pt_pages_allocated", "sptes_installed", "sptes_prefetched", "sptes_zapped", "pt_pages_freed",
              "ipis_sent", "remote_flushes", "zaps_fast", "zaps_targeted", "zap_duration_total_ns",
              "zap_duration_max_ns", "lock_breaks", "resched_yields", "yield_flushes", "zap_spte_visits",
              "ept_violations", "ept_misconfigs", "mmio_spte_refreshes", "memslot_swaps", "mmio_gen_wraps",
              "hash_probes", "gpte_sp_zapped", "obsolete_root_flushes", "nx_4k_maps", "nx_recovered",
              "cr3_switches", "prev_root_hits", "shadow_roots_created",
              "zone_lock_wait_ns", "zone_lock_contended", "lru_lock_wait_ns", "lru_lock_contended",
              "membw_stretch_ns", "memslot_ioctls", "memslot_ioctl_mean_ns",
              "memslot_ioctl_max_ns", "memslot_ioctl_total_ns", "srcu_syncs", "srcu_wait_ns"]
    names += [f"vcpu_{s}_ns" for s in VCPU_STATES] + ["vcpu_stall_ns", "completion_ns"]
    names += [f"phase_{p}_ns" for p in phase_names]
    for role in LOCK_ROLES:
        names += [f"lock_wait_{role}_ns", f"lock_hold_{role}_ns", f"lock_acquisitions_{role}",
                  f"lock_contended_{role}"]
    names += ["lock_mean_holders", "lock_mean_waiters"]
    return names


@dataclass
class VcpuMetrics:
    """Per-vCPU counters and time by state (ns)."""

    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_CAUSES, 0))
    accesses: int = 0
    mmio_exits: int = 0
    kicks: int = 0
    time: dict[str, float] = field(default_factory=lambda: dict.fromkeys(VCPU_STATES, 0.0))
    stall_ns: float = 0.0  # host time spent because of faults, retries and requests
    finish_ns: float = 0.0

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())


@dataclass
class Metrics:
    """All the numbers of one run."""

    nvcpus: int
    vcpus: list[VcpuMetrics] = field(default_factory=list)
    fault_latency: array = field(default_factory=lambda: array("d"))
    fault_time: array = field(default_factory=lambda: array("d"))
    fault_is_refault: array = field(default_factory=lambda: array("b"))
    host_page_allocs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOST_PAGE_SIZES, 0))
    pt_pages_allocated: int = 0
    sptes_installed: int = 0
    sptes_prefetched: int = 0
    sptes_zapped: int = 0
    pt_pages_freed: int = 0
    ipis_sent: int = 0
    remote_flushes: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    zaps: dict[str, int] = field(default_factory=dict)
    zap_duration: array = field(default_factory=lambda: array("d"))
    lock_breaks: int = 0
    resched_yields: int = 0  # lock breaks for need_resched() (a competing task), a subset of lock_breaks
    yield_flushes: int = 0  # remote flushes a zap did before yielding mmu_lock (part of remote_flushes)
    ept_misconfigs: int = 0  # accesses that hit an MMIO SPTE (valid or stale generation)
    mmio_spte_refreshes: int = 0  # of those, stale: check_mmio_spte failed, re-installed under mmu_lock
    memslot_swaps: int = 0  # kvm_swap_active_memslots: each kicks every vCPU (kvm_arch_memslots_updated)
    mmio_gen_wraps: int = 0  # MMIO generation wrap-arounds (each forced kvm_mmu_zap_all_fast)
    nx_4k_maps: int = 0  # faults mapped at 4 KiB on huge-capable memory because of NX huge pages
    nx_recovered: int = 0  # NX huge page splits zapped by the recovery worker
    obsolete_root_flushes: int = 0  # remote flushes by the last vCPU dropping an obsolete shadow root
    cr3_switches: int = 0  # guest CR3 writes (shadow paging with processes, desim/guest_as.py)
    prev_root_hits: int = 0  # of those, switches to a root cached in prev_roots (fast_pgd_switch)
    shadow_roots_created: int = 0  # root shadow pages created (kvm_mmu_alloc_shadow_page for a CR3)
    gpte_sp_zapped: int = 0  # shadow pages of guest page tables in a deleted slot, zapped with their children
    hash_probes: int = 0  # mmu_page_hash probes of targeted zaps (kvm_mmu_zap_memslot_pages_and_flush)
    zap_spte_visits: int = 0  # entries the TDP MMU zap walks visited (tdp_mmu_zap_leafs, tdp_mmu_zap_root)
    ioctl_ops: list[str] = field(default_factory=list)
    ioctl_latency: array = field(default_factory=lambda: array("d"))
    ioctl_time: array = field(default_factory=lambda: array("d"))
    srcu_syncs: int = 0
    srcu_wait_ns: float = 0.0
    phase_end_ns: dict[str, float] = field(default_factory=dict)
    accesses_assigned: int = 0  # accesses handed to vCPUs in chunks (all must be consumed)
    # accesses that stalled (a fault, retries, a kick): start time and latency until they completed;
    # every other access took its touch's access_ns (hits, counted by access_ns in hit_ns)
    access_stall: array = field(default_factory=lambda: array("d"))
    access_stall_time: array = field(default_factory=lambda: array("d"))
    hit_ns: dict[float, int] = field(default_factory=dict)
    completion_ns: float = 0.0

    def __post_init__(self) -> None:
        if not self.vcpus:
            self.vcpus = [VcpuMetrics() for _ in range(self.nvcpus)]

    # -- recording (hot path: keep tiny) -----------------------------------
    def record_fault(self, vcpu: int, cause: str, start_ns: float, latency_ns: float) -> None:
        self.vcpus[vcpu].faults[cause] += 1
        self.fault_latency.append(latency_ns)
        self.fault_time.append(start_ns)
        self.fault_is_refault.append(1 if cause == "after_zap" else 0)

    def record_faults(self, vcpu: int, causes: dict[str, int], start_ns: np.ndarray, latency_ns: np.ndarray,
                      refault: np.ndarray) -> None:
        """:meth:`record_fault` for many faults of one vCPU, in order (desim/faultrun.py)."""
        f = self.vcpus[vcpu].faults
        for c, n in causes.items():
            f[c] += n
        self.fault_latency.frombytes(np.ascontiguousarray(latency_ns, dtype=np.float64).tobytes())
        self.fault_time.frombytes(np.ascontiguousarray(start_ns, dtype=np.float64).tobytes())
        self.fault_is_refault.frombytes(np.ascontiguousarray(refault, dtype=np.int8).tobytes())

    def record_access_stalls(self, start_ns: np.ndarray, latency_ns: np.ndarray, access_ns: float) -> None:
        """:meth:`record_access_stall` for many accesses, in order (desim/faultrun.py)."""
        self.access_stall.frombytes(np.ascontiguousarray(latency_ns, dtype=np.float64).tobytes())
        self.access_stall_time.frombytes(np.ascontiguousarray(start_ns, dtype=np.float64).tobytes())
        self.hit_ns[access_ns] = self.hit_ns.get(access_ns, 0) - len(latency_ns)

    def record_access_stall(self, start_ns: float, latency_ns: float, access_ns: float) -> None:
        """An access that stalled completed; it was counted as a hit by ``access_ns`` when consumed."""
        self.access_stall.append(latency_ns)
        self.access_stall_time.append(start_ns)
        self.hit_ns[access_ns] = self.hit_ns.get(access_ns, 0) - 1

    def access_latency_percentiles(self, qs: tuple[float, ...] = (50, 90, 99, 99.9)) -> list[float]:
        """Percentiles of per-access latency: hits at their access_ns, stalled accesses as recorded."""
        stalls = np.frombuffer(self.access_stall, dtype=np.float64)
        hv = np.array(sorted(self.hit_ns), dtype=np.float64)
        hc = np.array([max(self.hit_ns[k], 0) for k in sorted(self.hit_ns)], dtype=np.int64)
        values = np.concatenate([hv, np.sort(stalls)])
        counts = np.concatenate([hc, np.ones(len(stalls), dtype=np.int64)])
        if counts.sum() == 0:
            return [0.0 for _ in qs]
        order = np.argsort(values, kind="stable")
        values, counts = values[order], counts[order]
        cum = np.cumsum(counts)
        total = cum[-1]
        return [float(values[min(np.searchsorted(cum, q / 100 * total, side="left"), len(values) - 1)])
                for q in qs]

    def record_ioctl(self, op: str, start_ns: float, latency_ns: float) -> None:
        self.ioctl_ops.append(op)
        self.ioctl_time.append(start_ns)
        self.ioctl_latency.append(latency_ns)

    # -- summary -------------------------------------------------------------
    def faults_by_cause(self) -> dict[str, int]:
        return {c: sum(v.faults[c] for v in self.vcpus) for c in FAULT_CAUSES}

    def faults_over_time(self, bins: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bin edges ns, all faults per bin, re-faults per bin) over the run."""
        t = np.frombuffer(self.fault_time, dtype=np.float64)
        r = np.frombuffer(self.fault_is_refault, dtype=np.int8).astype(bool)
        end = max(self.completion_ns, float(t.max()) if len(t) else 0.0, 1.0)
        edges = np.linspace(0.0, end, bins + 1)
        return edges, np.histogram(t, edges)[0], np.histogram(t[r], edges)[0]

    def summary(self, lock_summary: dict | None = None) -> dict[str, float | int]:
        """A flat dict of scalar metrics (the row of a tidy table)."""
        out: dict[str, float | int] = {}
        causes = self.faults_by_cause()
        out["faults"] = sum(causes.values())
        for c, n in causes.items():
            out[f"faults_{c}"] = n
        lat = np.frombuffer(self.fault_latency, dtype=np.float64)
        if len(lat):
            p50, p95, p99 = np.percentile(lat, [50, 95, 99])
            out.update(fault_latency_mean_ns=float(lat.mean()), fault_latency_p50_ns=float(p50),
                       fault_latency_p95_ns=float(p95), fault_latency_p99_ns=float(p99),
                       fault_latency_max_ns=float(lat.max()))
        else:
            out.update(fault_latency_mean_ns=0.0, fault_latency_p50_ns=0.0, fault_latency_p95_ns=0.0,
                       fault_latency_p99_ns=0.0, fault_latency_max_ns=0.0)
        if len(lat):
            out["fault_latency_p90_ns"], out["fault_latency_p999_ns"] = (float(x) for x in
                                                                         np.percentile(lat, [90, 99.9]))
        else:
            out["fault_latency_p90_ns"] = out["fault_latency_p999_ns"] = 0.0
        for q, v in zip(("p50", "p90", "p99", "p999"), self.access_latency_percentiles()):
            out[f"access_latency_{q}_ns"] = v
        st = np.frombuffer(self.access_stall, dtype=np.float64)
        out["access_stall_max_ns"] = float(st.max()) if len(st) else 0.0
        out["accesses"] = sum(v.accesses for v in self.vcpus)
        out["mmio_exits"] = sum(v.mmio_exits for v in self.vcpus)
        for k, n in self.host_page_allocs.items():
            out[f"host_page_allocs_{k}"] = n
        out["pt_pages_allocated"] = self.pt_pages_allocated
        out["sptes_installed"] = self.sptes_installed
        out["sptes_prefetched"] = self.sptes_prefetched
        out["sptes_zapped"] = self.sptes_zapped
        out["pt_pages_freed"] = self.pt_pages_freed
        out["ipis_sent"] = self.ipis_sent
        out["remote_flushes"] = self.remote_flushes
        out["zaps_fast"] = self.zaps.get("fast", 0)
        out["zaps_targeted"] = self.zaps.get("targeted", 0)
        zd = np.frombuffer(self.zap_duration, dtype=np.float64)
        out["zap_duration_total_ns"] = float(zd.sum())
        out["zap_duration_max_ns"] = float(zd.max()) if len(zd) else 0.0
        out["lock_breaks"] = self.lock_breaks
        out["resched_yields"] = self.resched_yields
        out["yield_flushes"] = self.yield_flushes
        out["zap_spte_visits"] = self.zap_spte_visits
        out["hash_probes"] = self.hash_probes
        out["gpte_sp_zapped"] = self.gpte_sp_zapped
        out["obsolete_root_flushes"] = self.obsolete_root_flushes
        out["cr3_switches"] = self.cr3_switches
        out["prev_root_hits"] = self.prev_root_hits
        out["shadow_roots_created"] = self.shadow_roots_created
        out["nx_4k_maps"] = self.nx_4k_maps
        out["nx_recovered"] = self.nx_recovered
        out["ept_violations"] = out["faults"]
        out["ept_misconfigs"] = self.ept_misconfigs
        out["mmio_spte_refreshes"] = self.mmio_spte_refreshes
        out["memslot_swaps"] = self.memslot_swaps
        out["mmio_gen_wraps"] = self.mmio_gen_wraps
        il = np.frombuffer(self.ioctl_latency, dtype=np.float64)
        out["memslot_ioctls"] = len(il)
        out["memslot_ioctl_mean_ns"] = float(il.mean()) if len(il) else 0.0
        out["memslot_ioctl_max_ns"] = float(il.max()) if len(il) else 0.0
        out["memslot_ioctl_total_ns"] = float(il.sum())
        out["srcu_syncs"] = self.srcu_syncs
        out["srcu_wait_ns"] = self.srcu_wait_ns
        for s in VCPU_STATES:
            out[f"vcpu_{s}_ns"] = sum(v.time[s] for v in self.vcpus)
        out["vcpu_stall_ns"] = sum(v.stall_ns for v in self.vcpus)
        out["completion_ns"] = self.completion_ns
        prev = 0.0
        for name, end in self.phase_end_ns.items():
            out[f"phase_{name}_ns"] = end - prev
            prev = end
        if lock_summary:
            for role, st in lock_summary["roles"].items():
                out[f"lock_wait_{role}_ns"] = st["wait_ns"]
                out[f"lock_hold_{role}_ns"] = st["hold_ns"]
                out[f"lock_acquisitions_{role}"] = st["acquisitions"]
                out[f"lock_contended_{role}"] = st["contended"]
            out["lock_mean_holders"] = lock_summary["mean_holders"]
            out["lock_mean_waiters"] = lock_summary["mean_waiters"]
        return out

    def per_vcpu_rows(self) -> list[dict[str, float | int]]:
        rows = []
        for i, v in enumerate(self.vcpus):
            row: dict[str, float | int] = {"vcpu": i, "faults": v.total_faults}
            row.update({f"faults_{c}": n for c, n in v.faults.items()})
            row.update(accesses=v.accesses, mmio_exits=v.mmio_exits, kicks=v.kicks)
            row.update({f"{s}_ns": t for s, t in v.time.items()})
            row.update(stall_ns=v.stall_ns, finish_ns=v.finish_ns)
            rows.append(row)
        return rows
