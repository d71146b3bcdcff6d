"""Plot helpers shared by the studies: error bars and CI bands per series, log axes, figure writers.

matplotlib is used headless (Agg). :func:`errorbar_panel` draws one line per
series with CI whiskers, :func:`band_panel` one line per series with a shaded
CI band (what ``desim results --plot`` and ``desim capacity`` draw).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

PROFILE_MMU = {"tdp-icelake": "TDP MMU (read-locked faults)", "legacy-2020": "legacy MMU (exclusive faults)",
               "shadow-pvm": "shadow paging (exclusive faults)"}
POLICY_COLORS = {"fast": "#d1495b", "targeted": "#00798c"}


def plt_module():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def errorbar_panel(ax, summary: pd.DataFrame, x: str, metric: str, series_keys: list[str],
                   style: Callable[[tuple], dict[str, Any]], label: Callable[[tuple], str], scale: float = 1.0,
                   x_scale: float = 1.0, dodge: float = 0.0) -> None:
    """One line per series (``series_keys`` values) of ``metric`` against ``x``, 95% CI bars.

    ``dodge`` shifts series j by ``2 ** (dodge * (j - centre))`` along a log x axis so that
    series with equal values stay visible.
    """
    s = summary[summary.metric == metric]
    groups = list(s.groupby(series_keys, sort=False))
    for j, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values(x)
        xs = g[x].to_numpy(float) / x_scale * 2.0 ** (dodge * (j - (len(groups) - 1) / 2))
        m = g["mean"].to_numpy(float) / scale
        hw = g["half_width"].to_numpy(float) / scale
        hw = np.where(np.isfinite(hw), hw, 0.0)
        # on a log axis a whisker may not cross zero: clip it just above
        lo = np.where(m - hw > 0, hw, m * 0.999) if ax.get_yscale() == "log" else hw
        ax.errorbar(xs, m, yerr=[lo, hw], capsize=3, lw=1.4, ms=5, label=label(key), **style(key))


def auto_yscale(ax, summary: pd.DataFrame, metric: str, ratio: float = 10.0) -> None:
    """Log y when the metric spans more than ``ratio`` (x) across the panel, else linear from 0.

    Call before :func:`errorbar_panel` (whiskers are clipped above 0 on a log axis).
    """
    m = summary.loc[summary.metric == metric, "mean"].to_numpy(float)
    m = m[np.isfinite(m) & (m > 0)]
    if len(m) and m.max() / m.min() > ratio:
        ax.set_yscale("log")
    else:
        ax.set_yscale("linear")
        ax.set_ylim(bottom=0, auto=True)


def log2_xaxis(ax, values: Sequence[float], labels: Sequence[str] | None = None, fontsize: int = 8,
               min_gap: float = 0.0) -> None:
    """A log2 x axis with one tick per grid value and no minor ticks.

    Labels closer than ``min_gap`` (in log2 units) to the previous label are left
    blank (the last value is always labelled), so that dense grids stay readable.
    """
    from matplotlib.ticker import NullLocator

    values = list(values)
    labels = list(labels) if labels is not None else [str(v) for v in values]
    shown, last = [], -math.inf
    for i, (v, lab) in enumerate(zip(values, labels)):
        lv = math.log2(v)
        if i == len(values) - 1 and shown and lv - last < min_gap:
            shown[max(j for j, t in enumerate(shown) if t)] = ""  # keep the last label, drop its neighbour
        ok = lv - last >= min_gap or i == len(values) - 1
        shown.append(lab if ok else "")
        if ok:
            last = lv
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, shown, fontsize=fontsize)
    ax.xaxis.set_minor_locator(NullLocator())


def figure_writers(fig, stem: str) -> dict[str, Callable[[Path], None]]:
    """``{stem.png: ..., stem.svg: ...}`` writers for :func:`desim.experiment.write_outputs`."""
    def w(p: Path) -> None:
        fig.savefig(p, dpi=130 if p.suffix == ".png" else None)
    return {f"{stem}.png": w, f"{stem}.svg": w}


def policy_mmu_style(key: tuple) -> dict[str, Any]:
    """Colour by policy, line style and marker by profile (MMU) for keys (profile, policy)."""
    profile, policy = key
    dashed = profile != "tdp-icelake"
    return {"color": POLICY_COLORS.get(policy, "grey"), "ls": "--" if dashed else "-",
            "marker": "s" if dashed else "o", "mfc": "white" if dashed else None}


def policy_mmu_label(key: tuple) -> str:
    profile, policy = key
    return f"{policy} zap, {PROFILE_MMU.get(profile, profile)}"


def short_series(key: tuple) -> str:
    profile, policy = key
    mmu = {"tdp-icelake": "tdp", "legacy-2020": "legacy", "shadow-pvm": "shadow"}.get(profile, profile)
    return f"{mmu}/{policy}"


def band_panel(ax, summary: pd.DataFrame, x: str, metric: str, series_key: str = "policy",
               scale: float = 1.0) -> None:
    """One line per ``series_key`` value of ``metric`` against ``x``, the CI as a shaded band.

    ``summary`` is a :func:`desim.studies.tables.summarize` table (mean, ci_low, ci_high).
    """
    s = summary[summary.metric == metric]
    for j, (key, g) in enumerate(s.groupby(series_key, sort=False)):
        g = g.sort_values(x)
        xs = g[x].to_numpy()
        color = POLICY_COLORS.get(str(key), f"C{j}")
        lo = g["ci_low"].to_numpy(float) / scale
        hi = g["ci_high"].to_numpy(float) / scale
        m = g["mean"].to_numpy(float) / scale
        lo = np.where(np.isfinite(lo), lo, m)
        hi = np.where(np.isfinite(hi), hi, m)
        ax.plot(xs, m, marker="o", ms=4, lw=1.5, color=color, label=f"{key} (mean)")
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0, label=f"{key} 95% CI" if j == 0 else None)
