"""When does a long zap break ``mmu_lock`` for faulting vCPUs? Across preemption models and kernel versions.

A long ``mmu_lock`` holder checks ``need_resched() || rwlock_needbreak()`` as it
goes (``tdp_mmu_iter_cond_resched``, ``__walk_slot_rmaps``,
``kvm_zap_obsolete_pages`` every ``BATCH_ZAP_PAGES``) and drops the lock when
either is true. Since commit c793a62823d1 (6.11, backported to 6.10.y)
``rwlock_needbreak`` / ``spin_needbreak`` is false unless
``preempt_model_preemptible()`` (``full`` or ``lazy``): the usual distro kernel,
``PREEMPT_DYNAMIC`` booted ``none`` or ``voluntary``, never breaks a zap for a
waiter any more, while the same kernel before 6.11 did (``PREEMPT_DYNAMIC``
selects ``CONFIG_PREEMPTION``). ``need_resched`` breaks the lock in every model,
but only when another task competes for the holder's CPU (see
``desim/sched.py``). This script deletes a big, fully mapped memslot while
every vCPU keeps faulting on other memory and measures, per preemption model,
both zap policies and both MMUs (``tdp-icelake``: TDP MMU, faults take
``mmu_lock`` for read; ``legacy-2020``: legacy MMU, faults take the spinlock
exclusively): the fault latency of the faults taken during that phase
(p50/p99/p99.9/max and its CDF), the lock wait of faults, the zap duration, the
memslot-ioctl latency and the number of lock breaks (``lock_breaks``,
``resched_yields``).

Models (``--models``; each sets ``profile_overrides.kernel``):

* ``none``, ``voluntary``, ``full``, ``lazy``: that ``preempt`` on the
  profile's own kernel (``tdp-icelake``: 6.12, ``PREEMPT_DYNAMIC``;
  ``legacy-2020``: 5.6, static models, no ``lazy``);
* ``voluntary-6.10``: ``PREEMPT_DYNAMIC`` booted ``voluntary`` on 6.10 (before
  c793a62823d1: breaks for waiters; TDP profile only);
* ``none+task``: ``none`` with a competing runnable task on the VMM thread's
  CPU (``competing_task``), so ``need_resched`` yields every slice.

The VM (assumptions; sizes are options):

* ``--vcpus`` vCPUs (default 8; quick 2), host backing 4 KiB pages (host THP
  off, so every guest page is one SPTE and the big slot holds 262,144 leaf
  SPTEs per GiB).
* Slot 0, the vCPUs' working memory (``--work-mib``, default 64 MiB; quick
  4 MiB) at gpa 0; slot 1, the big slot (``--big-mib``, default 1 GiB; quick
  16 MiB), right above it.
* Phase "populate": vCPU 0 alone first-touches all of slot 1 (sequentially), so
  no other fault competes for ``mmu_lock`` in that phase and every lock wait of
  a fault is from the next phase.
* Phase "work": every vCPU makes 2 x (pages of its share) uniformly random
  accesses (200 ns each) to its own share of slot 0, so it first-touches
  ~86% of its pages and keeps faulting throughout; ``--at-us`` into the phase
  (default 500 µs; quick 50 µs) the VMM deletes slot 1. The targeted zap
  walks slot 1 under the write lock; the fast zap obsoletes every root under
  the write lock and then (TDP MMU) tears the old roots down under the read
  lock or (legacy MMU) zaps the obsolete pages under the write lock.
* The model is set with ``profile_overrides.kernel`` on otherwise unchanged
  profiles (shipped: ``tdp-icelake`` 6.12 ``voluntary``, ``legacy-2020`` 5.6
  ``voluntary``: neither breaks for waiters).

Reading the results: lock breaking (``full``, ``lazy``, ``voluntary-6.10``) bounds the longest stall of a fault by one
slice of the zap (``ZAP_SLICE`` SPTEs, or ``BATCH_ZAP_PAGES`` shadow pages for
the legacy fast zap) instead of the whole zap, but every fault that arrives
during the zap now waits up to a slice, so p99 can rise while the maximum
falls, and the zap itself takes a little longer (it queues behind the faults it
let in). ``none+task`` breaks only once per scheduler slice (ms), and
the zap then waits a slice for its CPU: the lock is free meanwhile. The TDP MMU's fast zap holds the write lock only briefly and tears the
old roots down under the read lock, which faults share: nothing to break.

Fault-latency statistics are of the faults that started in the work phase
(``work_*`` columns, from ``RunResult.raw``); ``fault_latency_max_ns`` and the
lock and zap metrics are whole-run values (the populate phase has no lock
contention and no zap). The CDF plots use every work-phase fault of
replication 0 of each configuration. CIs are Student-t 95% over replications.

    python experiments/preemption_lockbreak.py [--quick] [--out DIR] [--replications N] [--workers W] [--seed S]
        [--vcpus 8] [--big-mib 1024] [--work-mib 64] [--at-us 500] [--profiles tdp-icelake,legacy-2020]
        [--models none,voluntary,full,lazy,voluntary-6.10,none+task]

Outputs (``--out``, default ``results/preemption_lockbreak``): ``runs.csv`` (one
row per profile x model x policy x replication), ``summary.csv``,
``comparison.csv`` (each model vs ``none``, paired, per profile and policy),
``fault_latency_samples.csv`` (work-phase fault latencies of replication 0),
``summary.json``, ``preemption_lockbreak.png/.svg`` (metrics),
``fault_latency_cdf.png/.svg`` and ``fault_latency_tail.png/.svg`` (CDF and
complementary CDF).
"""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from desim.studies import toolkit as C  # noqa: E402
from desim import experiment as ex  # noqa: E402
from desim.profile import load_profile  # noqa: E402

NAME = "preemption_lockbreak"
PROFILES = ["tdp-icelake", "legacy-2020"]
ACCESS_NS = 200.0
METRICS = ["work_fault_latency_p50_ns", "work_fault_latency_p99_ns", "work_fault_latency_p999_ns",
           "work_fault_latency_max_ns", "fault_latency_max_ns", "lock_wait_fault_ns", "lock_contended_fault",
           "zap_duration_total_ns", "memslot_ioctl_mean_ns", "lock_breaks", "work_faults", "faults",
           "vcpu_stall_ns", "work_ns", "completion_ns"]
# (metric, title, scale, unit, log y)
PANELS = [("work_fault_latency_p99_ns", "fault latency p99 (work phase)", 1e3, "µs", True),
          ("work_fault_latency_max_ns", "fault latency max (work phase)", 1e3, "µs", True),
          ("lock_wait_fault_ns", "total mmu_lock wait of faults", 1e6, "ms", False),
          ("zap_duration_total_ns", "zap duration", 1e6, "ms", False),
          ("lock_breaks", "lock breaks (zap dropped mmu_lock)", 1.0, "count", False),
          ("work_ns", "work phase duration", 1e6, "ms", False)]
# model -> kernel overrides (applied on top of the profile's own version)
MODELS = {"none": {"preempt": "none"}, "voluntary": {"preempt": "voluntary"}, "full": {"preempt": "full"},
          "lazy": {"preempt": "lazy"},
          "voluntary-6.10": {"preempt": "voluntary", "version": "6.10", "preempt_dynamic": True},
          "none+task": {"preempt": "none", "competing_task": True}}
BASELINE = "none"
PREEMPT_STYLE = {"none": {"color": "#e07a5f", "ls": "--", "label": "none (no breaks for waiters)"},
                 "voluntary": {"color": "#f2cc8f", "ls": ":", "label": "voluntary (no breaks for waiters)"},
                 "full": {"color": "#2e86ab", "ls": "-", "label": "full (breaks for waiters)"},
                 "lazy": {"color": "#81b29a", "ls": "-.", "label": "lazy, 6.13+ (breaks for waiters)"},
                 "voluntary-6.10": {"color": "#6d597a", "ls": (0, (3, 1, 1, 1)),
                                    "label": "voluntary on 6.10, PREEMPT_DYNAMIC (breaks for waiters)"},
                 "none+task": {"color": "#3d405b", "ls": (0, (1, 1)),
                               "label": "none + a competing task (need_resched yields)"}}


def model_applies(profile: str, model: str) -> bool:
    """Models the profile's kernel can run: lazy needs 6.13+, PREEMPT_DYNAMIC 5.12+."""
    kernel = load_profile(profile).kernel
    if model == "lazy":
        return kernel.version_tuple >= (6, 13) or kernel.preempt_dynamic
    if model == "voluntary-6.10":
        return kernel.preempt_dynamic
    return True


def model_overrides(profile: str, model: str) -> dict:
    kernel = load_profile(profile).kernel
    o = dict(MODELS[model])
    if model == "lazy" and kernel.version_tuple < (6, 13):
        o["version"] = "6.13"
    return o


def build_point(profile: str, model: str, vcpus: int, big: int, work: int, at_us: float) -> C.Point:
    share_pages = (work >> 12) // vcpus
    data = {
        "name": f"{NAME}-{profile}-{model}", "profile": profile,
        "description": f"{C.fmt_bytes(big)} slot deleted while {vcpus} vCPUs fault on {C.fmt_bytes(work)}",
        "profile_overrides": {"kernel": {"backing": "4k", **model_overrides(profile, model)}},
        "vm": {"vcpus": vcpus, "memslots": [{"id": 0, "gpa": 0, "size": work}, {"id": 1, "gpa": work, "size": big}]},
        "phases": [
            {"name": "populate", "vcpus": "bsp", "pattern": "sequential", "slot": 1, "access_ns": ACCESS_NS},
            {"name": "work", "vcpus": "all", "pattern": "uniform", "slot": 0, "sharing": "private",
             "accesses": 2 * share_pages, "access_ns": ACCESS_NS,
             "memslot_ops": [{"at_us": at_us, "op": "delete", "slot": 1}]},
        ]}
    sc = C.scenario_from(data, f"{NAME} point {profile}/model={model}")
    return C.Point({"profile": profile, "model": model}, sc, cost=(big + work) / C.MiB)


def extra(res) -> dict[str, float]:
    return C.phase_fault_stats(res, "work", "work_")


def samples(res) -> dict[str, np.ndarray]:
    return {"work_fault_latency_ns": C.phase_fault_latencies(res, "work")}


def preempt_comparison(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per (profile, policy, model): the model (alternative) vs ``none`` (baseline), paired by replication."""
    parts = []
    for (prof, pol), g in runs.groupby(["profile", "policy"], sort=False):
        for model in [m for m in MODELS if m != BASELINE and m in set(g.model)]:
            h = g[g.model.isin([BASELINE, model])].assign(policy=lambda d: d.model)
            t = ex.compare(h, metrics, baseline=BASELINE, alternative=model)
            t.insert(0, "model", model)
            t.insert(0, "policy", pol)
            t.insert(0, "profile", prof)
            parts.append(t)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def config_label(profile: str, policy: str) -> str:
    return f"{C.short_series((profile, policy))}"


def plot_metrics(summary: pd.DataFrame, configs: list[tuple[str, str]], models: list[str], title: str):
    plt = C.plt_module()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    x = np.arange(len(configs))
    w = 0.8 / max(1, len(models))
    for ax, (metric, name, scale, unit, logy) in zip(axes.flat, PANELS):
        s = summary[summary.metric == metric]
        for j, pre in enumerate(models):
            vals, errs = [], []
            for prof, pol in configs:
                r = s[(s.profile == prof) & (s.policy == pol) & (s.model == pre)]
                vals.append(float(r["mean"].iloc[0]) / scale if len(r) else np.nan)
                hw = float(r["half_width"].iloc[0]) / scale if len(r) else 0.0
                errs.append(hw if np.isfinite(hw) else 0.0)
            vals, errs = np.array(vals), np.array(errs)
            st = PREEMPT_STYLE[pre]
            lower = np.where(vals - errs > 0, errs, vals * 0.999) if logy else errs
            off = (j - (len(models) - 1) / 2) * w
            bars = ax.bar(x + off, vals, w, color=st["color"], alpha=0.85, label=st["label"], edgecolor="white")
            ax.errorbar(x + off, vals, yerr=[lower, errs], fmt="none", ecolor="black", capsize=3, lw=1)
            for b, v in zip(bars, vals):
                if np.isfinite(v):
                    ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, v), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=7)
        if logy:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        ax.set_xticks(x, [config_label(*c) for c in configs], fontsize=9)
        ax.set_xlabel("MMU / zap policy")
        ax.set_ylabel(f"{name.split(' (')[0]} ({unit}{', log' if logy else ''})")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3, which="both")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


def plot_cdfs(samples_by_cfg: dict[tuple[str, str, str], np.ndarray], profiles: list[str], models: list[str],
              title: str, tail: bool):
    from matplotlib.ticker import FuncFormatter

    plt = C.plt_module()
    fig, axes = plt.subplots(len(profiles), 2, figsize=(12, 4.2 * len(profiles)), squeeze=False,
                             sharex=True)
    every = [v for v in samples_by_cfg.values() if len(v)]
    lo = min(float(v.min()) for v in every) / 1e3 if every else 1.0
    hi = max(float(v.max()) for v in every) / 1e3 if every else 10.0
    for i, prof in enumerate(profiles):
        for j, pol in enumerate(C.POLICIES):
            ax = axes[i, j]
            for pre in models:
                lat = samples_by_cfg.get((prof, pol, pre))
                if lat is None or not len(lat):
                    continue
                x = np.sort(lat) / 1e3
                n = len(x)
                st = PREEMPT_STYLE[pre]
                label = (f"{st['label']}\n{n:,} faults, p99 {np.percentile(x, 99):,.3g} µs, "
                         f"max {x[-1]:,.4g} µs")
                if tail:
                    y = 1.0 - np.arange(n) / n  # P(latency >= x), never 0 on a log axis
                    ax.step(x, y, where="post", color=st["color"], ls=st["ls"], lw=1.6, label=label)
                else:
                    ax.step(x, np.arange(1, n + 1) / n, where="post", color=st["color"], ls=st["ls"], lw=1.6,
                            label=label)
            ax.set_xscale("log")
            ax.set_xlim(lo / 1.2, hi * 1.2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.tick_params(labelbottom=True)
            if tail:
                ax.set_yscale("log")
                ax.set_ylabel("fraction of faults ≥ x (log)")
            else:
                ax.set_ylim(0, 1.02)
                ax.set_ylabel("fraction of faults ≤ x")
            ax.set_xlabel("fault latency (µs, exit to re-entry, log)")
            ax.set_title(f"{pol} zap, {C.PROFILE_MMU.get(prof, prof)}\n(faults of the work phase, replication 0)",
                         fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7.5, loc="upper right" if tail else "lower right")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = C.make_parser(__doc__.split("\n\n")[0], NAME, default_reps=10)
    ap.add_argument("--vcpus", type=int, default=None, help="vCPUs (default 8; quick 2)")
    ap.add_argument("--big-mib", type=float, default=None, help="size of the deleted slot (default 1024; quick 16)")
    ap.add_argument("--work-mib", type=float, default=None, help="the vCPUs' working memory (default 64; quick 4)")
    ap.add_argument("--at-us", type=float, default=None,
                    help="DELETE time into the work phase (default 500; quick 50)")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"preemption models (default all: {', '.join(MODELS)})")
    args = C.parse_args(ap, argv)
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        ap.error(f"--models: choose from {', '.join(MODELS)}")
    vcpus = C.pick(args.vcpus, args.quick, 2, 8)
    big = int(C.pick(args.big_mib, args.quick, 16, 1024) * C.MiB) // 4096 * 4096
    work = int(C.pick(args.work_mib, args.quick, 4, 64) * C.MiB) // 4096 * 4096
    at_us = C.pick(args.at_us, args.quick, 50.0, 500.0)
    profiles = [p for p in args.profiles.split(",") if p]
    if vcpus < 1 or big <= 0 or at_us < 0 or (work >> 12) < vcpus:
        ap.error("need --vcpus >= 1, --big-mib > 0, --at-us >= 0 and at least one page of --work-mib per vCPU")

    points = [build_point(prof, m, vcpus, big, work, at_us) for prof in profiles for m in models
              if model_applies(prof, m)]
    print(f"{NAME}: {len(points)} points x 2 policies x {args.replications} replications "
          f"({C.fmt_bytes(big)} slot deleted while {vcpus} vCPUs fault on {C.fmt_bytes(work)})", file=sys.stderr)
    grid = C.run_grid(points, C.POLICIES, args.replications, args.seed, args.workers, backend=args.backend, extra=extra,
                      samples=samples, sample_replications=(0,), progress=args.progress, desc=NAME,
                      store=args.store, store_tag=f"{NAME}-1")
    runs = grid.runs
    keys = ["profile", "model"]
    summary = C.summarize(runs, keys, METRICS)
    summary.insert(0, "config", [config_label(p, q) for p, q in zip(summary.profile, summary.policy)])
    comparison = preempt_comparison(runs, METRICS)
    sample_rows, samples_by_cfg = [], {}
    for (i, pol, rep), d in sorted(grid.samples.items()):
        lab = points[i].labels
        lat = d["work_fault_latency_ns"]
        samples_by_cfg[(lab["profile"], pol, lab["model"])] = lat
        sample_rows.append(pd.DataFrame({"profile": lab["profile"], "model": lab["model"], "policy": pol,
                                         "replication": rep, "fault_latency_ns": lat}))
    samples_df = pd.concat(sample_rows, ignore_index=True) if sample_rows else pd.DataFrame()

    breaks = runs.groupby(["profile", "policy", "model"]).lock_breaks.mean()
    waiters = {"full", "lazy", "voluntary-6.10"}
    findings = {
        "no_breaks_for_waiters_on_none_or_voluntary": bool(
            (runs[runs.model.isin(["none", "voluntary"])].lock_breaks == 0).all()),
        "mean_lock_breaks": {f"{p}/{q}/{m}": float(v) for (p, q, m), v in breaks.items()},
        "max_fault_latency_ratio_vs_none": {
            f"{r.profile}/{r.policy}/{r.model}": {"ratio": r.ratio, "low": r.ratio_low, "high": r.ratio_high}
            for r in comparison[comparison.metric == "work_fault_latency_max_ns"].itertuples()}
        if len(comparison) else {},
        "models_breaking_for_waiters": sorted(waiters & set(models)),
    }

    print(f"\n{NAME}: {len(runs)} runs in {grid.wall_s:.1f} s ({C.fmt_bytes(big)} slot deleted at {at_us:g} µs "
          f"while {vcpus} vCPUs fault on {C.fmt_bytes(work)}; {args.replications} replications, seed {args.seed})\n")

    def pre_name(k: tuple) -> str:
        return str(k[0])
    for metric, name, scale, unit, _ in PANELS[:2] + [
            ("work_fault_latency_p999_ns", "fault latency p99.9 (work phase)", 1e3, "µs", True)] + PANELS[2:] + [
            ("memslot_ioctl_mean_ns", "memslot ioctl latency", 1e3, "µs", False)]:
        print(C.format_wide(summary, "config", ["model"], metric, scale, unit, name, series_fmt=pre_name))
        print()
    print(f"each model / {BASELINE}, ratio of means [95% CI] (paired by replication):")
    for m in ("work_fault_latency_max_ns", "work_fault_latency_p99_ns", "lock_wait_fault_ns",
              "zap_duration_total_ns"):
        cells = []
        for r in comparison[comparison.metric == m].itertuples() if len(comparison) else ():
            lo = f" [{r.ratio_low:.3f}, {r.ratio_high:.3f}]" if np.isfinite(r.ratio_low) else ""
            cells.append(f"{config_label(r.profile, r.policy)} {r.model} {r.ratio:.3g}{lo}")
        print(f"  {m:<28}\n    " + "\n    ".join(cells))
    print(f"\nno lock breaks for waiters on none/voluntary: {findings['no_breaks_for_waiters_on_none_or_voluntary']}")

    t = (f"{C.fmt_bytes(big)} slot deleted while {vcpus} vCPUs fault on {C.fmt_bytes(work)}: "
         f"preemption models (95% CIs, n={args.replications})")
    fig = plot_metrics(summary, [(p, q) for p in profiles for q in C.POLICIES], models, t)
    cdf = plot_cdfs(samples_by_cfg, profiles, models, f"Fault-latency CDF during the deletion of a {C.fmt_bytes(big)} slot "
                                              f"({vcpus} vCPUs faulting)", tail=False)
    tail = plot_cdfs(samples_by_cfg, profiles, models, f"Fault-latency tail (complementary CDF) during the deletion of a "
                                               f"{C.fmt_bytes(big)} slot ({vcpus} vCPUs faulting)", tail=True)
    files = {"runs.csv": ex.csv_writer(runs), "summary.csv": ex.csv_writer(summary),
             "comparison.csv": ex.csv_writer(comparison), "fault_latency_samples.csv": ex.csv_writer(samples_df),
             "summary.json": ex.json_writer(C.json_summary(
                 NAME, args, grid, summary, vcpus=vcpus, big_slot_bytes=big, work_bytes=work, delete_at_us=at_us,
                 profiles=profiles, models=models, findings=findings,
                 comparison=comparison)),
             **C.figure_writers(fig, NAME), **C.figure_writers(cdf, "fault_latency_cdf"),
             **C.figure_writers(tail, "fault_latency_tail")}
    out = C.write_all(args.out, files)
    print(f"\nwrote {', '.join(files)} to {out}")
    return 0


if __name__ == "__main__":
    C.guarded_main(main)
