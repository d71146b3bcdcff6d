"""Per-point summaries, paired comparisons and text tables of a tidy run table.

:func:`summarize` gives one row per (point keys, policy, metric) with the mean
and its Student-t CI; :func:`compare_points` the paired difference and ratio
CIs of two policies per point (:func:`desim.experiment.compare`, common random
numbers); :func:`format_wide` one metric as a text table (rows: a factor,
columns: series). Also the small formatters the studies share.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..stats import paired_diff_ci, t_ci

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def parse_size_list(text: str) -> list[int]:
    """``"64KiB,1MiB,1GiB"`` -> bytes."""
    from ..scenario import parse_size

    return [parse_size(t) for t in text.split(",") if t.strip()]


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if abs(v - round(v)) < 1e-9 else f"{v:.3g} {unit}"
    return f"{n:.0f} B"



def summarize(runs: pd.DataFrame, keys: list[str], metrics: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """Long table: one row per (keys..., policy, metric) with mean, std and the Student-t CI of the mean."""
    rows = []
    for gk, g in runs.groupby(keys + ["policy"], sort=False):
        gk = gk if isinstance(gk, tuple) else (gk,)
        for m in metrics:
            if m not in g.columns:
                continue
            x = g[m].to_numpy(float)
            x = x[np.isfinite(x)]  # a metric a run does not report (e.g. a lock role never taken)
            if not len(x):
                continue
            iv = t_ci(x, confidence)
            rows.append({**dict(zip(keys + ["policy"], gk)), "metric": m, "n": len(x), "mean": iv.estimate,
                         "std": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
                         "ci_low": iv.low, "ci_high": iv.high, "half_width": iv.half_width})
    return pd.DataFrame(rows)


def compare_points(runs: pd.DataFrame, keys: list[str], metrics: list[str], baseline: str = "fast",
                   alternative: str = "targeted", confidence: float = 0.95) -> pd.DataFrame:
    """Per point (``keys``), :func:`desim.experiment.compare` (paired difference and ratio CIs)."""
    parts = []
    for gk, g in runs.groupby(keys, sort=False):
        gk = gk if isinstance(gk, tuple) else (gk,)
        t = _compare(g, metrics, baseline, alternative, confidence)
        for k, v in zip(keys, gk):
            t[k] = v
        parts.append(t)
    out = pd.concat(parts, ignore_index=True)
    return out[keys + [c for c in out.columns if c not in keys]]


def paired_diff(runs: pd.DataFrame, metric: str, baseline: str = "fast", alternative: str = "targeted",
                confidence: float = 0.95):
    """Paired-t interval of mean(alternative - baseline) over the replications of one point."""
    a = runs[runs.policy == baseline].set_index("replication")[metric]
    b = runs[runs.policy == alternative].set_index("replication")[metric]
    common = a.index.intersection(b.index)
    return paired_diff_ci(a.loc[common].to_numpy(float), b.loc[common].to_numpy(float), confidence)



def _compare(runs: pd.DataFrame, metrics: list[str], baseline: str, alternative: str,
             confidence: float) -> pd.DataFrame:
    from .. import experiment as ex

    return ex.compare(runs, metrics, baseline, alternative, confidence)


def fmt_ci(mean: float, hw: float, scale: float = 1.0) -> str:
    """``12.3 ± 0.4`` with 3-4 significant digits (``±`` omitted when the CI has zero width)."""
    m = mean / scale
    if not math.isfinite(m):
        return "n/a"
    if not math.isfinite(hw):
        return f"{m:.4g} (n=1)"
    h = hw / scale
    if h == 0:
        return f"{m:.4g}"
    return f"{m:.4g} ± {h:.2g}"


def format_wide(summary: pd.DataFrame, row_key: str, series_keys: list[str], metric: str, scale: float = 1.0,
                unit: str = "", title: str = "", row_fmt: Callable[[Any], str] = str,
                series_fmt: Callable[[tuple], str] | None = None) -> str:
    """A text table of one metric: rows = ``row_key`` values, columns = series, cells = mean ± 95% half-width."""
    s = summary[summary.metric == metric]
    if s.empty:
        return ""
    series = list(dict.fromkeys(tuple(r) for r in s[series_keys].itertuples(index=False)))
    names = [series_fmt(k) if series_fmt else "/".join(map(str, k)) for k in series]
    rows = list(dict.fromkeys(s[row_key]))
    cells = {}
    for r in s.itertuples(index=False):
        cells[(getattr(r, row_key), tuple(getattr(r, k) for k in series_keys))] = fmt_ci(r.mean, r.half_width, scale)
    w0 = max(len(row_key), *(len(row_fmt(v)) for v in rows))
    widths = [max(len(n), *(len(cells.get((v, k), "")) for v in rows)) for n, k in zip(names, series)]
    head = f"{title or metric}" + (f" [{unit}, mean ± 95% CI half-width]" if unit else " [mean ± 95% CI half-width]")
    lines = [head, f"  {row_key:<{w0}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for v in rows:
        lines.append(f"  {row_fmt(v):<{w0}}  " + "  ".join(f"{cells.get((v, k), '-'):>{w}}"
                                                            for k, w in zip(series, widths)))
    return "\n".join(lines)



def clean_json(obj: Any) -> Any:
    """Plain JSON data: numpy scalars to Python, NaN and infinities to None (strict JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, pd.DataFrame):
        return clean_json(obj.to_dict(orient="records"))
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj

