"""A result store as tables and plots: what ``desim results`` shows.

:func:`load_runs` turns a store (or a sweep's output folder holding one, or a
per-task JSON store of earlier versions, converted on the way) into the tidy
run table: one row per task with the point, every factor, ``policy``,
``seed``, ``replication`` and every metric. :func:`point_summary` gives, per
point and metric, each policy's mean with its CI and the paired difference and
ratio CIs of the two policies (common random numbers: replication r of both
policies drew the same guest behaviour). :func:`plot_vs_factor` draws a metric
against a swept factor, one line per policy (and per value of the other
factors), with the CI as a band.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..errors import DesimInputError
from .store import DB_NAME, ResultStore, store_path
from .tables import compare_points, summarize

FORMATS = ("csv", "parquet", "json")
BOOKKEEPING = ("point", "policy", "seed", "replication", "scenario")


@dataclass
class Loaded:
    runs: pd.DataFrame
    factors: list[str]      # factor columns (empty for a store without sweeps: then "scenario" is the key)
    metrics: list[str]
    sweep: str | None


def open_store(path: str | Path) -> ResultStore:
    """The store at ``path``: a store directory, its database file, or an output folder with ``store/``."""
    p = Path(path)
    if not p.exists():
        raise DesimInputError(f"{p}: no such store or output folder")
    for cand in (store_path(p), p / "store" / DB_NAME):
        if cand.is_file():
            return ResultStore(cand, create=False)
    if p.is_dir() and any(p.glob("[0-9a-f][0-9a-f]/*.json")):  # a per-task JSON store: convert it
        st = ResultStore(p)
        n, bad = st.import_legacy()
        st.warn(f"converted the per-task JSON store {p}: {n} entries into {st.path}"
                + (f", {bad} damaged ones skipped" if bad else ""))
        return st
    raise DesimInputError(f"{p}: no result store there (expected {store_path(p)} or {p / 'store' / DB_NAME})")


def load_runs(path: str | Path, sweep: str | None = None) -> Loaded:
    st = open_store(path)
    try:
        names = st.sweeps()
        if sweep is not None and sweep not in names:
            raise DesimInputError(f"--sweep {sweep}: not in {st.path} (sweeps there: {', '.join(names) or 'none'})")
        if sweep is None and len(names) > 1:
            raise DesimInputError(f"{st.path} holds {len(names)} sweeps ({', '.join(names)}): choose one with --sweep")
        sweep = sweep or (names[0] if names else None)
        if sweep is None:
            return _plain_runs(st)
        tasks = st.sweep_tasks(sweep)
        found = st.get_many([t[5] for t in tasks], [{"policy": t[2], "seed": t[3], "replication": t[4]}
                                                     for t in tasks])
        rows, factors, metrics = [], {}, {}
        for point, labels, pol, seed, rep, key in tasks:
            r = found.get(key)
            if r is None:
                continue  # not finished (yet)
            factors.update(dict.fromkeys(labels))
            metrics.update(dict.fromkeys(r["metrics"]))
            rows.append({"point": point, **labels, "policy": pol, "seed": seed, "replication": rep, **r["metrics"]})
        if not rows:
            raise DesimInputError(f"sweep {sweep} in {st.path}: no finished task yet")
        runs = pd.DataFrame(rows)
        return Loaded(runs, list(factors), list(metrics), sweep)
    finally:
        st.close()


def _plain_runs(st: ResultStore) -> Loaded:
    rows, metrics = [], {}
    for r in st.all_results().values():
        metrics.update(dict.fromkeys(r["metrics"]))
        rows.append({"scenario": r["scenario"], "policy": r["policy"], "seed": r["seed"],
                     "replication": r["replication"], **r["metrics"]})
    if not rows:
        raise DesimInputError(f"{st.path}: the store is empty")
    runs = pd.DataFrame(rows).sort_values(["scenario", "seed", "replication", "policy"], kind="stable")
    return Loaded(runs.reset_index(drop=True), [], list(metrics), None)


def point_keys(loaded: Loaded) -> list[str]:
    return loaded.factors or ["scenario", "seed"]


def point_summary(loaded: Loaded, metrics: list[str], confidence: float = 0.95,
                  baseline: str = "fast", alternative: str = "targeted") -> pd.DataFrame:
    """Per point and metric: each policy's mean and CI, and (with both policies) the paired CIs."""
    keys = point_keys(loaded)
    runs = loaded.runs
    # paired CIs need the metric in every run: the others (reported by some runs only) are left out
    metrics = [m for m in metrics if runs[m].notna().all()]
    per_policy = summarize(runs, keys, metrics, confidence)
    pols = set(runs.policy)
    if {baseline, alternative} <= pols:
        paired = compare_points(runs, keys, metrics, baseline, alternative, confidence)
        paired["confidence"] = confidence
        return paired
    per_policy["confidence"] = confidence
    return per_policy


def write_table(df: pd.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        path.write_text(df.to_json(orient="records", indent=1) + "\n")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DesimInputError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise DesimInputError("--format parquet needs pyarrow: pip install 'desim[parquet]'") from None


def plot_vs_factor(loaded: Loaded, metric: str, factor: str, confidence: float = 0.95
                   ) -> Callable[[Path], None]:
    """A writer of the plot of ``metric`` against ``factor``: one line per policy (x other factors), CI bands."""
    if factor not in loaded.factors:
        raise DesimInputError(f"--vs {factor}: not a factor of this sweep (factors: {', '.join(loaded.factors) or 'none'})")
    if metric not in loaded.metrics:
        raise DesimInputError(f"--plot {metric}: not a metric in this store (e.g. {', '.join(loaded.metrics[:8])})")
    x = _numeric(loaded.runs[factor])
    runs = loaded.runs.assign(**{"_x": x})
    # other factors define the series, except those that move with the x factor (a zip group)
    others = [f for f in loaded.factors if f != factor
              and not (runs.groupby(factor)[f].nunique() == 1).all()]
    runs["_series"] = runs["policy"].astype(str) + runs[others].astype(str).apply(
        lambda r: "".join(f", {k}={v}" for k, v in r.items()), axis=1) if others else runs["policy"].astype(str)
    summary = summarize(runs, ["_series", "_x"], [metric], confidence)

    def write(path: Path) -> None:
        from .figures import POLICY_COLORS, plt_module

        plt = plt_module()
        fig, ax = plt.subplots(figsize=(8, 5))
        combos: list[str] = []
        for name, g in summary.groupby("_series", sort=False):
            g = g.sort_values("_x")
            pol, _, rest = str(name).partition(", ")
            if rest not in combos:
                combos.append(rest)
            # colour: the policy (or, with other factors, their values); fast drawn wide and dashed
            # under targeted, so that equal lines stay visible
            color = POLICY_COLORS.get(pol, "grey") if not others else f"C{combos.index(rest)}"
            wide = pol == "fast"
            m = g["mean"].to_numpy(float)
            lo = np.where(np.isfinite(g["ci_low"]), g["ci_low"], m)
            hi = np.where(np.isfinite(g["ci_high"]), g["ci_high"], m)
            ax.plot(g["_x"], m, marker="s" if wide else "o", ms=6 if wide else 4, color=color, label=str(name),
                    ls="--" if wide else "-", lw=2.8 if wide else 1.4, alpha=0.6 if wide else 1.0,
                    zorder=2 if wide else 3)
            ax.fill_between(g["_x"].to_numpy(float), lo, hi, color=color, alpha=0.15, lw=0)
        xs = np.unique(summary["_x"].to_numpy(float))
        if len(xs) > 2 and xs.min() > 0 and xs.max() / xs.min() >= 16:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(factor)
        ax.set_ylabel(metric)
        n = runs.groupby(["_series", "_x"]).size()
        ax.set_title(f"{metric} vs {factor} (mean, {confidence:.0%} CI band; "
                     f"n = {n.min()}{'' if n.min() == n.max() else '-' + str(n.max())} per point)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=130 if path.suffix == ".png" else None)
        plt.close(fig)
    return write


def _numeric(col: pd.Series) -> pd.Series:
    """Factor values on a numeric axis: numbers as they are, sizes ("64MiB") in bytes."""
    from ..scenario import parse_size

    def conv(v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
        try:
            return parse_size(v)
        except Exception:  # noqa: BLE001 - a category: plotted by position
            return v
    vals = col.map(conv)
    if all(isinstance(v, (int, float)) for v in vals):
        return vals.astype(float)
    cats = list(dict.fromkeys(col))
    return col.map(cats.index).astype(float)


def format_summary(summary: pd.DataFrame, keys: list[str], baseline: str = "fast",
                   alternative: str = "targeted") -> str:
    """A text table: one line per point and metric (paired ratio CI when both policies ran)."""
    from .tables import fmt_ci

    lines = []
    paired = f"mean_{baseline}" in summary.columns
    head = keys + ["metric", "n"] + ([baseline, alternative, f"{alternative}/{baseline} [CI]"] if paired
                                     else ["policy", "mean ± half-width"])
    table = []
    for r in summary.to_dict(orient="records"):
        cells = [str(r[k]) for k in keys] + [r["metric"], str(r["n"])]
        if paired:
            ratio = r.get("ratio", float("nan"))
            lo, hi = r.get("ratio_low", float("nan")), r.get("ratio_high", float("nan"))
            rs = "n/a" if not np.isfinite(ratio) else (f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo)
                                                        else f"{ratio:.3f}")
            cells += [fmt_ci(r[f"mean_{baseline}"], r[f"hw_{baseline}"]),
                      fmt_ci(r[f"mean_{alternative}"], r[f"hw_{alternative}"]), rs]
        else:
            cells += [r["policy"], fmt_ci(r["mean"], r["half_width"])]
        table.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(head)]
    lines.append("  ".join(h.ljust(w) if i < len(keys) + 1 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for c in table:
        lines.append("  ".join(x.ljust(w) if i < len(keys) + 1 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)
