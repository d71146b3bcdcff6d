"""Shared plumbing of the experiment scripts: arguments, a grid runner, summaries, tables, plots.

Nothing here knows what an experiment is about. A script builds a list of
:class:`Point` (labels such as ``{"vcpus": 8, "mmu": "tdp"}`` plus a validated
:class:`~desim.scenario.Scenario`), runs them with :func:`run_grid` and turns
the tidy run table into summaries (:func:`summarize`, :func:`compare_points`),
text (:func:`format_wide`) and figures (:func:`errorbar_panel`,
:func:`figure_writers`), then writes everything atomically with
:func:`desim.experiment.write_outputs`.

The grid runner is :func:`desim.sweep.execute` (serial, or a local Dask
cluster) fed with every (point, policy, replication) task of the experiment at
once, largest points first, with two per-task hooks evaluated in the worker:
``extra`` (RunResult -> more scalar metrics, e.g. statistics of one phase) and
``samples`` (RunResult -> arrays such as latencies for CDF plots, kept for the
replications asked for).

``--store DIR`` keeps every finished run in the sweep engine's result store
(keyed by the model fingerprint -- MODEL_VERSION plus a hash of desim's source
--, the resolved scenario and profile, policy, seed, replication, and a tag
naming the extras), so a killed run resumes and a changed model recomputes.

Each task is still exactly ``desim.vm.run_scenario(scenario, policy, seed,
replication)``: replication ``r`` of ``seed`` draws the same random streams
under every policy (common random numbers), and results do not depend on the
number of workers or on the order in which tasks finish.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from desim import model_fingerprint  # noqa: E402
from desim import experiment as ex  # noqa: E402
from desim.errors import DesimInputError  # noqa: E402
from desim.scenario import Scenario, validate_scenario  # noqa: E402
from desim.stats import paired_diff_ci, t_ci  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
POLICIES = ("fast", "targeted")
PROFILE_MMU = {"tdp-icelake": "TDP MMU (read-locked faults)", "legacy-2020": "legacy MMU (exclusive faults)",
               "shadow-pvm": "shadow paging (exclusive faults)"}
POLICY_COLORS = {"fast": "#d1495b", "targeted": "#00798c"}


# -- arguments ----------------------------------------------------------------------------------
def make_parser(description: str, name: str, default_reps: int, quick_reps: int = 2) -> argparse.ArgumentParser:
    """The common options: ``--quick --out --replications --workers --seed --progress``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke version (small VM, few points)")
    ap.add_argument("--out", default=str(ROOT / "results" / name),
                    help=f"output directory (default results/{name})")
    ap.add_argument("--replications", "-n", type=int, default=None,
                    help=f"paired replications per point (default {default_reps}; quick: {quick_reps})")
    ap.add_argument("--workers", "-w", type=int, default=1,
                    help="worker processes (default 1: run in this process)")
    ap.add_argument("--seed", type=int, default=1, help="base seed (replication r of every point uses seed/r)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")
    ap.add_argument("--store", default=None,
                    help="keep every finished run in this directory; a killed run resumes without recomputing")
    ap.set_defaults(_default_reps=default_reps, _quick_reps=quick_reps)
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = ap.parse_args(argv)
    if args.replications is None:
        args.replications = args._quick_reps if args.quick else args._default_reps
    if args.replications < 1:
        ap.error("--replications must be >= 1")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    from desim.outputs import check_output_dir  # output paths checked before any work, as by desim

    try:
        check_output_dir(args.out, "--out")
        if args.store is not None:
            check_output_dir(args.store, "--store")
    except DesimInputError as e:
        ap.error(str(e))
    return args


def pick(value: Any, quick: bool, quick_default: Any, default: Any) -> Any:
    """An option's value if given (even 0, so validation sees it), else its quick or full default."""
    if value is not None:
        return value
    return quick_default if quick else default


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as plain JSON data (for summary.json)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def parse_size_list(text: str) -> list[int]:
    """``"64KiB,1MiB,1GiB"`` -> bytes."""
    from desim.scenario import parse_size

    return [parse_size(t) for t in text.split(",") if t.strip()]


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if abs(v - round(v)) < 1e-9 else f"{v:.3g} {unit}"
    return f"{n:.0f} B"


# -- scenarios -------------------------------------------------------------------------------------
def scenario_from(data: dict[str, Any], where: str) -> Scenario:
    """Validate a scenario dict exactly like a scenario file (errors name the field)."""
    return validate_scenario(data, where)


@dataclass
class Point:
    """One point of an experiment grid: labels (become CSV columns) and the scenario to run."""

    labels: dict[str, Any]
    scenario: Scenario
    cost: float = 1.0  # relative run time, for scheduling the biggest tasks first


@dataclass
class GridResult:
    runs: pd.DataFrame  # one row per point x policy x replication
    samples: dict[tuple[int, str, int], dict[str, np.ndarray]] = field(default_factory=dict)
    wall_s: float = 0.0


def phase_window(res: Any, phase: str) -> tuple[float, float]:
    """(start, end) in simulated ns of ``phase`` in a RunResult (start: the previous phase's end)."""
    ends = res.raw.phase_end_ns
    names = list(ends)
    i = names.index(phase)
    return (ends[names[i - 1]] if i else 0.0), ends[phase]


def phase_fault_latencies(res: Any, phase: str) -> np.ndarray:
    """Latencies (ns) of the faults that started during ``phase``."""
    lo, hi = phase_window(res, phase)
    t = np.frombuffer(res.raw.fault_time, dtype=np.float64)
    lat = np.frombuffer(res.raw.fault_latency, dtype=np.float64)
    return lat[(t >= lo) & (t < hi)]


def phase_fault_stats(res: Any, phase: str, prefix: str | None = None) -> dict[str, float]:
    """Faults, fault-latency percentiles and duration of one phase (0 for the percentiles if no fault)."""
    p = prefix if prefix is not None else f"{phase}_"
    lo, hi = phase_window(res, phase)
    lat = phase_fault_latencies(res, phase)
    out = {f"{p}ns": hi - lo, f"{p}faults": int(len(lat))}
    if len(lat):
        p50, p99, p999 = np.percentile(lat, [50, 99, 99.9])
        out.update({f"{p}fault_latency_p50_ns": float(p50), f"{p}fault_latency_p99_ns": float(p99),
                    f"{p}fault_latency_p999_ns": float(p999), f"{p}fault_latency_max_ns": float(lat.max()),
                    f"{p}fault_latency_mean_ns": float(lat.mean())})
    else:
        out.update({f"{p}fault_latency_{s}_ns": 0.0 for s in ("p50", "p99", "p999", "max", "mean")})
    return out


# -- running ---------------------------------------------------------------------------------------
def run_grid(points: list[Point], policies: Iterable[str] = POLICIES, replications: int = 10, seed: int = 1,
             workers: int = 1, extra: Callable[[Any], dict[str, float]] | None = None,
             samples: Callable[[Any], dict[str, np.ndarray]] | None = None, sample_replications: Iterable[int] = (0,),
             progress: bool | None = None, desc: str = "runs", store: str | Path | None = None,
             store_tag: str = "") -> GridResult:
    """Run every (point, policy, replication) on the sweep engine; return the tidy run table.

    One :func:`desim.sweep.execute` call for the whole grid (serial, or a local
    Dask cluster with ``workers`` processes), the most expensive points first.
    ``extra`` and ``samples`` run in the worker on the full RunResult (see
    :class:`desim.sweep.Task`); samples are kept for ``sample_replications``
    only. With ``store`` every finished run is kept there and found again on
    the next call (``store_tag`` names what ``extra``/``samples`` compute).
    Rows come back in (point, policy, replication) order whatever the workers do.
    """
    from desim.sweep import ResultStore, Task, execute

    policies = list(policies)
    keep = set(sample_replications)
    tasks = [Task(p.scenario.model_dump(), pol, seed, r, point=i, extra=extra,
                  samples=samples if r in keep else None, tag=store_tag)
             for i, p in enumerate(points) for pol in policies for r in range(replications)]
    order = sorted(range(len(tasks)), key=lambda k: -points[tasks[k].point].cost)
    t0 = time.perf_counter()
    results = execute(tasks, backend="local" if workers > 1 else "serial", workers=workers,
                      store=ResultStore(store) if store is not None else None, progress=progress,
                      order=order, desc=desc)
    rows = []
    kept: dict[tuple[int, str, int], dict[str, np.ndarray]] = {}
    for t, res in zip(tasks, results):
        row = {"point": t.point, **points[t.point].labels, "policy": t.policy, "seed": seed,
               "replication": t.replication}
        row.update(res["metrics"])
        row["run_wall_s"] = res.get("wall_s", 0.0)
        rows.append(row)
        if res.get("samples") is not None:
            kept[(t.point, t.policy, t.replication)] = {n: np.asarray(v, dtype=float)
                                                          for n, v in res["samples"].items()}
    return GridResult(pd.DataFrame(rows), kept, time.perf_counter() - t0)


def guarded_main(main: Callable[[], int]) -> None:
    """Run ``main``; a scenario error prints one line and exits 2 (like the desim CLI)."""
    try:
        code = main()
    except DesimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


# -- statistics --------------------------------------------------------------------------------------
def summarize(runs: pd.DataFrame, keys: list[str], metrics: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """Long table: one row per (keys..., policy, metric) with mean, std and the Student-t CI of the mean."""
    rows = []
    for gk, g in runs.groupby(keys + ["policy"], sort=False):
        gk = gk if isinstance(gk, tuple) else (gk,)
        for m in metrics:
            if m not in g.columns:
                continue
            x = g[m].to_numpy(float)
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
        t = ex.compare(g, metrics, baseline, alternative, confidence)
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


# -- text ------------------------------------------------------------------------------------------
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


# -- plots -------------------------------------------------------------------------------------------
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


def json_summary(name: str, args: argparse.Namespace, grid: GridResult, summary: pd.DataFrame,
                 **extra: Any) -> dict[str, Any]:
    """The common part of every summary.json (DataFrames become lists of records; NaN/inf become null)."""
    return clean_json({
        "experiment": name, "model_version": model_fingerprint(), "args": args_record(args),
        "replications": int(args.replications), "seed": int(args.seed), "confidence": 0.95,
        "runs": int(len(grid.runs)), "wall_s": round(grid.wall_s, 2),
        "cpu_s_per_run_mean": float(grid.runs["run_wall_s"].mean()) if len(grid.runs) else 0.0,
        "summary": summary, **extra})


def write_all(out: str | Path, files: dict[str, Callable[[Path], None]]) -> Path:
    """Write atomically (see :func:`desim.experiment.write_outputs`), close every figure, return the dir."""
    try:
        return ex.write_outputs(out, files)
    finally:
        plt_module().close("all")

