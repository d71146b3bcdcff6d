"""Plots of latency tails across replications (matplotlib, PNG or SVG by file suffix).

* :func:`plot_latency_percentiles` — per latency class, each policy's p50 / p90 /
  p99 / p99.9 with bootstrap CI whiskers (log scale);
* :func:`plot_around_ops` — around each memslot DELETE/MOVE, the number of vCPUs
  stalled in an access and the faults per microsecond (the re-fault storm),
  averaged over ioctls and replications, with a 95% band.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .plots import COLORS  # noqa: E402
from .tails import around_band  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def plot_latency_percentiles(table: "pd.DataFrame", path: str | Path, policies: tuple[str, str] = ("fast", "targeted"),
                             title: str = "") -> None:
    classes = list(dict.fromkeys(table["class"]))
    fig, axes = plt.subplots(1, len(classes), figsize=(2.6 * len(classes) + 1, 4.2), squeeze=False, sharey=True)
    for ax, cls in zip(axes[0], classes):
        t = table[table["class"] == cls]
        x = np.arange(len(t))
        for k, pol in enumerate(policies):
            y = t[pol].to_numpy(float)
            err = np.vstack([y - t[f"{pol}_low"].to_numpy(float), t[f"{pol}_high"].to_numpy(float) - y])
            ax.errorbar(x + (k - 0.5) * 0.25, y, yerr=np.where(np.isfinite(err), err, 0), fmt="o",
                        color=COLORS.get(pol), capsize=3, label=pol, ms=4)
        ax.set_xticks(x, [f"p{q:g}" for q in t["percentile"]])
        ax.set_yscale("log")
        ax.set_title(cls, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("latency (ns), 95% bootstrap CI")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "Latency percentiles over replications")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_around_ops(samples: dict[str, dict[int, dict[str, Any]]], path: str | Path, title: str = "") -> None:
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for pol, by_rep in samples.items():
        if not by_rep:
            continue
        for ax, series in ((a1, "stalled_vcpus"), (a2, "faults_per_us")):
            x, m, lo, hi = around_band(by_rep, series)
            ax.plot(x / 1e3, m, color=COLORS.get(pol), label=pol, lw=1.2)
            ax.fill_between(x / 1e3, lo, hi, color=COLORS.get(pol), alpha=0.25, lw=0)
    for ax in (a1, a2):
        ax.axvline(0, color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    a1.set_ylabel("vCPUs stalled in an access")
    a2.set_ylabel("faults per µs")
    a2.set_xlabel("time since the DELETE/MOVE ioctl began (µs); mean over ioctls and replications, 95% band")
    a1.legend()
    a1.set_title(title or "Around each memslot DELETE/MOVE")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


LABELLED_MISSES = 6  # the worst misses get a label (more would cover the plot)
STAT_MARKERS = {"p50": "o", "p90": "s", "p99": "^", "p99.9": "v", "longest": "*"}


def plot_validation_tails(rows: list[dict[str, Any]], path: str | Path, title: str = "",
                          notes: list[str] | tuple[str, ...] = ()) -> None:
    """Real vs simulated latency percentiles (log-log), one marker per statistic, with the ±20% band
    (p50/p90) and the ±35% band (p99, p99.9, longest stall); the worst misses are labelled, and
    ``notes`` (why classes miss: :func:`desim.kvm.validate_tails.tails_why`) go below the plot."""
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    vals = [v for r in rows for v in (r["real"], r["sim"]) if v > 0]
    lo, hi = (min(vals) / 1.5, max(vals) * 1.5) if vals else (1.0, 10.0)
    x = np.geomspace(lo, hi, 50)
    ax.plot(x, x, color="grey", lw=1)
    ax.fill_between(x, x * 0.8, x * 1.2, color="grey", alpha=0.25, lw=0, label="±20% (p50, p90)")
    ax.fill_between(x, x * 0.65, x * 1.35, color="grey", alpha=0.1, lw=0, label="±35% (p99, p99.9, longest)")
    for stat, marker in STAT_MARKERS.items():
        for pol in ("fast", "targeted"):
            sel = [r for r in rows if r["stat"] == stat and r["policy"] == pol and r["real"] > 0 and r["sim"] > 0]
            if sel:
                ax.scatter([r["real"] for r in sel], [r["sim"] for r in sel], marker=marker, s=36,
                           color=COLORS.get(pol), alpha=0.8, label=f"{stat} {pol}")
    misses = [r for r in rows if not r["within"] and r["real"] > 0 and r["sim"] > 0 and r["rel_error"] is not None]
    for r in sorted(misses, key=lambda r: -abs(np.log(r["sim"] / r["real"])))[:LABELLED_MISSES]:
        ax.annotate(f"{r['scenario']} {r['class']} {r['stat']}", (r["real"], r["sim"]), fontsize=6,
                    alpha=0.7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("real (rdtsc in the guest), ns")
    ax.set_ylabel("simulated, ns")
    n = sum(r["within"] for r in rows)
    ax.set_title(title or "Latency tails: real vs simulated", fontsize=10)
    ax.text(0.02, 0.98, f"{n}/{len(rows)} within target", transform=ax.transAxes, va="top", fontsize=9)
    why = [ln for w in notes for ln in textwrap.wrap(w.strip(), 175, subsequent_indent="    ")]
    if why:  # the reasons the summary prints for the misses, as a footnote
        fig.text(0.01, 0.005, "\n".join(why), fontsize=5.5, va="bottom")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout(rect=(0, 0.018 * len(why), 1, 1))
    fig.savefig(path)
    plt.close(fig)
