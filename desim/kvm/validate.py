"""Real versus simulated: run the same scenario on the real KVM and in the simulator, metric by metric.

For each :class:`KvmScenario` and each policy, the real side is
:func:`desim.kvm.measure.measure_interleaved` (median and min-max over
``repeats``, the scenarios' runs interleaved), the
simulated side :func:`desim.kvm.simbridge.sim_metrics` on a host profile
(ideally the one ``desim kvm calibrate`` wrote), with the guest's access time
per page taken from the real ``warm`` pass. The result is one row per
(scenario, policy, metric) with the relative error ``(sim - real) / real``.

Counts (``refaults``, SPTEs and shadow pages zapped, first-touch faults) test
the model's structure: faults and shadow pages match exactly (the simulator
also fetches the guest's code page), SPTEs to within the 7 page-table pages
the real fault on the code page prefetches (their guest PTEs were written with
the Accessed bit set, which the simulator's "ever mapped" proxy does not
know); times test the profile's costs.
"""
from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any, Callable

from desim.kvm.measure import Measurement, measure_interleaved
from desim.kvm.scenario import POLICIES, KvmScenario, layout, named
from desim.kvm.simbridge import sim_metrics, to_sim

COMPARED: dict[str, str] = {
    "refaults": "count",
    "op_sptes_dropped": "count",
    "op_shadow_zapped": "count",
    "populate_pf_fixed": "count",
    "zap_ioctl_ns": "ns",
    "create_ioctl_ns": "ns",
    "retouch_ns": "ns",
    "populate_ns": "ns",
    "warm_ns": "ns",
}


VALIDATION_SCENARIOS = ("outside", "inside", "move", "delete", "many-slots", "guest-2m", "thp", "big-slot")
TWO_VCPU_SCENARIOS = ("outside", "inside", "move")


def default_scenarios() -> list[KvmScenario]:
    """Small versions (256 MiB) of the named scenarios the simulator can mirror (every named one
    but ``no-accessed``, which it cannot, and ``tiny``) with one vCPU, and three of them with two
    vCPUs, whose faults contend for ``mmu_lock`` (the shadow MMU takes it for write).

    None of them is a calibration microscenario (:data:`desim.kvm.calibrate.MICRO`): those use
    one vCPU, 64, 128 and 512 MiB of RAM, a 1 GiB slot or a stride, and no MOVE, no guest-2m,
    no 32 slots, no 8 GiB slot (``big-slot``: an untouched slot whose targeted zap probes 2M gfns).
    """
    one = [replace(named(n), name=f"{n}-256M", ram_mib=256, vcpus=1) for n in VALIDATION_SCENARIOS]
    two = [replace(named(n), name=f"{n}-256M-2vcpu", ram_mib=256, vcpus=2) for n in TWO_VCPU_SCENARIOS]
    return one + two


def _real_samples(m: Measurement, policy: str, metric: str) -> list[float]:
    if metric == "op_sptes_dropped":
        a, b = m.samples(policy, "op_sptes_4k_dropped"), m.samples(policy, "op_sptes_2m_dropped")
        return [float(x + y) for x, y in zip(a, b)]
    return [float(x) for x in m.samples(policy, metric)]


def validate(scenarios: list[KvmScenario], profile: str = "shadow-pvm", repeats: int = 5,
             replications: int = 1, progress: Callable[[str], None] | None = None,
             kvm_path: str = "/dev/kvm") -> dict[str, Any]:
    """Rows comparing real medians with simulated means; see the module docstring."""
    rows: list[dict[str, Any]] = []
    for sc in scenarios:  # what the simulator cannot mirror fails before any VM runs
        to_sim(sc, profile)
    measured = measure_interleaved(scenarios, repeats, progress, kvm_path)
    for sc, real in zip(scenarios, measured):
        # the vCPUs touch their regions in parallel: a pass lasts one vCPU's share of the pages
        pages_per_vcpu = layout(sc).touched_pages(sc.stride_kib << 10) / sc.vcpus
        for pol in POLICIES:
            access_ns = statistics.median(real.samples(pol, "warm_ns")) / max(pages_per_vcpu, 1)
            sims = [sim_metrics(sc.with_policy(pol), profile, seed=1, replication=r, access_ns=access_ns)
                    for r in range(replications)]
            for metric, unit in COMPARED.items():
                xs = _real_samples(real, pol, metric)
                med = float(statistics.median(xs))
                sim = float(statistics.fmean(s[metric] for s in sims))
                rows.append({
                    "scenario": sc.name, "policy": pol, "metric": metric, "unit": unit,
                    "real_median": med, "real_min": min(xs), "real_max": max(xs), "sim": sim,
                    "rel_error": (sim - med) / med if med else (0.0 if sim == 0 else None),
                    "access_ns": access_ns,
                })
            if progress:
                r = next(x for x in rows[::-1] if x["metric"] == "refaults" and x["policy"] == pol)
                progress(f"validate {sc.name} {pol}: refaults real {r['real_median']:.0f} sim {r['sim']:.0f}")
    return {"tool": "desim kvm validate", "profile": profile, "repeats": repeats, "replications": replications,
            "scenarios": [s.to_dict() for s in scenarios], "rows": rows}


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "ns":
        return f"{v / 1e6:.3f}ms" if abs(v) >= 1e6 else f"{v / 1e3:.1f}us"
    return f"{v:.0f}"


def format_rows(result: dict[str, Any]) -> str:
    lines = [f"profile {result['profile']}: real median [min-max] over {result['repeats']} run(s) vs simulated",
             f"{'scenario':16s} {'policy':9s} {'metric':18s} {'real':>30s} {'sim':>12s} {'error':>8s}"]
    for r in result["rows"]:
        u = r["unit"]
        real = f"{_fmt(r['real_median'], u)} [{_fmt(r['real_min'], u)}-{_fmt(r['real_max'], u)}]"
        err = "n/a" if r["rel_error"] is None else f"{100 * r['rel_error']:+.0f}%"
        lines.append(f"{r['scenario']:16s} {r['policy']:9s} {r['metric']:18s} {real:>30s} "
                     f"{_fmt(r['sim'], u):>12s} {err:>8s}")
    return "\n".join(lines)


# counts that test the model's structure; the real VM also maps its code page and page
# tables, so a difference of up to STRUCTURAL_SLACK faults or SPTEs is not an error
STRUCTURAL = ("refaults", "op_sptes_dropped", "populate_pf_fixed")
STRUCTURAL_SLACK = 16


def worst_error(result: dict[str, Any], metrics: tuple[str, ...] = STRUCTURAL) -> float:
    """The largest |relative error| among rows of ``metrics`` (0 if none), ignoring differences
    of at most :data:`STRUCTURAL_SLACK`."""
    errs = []
    for r in result["rows"]:
        if r["metric"] not in metrics:
            continue
        if abs(r["sim"] - r["real_median"]) <= STRUCTURAL_SLACK:
            errs.append(0.0)
        elif r["rel_error"] is None:
            errs.append(float("inf"))
        else:
            errs.append(abs(r["rel_error"]))
    return max(errs, default=0.0)


def worst_time_error(result: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """The largest |relative error| among the time rows (``unit == "ns"``, real median > 0), and its row."""
    worst: tuple[float, dict[str, Any] | None] = (0.0, None)
    for r in result["rows"]:
        if r["unit"] == "ns" and r["real_median"] > 0 and r["rel_error"] is not None:
            if abs(r["rel_error"]) > worst[0]:
                worst = (abs(r["rel_error"]), r)
    return worst


def summary(result: dict[str, Any]) -> str:
    """Two lines: the worst structural-count and the worst time error."""
    counts = worst_error(result)
    t, row = worst_time_error(result)
    where = f" ({row['scenario']} {row['policy']} {row['metric']}: real {_fmt(row['real_median'], 'ns')}, " \
            f"sim {_fmt(row['sim'], 'ns')})" if row else ""
    n = sum(1 for r in result["rows"] if r["unit"] == "ns" and r["real_median"] > 0)
    within = sum(1 for r in result["rows"] if r["unit"] == "ns" and r["real_median"] > 0
                 and r["rel_error"] is not None and abs(r["rel_error"]) <= 0.2)
    return (f"counts: worst error {100 * counts:.1f}% (differences of <= {STRUCTURAL_SLACK} ignored)\n"
            f"times: {within}/{n} within 20%, worst error {100 * t:.0f}%{where}")
