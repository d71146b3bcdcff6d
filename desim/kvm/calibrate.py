"""Fit host-profile costs (``desim/profiles/*.toml``) from microscenarios on the real KVM.

Each microscenario is a :class:`KvmScenario` run with one vCPU (no
``mmu_lock`` contention), 4 KiB guest and host pages, ``repeats`` times, its
memslot ioctls timed with the other host CPUs busy (``busy_cpus``, see
:mod:`desim.kvm.spin`); the medians of its metrics (:mod:`desim.kvm.measure`)
are combined as follows, in the simulator's cost model (``desim/vcpu.py``,
``desim/zap.py``, ``desim/vmm.py``). Every extra slot is untouched unless
stated; "2 MiB" and "1 GiB" are the size of the slot deleted and re-created::

    A  128 MiB, fast, 2 MiB slot      R8 = (retouch - warm) / refaults   (8 SPTEs per fault)
    B  512 MiB, fast, 2 MiB slot
    C  512 MiB, fast, 2 MiB slot,     R1 = (retouch - warm) / refaults   (1 SPTE per fault: no
       every 8th page touched         neighbour is resident, so nothing to prefetch)
                                      F1 = (populate - warm) / first-touch faults
    F  64 MiB, fast, 2 MiB slot
    H  64 MiB, fast, 1 GiB slot       free = (Zfast(H) - Zfast(F)) / extra pages
    D  64 MiB, targeted, 2 MiB slot   Zt(2 MiB), CREATE(2 MiB)
    E  64 MiB, targeted, 1 GiB slot   Zt(1 GiB), CREATE(1 GiB)
    T  512 MiB, fast, host THP,       F2M = (populate - warm) / first-touch faults (one per 2 MiB)
       2 MiB guest pages

    access_ns           = warm / pages of A
    prefetch_spte       = (R8 - R1) / 7          (R8 and R1 are per fault)
    exit path           = R1 = vm_exit + vm_entry + fault_handle + faultin_resident + spte_install,
                          split in the base profile's proportions (one sum is all one can see)
    host_alloc_4k       = faultin_resident + (F1 - R1)
    host_alloc_2m       = faultin_resident + (F2M - R1)
    fast zap            = K + sp_free x shadow pages + spte_zap x present SPTEs: least squares over
                          the medians of A, B, C, F (their DELETE ioctls); C has as many shadow pages
                          as B but an eighth of the SPTEs, which separates the two slopes
    memslot_free_page   = free (above)
    memslot_alloc_page  = (CREATE(1 GiB) - CREATE(2 MiB)) / extra pages, from D and E. Per page,
                          zeroing the rmaps costs more once they outgrow the caches: about 1.0 ns
                          with a 256 MiB slot (``desim kvm measure --scenario tiny --extra-slot-mib
                          256``), 1.4 with 1 GiB and with 8 GiB (``desim validate``'s big-slot
                          CREATE); 1 GiB is closer to real RAM slots. CREATEs after a fast zap are
                          left out, because a ~20 us ioctl depends on how warm the CPU caches are. Right after a
                          targeted DELETE (which ran the same memslot, SRCU and allocator code) a
                          2 MiB CREATE took 20.5 us; after 5 ms of busy userspace work 31 us; after
                          streaming 64 MiB through the cache 32-45 us; after a 10 ms fast zap (which
                          streams through every SPTE) 43 us, and only the first ioctl pays
                          (benchmarks/bench_kvm_ioctls.py). The model's fixed costs are the warm
                          values, so they come from CREATEs that follow a targeted DELETE
    per gfn probes      = rmap_probe + hash_probe = (Zt(1G) - Zt(2M)) / extra pages - free,
                          split in the base profile's proportions
    c1 = ioctl_fixed + srcu_sync                  = CREATE(2 MiB) - 512 alloc
    c2 = ioctl_fixed + 2 srcu_sync + memslot_invalidate = Zt(2 MiB) - 512 (probes + free)
    ioctl_fixed, srcu_sync = c1 split in the base profile's proportions (only the sum is seen)
    memslot_invalidate  = c2 - ioctl_fixed - 2 srcu_sync; K of the fast-zap fit is a check of c2

Each fitted cost also gets a 95% interval from a percentile bootstrap over the
repeats (:func:`bootstrap_ci95`), written as ``ci95 = [low, high]`` next to
its value, and calibrate warns when the host's speed drifted between the first
and second half of the repeats (:func:`drift`).

The two costs that carry a fault's variation, ``fault_handle`` and
``host_alloc_4k``, also get the shape of their distribution (an empirical
quantile table with a bootstrap 95% interval per quantile) from per-access
rdtsc latencies of microscenario C: :mod:`desim.kvm.fitdist`.

``ipi_ack`` (IPI delivery to a running vCPU) comes from the stalls a vCPU
that keeps touching sees during D's targeted DELETE (the kicks of the memslot
swaps): :func:`desim.kvm.fitdist.fit_ipi_ack`.

Costs not identifiable here (``ipi_send``, ``invept``, ``root_alloc``, 1 GiB
host allocation, ``pt_page_alloc``, ``lock_handoff``, ``mmio_emulation``) keep
the base profile's value and source. Every fitted cost's ``source`` says
``measured: desim kvm calibrate`` with the kernel, date and the numbers used.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from desim.errors import DesimInputError
from desim.kvm.measure import run_once
from desim.kvm.scenario import KvmScenario
from desim.kvm.vm import Kvm

MICRO: dict[str, KvmScenario] = {
    "A": KvmScenario(name="cal-A", ram_mib=128, policy="fast"),
    "B": KvmScenario(name="cal-B", ram_mib=512, policy="fast"),
    "C": KvmScenario(name="cal-C", ram_mib=512, policy="fast", stride_kib=32),
    "F": KvmScenario(name="cal-F", ram_mib=64, policy="fast", extra_slot_mib=2),
    "H": KvmScenario(name="cal-H", ram_mib=64, policy="fast", extra_slot_mib=1024),
    "D": KvmScenario(name="cal-D", ram_mib=64, policy="targeted", extra_slot_mib=2),
    "E": KvmScenario(name="cal-E", ram_mib=64, policy="targeted", extra_slot_mib=1024),
    "T": KvmScenario(name="cal-T", ram_mib=512, policy="fast", guest_page="2m", host_thp=True),
}
FAST_FIT = ("A", "B", "C", "F")
EXIT_PATH = ("vm_exit", "vm_entry", "fault_handle", "faultin_resident", "spte_install")
PROBES = ("rmap_probe", "hash_probe")


@dataclass
class Calibration:
    """Fitted costs (ns), the numbers they came from, and the guest access time."""

    costs: dict[str, float]
    access_ns: float
    observations: dict[str, float]
    sources: dict[str, str] = field(default_factory=dict)
    raw: dict[str, list[dict[str, int]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    dists: dict[str, dict[str, Any]] = field(default_factory=dict)  # cost -> Dist fields (desim.kvm.fitdist)
    harness: dict[str, dict[str, Any]] = field(default_factory=dict)  # [harness] fields: access_dist (hits)

    def to_dict(self) -> dict[str, Any]:
        return {"costs": self.costs, "ci95": self.ci95, "access_ns": self.access_ns,
                "observations": self.observations, "sources": self.sources, "warnings": self.warnings,
                "dists": self.dists, "harness": self.harness, "runs": self.raw}


def collect(repeats: int = 7, progress: Callable[[str], None] | None = None,
            kvm_path: str = "/dev/kvm") -> dict[str, list[dict[str, int]]]:
    """Metrics of every microscenario, ``repeats`` runs each (interleaved)."""
    if repeats < 1:
        raise DesimInputError(f"--repeats must be >= 1 (got {repeats})")
    out: dict[str, list[dict[str, int]]] = {k: [] for k in MICRO}
    with Kvm(kvm_path) as kvm:
        for rep in range(repeats):
            for key, sc in MICRO.items():
                if key != "T":
                    out[key].append(run_once(kvm, sc)["metrics"])
            if progress:
                progress(f"calibrate: round {rep + 1}/{repeats} done")
        # Host THP: the first THP VM after 4 KiB-heavy runs pays for compaction (first touch of a
        # 2 MiB page measured at 2.7 ms, against 0.19 ms with free huge pages). The model has no
        # compaction, so the THP runs come back to back after one discarded warm-up run.
        run_once(kvm, MICRO["T"])
        for _ in range(repeats):
            out["T"].append(run_once(kvm, MICRO["T"])["metrics"])
    return out


# the metrics of each microscenario that feed the fit (see the module docstring)
USED: dict[str, tuple[str, ...]] = {
    "A": ("retouch_ns", "populate_ns", "zap_ioctl_ns"),
    "B": ("zap_ioctl_ns",),
    "C": ("retouch_ns", "populate_ns", "zap_ioctl_ns"),
    "F": ("zap_ioctl_ns",),
    "H": ("zap_ioctl_ns",),
    "D": ("zap_ioctl_ns", "create_ioctl_ns"),
    "E": ("zap_ioctl_ns", "create_ioctl_ns"),
    "T": ("populate_ns",),
}
DRIFT_LIMIT = 0.15


def drift(raw: dict[str, list[dict[str, int]]], limit: float = DRIFT_LIMIT) -> list[str]:
    """Warnings for metrics whose median moved by more than ``limit`` between the first and the
    second half of the (interleaved) repeats: the host's speed changed during calibration (on
    these machines bursts of neighbour load slow kernel work by 20-30% for seconds), so the fitted
    costs carry that error. Needs 4 repeats or more."""
    out = []
    for key, runs in raw.items():
        if len(runs) < 4:
            continue
        half = len(runs) // 2
        for metric in USED.get(key, ()):
            a = statistics.median(r.get(metric, 0) for r in runs[:half])
            b = statistics.median(r.get(metric, 0) for r in runs[half:])
            if a > 0 and b > 0 and abs(b / a - 1) > limit:
                out.append(f"{MICRO[key].name} {metric}: median {a / 1e3:.1f} us in the first {half} runs, "
                           f"{b / 1e3:.1f} us in the other {len(runs) - half} ({100 * (b / a - 1):+.0f}%)")
    return out


def _med(runs: list[dict[str, int]], metric: str) -> float:
    return float(statistics.median(r[metric] for r in runs))


def _per_fault(runs: list[dict[str, int]], span: str, count: str) -> float:
    return float(statistics.median((r[span] - r["warm_ns"]) / max(r[count], 1) for r in runs))


def _fast_zap_fit(raw: dict[str, list[dict[str, int]]], free: float) -> tuple[float, float, float, float]:
    """Least squares ``zap = K + P sp + Z sptes`` over the medians of :data:`FAST_FIT` (medians,
    not single runs, so that one slow run does not pull the slopes); returns K, P, Z and the worst
    relative residual. The metadata free of the deleted slot is taken out first."""
    rows, ys = [], []
    for key in FAST_FIT:
        runs = raw[key]
        sptes = statistics.median(r.get("op_sptes_4k_dropped", 0) + r.get("op_sptes_2m_dropped", 0) for r in runs)
        rows.append((1.0, _med(runs, "op_shadow_zapped"), float(sptes)))
        ys.append(_med(runs, "zap_ioctl_ns") - free * (MICRO[key].extra_slot_mib << 8))
    a, y = np.array(rows), np.array(ys)
    (k, p, z), *_ = np.linalg.lstsq(a, y, rcond=None)
    worst = float(np.max(np.abs(a @ np.array([k, p, z]) - y) / np.maximum(y, 1.0)))
    return float(k), float(p), float(z), worst


BOOTSTRAP_RESAMPLES = 400


def bootstrap_ci95(raw: dict[str, list[dict[str, int]]], base: Any, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap 95% intervals of every fitted cost: each resample draws, per
    microscenario, as many runs as it has with replacement and fits again. Deterministic (``seed``)."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        sample = {k: [runs[i] for i in rng.integers(0, len(runs), len(runs))] for k, runs in raw.items()}
        for k, v in fit(sample, base, uncertainty=False).costs.items():
            draws.setdefault(k, []).append(v)
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items()}


def fit(raw: dict[str, list[dict[str, int]]], base: Any, uncertainty: bool = True) -> Calibration:
    """Costs from the microscenario metrics; ``base`` is the HostProfile supplying splits and the rest.
    With ``uncertainty``, also their bootstrap 95% intervals (:func:`bootstrap_ci95`) and drift warnings."""
    A, C, D, E, F, H, T = (raw[k] for k in "ACDEFHT")
    pages_a = MICRO["A"].ram_mib << 8
    small, big = MICRO["D"].extra_slot_mib << 8, MICRO["E"].extra_slot_mib << 8
    if (MICRO["F"].extra_slot_mib << 8, MICRO["H"].extra_slot_mib << 8) != (small, big):
        raise AssertionError("F/H and D/E must use the same slot sizes")
    obs: dict[str, float] = {
        "access_ns": _med(A, "warm_ns") / pages_a,
        "R8_refault_ns": _per_fault(A, "retouch_ns", "refaults"),
        "R1_refault_ns": _per_fault(C, "retouch_ns", "refaults"),
        "F_first_touch_ns": float(statistics.median(
            (r["populate_ns"] - r["warm_ns"]) / max(r["populate_pf_fixed"], 1) for r in A)),
        "F1_first_touch_ns": float(statistics.median(
            (r["populate_ns"] - r["warm_ns"]) / max(r["populate_pf_fixed"], 1) for r in C)),
        "F2M_first_touch_ns": float(statistics.median(
            (r["populate_ns"] - r["warm_ns"]) / max(r["populate_pf_fixed"], 1) for r in T)),
        # only after a targeted DELETE: after a fast zap the caches are colder (see the docstring)
        "create_small_ns": _med(D, "create_ioctl_ns"),
        "create_big_ns": _med(E, "create_ioctl_ns"),
        "zap_fast_small_slot_ns": _med(F, "zap_ioctl_ns"), "zap_fast_big_slot_ns": _med(H, "zap_ioctl_ns"),
        "zap_targeted_small_ns": _med(D, "zap_ioctl_ns"), "zap_targeted_big_ns": _med(E, "zap_ioctl_ns"),
    }
    P = {k: c.value for k, c in base.costs.items()}
    costs: dict[str, float] = {}
    src: dict[str, str] = {}
    # exit path and prefetch
    r1, r8 = obs["R1_refault_ns"], obs["R8_refault_ns"]
    costs["prefetch_spte"] = max(0.0, (r8 - r1) / 7)
    src["prefetch_spte"] = f"(R8 {r8:.0f} - R1 {r1:.0f}) / 7 ns: re-fault with 8 vs 1 SPTE per fault"
    share = sum(P[k] for k in EXIT_PATH)
    for k in EXIT_PATH:
        costs[k] = r1 * P[k] / share if share else r1 / len(EXIT_PATH)
        src[k] = f"R1 = {r1:.0f} ns per re-fault without prefetch, split in {base.name}'s proportions"
    f1 = obs["F1_first_touch_ns"]
    costs["host_alloc_4k"] = max(0.0, costs["faultin_resident"] + f1 - r1)
    src["host_alloc_4k"] = f"faultin_resident + (first-touch fault {f1:.0f} ns - re-fault {r1:.0f} ns), no prefetch"
    f2m = obs["F2M_first_touch_ns"]
    costs["host_alloc_2m"] = max(0.0, costs["faultin_resident"] + f2m - r1)
    src["host_alloc_2m"] = f"faultin_resident + (first-touch fault on a THP {f2m:.0f} ns - re-fault {r1:.0f} ns)"
    # memslot metadata: free (fast DELETE of the big vs the small untouched slot), alloc (their CREATEs)
    free = max(0.0, (obs["zap_fast_big_slot_ns"] - obs["zap_fast_small_slot_ns"]) / (big - small))
    costs["memslot_free_page"] = free
    src["memslot_free_page"] = (f"fast DELETE of an untouched {big >> 8} MiB vs {small >> 8} MiB slot: "
                                f"{obs['zap_fast_big_slot_ns']:.0f} vs {obs['zap_fast_small_slot_ns']:.0f} ns")
    alloc = max(0.0, (obs["create_big_ns"] - obs["create_small_ns"]) / (big - small))
    costs["memslot_alloc_page"] = alloc
    src["memslot_alloc_page"] = (f"CREATE of a {big >> 8} MiB vs {small >> 8} MiB slot: "
                                 f"{obs['create_big_ns']:.0f} vs {obs['create_small_ns']:.0f} ns")
    # fast zap: fixed part, per shadow page, per present SPTE
    k, per_sp, per_spte, worst = _fast_zap_fit(raw, free)
    obs.update(fast_zap_fixed_ns=k, fast_zap_per_sp_ns=per_sp, fast_zap_per_spte_ns=per_spte,
               fast_zap_fit_worst_residual=worst)
    how = (f"fast-zap DELETE = {k:.0f} + {per_sp:.0f} x shadow pages + {per_spte:.1f} x SPTEs "
           f"(least squares over {', '.join(FAST_FIT)}; worst residual {100 * worst:.1f}%)")
    costs["sp_free"], costs["spte_zap"] = max(0.0, per_sp), max(0.0, per_spte)
    src["sp_free"] = how + ": per shadow page (unlink its 512 entries and free it)"
    src["spte_zap"] = how + ": per present SPTE"
    # targeted zap of an untouched slot: per-gfn probes (minus the metadata free), then the fixed part
    per_gfn = max(0.0, (obs["zap_targeted_big_ns"] - obs["zap_targeted_small_ns"]) / (big - small))
    probes = max(0.0, per_gfn - free)
    pshare = sum(P[k] for k in PROBES)
    probes_per_gfn = {"rmap_probe": 1 + 1 / 512, "hash_probe": 1.0}
    for name in PROBES:
        costs[name] = probes * (P[name] / pshare if pshare else 0.5) / probes_per_gfn[name]
        src[name] = (f"targeted DELETE {per_gfn:.2f} ns per gfn ({small >> 8} vs {big >> 8} MiB untouched slot) "
                     f"minus memslot_free_page, split in {base.name}'s proportions")
    c1 = obs["create_small_ns"] - alloc * small
    c2 = obs["zap_targeted_small_ns"] - per_gfn * small
    fshare = P["ioctl_fixed"] / (P["ioctl_fixed"] + P["srcu_sync"]) if P["ioctl_fixed"] + P["srcu_sync"] else 0.5
    costs["ioctl_fixed"], costs["srcu_sync"] = c1 * fshare, c1 * (1 - fshare)
    src["ioctl_fixed"] = src["srcu_sync"] = (f"CREATE of a {small >> 8} MiB slot minus its metadata = {c1:.0f} ns "
                                             f"(ioctl_fixed + srcu_sync), split in {base.name}'s proportions")
    inv = c2 - costs["ioctl_fixed"] - 2 * costs["srcu_sync"]
    obs.update(create_fixed_ns=c1, delete_fixed_ns=c2)
    costs["memslot_invalidate"] = max(0.0, inv)
    src["memslot_invalidate"] = (f"targeted DELETE of an untouched {small >> 8} MiB slot minus its probes = {c2:.0f} ns "
                                 f"= ioctl_fixed + 2 srcu_sync + this (fast-zap fit's fixed part: {k:.0f} ns)")
    if not uncertainty:
        return Calibration(costs, obs["access_ns"], obs, src, raw)
    return Calibration(costs, obs["access_ns"], obs, src, raw, drift(raw), bootstrap_ci95(raw, base))


def calibrate(base: str = "shadow-pvm", repeats: int = 7, progress: Callable[[str], None] | None = None,
              kvm_path: str = "/dev/kvm") -> tuple[Calibration, Any]:
    """Measure and fit; returns the calibration and the base HostProfile."""
    from desim.profile import load_profile

    from desim.kvm.fitdist import (DIST_SCENARIO, HIT_SCENARIO, KICK_SCENARIO, collect_kicks, collect_latency,
                                   fit_dists, fit_hit_dist, fit_ipi_ack, rdtsc_fault_means)
    prof = load_profile(base)
    cal = fit(collect(repeats, progress, kvm_path), prof)
    # the fault path from the timed guest: means (microscenarios C, A and T) and shapes (C and T); the
    # hits' shape (A)
    with Kvm(kvm_path) as kvm:
        lat = collect_latency(MICRO[DIST_SCENARIO], repeats, kvm, progress)
        lat_a = collect_latency(MICRO[HIT_SCENARIO], repeats, kvm, progress)
        kicks = collect_kicks(MICRO[KICK_SCENARIO], repeats, kvm)
        lat_t = collect_latency(MICRO["T"], repeats, kvm, progress)  # host THP last (compaction)
    hit = float(np.mean(np.concatenate([r["hit"] for r in lat_a])))
    apply_rdtsc_means(cal, prof, rdtsc_fault_means(lat, lat_a, hit, lat_t))
    # 95% intervals: percentile bootstrap over the timed runs (as bootstrap_ci95 over the untimed ones)
    rng = np.random.default_rng(1)
    boot: dict[str, list[float]] = {}
    for _ in range(BOOTSTRAP_RESAMPLES):
        c = [lat[i] for i in rng.integers(0, len(lat), len(lat))]
        a = [lat_a[i] for i in rng.integers(0, len(lat_a), len(lat_a))]
        t = [lat_t[i] for i in rng.integers(0, len(lat_t), len(lat_t))]
        tmp = Calibration(dict(cal.costs), cal.access_ns, dict(cal.observations))
        apply_rdtsc_means(tmp, prof, rdtsc_fault_means(c, a, hit, t))
        for k in RDTSC_COSTS:
            boot.setdefault(k, []).append(tmp.costs[k])
    for k, xs in boot.items():
        lo, hi = np.percentile(xs, [2.5, 97.5])
        cal.ci95[k] = (float(lo), float(hi))
    costs = {k: cal.costs.get(k, c.value) for k, c in prof.costs.items()}
    stamp = f"measured: desim kvm calibrate, {os.uname().release}, {time.strftime('%Y-%m-%d')}"
    cal.dists = fit_dists(lat, costs, hit, stamp, t_runs=lat_t)
    cal.harness["access_dist"] = fit_hit_dist(lat_a, stamp)
    cal.harness["access_dist_thp"] = fit_hit_dist(lat_t, stamp, scenario="T")
    ack = fit_ipi_ack(kicks, cal.costs["vm_entry"], hit)
    n = sum(len(k) for k in kicks)
    cal.observations["kick_stalls"] = n
    if ack is not None:
        cal.costs["ipi_ack"] = ack
        cal.sources["ipi_ack"] = (f"median of {n} stalls of a running vCPU during {len(kicks)} targeted DELETEs of "
                                  f"calibration scenario {KICK_SCENARIO} (the kicks of kvm_arch_memslots_updated, "
                                  f"rdtsc in the guest, run-queue waits dropped) minus vm_entry and access_ns")
        if len(kicks) >= 2:
            rng = np.random.default_rng(2)
            bs = [fit_ipi_ack([kicks[i] for i in rng.integers(0, len(kicks), len(kicks))], cal.costs["vm_entry"], hit)
                  for _ in range(BOOTSTRAP_RESAMPLES)]
            lo, hi = np.percentile([b for b in bs if b is not None], [2.5, 97.5])
            cal.ci95["ipi_ack"] = (float(lo), float(hi))
    return cal, prof


RDTSC_GAP = 0.2  # warn when the wall-time and the rdtsc fault means differ by more
RDTSC_COSTS = EXIT_PATH + ("host_alloc_4k", "host_alloc_2m", "prefetch_spte")


def apply_rdtsc_means(cal: Calibration, base: Any, rd: dict[str, float]) -> None:
    """Replace the fault-path costs fitted from wall times (R1, F1, R8 of :func:`fit`) by the same
    formulas on the rdtsc means (:func:`desim.kvm.fitdist.rdtsc_fault_means`), keeping the wall-time
    numbers as observations and warning when the two disagree by more than :data:`RDTSC_GAP`.

    The exit path's constant terms are the re-fault's *median* split in the base's proportions and
    ``fault_handle`` is the rest of the mean R1, as :func:`desim.kvm.fitdist.fit_tables` splits the
    quantiles: a fitted table's mean is then its cost's value, and the sampler keeps its shape."""
    P = {k: c.value for k, c in base.costs.items()}
    obs = cal.observations
    if np.isfinite(rd.get("prefetched_hit_extra", float("nan"))):
        obs["prefetched_hit_extra_ns"] = rd["prefetched_hit_extra"]  # not modelled (desim.kvm.fitdist)
    for key, wall in (("R1", "R1_refault_ns"), ("F1", "F1_first_touch_ns"), ("R8", "R8_refault_ns"),
                      ("F2M", "F2M_first_touch_ns")):
        if key not in rd:
            continue
        obs[f"{key}_rdtsc_ns"] = rd[key]
        w = obs.get(wall)
        same = rd[key]
        if key == "R8" and np.isfinite(rd.get("prefetched_hit_extra", float("nan"))):
            same += 7 * rd["prefetched_hit_extra"]  # the wall time also holds the 7 slower hits after it
        if w and np.isfinite(same) and abs(w / same - 1) > RDTSC_GAP:
            cal.warnings.append(f"{key} per fault: wall time {w:.0f} ns, rdtsc {rd[key]:.0f} ns: the host's "
                                "scheduler stretched the wall times (the rdtsc means, which drop preempted "
                                "accesses, are used)")
    r1, f1, r8 = rd["R1"], rd["F1"], rd["R8"]
    # the constant terms: the re-fault's median split in the base's proportions; fault_handle, which
    # carries the exit path's variation (desim.kvm.fitdist), takes the rest of the mean
    med = rd.get("R1_median", r1)
    share = sum(P[k] for k in EXIT_PATH)
    for k in EXIT_PATH:
        if k == "fault_handle":
            continue
        cal.costs[k] = med * P[k] / share if share else med / len(EXIT_PATH)
        cal.sources[k] = (f"R1 median = {med:.0f} ns per re-fault without prefetch (rdtsc in the guest), "
                          f"split in {base.name}'s proportions")
        cal.ci95.pop(k, None)
    cal.costs["fault_handle"] = max(0.0, r1 - sum(cal.costs[k] for k in EXIT_PATH if k != "fault_handle"))
    cal.sources["fault_handle"] = (f"R1 = {r1:.0f} ns per re-fault without prefetch (rdtsc in the guest, mean) "
                                   f"minus the other exit-path terms (the median {med:.0f} ns split in "
                                   f"{base.name}'s proportions): its share of the median and all of the spread")
    cal.ci95.pop("fault_handle", None)
    cal.costs["host_alloc_4k"] = max(0.0, cal.costs["faultin_resident"] + f1 - r1)
    cal.sources["host_alloc_4k"] = (f"faultin_resident + (first-touch fault {f1:.0f} ns - re-fault {r1:.0f} ns), "
                                    "rdtsc in the guest, means")
    cal.ci95.pop("host_alloc_4k", None)
    if "F2M" in rd and np.isfinite(rd["F2M"]):
        f2m = rd["F2M"]
        cal.costs["host_alloc_2m"] = max(0.0, cal.costs["faultin_resident"] + f2m - r1)
        cal.sources["host_alloc_2m"] = (f"faultin_resident + (first-touch fault on a THP {f2m:.0f} ns - re-fault "
                                        f"{r1:.0f} ns), rdtsc in the guest, means")
        cal.ci95.pop("host_alloc_2m", None)
    if np.isfinite(r8):
        cal.costs["prefetch_spte"] = max(0.0, (r8 - r1) / 7)
        cal.sources["prefetch_spte"] = f"(R8 {r8:.0f} - R1 {r1:.0f}) / 7 ns, rdtsc in the guest, means"
        cal.ci95.pop("prefetch_spte", None)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def profile_toml(cal: Calibration, base: Any, name: str) -> str:
    """A complete profile TOML: the base's kernel and costs, fitted costs replaced."""
    stamp = f"measured: desim kvm calibrate, {os.uname().release}, {time.strftime('%Y-%m-%d')}"
    lines = [f"# Calibrated by `desim kvm calibrate` from {base.name} on {os.uname().nodename} "
             f"({os.uname().release}). Values in ns.",
             f"# Guest access time per 4 KiB page touch (a scenario's access_ns): {cal.access_ns:.1f} ns.",
             f"name = {_toml_str(name)}",
             f"description = {_toml_str(base.description + ' (calibrated on the real KVM)')}",
             "", "[kernel]"]
    for k, v in base.kernel.model_dump().items():
        lines.append(f"{k} = {_toml_str(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}")
    lines += ["", "[costs]"]
    for k, c in base.costs.items():
        ci = ""
        if k in cal.costs and k in cal.sources:
            value, source = cal.costs[k], f"{stamp}: {cal.sources[k]}"
            if k in cal.ci95:
                lo, hi = cal.ci95[k]
                ci = f", ci95 = [{round(lo, 2)}, {round(hi, 2)}]"
        else:
            value, source = c.value, c.source
        dist = _dist_toml(cal.dists[k]) if k in cal.dists else ""
        lines.append(f"{k} = {{ value = {round(value, 2)}{ci}, source = {_toml_str(source)}{dist} }}")
    if cal.harness:
        lines += ["", "[harness]  # the desim kvm harness's own guest on this host (desim validate), not a cost"]
        for k, d in cal.harness.items():
            lines.append(f"{k} = {_inline_table(d)}")
    return "\n".join(lines) + "\n"


def _inline_table(d: dict[str, Any]) -> str:
    """``{ ... }``: an inline TOML table of a fitted distribution."""
    parts = []
    for k, v in d.items():
        parts.append(f"{k} = {_toml_str(v) if isinstance(v, str) else str(v)}")
    return "{ " + ", ".join(parts) + " }"


def _dist_toml(d: dict[str, Any]) -> str:
    """``, dist = { ... }``: a cost's fitted distribution."""
    return ", dist = " + _inline_table(d)

