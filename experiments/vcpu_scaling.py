"""How do fast and targeted zap scale with the number of vCPUs (1 to 448)?

For each vCPU count and each MMU (``tdp-icelake``: TDP MMU, faults take
``mmu_lock`` for read; ``legacy-2020``: legacy MMU, every fault takes the
spinlock exclusively, no preemption) the script runs both zap policies with
common random numbers and reports fault latency p50/p99, vCPU stall time,
workload completion time, faults, memslot-ioctl latency and the per-point
paired targeted/fast ratios.

The workload is the built-in default scenario (``desim/scenarios/default.toml``,
"rom-toggle") scaled with the VM:

* RAM is one memslot of ``vcpus x per-vCPU share`` (default 4 MiB per vCPU,
  so 448 vCPUs touch 1.75 GiB): the memory touched grows linearly with the
  vCPUs and per-vCPU work stays constant, so a flat line means perfect scaling.
* Phase "populate": every vCPU first-touches its own share sequentially.
* Phase "work": every vCPU makes ``--accesses`` accesses (default 20,000,
  200 ns each) to *its own* share with the default's hot/cold pattern (90% of
  accesses to the first 10% of the share); ``sharing = "private"`` instead of
  the default's ``"shared"``, so that each vCPU's working set is a fixed
  per-vCPU share (assumption: per-thread data dominates).
* Meanwhile the VMM toggles the default's 64 KiB read-only option-ROM slot
  ``--toggles`` times (default 3): create, delete half a period later, with
  the period = the nominal work-phase length / (toggles + 1), so every DELETE
  (and its zap) happens while all vCPUs are running. The guest never touches
  the ROM, so a targeted zap finds nothing to zap (as in the default).
* Host backing 4 KiB pages (the default's assumption: host THP off), so every
  4 KiB guest page is one SPTE and one fault.
* Profiles are used as shipped (``tdp-icelake`` has CONFIG_PREEMPTION on,
  ``legacy-2020`` off).

Reading the results: the completion time is the end of the work phase, which
ends when the vCPUs *and* the VMM's script are done. The VMM's ioctls are
serialised, and a fast-zap DELETE includes the teardown of every SPTE of the
VM (TDP MMU: ``kvm_tdp_mmu_zap_invalidated_roots``; legacy MMU:
``kvm_zap_obsolete_pages``), which grows with the VM's memory; on big VMs the
later ROM toggles therefore start late (possibly after the vCPUs finished, so
fewer re-faults per vCPU) and the VMM, not the vCPUs, sets the completion time.
On the legacy MMU the populate phase's exclusive faults serialise on
``mmu_lock`` whatever the policy, which dominates fault latency at many vCPUs.

Metrics are whole-run values from ``RunResult.metrics`` (fault latency
percentiles pool all faults of the run, first-touch faults included), plus
``stall_per_vcpu_ns`` = ``vcpu_stall_ns`` / vCPUs, ``faults_per_vcpu`` and
``work_ns`` (duration of the work phase). CIs are Student-t 95% intervals over
replications; the per-point comparison is paired (``desim.experiment.compare``).

    python experiments/vcpu_scaling.py [--quick] [--out DIR] [--replications N] [--workers W] [--seed S]
        [--vcpus 1,2,4,...] [--per-vcpu-mib 4] [--accesses 20000] [--toggles 3] [--profiles tdp-icelake,legacy-2020]

Outputs (in ``--out``, default ``results/vcpu_scaling``): ``runs.csv`` (one row per
vCPU count x profile x policy x replication), ``summary.csv`` (mean, std, 95%
CI per point x policy x metric), ``comparison.csv`` (paired difference and
ratio CIs per point), ``summary.json``, ``vcpu_scaling.png/.svg``.
"""
from __future__ import annotations

import sys

from desim.studies import toolkit as C  # noqa: E402
from desim import experiment as ex  # noqa: E402

NAME = "vcpu_scaling"
DEFAULT_VCPUS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 448]
QUICK_VCPUS = [1, 2, 4]
PROFILES = ["tdp-icelake", "legacy-2020"]
ACCESS_NS = 200.0  # the default scenario's guest time per access

METRICS = ["faults", "faults_after_zap", "faults_per_vcpu", "fault_latency_p50_ns", "fault_latency_p99_ns",
           "fault_latency_max_ns", "vcpu_stall_ns", "stall_per_vcpu_ns", "lock_wait_fault_ns", "completion_ns",
           "work_ns", "memslot_ioctl_mean_ns", "zap_duration_total_ns", "ipis_sent"]
# (metric, panel title, scale, unit)
PANELS = [("fault_latency_p50_ns", "fault latency p50 (all faults of the run)", 1e3, "µs"),
          ("fault_latency_p99_ns", "fault latency p99 (all faults of the run)", 1e3, "µs"),
          ("stall_per_vcpu_ns", "vCPU stall time per vCPU", 1e6, "ms"),
          ("completion_ns", "workload completion time", 1e6, "ms"),
          ("memslot_ioctl_mean_ns", "memslot ioctl latency (mean)", 1e3, "µs"),
          ("faults_per_vcpu", "faults per vCPU", 1.0, "faults")]


def build_point(vcpus: int, profile: str, per_vcpu: int, accesses: int, toggles: int) -> C.Point:
    period = accesses * ACCESS_NS / 1e3 / (toggles + 1)  # µs
    sc = ex.load().with_overrides({
        "name": f"{NAME}-{profile}-{vcpus}",
        "profile": profile,
        "profile_overrides.kernel.backing": "4k",
        "vm.vcpus": vcpus,
        "vm.memslots.0.size": vcpus * per_vcpu,
        "phases.0.sharing": "private",
        "phases.1.sharing": "private",
        "phases.1.accesses": accesses,
        "phases.1.access_ns": ACCESS_NS,
        "phases.1.memslot_ops.0.at_us": period / 4,
        "phases.1.memslot_ops.0.repeat": toggles,
        "phases.1.memslot_ops.0.every_us": period,
        "phases.1.memslot_ops.1.at_us": period * 3 / 4,
        "phases.1.memslot_ops.1.repeat": toggles,
        "phases.1.memslot_ops.1.every_us": period,
    })
    return C.Point({"vcpus": vcpus, "profile": profile}, sc, cost=vcpus * (per_vcpu / C.MiB + accesses / 5000))


def extra(res) -> dict[str, float]:
    n = res.raw.nvcpus
    lo, hi = C.phase_window(res, "work")
    return {"stall_per_vcpu_ns": res.metrics["vcpu_stall_ns"] / n, "faults_per_vcpu": res.metrics["faults"] / n,
            "work_ns": hi - lo}


def plot(summary, vcpus: list[int], title: str):
    plt = C.plt_module()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (metric, name, scale, unit) in zip(axes.flat, PANELS):
        C.log2_xaxis(ax, vcpus)
        C.auto_yscale(ax, summary, metric)
        C.errorbar_panel(ax, summary, "vcpus", metric, ["profile", "policy"], C.policy_mmu_style,
                         C.policy_mmu_label, scale=scale, dodge=0.06)
        if ax.get_yscale() == "linear":
            ax.set_ylim(bottom=0)
        ax.set_xlabel("vCPUs (log2 scale)")
        ax.set_ylabel(f"{name.split(' (')[0]} ({unit}{', log' if ax.get_yscale() == 'log' else ''})")
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, fontsize=10)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = C.make_parser(__doc__.split("\n\n")[0], NAME, default_reps=10)
    ap.add_argument("--vcpus", default=None,
                    help="comma-separated vCPU counts (default 1,2,4,...,256,448; quick 1,2,4)")
    ap.add_argument("--per-vcpu-mib", type=float, default=None, help="RAM per vCPU in MiB (default 4; quick 1)")
    ap.add_argument("--accesses", type=int, default=None,
                    help="work-phase accesses per vCPU (default 20000; quick 4000)")
    ap.add_argument("--toggles", type=int, default=3, help="option-ROM create/delete pairs during the work phase")
    ap.add_argument("--profiles", default=",".join(PROFILES), help="host profiles (MMUs) to compare")
    args = C.parse_args(ap, argv)
    vcpus = [int(v) for v in args.vcpus.split(",")] if args.vcpus else (QUICK_VCPUS if args.quick else DEFAULT_VCPUS)
    per_vcpu = int(C.pick(args.per_vcpu_mib, args.quick, 1, 4) * C.MiB) // 4096 * 4096
    accesses = C.pick(args.accesses, args.quick, 4000, 20000)
    profiles = [p for p in args.profiles.split(",") if p]
    if per_vcpu <= 0 or accesses <= 0 or args.toggles < 1 or min(vcpus) < 1:
        ap.error("--per-vcpu-mib, --accesses, --toggles and --vcpus must be positive")

    points = [build_point(n, prof, per_vcpu, accesses, args.toggles) for prof in profiles for n in vcpus]
    print(f"{NAME}: {len(points)} points x 2 policies x {args.replications} replications "
          f"({C.fmt_bytes(per_vcpu)} and {accesses:,} work accesses per vCPU, {args.toggles} ROM deletes)",
          file=sys.stderr)
    grid = C.run_grid(points, C.POLICIES, args.replications, args.seed, args.workers, backend=args.backend, extra=extra,
                      progress=args.progress, desc=NAME,
                      store=args.store, store_tag=f"{NAME}-1")
    runs = grid.runs
    keys = ["vcpus", "profile"]
    summary = C.summarize(runs, keys, METRICS)
    comparison = C.compare_points(runs, keys, METRICS)

    # findings: targeted/fast ratios at the largest VM, and how much each series grows from the smallest
    big, small = max(vcpus), min(vcpus)
    findings = {}
    for prof in profiles:
        c = comparison[(comparison.profile == prof) & (comparison.vcpus == big)].set_index("metric")
        s = summary[(summary.profile == prof) & (summary.metric == "completion_ns")]
        growth = {}
        for pol in C.POLICIES:
            ss = s[s.policy == pol].set_index("vcpus")["mean"]
            growth[pol] = float(ss[big] / ss[small])
        findings[prof] = {
            "vcpus": big,
            "targeted_over_fast": {m: {"ratio": c.loc[m, "ratio"], "low": c.loc[m, "ratio_low"],
                                       "high": c.loc[m, "ratio_high"]}
                                   for m in ("completion_ns", "faults", "stall_per_vcpu_ns", "fault_latency_p99_ns",
                                             "memslot_ioctl_mean_ns") if m in c.index},
            f"completion_growth_{small}_to_{big}_vcpus": growth}

    print(f"\n{NAME}: {len(runs)} runs in {grid.wall_s:.1f} s "
          f"({args.replications} paired replications per point, seed {args.seed})\n")
    for metric, name, scale, unit in PANELS + [("faults_after_zap", "re-faults after a zap", 1.0, "faults")]:
        print(C.format_wide(summary, "vcpus", ["profile", "policy"], metric, scale, unit, name,
                            series_fmt=C.short_series))
        print()
    for prof, f in findings.items():
        print(f"{prof}, {f['vcpus']} vCPUs, targeted/fast (ratio of means, 95% CI):")
        for m, v in f["targeted_over_fast"].items():
            print(f"  {m:<24} {v['ratio']:.3f} [{v['low']:.3f}, {v['high']:.3f}]")
        g = f[f"completion_growth_{small}_to_{big}_vcpus"]
        print(f"  completion time grows x{g['fast']:.2f} (fast) and x{g['targeted']:.2f} (targeted) "
              f"from {small} to {big} vCPUs")

    fig = plot(summary, vcpus, f"Fast vs targeted zap as the VM grows ({C.fmt_bytes(per_vcpu)} per vCPU, "
                               f"{args.toggles} option-ROM deletes; 95% CIs, n={args.replications})")
    files = {"runs.csv": ex.csv_writer(runs), "summary.csv": ex.csv_writer(summary),
             "comparison.csv": ex.csv_writer(comparison),
             "summary.json": ex.json_writer(C.json_summary(
                 NAME, args, grid, summary, vcpus=vcpus, profiles=profiles, per_vcpu_bytes=per_vcpu,
                 accesses_per_vcpu=accesses, findings=findings,
                 comparison=comparison)),
             **C.figure_writers(fig, NAME)}
    out = C.write_all(args.out, files)
    print(f"\nwrote {', '.join(files)} to {out}")
    return 0


if __name__ == "__main__":
    C.guarded_main(main)
