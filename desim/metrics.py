"""Metrics: counters, latency samples and time series, without per-event objects.

Everything a run reports is either a plain counter, a float accumulator, or a
sample appended to an ``array('d')`` (8 bytes a sample, no Python object per
event). Percentiles and time series are computed once, in :meth:`Metrics.summary`.

Per-fault and per-stall samples are kept exactly while a run has at most
``sample_limit`` of a kind (:data:`desim.quantiles.EXACT_SAMPLE_LIMIT`, far above
any shipped workload or experiment at its default size), so percentiles are
``numpy.percentile`` of every sample. Beyond it (a guest faulting on billions of
pages) the samples are folded into a quantile sketch (latencies, within
:data:`desim.quantiles.SKETCH_ALPHA` relative) and into time histograms (fault
and re-fault times), and memory stays bounded: the raw samples
(``fault_latency``, ``fault_time``, ...) are then gone, and asking for them
is an error that says so.

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
from typing import Any

import numpy as np

from .errors import DesimInputError
from . import quantiles
from .hitdist import hit_points, mixture_percentiles
from .quantiles import LatencySamples, LogSketch, TimeHistogram

SPILL_BATCH = 1 << 16  # once sketched, samples are folded in batches of this many

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


def _as_bytes(values, dtype) -> memoryview:
    """The bytes of ``values`` as ``dtype``, without a copy where they already are (for ``array.frombytes``)."""
    return memoryview(np.ascontiguousarray(values, dtype=dtype)).cast("B")


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
    sample_limit: int | None = None  # samples of a kind kept exactly (default EXACT_SAMPLE_LIMIT; module docstring)
    _fault_lat: LatencySamples = field(init=False, repr=False)
    _fault_time: array = field(default_factory=lambda: array("d"), repr=False)
    _fault_is_refault: array = field(default_factory=lambda: array("b"), repr=False)
    _fault_hist: TimeHistogram | None = field(default=None, repr=False)  # beyond sample_limit: all faults
    _refault_hist: TimeHistogram | None = field(default=None, repr=False)  # and re-faults, over time
    _stall_lat: LatencySamples = field(init=False, repr=False)
    _stall_time: array = field(default_factory=lambda: array("d"), repr=False)
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
    # accesses that stalled (a fault, retries, a kick): start time and latency until they completed
    # (access_stall, access_stall_time); every other access took its touch's access_ns (hits, counted
    # by access_ns in hit_ns)
    hit_ns: dict[float, int] = field(default_factory=dict)
    # the shape of a hit's latency around its access_ns (the scenario's access_dist, None with costs = "mean"):
    # read by the statistics only (desim/hitdist.py)
    hit_dist: Any = None
    completion_ns: float = 0.0

    def __post_init__(self) -> None:
        if not self.vcpus:
            self.vcpus = [VcpuMetrics() for _ in range(self.nvcpus)]
        if self.sample_limit is None:
            self.sample_limit = quantiles.EXACT_SAMPLE_LIMIT
        self._fault_lat = LatencySamples(self.sample_limit)
        self._stall_lat = LatencySamples(self.sample_limit)
        self._lat_buf = self._fault_lat.values  # hot path: the arrays appended to (emptied in place)
        self._stall_buf = self._stall_lat.values
        self._fault_spill_at = self._stall_spill_at = self.sample_limit

    # -- recording (hot path: keep tiny) -----------------------------------
    def record_fault(self, vcpu: int, cause: str, start_ns: float, latency_ns: float) -> None:
        self.vcpus[vcpu].faults[cause] += 1
        self._lat_buf.append(latency_ns)
        self._fault_time.append(start_ns)
        self._fault_is_refault.append(1 if cause == "after_zap" else 0)
        if len(self._lat_buf) > self._fault_spill_at:
            self._spill_faults()

    def record_faults(self, vcpu: int, causes: dict[str, int], start_ns: np.ndarray, latency_ns: np.ndarray,
                      refault: np.ndarray) -> None:
        """:meth:`record_fault` for many faults of one vCPU, in order (a batch of the fast engine, desim/faultrun.py)."""
        f = self.vcpus[vcpu].faults
        for c, n in causes.items():
            f[c] += n
        self._lat_buf.frombytes(_as_bytes(latency_ns, np.float64))
        self._fault_time.frombytes(_as_bytes(start_ns, np.float64))
        self._fault_is_refault.frombytes(_as_bytes(refault, np.int8))
        if len(self._lat_buf) > self._fault_spill_at:
            self._spill_faults()

    def record_access_stalls(self, start_ns: np.ndarray, latency_ns: np.ndarray, access_ns: float) -> None:
        """:meth:`record_access_stall` for many accesses, in order (a batch of the fast engine, desim/faultrun.py)."""
        self._stall_buf.frombytes(_as_bytes(latency_ns, np.float64))
        self._stall_time.frombytes(_as_bytes(start_ns, np.float64))
        self.hit_ns[access_ns] = self.hit_ns.get(access_ns, 0) - len(latency_ns)
        if len(self._stall_buf) > self._stall_spill_at:
            self._spill_stalls()

    def record_faults_alike(self, start_ns: float, latency_ns: float, n: int) -> None:
        """``n`` faults with the same start and latency, none a re-fault (RET_PF_RETRY rounds).

        The caller counts them by cause in its :class:`VcpuMetrics`."""
        self._lat_buf.extend([latency_ns] * n)
        self._fault_time.extend([start_ns] * n)
        self._fault_is_refault.extend([0] * n)
        if len(self._lat_buf) > self._fault_spill_at:
            self._spill_faults()

    def record_access_stall(self, start_ns: float, latency_ns: float, access_ns: float) -> None:
        """An access that stalled completed; it was counted as a hit by ``access_ns`` when consumed."""
        self._stall_buf.append(latency_ns)
        self._stall_time.append(start_ns)
        self.hit_ns[access_ns] = self.hit_ns.get(access_ns, 0) - 1
        if len(self._stall_buf) > self._stall_spill_at:
            self._spill_stalls()

    # Samples are folded in fixed blocks of sample index (the first sample_limit, then SPILL_BATCH at a
    # time), whatever the batches they were recorded in: one-by-one and batched recording (the two
    # engines) give the same sketches and sums, bit for bit.
    def _spill_stalls(self) -> None:
        while len(self._stall_buf) > self._stall_spill_at:
            n = self._stall_spill_at
            self._stall_lat.spill(n)
            del self._stall_time[:n]
            self._stall_spill_at = min(SPILL_BATCH, self.sample_limit)

    def _spill_faults(self) -> None:
        """Beyond ``sample_limit`` faults: fold the samples into the sketch and the time histograms."""
        if self._fault_hist is None:
            self._fault_hist, self._refault_hist = TimeHistogram(), TimeHistogram()
        while len(self._lat_buf) > self._fault_spill_at:
            n = self._fault_spill_at
            t = np.frombuffer(self._fault_time, dtype=np.float64, count=n).copy()
            r = np.frombuffer(self._fault_is_refault, dtype=np.int8, count=n).astype(bool)
            self._fault_hist.add_many(t)
            self._refault_hist.add_many(t[r])
            del t, r
            del self._fault_time[:n]
            del self._fault_is_refault[:n]
            self._fault_lat.spill(n)
            self._fault_spill_at = min(SPILL_BATCH, self.sample_limit)

    # -- raw samples (exact runs only) -----------------------------------------
    @property
    def exact(self) -> bool:
        """Every sample kept (the run stayed within ``sample_limit``): percentiles are exact."""
        return self._fault_lat.exact and self._stall_lat.exact

    def _raw(self, name: str, arr: array, exact: bool) -> array:
        if not exact:
            raise DesimInputError(
                f"{name}: this run had more than {self.sample_limit:,} samples, so they were folded into a "
                f"quantile sketch and time histograms (summary metrics only); per-sample analyses (latency "
                f"tails around ops, plots, steady state) need a smaller run, or give --no-tails/--no-plots")
        return arr

    @property
    def fault_latency(self) -> array:
        """Every fault's latency (ns), in fault order; an error beyond ``sample_limit`` faults."""
        return self._raw("fault_latency", self._lat_buf, self._fault_lat.exact)

    @property
    def fault_time(self) -> array:
        """Every fault's start (ns)."""
        return self._raw("fault_time", self._fault_time, self._fault_lat.exact)

    @property
    def fault_is_refault(self) -> array:
        """1 for a re-fault after a zap (cause ``after_zap``), else 0."""
        return self._raw("fault_is_refault", self._fault_is_refault, self._fault_lat.exact)

    @property
    def access_stall(self) -> array:
        """Latency (ns) of every access that stalled."""
        return self._raw("access_stall", self._stall_buf, self._stall_lat.exact)

    @property
    def access_stall_time(self) -> array:
        """Start (ns) of every access that stalled."""
        return self._raw("access_stall_time", self._stall_time, self._stall_lat.exact)

    @property
    def samples_nbytes(self) -> int:
        """Bytes held by per-sample arrays and sketches (the memory benchmark)."""
        hists = sum(h.counts.nbytes for h in (self._fault_hist, self._refault_hist) if h is not None)
        return (self._fault_lat.nbytes + self._stall_lat.nbytes + 8 * len(self._fault_time)
                + len(self._fault_is_refault) + 8 * len(self._stall_time) + hists)

    def access_latency_percentiles(self, qs: tuple[float, ...] = (50, 90, 99, 99.9)) -> list[float]:
        """Percentiles of per-access latency: hits at their access_ns (or drawn from ``hit_dist`` around it,
        desim/hitdist.py), stalled accesses as recorded."""
        if not self._stall_lat.exact:
            sk = LogSketch(self._stall_lat.sketch.alpha)
            sk.merge(self._stall_lat.sketch)
            sk.add_many(np.frombuffer(self._stall_buf, dtype=np.float64))
            for v, c in self.hit_ns.items():
                if self.hit_dist is None:
                    sk.add_weighted(v, max(c, 0))
                else:
                    for hv, hc in zip(*hit_points(max(c, 0), self.hit_dist, v)):
                        sk.add_weighted(float(hv), int(hc))
            return sk.quantiles([q / 100 for q in qs])
        stalls = np.frombuffer(self.access_stall, dtype=np.float64)
        if self.hit_dist is not None:
            return mixture_percentiles({v: max(c, 0) for v, c in self.hit_ns.items()}, self.hit_dist, stalls, qs)
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
        """(bin edges ns, all faults per bin, re-faults per bin) over the run.

        Beyond ``sample_limit`` faults, from the time histograms: each native bin (at most 1/2048 of
        the run) counts in the bin its midpoint falls in."""
        if self._fault_hist is not None:
            fh, rh = TimeHistogram(len(self._fault_hist.counts), self._fault_hist.width), None
            fh.merge(self._fault_hist)
            rh = TimeHistogram(len(fh.counts), self._refault_hist.width)
            rh.merge(self._refault_hist)
            t = np.frombuffer(self._fault_time, dtype=np.float64)
            fh.add_many(t)
            rh.add_many(t[np.frombuffer(self._fault_is_refault, dtype=np.int8).astype(bool)])
            end = max(self.completion_ns, fh.end, 1.0)
            edges = np.linspace(0.0, end, bins + 1)
            return edges, fh.rebin(edges), rh.rebin(edges)
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
        fl = self._fault_lat
        if len(fl):
            p50, p95, p99, p90, p999 = fl.percentiles([50, 95, 99, 90, 99.9])  # one partition of the samples
            out.update(fault_latency_mean_ns=fl.mean(), fault_latency_p50_ns=p50,
                       fault_latency_p95_ns=p95, fault_latency_p99_ns=p99,
                       fault_latency_max_ns=fl.max())
        else:
            p90 = p999 = 0.0
            out.update(fault_latency_mean_ns=0.0, fault_latency_p50_ns=0.0, fault_latency_p95_ns=0.0,
                       fault_latency_p99_ns=0.0, fault_latency_max_ns=0.0)
        out["fault_latency_p90_ns"], out["fault_latency_p999_ns"] = p90, p999
        for q, v in zip(("p50", "p90", "p99", "p999"), self.access_latency_percentiles()):
            out[f"access_latency_{q}_ns"] = v
        out["access_stall_max_ns"] = self._stall_lat.max()
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
