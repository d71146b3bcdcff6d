"""At what size of the deleted memslot does the targeted zap start to cost more than the fast zap?

The fast zap (``kvm_mmu_zap_all_fast``) costs about the same whatever slot is
deleted: a short write-locked section (obsolete the roots, IPI every vCPU),
then on the TDP MMU a teardown of *all* old SPTEs under the read lock, and on
the legacy MMU ``kvm_zap_obsolete_pages`` under the write lock; afterwards
every vCPU re-faults everything it touches. The targeted zap walks only the
deleted slot, under ``mmu_lock`` held for write, with a cost proportional to
the slot (TDP MMU: its present page tables and SPTEs; legacy MMU: an rmap
probe per gfn and level), and nothing else is re-faulted. So there is a slot
size above which the targeted zap's own cost outweighs the re-faults it saves.

The VM (assumptions, all overridable on the command line):

* ``--vcpus`` vCPUs (default 4) and ``--ram-mib`` of guest RAM (default
  1 GiB; quick 16 MiB), host backing 4 KiB pages (host THP off, as in the
  default scenario: every guest page is one SPTE).
* The RAM is split into two memslots: slot 0 ("the other memory", RAM - S, at
  gpa 0) and slot 1 (the variable slot of size S, right above it). At the
  "whole RAM" end (S = RAM) slot 0 does not exist.
* Phase "populate": the guest first-touches all of slot 1 and the hot 10% of
  slot 0 (sequentially, each vCPU its share): the variable slot is fully
  mapped, and so is the working set of the other memory.
* Phase "work": each vCPU makes ``--accesses`` accesses (default 50,000,
  200 ns each; quick 5,000) to slot 0 with the default scenario's hot/cold
  pattern (shared; 90% of the accesses to the first 10% of the slot). The hot
  set is mapped; the cold accesses keep first-touching pages, so the vCPUs
  keep faulting (and contend for ``mmu_lock``) while the zap runs.
  ``--at-us`` into the phase (default 1,000 µs; quick 200 µs) the VMM deletes
  slot 1 (``--op move``: moves it to the gpa right above the RAM instead; the
  guest never touches it again either way). At S = RAM the work phase has no
  guest accesses: it is the ioctl alone, and both policies lose exactly the
  same SPTEs (a targeted zap of a slot that is then deleted also drops that
  slot's SPTEs), so there both re-fault the same amount (nothing).
* Profiles as shipped (``tdp-icelake``: TDP MMU, read-locked faults,
  CONFIG_PREEMPTION on, so the targeted zap yields the write lock to waiting
  faults; ``legacy-2020``: exclusive faults, no preemption).

Reported per size, profile and policy: memslot-ioctl latency (the one
DELETE/MOVE), zap duration, faults (all, re-faults after the zap, and those
of the work phase), fault latency of the work phase, lock wait of faults,
completion time (populate + work; populate is identical under both policies,
so the paired difference is the work phase's). The *crossover* per profile is
the smallest size S whose paired 95% CI of (targeted - fast) lies entirely
above 0 for completion time, for ioctl latency, and for either ("none in
range" if no size qualifies); the JSON also says whether targeted stays above
fast at every larger size. The point S = RAM is *degenerate* (no guest
accesses in the work phase): the tables mark it with ``*`` and a
``degenerate`` column, the plot greys it out, and it never counts as a crossover.

    python experiments/slot_size_crossover.py [--quick] [--out DIR] [--replications N] [--workers W] [--seed S]
        [--ram-mib 1024] [--sizes 64KiB,1MiB,...] [--vcpus 4] [--accesses 50000] [--at-us 1000]
        [--op delete|move] [--profiles tdp-icelake,legacy-2020]

Outputs (``--out``, default ``results/slot_size_crossover``): ``runs.csv`` (one
row per size x profile x policy x replication), ``summary.csv`` (means and 95%
CIs), ``comparison.csv`` (paired differences and ratios per point),
``crossover.csv``, ``summary.json``, ``slot_size_crossover.png/.svg``.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pandas as pd

from desim.studies import toolkit as C  # noqa: E402
from desim import experiment as ex  # noqa: E402

NAME = "slot_size_crossover"
PROFILES = ["tdp-icelake", "legacy-2020"]
ACCESS_NS = 200.0
HOT_FRACTION = 0.1
HOT_PROBABILITY = 0.9
CROSSOVER_METRICS = {"completion_ns": "completion time", "memslot_ioctl_mean_ns": "ioctl latency"}
DEGENERATE = ("the slot is the whole RAM: the work phase has no guest accesses, so nothing is re-faulted and "
              "the point measures the ioctl alone; flagged and left out of the crossover")


def degenerate(size: int, ram: int) -> str:
    """Why the point at this slot size cannot answer the question ("" if it can)."""
    return DEGENERATE if size >= ram else ""

METRICS = ["memslot_ioctl_mean_ns", "zap_duration_total_ns", "faults", "faults_after_zap", "work_faults",
           "sptes_zapped", "work_fault_latency_p99_ns", "work_fault_latency_max_ns", "lock_wait_fault_ns",
           "lock_wait_zap_ns", "lock_breaks", "vcpu_stall_ns", "work_ns", "completion_ns"]


def default_sizes(ram: int, quick: bool) -> list[int]:
    """64 KiB x 4^k below the RAM, then RAM/2, 5/8, 3/4, 7/8 (finer where the curves meet), then the whole RAM."""
    if quick:
        sizes = [64 * C.KiB, C.MiB, ram // 2, ram]
    else:
        sizes, s = [], 64 * C.KiB
        while s < ram:
            sizes.append(s)
            s *= 4
        sizes += [ram // 2, ram * 5 // 8, ram * 3 // 4, ram * 7 // 8, ram]
    return sorted({s // (64 * C.KiB) * (64 * C.KiB) for s in sizes if 0 < s <= ram})


def build_point(size: int, ram: int, profile: str, vcpus: int, accesses: int, at_us: float, op: str) -> C.Point:
    other = ram - size
    slots = ([{"id": 0, "gpa": 0, "size": other}] if other else []) + [{"id": 1, "gpa": other, "size": size}]
    populate: list[dict[str, Any]] = [{"pattern": "sequential", "slot": 1, "sharing": "private",
                                       "access_ns": ACCESS_NS}]
    work: dict[str, Any] = {"name": "work", "pattern": "none"}
    if other:
        hot_pages = max(1, int((other >> 12) * HOT_FRACTION))  # = the hot set of desim.workload's hotcold
        populate.append({"pattern": "sequential", "slot": 0, "offset": 0, "size": hot_pages << 12,
                         "sharing": "private", "access_ns": ACCESS_NS})
        work.update(pattern="hotcold", slot=0, sharing="shared", accesses=accesses, access_ns=ACCESS_NS,
                    hot_fraction=HOT_FRACTION, hot_probability=HOT_PROBABILITY)
    vmm_op: dict[str, Any] = {"at_us": at_us, "op": op, "slot": 1}
    if op == "move":
        vmm_op["gpa"] = ram
    work["memslot_ops"] = [vmm_op]
    data = {"name": f"{NAME}-{profile}-{size >> 10}k", "profile": profile,
            "description": f"{C.fmt_bytes(size)} slot {op}d out of {C.fmt_bytes(ram)} while vCPUs work on the rest",
            "profile_overrides": {"kernel": {"backing": "4k"}},
            "vm": {"vcpus": vcpus, "memslots": slots},
            "phases": [{"name": "populate", "pattern": "none", "touches": populate}, work]}
    sc = C.scenario_from(data, f"{NAME} point {C.fmt_bytes(size)}/{profile}")
    pages = (size + HOT_FRACTION * other) / 4096
    return C.Point({"slot_bytes": size, "profile": profile}, sc, cost=pages / 20000 + vcpus * accesses / 50000)


def extra(res) -> dict[str, float]:
    return C.phase_fault_stats(res, "work", "work_")


def crossovers(comparison: pd.DataFrame, profiles: list[str], sizes: list[int]) -> tuple[pd.DataFrame, dict]:
    rows, info = [], {}
    for prof in profiles:
        info[prof] = {}
        first_any = None
        for metric, what in CROSSOVER_METRICS.items():
            c = comparison[(comparison.profile == prof) & (comparison.metric == metric)].set_index("slot_bytes")
            above = [s for s in sizes if s in c.index and c.loc[s, "diff_low"] > 0]
            first = min(above) if above else None
            stays = first is not None and all(c.loc[s, "diff_low"] > 0 for s in sizes if s >= first and s in c.index)
            # bracket: the grid size below the crossover, and where the mean difference crosses 0 between them
            below = [s for s in sizes if first is not None and s < first and s in c.index]
            prev = max(below) if below else None
            interp = None
            if first is not None and prev is not None:
                d0, d1 = c.loc[prev, "diff"], c.loc[first, "diff"]
                interp = int(prev + (first - prev) * (-d0) / (d1 - d0)) if d0 < 0 < d1 else None
            rows.append({"profile": prof, "metric": metric, "crossover_bytes": first,
                         "crossover": C.fmt_bytes(first) if first else "none in range",
                         "previous_size_bytes": prev, "interpolated_zero_bytes": interp,
                         "stays_above_at_larger_sizes": stays if first else None,
                         "sizes_with_targeted_above": ",".join(C.fmt_bytes(s) for s in above)})
            info[prof][metric] = rows[-1]
            if first is not None and (first_any is None or first < first_any):
                first_any = first
        rows.append({"profile": prof, "metric": "either", "crossover_bytes": first_any,
                     "crossover": C.fmt_bytes(first_any) if first_any else "none in range",
                     "previous_size_bytes": None, "interpolated_zero_bytes": None,
                     "stays_above_at_larger_sizes": None, "sizes_with_targeted_above": ""})
        info[prof]["either"] = rows[-1]
    return pd.DataFrame(rows), info


def plot(summary: pd.DataFrame, comparison: pd.DataFrame, cross: dict, sizes: list[int], ram: int, title: str):
    plt = C.plt_module()
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    labels = [C.fmt_bytes(s).replace(" ", "\u2009") for s in sizes]
    panels = [(axes[0, 0], "memslot_ioctl_mean_ns", "memslot ioctl latency (DELETE/MOVE)", 1e3, "µs"),
              (axes[0, 1], "zap_duration_total_ns", "zap duration (kvm_arch_flush_shadow_memslot)", 1e3, "µs"),
              (axes[1, 0], "faults_after_zap", "re-faults after the zap (SPTEs lost and needed again)", 1.0,
               "faults")]
    bad = [s for s in sizes if degenerate(s, ram)]
    for ax, metric, name, scale, unit in panels:
        C.log2_xaxis(ax, sizes, labels, fontsize=7, min_gap=0.9)
        plt.setp(ax.get_xticklabels(), rotation=40, ha="right")
        if metric == "faults_after_zap":
            ax.set_yscale("symlog", linthresh=1)  # targeted's 0 stays visible
        else:
            ax.set_yscale("log")
        C.errorbar_panel(ax, summary, "slot_bytes", metric, ["profile", "policy"], C.policy_mmu_style,
                         C.policy_mmu_label, scale=scale, dodge=0.04)
        if metric == "faults_after_zap":
            ax.set_ylim(bottom=0)
        else:
            # a CI reaching 0 (few replications) runs off the bottom instead of stretching the axis to 1e-3
            m = summary.loc[(summary.metric == metric) & ~summary.slot_bytes.isin(bad), "mean"].to_numpy(float)
            m = m[np.isfinite(m) & (m > 0)] / scale
            if len(m):
                ax.set_ylim(bottom=m.min() / 3)
        for b in bad:
            ax.axvspan(b / 2 ** 0.25, b * 2 ** 0.25, color="grey", alpha=0.15, lw=0)
        ax.set_xlabel("size of the deleted slot (log2 scale)" + ("; grey: degenerate point (*)" if bad else ""))
        ax.set_ylabel(f"{name.split(' (')[0]} ({unit}, {'symlog' if metric == 'faults_after_zap' else 'log'})")
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
    ax = axes[1, 1]  # linear x: the crossover sits where the log axis is most crowded
    mmu_color = {"tdp-icelake": "black", "legacy-2020": "#6a4c93", "shadow-pvm": "#8a5a00"}
    for b in bad:
        ax.axvspan(b / C.MiB - ram / C.MiB * 0.015, b / C.MiB + ram / C.MiB * 0.015, color="grey", alpha=0.15, lw=0)
    for k, prof in enumerate(dict.fromkeys(comparison.profile)):
        c = comparison[(comparison.profile == prof) & (comparison.metric == "completion_ns")
                       & ~comparison.slot_bytes.isin(bad)].sort_values("slot_bytes")
        x = c["slot_bytes"].to_numpy(float) / C.MiB
        d = c["diff"].to_numpy(float) / 1e6
        lo = np.nan_to_num(d - c["diff_low"].to_numpy(float) / 1e6, posinf=0)
        hi = np.nan_to_num(c["diff_high"].to_numpy(float) / 1e6 - d, posinf=0)
        st = C.policy_mmu_style((prof, "targeted"))
        col = mmu_color.get(prof, "grey")
        ax.errorbar(x, d, yerr=[lo, hi], capsize=3, lw=1.4, ms=5, color=col, ls=st["ls"], marker=st["marker"],
                    mfc=st["mfc"], label=C.PROFILE_MMU.get(prof, prof))
        xc = cross.get(prof, {}).get("completion_ns", {}).get("crossover_bytes")
        if xc:
            ax.axvline(xc / C.MiB, color=col, ls=":", lw=1.2)
            ax.annotate(f"crossover {C.fmt_bytes(xc)}", (xc / C.MiB, 0.97 - 0.09 * k),
                        xycoords=("data", "axes fraction"), xytext=(-5, 0), textcoords="offset points", ha="right",
                        va="top", fontsize=8, color=col,
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.85))
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlim(0, ram / C.MiB * 1.03)
    ax.set_xlabel("size of the deleted slot (MiB, linear scale)")
    ax.set_ylabel("targeted − fast completion time (ms)")
    ax.set_title("completion time: targeted − fast (paired 95% CI)\nabove 0: targeted costs more")
    ax.set_ylim(top=ax.get_ylim()[1] + 0.12 * (ax.get_ylim()[1] - ax.get_ylim()[0]))  # room for the labels
    ax.grid(alpha=0.3)
    handles, lab = ax.get_legend_handles_labels()
    if bad:
        from matplotlib.patches import Patch

        handles.append(Patch(color="grey", alpha=0.3, label="whole RAM deleted: no guest accesses "
                                                           "(degenerate *, left out)"))
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    handles, lab = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, lab, loc="lower center", ncol=4, frameon=False, fontsize=10)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = C.make_parser(__doc__.split("\n\n")[0], NAME, default_reps=10)
    ap.add_argument("--ram-mib", type=float, default=None, help="guest RAM in MiB (default 1024; quick 16)")
    ap.add_argument("--sizes", default=None, help="deleted-slot sizes, e.g. 64KiB,1MiB,512MiB (default: a log grid)")
    ap.add_argument("--vcpus", type=int, default=4)
    ap.add_argument("--accesses", type=int, default=None, help="work accesses per vCPU (default 50000; quick 5000)")
    ap.add_argument("--at-us", type=float, default=None, help="DELETE/MOVE time into the work phase "
                                                              "(default 1000; quick 200)")
    ap.add_argument("--op", choices=["delete", "move"], default="delete")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    args = C.parse_args(ap, argv)
    ram = int(C.pick(args.ram_mib, args.quick, 16, 1024) * C.MiB) // (64 * C.KiB) * (64 * C.KiB)
    sizes = C.parse_size_list(args.sizes) if args.sizes else default_sizes(ram, args.quick)
    accesses = C.pick(args.accesses, args.quick, 5000, 50000)
    at_us = C.pick(args.at_us, args.quick, 200.0, 1000.0)
    profiles = [p for p in args.profiles.split(",") if p]
    if ram <= 0 or args.vcpus < 1 or accesses < 1 or at_us < 0:
        ap.error("--ram-mib (>= 64 KiB), --vcpus and --accesses must be positive, --at-us >= 0")
    if any(s <= 0 or s > ram or s % 4096 for s in sizes):
        ap.error("--sizes must be multiples of 4 KiB between 4 KiB and the RAM size")
    sizes = sorted(set(sizes))

    points = [build_point(s, ram, prof, args.vcpus, accesses, at_us, args.op) for prof in profiles for s in sizes]
    print(f"{NAME}: {len(points)} points x 2 policies x {args.replications} replications "
          f"({C.fmt_bytes(ram)} RAM, {args.vcpus} vCPUs, slot {args.op} at {at_us:g} µs into the work phase)",
          file=sys.stderr)
    grid = C.run_grid(points, C.POLICIES, args.replications, args.seed, args.workers, backend=args.backend, extra=extra,
                      progress=args.progress, desc=NAME,
                      store=args.store, store_tag=f"{NAME}-1")
    runs = grid.runs
    runs.insert(2, "slot_size", runs["slot_bytes"].map(C.fmt_bytes))
    keys = ["slot_bytes", "profile"]
    summary = C.summarize(runs, keys, METRICS)
    comparison = C.compare_points(runs, keys, METRICS)
    why = {s: degenerate(s, ram) for s in sizes}
    for df in (runs, summary, comparison):
        df["degenerate"] = df["slot_bytes"].map(lambda s: bool(why[s]))
    good = [s for s in sizes if not why[s]]
    cross_table, cross = crossovers(comparison, profiles, good)

    def size_label(s: int) -> str:
        return C.fmt_bytes(s) + (" *" if why[s] else "")

    print(f"\n{NAME}: {len(runs)} runs in {grid.wall_s:.1f} s ({C.fmt_bytes(ram)} RAM, {args.vcpus} vCPUs, "
          f"{args.op}; {args.replications} paired replications per point, seed {args.seed})\n")
    for metric, name, scale, unit in [("memslot_ioctl_mean_ns", "memslot ioctl latency", 1e3, "µs"),
                                      ("zap_duration_total_ns", "zap duration", 1e3, "µs"),
                                      ("work_faults", "faults in the work phase", 1.0, "faults"),
                                      ("faults_after_zap", "re-faults after the zap", 1.0, "faults"),
                                      ("work_fault_latency_max_ns", "max fault latency in the work phase", 1e3, "µs"),
                                      ("completion_ns", "completion time", 1e6, "ms")]:
        print(C.format_wide(summary, "slot_bytes", ["profile", "policy"], metric, scale, unit, name,
                            row_fmt=size_label, series_fmt=C.short_series))
        print()
    if any(why.values()):
        print(f"* {DEGENERATE}\n")
    print("completion time, targeted − fast [ms, paired 95% CI]")
    for prof in profiles:
        c = comparison[(comparison.profile == prof) & (comparison.metric == "completion_ns")]
        cells = [f"{size_label(r.slot_bytes)}: {r.diff / 1e6:+.3g} [{r.diff_low / 1e6:+.3g}, {r.diff_high / 1e6:+.3g}]"
                 for r in c.itertuples()]
        print(f"  {prof}: " + "; ".join(cells))
    print("\ncrossover (smallest slot size where targeted's CI lies above fast's, paired"
          + ("; degenerate points * left out" if any(why.values()) else "") + "):")
    for r in cross_table.itertuples():
        more = ""
        if pd.notna(r.previous_size_bytes):
            more += f" (above {C.fmt_bytes(r.previous_size_bytes)}"
            more += (f"; mean difference crosses 0 near {C.fmt_bytes(r.interpolated_zero_bytes)})"
                     if pd.notna(r.interpolated_zero_bytes) else ")")
        if r.stays_above_at_larger_sizes is False:
            more += "; not above at every larger size"
        print(f"  {r.profile:<12} {CROSSOVER_METRICS.get(r.metric, r.metric):<16} {r.crossover}{more}")

    fig = plot(summary, comparison, cross, sizes, ram,
               f"Targeted vs fast zap by size of the deleted slot ({C.fmt_bytes(ram)} RAM, {args.vcpus} vCPUs, "
               f"{args.op}; 95% CIs, n={args.replications})")
    files = {"runs.csv": ex.csv_writer(runs), "summary.csv": ex.csv_writer(summary),
             "comparison.csv": ex.csv_writer(comparison), "crossover.csv": ex.csv_writer(cross_table),
             "summary.json": ex.json_writer(C.json_summary(
                 NAME, args, grid, summary, ram_bytes=ram, sizes=sizes, profiles=profiles, op=args.op,
                 crossover=cross, degenerate_points={C.fmt_bytes(s): w for s, w in why.items() if w},
                 comparison=comparison)),
             **C.figure_writers(fig, NAME)}
    out = C.write_all(args.out, files)
    print(f"\nwrote {', '.join(files)} to {out}")
    return 0


if __name__ == "__main__":
    C.guarded_main(main)
