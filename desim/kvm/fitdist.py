"""Fit the shape of the fault-path costs from per-access latencies measured with rdtsc.

``desim calibrate`` fits each cost's *mean* from wall times and counts
(:mod:`desim.kvm.calibrate`), then replaces the fault path's means by rdtsc
means (:func:`rdtsc_fault_means`, ``calibrate.apply_rdtsc_means``); this
module adds the *distribution* of the two costs that carry a fault's
variation, as empirical quantile tables (:class:`desim.profile.Dist`,
``kind = "quantiles"``), from the timed guest (:mod:`desim.kvm.latency`) on
calibration microscenario C (512 MiB, one vCPU, every 8th page: a re-fault
installs one SPTE, nothing to prefetch). Means and tables come from the same
samples and the same decomposition, so a table's mean is its cost's ``value``
(up to the interpolation between grid points) and the sampler's scaling
(``value / table_mean``, :mod:`desim.costs`) leaves the shape as measured:

* ``fault_handle`` from the re-faults after C's fast zap. The simulator's
  re-fault access is ``vm_exit + fault_handle + faultin_resident +
  spte_install + vm_entry + access_ns`` (``desim/vcpu.py``, no contention with
  one vCPU). The other four are constants: the re-fault's *median* split in
  the profile's proportions (``apply_rdtsc_means``); ``fault_handle`` is the
  rest, quantile by quantile (clipped at 0): the exit path's whole variation,
  and the mean's excess over the median, go to ``fault_handle`` (one sum is
  all rdtsc sees). (Splitting the *mean* for the constants, as before, left
  the table's mean ~1.7 times the cost's value, so the sampler shrank the
  body: first touches came out 20-24% short at p50/p90.)
* ``host_alloc_4k`` from C's first touches, ``vm_exit + fault_handle +
  host_alloc_4k + spte_install + vm_entry + access_ns``: quantile by
  quantile, first touch minus re-fault plus ``faultin_resident``. That
  difference is exact if a fault slow in one part is as slow in the other
  (comonotone); the simulator draws the two independently, so its first-touch
  spread comes out somewhat wider in the upper middle (checked on these hosts:
  p50 +2%, p90 +12%, p99 +25%, p99.9 -4% against the measured first touches).
  A numerical deconvolution (fixed-point iteration on the quantiles under
  independence) fitted worse on the same data and was dropped.

* ``host_alloc_2m`` from the first touches of calibration scenario T (host
  THP, 2 MiB guest pages: one ~200 us fault per 2 MiB region):
  :func:`fit_thp_table`.
* The hits' shape (not a cost: the ``[harness] access_dist`` of the profile,
  :mod:`desim.hitdist`) from scenario A's warm passes: :func:`fit_hit_dist`.

Tables are on :data:`P_GRID`. Samples above the p99.99 (:data:`TAIL_CAP`) are
clipped to it, in the tables and in the means alike: single accesses of
several milliseconds are the host's scheduler (a vCPU thread preempted by a
neighbour), not fault costs, and the samples already drop the ones the
thread's run-queue wait explains (:func:`desim.kvm.latency.not_preempted`).
The last point (p = 1) is set so that the last segment's trapezoid carries
the clipped samples' mean above the p99.95 (:func:`quantile_table`): linear
interpolation from the p99.9 straight to the p99.99 (tens to hundreds of
microseconds: host interrupts) overstated that segment's mean several times
over, and with it the table's. Each quantile gets a 95% interval from a
bootstrap over the repeats (``ci95_ns``).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from desim.kvm.latency import STALL_NS, run_timed

EXIT_PATH = ("vm_exit", "vm_entry", "fault_handle", "faultin_resident", "spte_install")  # as calibrate
from desim.kvm.scenario import KvmScenario

# dense above the p99, where the body ends and host interrupts begin: the trapezoids' mean stays within
# 1% of the samples' (C's re-faults on these hosts: +0.5%; without 0.998 and 0.9995: +1.4%)
P_GRID = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.998, 0.999, 0.9995, 1.0)
TAIL_CAP = 99.99  # samples above this percentile are clipped to it (tables and means)
DIST_SCENARIO = "C"
BOOTSTRAP = 200


def collect_latency(sc: KvmScenario, repeats: int, kvm: Any,
                    progress: Callable[[str], None] | None = None) -> list[dict[str, np.ndarray]]:
    """``repeats`` timed runs of ``sc``: per run, its ``first_touch`` and ``refault`` samples (ns).
    With host THP, after one discarded run (the first THP VM after 4 KiB-heavy runs pays for
    compaction, as :func:`desim.kvm.calibrate.collect` says)."""
    out = []
    if sc.host_thp:
        run_timed(kvm, sc, during=False)
    for rep in range(repeats):
        r = run_timed(kvm, sc, during=False)
        out.append({"first_touch": r.samples["first_touch"], "refault": r.samples["refault"],
                    "retouch": r.samples["retouch"], "hit": r.samples["hit"],
                    "refaults": np.array([r.metrics["refaults"]]), "preempted": np.array([r.preempted])})
        if progress:
            progress(f"calibrate: latency run {rep + 1}/{repeats}: re-fault p50 "
                     f"{np.median(r.samples['refault']):.0f} ns, first touch p50 "
                     f"{np.median(r.samples['first_touch']):.0f} ns")
    return out


def capped(x: np.ndarray) -> np.ndarray:
    """``x`` clipped at its p99.99 (:data:`TAIL_CAP`): what the tables and the means describe."""
    return np.minimum(x, np.percentile(x, TAIL_CAP)) if len(x) else x


def quantile_table(x: np.ndarray) -> np.ndarray:
    """The quantiles of ``x`` (clipped at its p99.99) on :data:`P_GRID`.

    The last point (p = 1) makes the last segment's trapezoid mean,
    ``(q[-2] + q[-1]) / 2``, equal to the mean of the clipped samples above
    ``q[-2]`` (the p99.95), so the table's mean is the samples' mean up to the
    interpolation error of the body (C's re-faults on these hosts: +0.5%; with
    the p99.99 itself as the last point, and no 0.998 and 0.9995, +4%).
    """
    x = capped(np.asarray(x, dtype=np.float64))
    q = np.percentile(x, [100 * p for p in P_GRID[:-1]])
    top = x[x >= q[-1]]
    last = 2.0 * float(top.mean()) - q[-1] if len(top) else q[-1]
    q = np.append(q, max(last, q[-1]))
    return np.maximum.accumulate(np.maximum(q, 0.0))


def fit_tables(runs: list[dict[str, np.ndarray]], costs: dict[str, float], access_ns: float) -> dict[str, np.ndarray]:
    """The ``fault_handle`` and ``host_alloc_4k`` quantile tables (ns) from pooled runs."""
    refault = np.concatenate([r["refault"] for r in runs])
    first = np.concatenate([r["first_touch"] for r in runs])
    first = first[first > STALL_NS]
    # everything on the exit path but fault_handle is a constant: the costs given (calibrate's, the
    # re-fault's median split in the profile's proportions, apply_rdtsc_means)
    others = sum(costs[k] for k in EXIT_PATH if k != "fault_handle")
    faultin = costs["faultin_resident"]
    ref_q = quantile_table(refault)
    fh = np.maximum.accumulate(np.maximum(ref_q - access_ns - others, 0.0))
    # first touch = re-fault - faultin_resident + host_alloc_4k, quantile by quantile
    alloc = np.maximum.accumulate(np.maximum(quantile_table(first) - ref_q + faultin, 0.0))
    return {"fault_handle": fh, "host_alloc_4k": alloc}


THP_MIN_NS = 20_000.0  # a 4 KiB first touch takes 3-10 us here; zeroing 2 MiB alone takes >= 100 us (20 GB/s)


def thp_first_touches(runs: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The host THP allocations among the first touches of THP runs (calibration scenario T): those
    slower than :data:`THP_MIN_NS` (one per 2 MiB region the guest touches first, ~200 us each); the
    others are 4 KiB faults on regions the VMM had already made resident (the guest's page tables
    and code)."""
    x = np.concatenate([r["first_touch"] for r in runs])
    return x[x > THP_MIN_NS]


def fit_thp_table(t_runs: list[dict[str, np.ndarray]], costs: dict[str, float], access_ns: float) -> np.ndarray:
    """The ``host_alloc_2m`` quantile table: T's THP first touch = ``vm_exit + fault_handle +
    host_alloc_2m + spte_install + vm_entry + access_ns`` (``desim/vcpu.py``), so quantile by quantile
    first touch minus the exit path's mean (R1 = the five :data:`EXIT_PATH` costs) plus
    ``faultin_resident``, as :func:`fit_tables` does for 4 KiB pages; the exit path's own spread
    (~1 us) is negligible against ~200 us and is not taken out."""
    const = access_ns + sum(costs[k] for k in EXIT_PATH) - costs["faultin_resident"]
    q = quantile_table(thp_first_touches(t_runs))
    return np.maximum.accumulate(np.maximum(q - const, 0.0))


def fit_dists(runs: list[dict[str, np.ndarray]], costs: dict[str, float], access_ns: float,
              source: str, resamples: int = BOOTSTRAP, seed: int = 1,
              t_runs: list[dict[str, np.ndarray]] | None = None) -> dict[str, dict[str, Any]]:
    """``{cost: dist}`` for the profile TOML, with a bootstrap 95% interval per quantile: ``fault_handle``
    and ``host_alloc_4k`` from C's ``runs``, ``host_alloc_2m`` from T's ``t_runs`` if given."""
    def tables_of(c_runs: list[dict[str, np.ndarray]], t: list[dict[str, np.ndarray]] | None) -> dict[str, np.ndarray]:
        out = fit_tables(c_runs, costs, access_ns)
        if t:
            out["host_alloc_2m"] = fit_thp_table(t, costs, access_ns)
        return out
    tables = tables_of(runs, t_runs)
    rng = np.random.default_rng(seed)
    boots: dict[str, list[np.ndarray]] = {k: [] for k in tables}
    if len(runs) >= 2:
        for _ in range(resamples):
            pick = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
            tpick = [t_runs[i] for i in rng.integers(0, len(t_runs), len(t_runs))] if t_runs else None
            for k, t in tables_of(pick, tpick).items():
                boots[k].append(t)
    n_ref = sum(len(r["refault"]) for r in runs)
    n_first = sum(len(r["first_touch"]) for r in runs)
    out: dict[str, dict[str, Any]] = {}
    for k, t in tables.items():
        d: dict[str, Any] = {"kind": "quantiles", "p": list(P_GRID), "ns": [round(float(x), 1) for x in t]}
        if boots[k]:
            b = np.array(boots[k])
            lo, hi = np.percentile(b, [2.5, 97.5], axis=0)
            d["ci95_ns"] = [[round(float(a), 1), round(float(c), 1)] for a, c in zip(lo, hi)]
        if k == "host_alloc_2m":
            what = (f"{len(thp_first_touches(t_runs or []))} first touches of a 2 MiB host THP (rdtsc, those "
                    f"slower than {THP_MIN_NS / 1e3:.0f} us) minus the exit path's mean plus faultin_resident, "
                    f"{len(t_runs or [])} runs of calibration scenario T")
        elif k == "fault_handle":
            what = f"{n_ref} re-faults (rdtsc) minus the constant exit-path terms, {len(runs)} runs of calibration scenario C"
        else:
            what = (f"{n_first} first touches (rdtsc) minus the re-faults' quantiles plus faultin_resident, "
                    f"{len(runs)} runs of calibration scenario C")
        d["source"] = f"{source}: quantiles of {what}, clipped at the p99.99; p = 1 makes the last segment carry the samples' mean above the p99.95"
        out[k] = d
    return out


def rdtsc_fault_means(c_runs: list[dict[str, np.ndarray]], a_runs: list[dict[str, np.ndarray]],
                      access_ns: float, t_runs: list[dict[str, np.ndarray]] | None = None) -> dict[str, float]:
    """Per-fault means from rdtsc, for calibrate's R1, F1 and R8 (``desim.kvm.calibrate``).

    ``R1`` = mean re-fault of C (one SPTE each) minus ``access_ns``, ``R1_median`` its median
    (the constant part of the exit path, :func:`fit_tables`); ``F1`` = mean first touch of
    C minus ``access_ns``; ``R8`` = the mean re-fault of A's first retouch pass (a re-fault installs
    8 SPTEs: its accesses slower than :data:`desim.kvm.latency.STALL_NS`), minus ``access_ns``. The
    pass's other accesses hit through the 7 prefetched SPTEs, and each of those hits is slower than a
    warm hit (``prefetched_hit_extra``: ~165 ns on these hosts, 216 against 52 ns): the SPTE was
    installed without its Accessed bit (``make_spte`` sets it only when not prefetching,
    arch/x86/kvm/mmu/spte.c), so the first access through it sets the bit in the page walk. The
    simulator charges a hit ``access_ns`` whatever its SPTE's history, so that cost is left out
    rather than folded into ``prefetch_spte``, where it made every simulated re-fault 1.2 us (7 x
    165 ns) longer than the real ones (re-fault p50 +59% on the validation scenarios). Accesses
    the host's scheduler stretched are already dropped (:func:`desim.kvm.latency.not_preempted`),
    which wall times cannot do: on a loaded host they inflate a wall-time mean several times.
    C's samples are clipped at their p99.99 (:func:`capped`), as in the tables. With ``t_runs``
    (calibration scenario T), ``F2M`` = the mean THP first touch (:func:`thp_first_touches`, clipped
    the same way) minus ``access_ns``.
    """
    ref = capped(np.concatenate([r["refault"] for r in c_runs]))
    first = capped(np.concatenate([r["first_touch"] for r in c_runs]))
    r8 = capped(np.concatenate([r["retouch"][r["retouch"] > STALL_NS] for r in a_runs])) if a_runs else np.zeros(0)
    slow_hits = [float(np.mean(r["retouch"][r["retouch"] <= STALL_NS])) - float(np.mean(r["hit"]))
                 for r in a_runs if np.any(r["retouch"] <= STALL_NS) and len(r["hit"])]
    out = {"R1": float(ref.mean()) - access_ns, "R1_median": float(np.median(ref)) - access_ns,
           "F1": float(first.mean()) - access_ns,
           "R8": float(r8.mean()) - access_ns if len(r8) else float("nan"),
           "prefetched_hit_extra": float(np.mean(slow_hits)) if slow_hits else float("nan")}
    if t_runs:
        out["F2M"] = float(capped(thp_first_touches(t_runs)).mean()) - access_ns
    return out


def tick_ns(x: np.ndarray, merge_ns: float = 1.0) -> float:
    """The step of the guest's clock in ``x`` (ns), or 0 if it has none worth the name.

    On these hosts the timed guest's TSC advances in steps of 24.5 cycles
    (10.0 ns at 2445 MHz): a hit measures 40.1, 50.1, 60.1 ns ... and nothing
    between. The distinct values are grouped where they lie within
    ``merge_ns`` of each other (a step's rounding to whole cycles, 0.4 ns), and
    the step is the smallest gap between the centres of the groups that hold
    at least 0.5% of the readings each, if at
    least 90% of the readings lie within a tenth of a step of that lattice
    (a clock that counts single cycles, or continuous data, gives 0)."""
    u = np.unique(np.asarray(x, dtype=np.float64))
    if len(u) < 3:
        return 0.0
    starts = np.concatenate([[0], np.flatnonzero(np.diff(u) > merge_ns) + 1])
    ends = np.append(starts[1:], len(u))
    xs = np.sort(np.asarray(x, dtype=np.float64))
    counts = np.diff(np.searchsorted(xs, np.append(u[starts], np.inf), side="left"))
    centres = np.array([u[a:b].mean() for a, b in zip(starts, ends)])[counts >= 0.005 * len(xs)]
    if len(centres) < 2:
        return 0.0
    tick = float(np.min(np.diff(centres)))
    # a clock with steps puts (nearly) every reading on the lattice centres[0] + k tick
    r = (np.asarray(x, dtype=np.float64) - centres[0]) / tick
    return tick if np.mean(np.abs(r - np.round(r)) < 0.1) >= 0.9 else 0.0


def dequantize(x: np.ndarray, tick: float) -> np.ndarray:
    """``x`` with each distinct measured value ``v`` (within half a tick) spread evenly over
    ``[v - tick/2, v + tick/2]``, sorted.

    A measured duration is the difference of two clock reads each truncated
    to a step, so a true duration d reads as floor or ceil of d in steps,
    with the mean kept: the readings are the true distribution blurred by a
    step. Spreading each reading over its step (the mid-distribution of
    discrete data) keeps the mean and gives the continuous quantiles a
    simulator's draws are compared with; without it a hit's median is 40 or
    50 ns depending on whether 49.8% or 50.2% of a run's hits read 4 steps."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    if tick <= 0 or len(x) == 0:
        return x
    grp = np.round(x / tick).astype(np.int64)
    out = x.copy()
    bounds = np.flatnonzero(np.diff(grp)) + 1
    for a, b in zip(np.concatenate([[0], bounds]), np.append(bounds, len(x))):
        v = float(x[a:b].mean())
        m = b - a
        out[a:b] = v - tick / 2 + tick * (np.arange(m) + 0.5) / m
    return out


HIT_SCENARIO = "A"  # every 4 KiB page touched, as in the validation scenarios (host THP: T)


def hit_table(runs: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The quantile table (on :data:`P_GRID`) of the pooled warm-pass hits of ``runs``, dequantized."""
    x = np.concatenate([r["hit"] for r in runs])
    return quantile_table(dequantize(x, tick_ns(x)))


def fit_hit_dist(runs: list[dict[str, np.ndarray]], source: str, resamples: int = BOOTSTRAP,
                 seed: int = 1, scenario: str = HIT_SCENARIO) -> dict[str, Any]:
    """The ``[harness] access_dist`` of a calibrated profile: the shape of the hits of calibration
    scenario A's warm passes (every access touches a new 4 KiB page and hits: no fault), as a
    quantile table with a bootstrap 95% interval per quantile; :mod:`desim.hitdist` scales it to
    each validation scenario's own mean hit (its ``access_ns``). ``access_dist_thp`` is the same
    from T's warm passes (2 MiB guest pages on host THP: a hit misses the TLB far less often)."""
    t = hit_table(runs)
    d: dict[str, Any] = {"kind": "quantiles", "p": list(P_GRID), "ns": [round(float(v), 2) for v in t]}
    if len(runs) >= 2:
        rng = np.random.default_rng(seed)
        b = np.array([hit_table([runs[i] for i in rng.integers(0, len(runs), len(runs))])
                      for _ in range(resamples)])
        lo, hi = np.percentile(b, [2.5, 97.5], axis=0)
        d["ci95_ns"] = [[round(float(a), 2), round(float(c), 2)] for a, c in zip(lo, hi)]
    x = np.concatenate([r["hit"] for r in runs])
    d["source"] = (f"{source}: quantiles of {len(x)} hits (rdtsc in the guest) of {len(runs)} warm passes of "
                   f"calibration scenario {scenario}, each reading spread over the guest clock's step "
                   f"({tick_ns(x):.2f} ns), clipped at the p99.99; p = 1 makes the last segment carry the "
                   "samples' mean above the p99.95")
    return d


KICK_SCENARIO = "D"  # targeted DELETE of an untouched 2 MiB slot: the only KVM work a running vCPU sees is the kicks


def collect_kicks(sc: KvmScenario, repeats: int, kvm: Any) -> list[np.ndarray]:
    """Per timed run of ``sc`` with the op issued while the vCPU keeps touching
    (:func:`desim.kvm.latency.run_timed`): its stalls overlapping the DELETE, those the host's
    run queue explains dropped (:func:`desim.kvm.latency.not_preempted`)."""
    return [run_timed(kvm, sc).samples["during_op"] for _ in range(repeats)]


SWAPS_PER_DELETE = 2  # kvm_invalidate_memslot and kvm_delete_memslot each swap the memslot array: two kicks


def fit_ipi_ack(kicks: list[np.ndarray], vm_entry: float, access_ns: float) -> float | None:
    """``ipi_ack`` from the stalls a running vCPU sees during calibration scenario D's targeted DELETE.

    KVM's only work there that reaches a running vCPU is the kick of each memslot swap
    (``kvm_swap_active_memslots`` -> ``kvm_arch_memslots_updated`` -> ``kvm_vcpu_kick``: a
    reschedule IPI), two per DELETE (:data:`SWAPS_PER_DELETE`); the simulator charges the kicked
    access ``ipi_ack + vm_entry + access_ns`` (``desim/vcpu.py``). Each run's two slowest kept
    stalls are its kicks (the rest are host interrupts of a microsecond or two), and their median
    over the runs is used: on these hosts a vCPU thread on the boot CPU is also preempted by
    SRCU's callback kworker after each ``synchronize_srcu_expedited`` (50-120 us, mostly dropped as
    run-queue waits; the median leaves the rest out). A loaded host stretches everything: fit on
    an idle one. Measured on these nested hosts: 10-25 us per kick, the outer
    hypervisor's IPI delivery (the trace's ``ipi_send_cpu`` to ``reschedule_entry`` on the
    target: 21-36 us), against ~1 us on bare metal."""
    parts = [np.sort(k)[-SWAPS_PER_DELETE:] for k in kicks if len(k)]
    x = np.concatenate(parts) if parts else np.zeros(0)
    if len(x) == 0:
        return None
    return max(0.0, float(np.median(x)) - vm_entry - access_ns)
