"""Plots a user would rather look at than read (matplotlib, PNG or SVG by file suffix).

* :func:`plot_comparison` — per metric, the alternative/baseline ratio with its CI whisker;
* :func:`plot_fault_latency_cdf` — fault-latency CDF per policy;
* :func:`plot_faults_over_time` — faults per time bin with memslot ioctls marked;
* :func:`plot_lock_wait` — ``mmu_lock`` wait time by role per policy.
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

    from .vm import RunResult

COLORS = {"fast": "#d1495b", "targeted": "#00798c"}


def plot_comparison(table: "pd.DataFrame", path: str | Path, baseline: str = "fast",
                    alternative: str = "targeted", title: str = "") -> None:
    t = table[np.isfinite(table["ratio"])]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(t), 3) + 1.4))
    y = np.arange(len(t))[::-1]
    r = t["ratio"].to_numpy(float)
    lo = t["ratio_low"].to_numpy(float)
    hi = t["ratio_high"].to_numpy(float)
    err = np.vstack([np.where(np.isfinite(lo), r - lo, 0), np.where(np.isfinite(hi), hi - r, 0)])
    colors = [COLORS[alternative] if v < 1 else COLORS[baseline] for v in r]
    ax.barh(y, r - 1, left=1, color=colors, alpha=0.75)
    ax.errorbar(r, y, xerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
    ax.axvline(1, color="grey", lw=1)
    finite = np.concatenate([r, lo[np.isfinite(lo)], hi[np.isfinite(hi)]])
    ax.set_xlim(min(0.0, finite.min()) - 0.05, max(1.1, finite.max() + 0.05))
    ax.text(0.01, 1.01, f"← {alternative} lower", transform=ax.transAxes, color=COLORS[alternative],
            fontsize=9, va="bottom")
    ax.text(0.99, 1.01, f"{alternative} higher →", transform=ax.transAxes, color=COLORS[baseline],
            fontsize=9, va="bottom", ha="right")
    ax.set_yticks(y, t["metric"])
    ax.set_xlabel(f"{alternative} / {baseline} (ratio of means, 95% CI)")
    ax.set_title(title or f"{alternative} vs {baseline}", pad=16)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_fault_latency_cdf(results: dict[str, "RunResult"], path: str | Path, title: str = "") -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lo, hi = np.inf, 0.0
    for policy, res in results.items():
        lat = np.sort(np.frombuffer(res.raw.fault_latency, dtype=np.float64)) / 1e3
        if len(lat) == 0:
            continue
        lo, hi = min(lo, lat[0]), max(hi, lat[-1])
        ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post",
                label=f"{policy} ({len(lat):,} faults)", color=COLORS.get(policy))
    if hi > 0 and hi / max(lo, 1e-9) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("fault latency (µs, exit to re-entry)")
    ax.set_ylabel("fraction of faults ≤ x")
    ax.set_title(title or "Fault-latency CDF")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_faults_over_time(results: dict[str, "RunResult"], path: str | Path, bins: int = 200,
                          title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    end = max(r.raw.completion_ns for r in results.values())
    marked = False
    for policy, res in results.items():
        t = np.frombuffer(res.raw.fault_time, dtype=np.float64)
        edges = np.linspace(0, end, bins + 1)
        counts = np.histogram(t, edges)[0]
        ax.step(edges[:-1] / 1e6, counts, where="post", label=policy, color=COLORS.get(policy))
        if not marked:
            ops = res.raw.ioctl_ops
            times = np.frombuffer(res.raw.ioctl_time, dtype=np.float64)
            for op, tt in zip(ops, times):
                if op in ("delete", "move"):
                    ax.axvline(tt / 1e6, color="grey", lw=0.8, ls="--", alpha=0.7)
            marked = True
    ax.plot([], [], color="grey", ls="--", label="memslot DELETE/MOVE")
    ax.set_xlabel("simulated time (ms)")
    ax.set_ylabel(f"faults per bin ({end / bins / 1e3:.0f} µs)")
    ax.set_title(title or "Faults over time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lock_wait(results: dict[str, "RunResult"], path: str | Path, title: str = "") -> None:
    roles = sorted({k[len("lock_wait_"):-3] for r in results.values() for k in r.metrics
                    if k.startswith("lock_wait_") and k.endswith("_ns")})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    w = 0.8 / max(len(results), 1)
    x = np.arange(len(roles))
    for i, (policy, res) in enumerate(results.items()):
        vals = [res.metrics.get(f"lock_wait_{role}_ns", 0.0) / 1e3 for role in roles]
        ax.bar(x + i * w, vals, w, label=policy, color=COLORS.get(policy))
    ax.set_xticks(x + w * (len(results) - 1) / 2, roles)
    ax.set_ylabel("total mmu_lock wait (µs)")
    ax.set_xlabel("lock role")
    ax.set_title(title or "mmu_lock wait by role")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
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
