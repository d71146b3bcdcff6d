"""Plots a user would rather look at than read (matplotlib, PNG or SVG by file suffix).

* :func:`plot_comparison` — per metric, the alternative/baseline ratio with its CI whisker;
* :func:`plot_fault_latency_cdf` — fault-latency CDF per policy, pooled over all replications;
* :func:`plot_faults_over_time` — faults per time bin (mean and min-max over replications),
  memslot ioctls marked;
* :func:`plot_lock_wait` — ``mmu_lock`` wait time by role per policy (mean and CI over replications).

The detail plots take every replication (:mod:`desim.detail` keeps what they need of each run).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

COLORS = {"fast": "#d1495b", "targeted": "#00798c"}


def plot_comparison(table: "pd.DataFrame", path: str | Path, baseline: str = "fast",
                    alternative: str = "targeted", title: str = "", confidence: float = 0.95) -> None:
    """Per metric, the ratio alternative/baseline as a bar from 1 with its CI as a black whisker.

    The CI is also written next to each bar (a CI narrower than the whisker's
    caps is invisible otherwise), and a metric without a ratio (its baseline
    mean is 0) keeps its row with the reason, instead of vanishing.
    """
    pct = f"{confidence * 100:g}%"
    n = len(table)
    fig, ax = plt.subplots(figsize=(9.5, 0.45 * max(n, 3) + 1.6))
    side = ax.get_yaxis_transform()  # x in axes fraction, y in data: the numbers' column right of the plot
    y = np.arange(n)[::-1]
    r = table["ratio"].to_numpy(float)
    lo = table["ratio_low"].to_numpy(float)
    hi = table["ratio_high"].to_numpy(float)
    ok = np.isfinite(r)
    finite = np.concatenate([r[ok], lo[np.isfinite(lo)], hi[np.isfinite(hi)], [0.0, 1.0]])
    xmax = max(1.1, finite.max() * 1.05 + 0.05)
    for yi, ri, li, hi_, metric in zip(y, r, lo, hi, table["metric"]):
        if not np.isfinite(ri):
            mean_b = table.loc[table["metric"] == metric, f"mean_{baseline}"].iloc[0]
            why = f"no ratio: {baseline} mean is 0" if mean_b == 0 else "no ratio"
            ax.text(1.02, yi, f"n/a ({why})", transform=side, va="center", ha="left", fontsize=8, color="grey")
            continue
        ax.barh(yi, ri - 1, left=1, height=0.6, alpha=0.6,
                color=COLORS[alternative] if ri < 1 else COLORS[baseline])
        ax.plot([ri], [yi], "o", color="black", ms=4, zorder=3)
        if np.isfinite(li) and np.isfinite(hi_):
            ax.errorbar(ri, yi, xerr=[[ri - li], [hi_ - ri]], fmt="none", ecolor="black", elinewidth=2.2,
                        capsize=6, capthick=2.2, zorder=3)
            label = f"{ri:.3f} [{li:.3f}, {hi_:.3f}]"
        else:
            label = f"{ri:.3f} (no CI)"
        ax.text(1.02, yi, label, transform=side, va="center", ha="left", fontsize=8, family="monospace")
    ax.axvline(1, color="grey", lw=1)
    ax.set_xlim(min(0.0, finite.min()) - 0.05, xmax)
    ax.text(0.01, 1.01, f"<- {alternative} lower", transform=ax.transAxes, color=COLORS[alternative],
            fontsize=9, va="bottom")
    ax.text(0.99, 1.01, f"{alternative} higher ->", transform=ax.transAxes, color=COLORS[baseline],
            fontsize=9, va="bottom", ha="right")
    ax.set_yticks(y, table["metric"])
    nrep = int(table["n"].max()) if n else 0
    ax.set_xlabel(f"{alternative} / {baseline} (ratio of means; whiskers and numbers: paired {pct} CI, "
                  f"n = {nrep})")
    ax.text(1.02, 1.01, f"ratio [{pct} CI]", transform=ax.transAxes, fontsize=8, va="bottom", ha="left")
    ax.set_title(title or f"{alternative} vs {baseline}", pad=16)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path)
    plt.close(fig)


def plot_fault_latency_cdf(kept: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Fault-latency CDF per policy, pooled over all its replications (:mod:`desim.detail`)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from .detail import LATENCY_EDGES_NS, pooled_latency_counts

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lo, hi = np.inf, 0.0
    styles = [dict(lw=4, alpha=0.45), dict(lw=1.4, ls="--")]
    for k, (policy, runs) in enumerate(kept.items()):
        counts = pooled_latency_counts(runs)
        total = counts.sum()
        if total == 0:
            ax.plot([], [], color=COLORS.get(policy), label=f"{policy}: no faults")
            continue
        nz = np.nonzero(counts)[0]
        first, last = nz[0], nz[-1] + 1
        x = LATENCY_EDGES_NS[first:last + 1] / 1e3
        cdf = np.concatenate([[0.0], np.cumsum(counts[first:last]) / total])
        lo, hi = min(lo, x[0]), max(hi, x[-1])
        ax.step(x, cdf, where="post", color=COLORS.get(policy), **styles[k % 2],
                label=f"{policy}: {int(total):,} faults pooled over {len(runs)} replications")
    if hi > 0 and hi / max(lo, 1e-9) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("fault latency (us, exit to re-entry; bins of 2.3%)")
    ax.set_ylabel("fraction of faults <= x")
    ax.set_title(title or "Fault-latency CDF")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_faults_over_time(kept: dict[str, list[dict]], path: str | Path, title: str = "", bins: int = 200) -> None:
    """Faults per time bin: the mean over replications per policy, with the min-max band.

    The baseline is a wide pale line and the alternative a thin dashed one on
    top, so a stretch where both are the same (the populate phase) shows both.
    The DELETE/MOVE ioctls of the first replication of the first policy are marked.
    """
    from .detail import fault_series

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    width = max(float(k["fault_bin_ns"][0]) for runs in kept.values() for k in runs)
    nbins = max(len(k["fault_counts"]) * float(k["fault_bin_ns"][0]) / width for runs in kept.values() for k in runs)
    width *= 2 ** max(0, int(np.ceil(np.log2(nbins / bins))))  # at most ``bins`` bins on screen
    styles = [dict(lw=3.5, alpha=0.5), dict(lw=1.2, ls="--")]
    for k, (policy, runs) in enumerate(kept.items()):
        w, series = fault_series(runs, width)
        t = np.arange(series.shape[1] + 1) * w / 1e6
        mean = series.mean(axis=0)
        c = COLORS.get(policy)
        ax.stairs(mean, t, color=c, label=f"{policy}: mean of {len(runs)} replications", **styles[k % 2])
        if len(runs) > 1:
            ax.stairs(series.max(axis=0), t, baseline=series.min(axis=0), fill=True, color=c, alpha=0.15,
                      label=f"{policy}: min-max over replications")
    first = next(iter(kept.values()))[0]
    for tt in first.get("zap_ioctl_ns", []):
        ax.axvline(tt / 1e6, color="grey", lw=0.8, ls=":", alpha=0.8)
    ax.plot([], [], color="grey", ls=":", label="memslot DELETE/MOVE")
    ax.set_xlabel("simulated time (ms)")
    ax.set_ylabel(f"faults per {width / 1e3:,.1f} us bin")
    ax.set_title(title or "Faults over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lock_wait(runs: "pd.DataFrame", path: str | Path, title: str = "", confidence: float = 0.95) -> None:
    """``mmu_lock`` wait by role: the mean over replications per policy with its CI.

    A zero mean is drawn as a short stub labelled 0, so it cannot be mistaken
    for a missing bar; every bar carries its value.
    """
    from .stats import t_ci

    roles = sorted(c[len("lock_wait_"):-3] for c in runs.columns
                   if c.startswith("lock_wait_") and c.endswith("_ns"))
    policies = list(dict.fromkeys(runs["policy"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    w = 0.8 / max(len(policies), 1)
    x = np.arange(len(roles))
    top = 0.0
    bars = []
    for i, policy in enumerate(policies):
        sel = runs[runs.policy == policy]
        for j, role in enumerate(roles):
            v = sel[f"lock_wait_{role}_ns"].fillna(0).to_numpy(float) / 1e3
            iv = t_ci(v, confidence) if len(v) >= 2 else None
            m = float(v.mean()) if len(v) else 0.0
            hi = iv.high if iv is not None and np.isfinite(iv.high) else m
            top = max(top, hi)
            bars.append((x[j] + i * w, m, iv, policy))
    stub = top * 0.012 if top > 0 else 0.05
    for xi, m, iv, policy in bars:
        c = COLORS.get(policy)
        ax.bar(xi, m if m > 0 else stub, w * 0.9, color=c if m > 0 else "white", edgecolor=c,
               hatch=None if m > 0 else "////")
        if iv is not None and np.isfinite(iv.low) and iv.half_width > 0:
            ax.errorbar(xi, m, yerr=[[m - max(iv.low, 0.0)], [iv.high - m]], fmt="none", ecolor="black",
                        capsize=4, lw=1.2)
        label = "0" if m == 0 else (f"{m:,.0f}" if m >= 100 else f"{m:,.2f}")
        ax.annotate(label, (xi, max(m, stub) if iv is None else max(iv.high, m, stub)), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(color=COLORS.get(p), label=f"{p} (n = {int((runs.policy == p).sum())})") for p in policies]
    ax.set_xticks(x + w * (len(policies) - 1) / 2, roles)
    ax.set_ylim(0, (top if top > 0 else 1) * 1.18)
    ax.set_ylabel("mmu_lock wait per run (us, total over vCPUs)")
    ax.set_xlabel(f"lock role (bars: mean over replications, whiskers: {confidence * 100:g}% CI; "
                  "hatched stub: 0)")
    ax.set_title(title or "mmu_lock wait by role")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_validation(rows: list[dict], path: str | Path, title: str = "") -> None:
    """``desim validate``'s rows as real vs simulated, log-log: counts on the left, times on the
    right with the ±20% band; real medians carry their min-max as horizontal bars."""
    panels = [("count", "counts (faults, SPTEs, shadow pages)"), ("ns", "times (ioctls, phases)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (unit, label) in zip(axes, panels):
        pts = [r for r in rows if r["unit"] == unit and r["real_median"] > 0 and r["sim"] > 0]
        if not pts:
            ax.set_axis_off()
            continue
        scale = 1e-3 if unit == "ns" else 1.0  # times in us
        for pol in sorted({r["policy"] for r in pts}):
            sel = [r for r in pts if r["policy"] == pol]
            x = np.array([r["real_median"] for r in sel]) * scale
            lo = np.array([r["real_min"] for r in sel]) * scale
            hi = np.array([r["real_max"] for r in sel]) * scale
            y = np.array([r["sim"] for r in sel]) * scale
            ax.errorbar(x, y, xerr=np.vstack([x - lo, hi - x]), fmt="o", ms=5, alpha=0.8, capsize=2,
                        color=COLORS.get(pol, "grey"), label=pol)
        vals = np.array([v for r in pts for v in (r["real_min"], r["real_max"], r["sim"])]) * scale
        a, b = vals[vals > 0].min() / 1.5, vals.max() * 1.5
        grid = np.geomspace(a, b, 50)
        ax.plot(grid, grid, color="black", lw=1)
        if unit == "ns":
            ax.fill_between(grid, grid * 0.8, grid * 1.2, color="grey", alpha=0.2, label="±20%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(a, b)
        ax.set_ylim(a, b)
        u = " (us)" if unit == "ns" else ""
        ax.set_xlabel(f"real KVM, median [min-max]{u}")
        ax.set_ylabel(f"simulated{u}")
        ax.set_title(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="upper left")
    fig.suptitle(title or "desim validate: real vs simulated")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
