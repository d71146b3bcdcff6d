"""The experiment API: replications, policy comparisons and tidy tables.

What an experiment script (or ``desim compare``) does::

    from desim import experiment as ex
    sc = ex.load("workloads/boot-6g.toml").with_overrides({"vm.vcpus": 8})
    runs = ex.replicate(sc, ["fast", "targeted"], replications=10, seed=1)
    table = ex.compare(runs, metrics=["faults", "completion_ns"])
    ex.save(out_dir, runs=runs, table=table)

Replication ``r`` of seed ``s`` runs both policies with the same named random
streams (:mod:`desim.streams`): common random numbers, so the comparison is
*paired* — per metric, the mean of each policy, the mean paired difference
(alternative - baseline) with its Student-t CI, and the ratio
alternative/baseline as a ratio of means with a delta-method CI (the ratio
of means is what "-14% EPT violations" means).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from .scenario import Scenario, load_scenario
from .stats import Interval, paired_diff_ci, precision_reached, ratio_ci, t_ci
from .sweep import ResultStore, Task, execute

DEFAULT_METRICS = [
    "faults", "faults_after_zap", "fault_latency_p50_ns", "fault_latency_p99_ns", "vcpu_stall_ns",
    "lock_wait_fault_ns", "ipis_sent", "remote_flushes", "zap_duration_total_ns", "memslot_ioctl_mean_ns",
    "completion_ns",
]


def load(path: str | Path | None = None) -> Scenario:
    """Load a scenario file (None: the built-in default)."""
    return load_scenario(path)


def replicate(scenario: Scenario, policies: Iterable[str] = ("fast", "targeted"), replications: int = 10,
              seed: int = 1, backend: str = "serial", workers: int = 1, store: str | Path | None = None,
              progress: bool | None = None, first_replication: int = 0) -> pd.DataFrame:
    """Run every policy for replications ``first_replication ..`` and return a tidy table.

    One row per (policy, replication), one column per metric.
    """
    return runs_table(replicate_results(scenario, policies, replications, seed, backend, workers, store,
                                        progress, first_replication))


def replicate_results(scenario: Scenario, policies: Iterable[str] = ("fast", "targeted"), replications: int = 10,
                      seed: int = 1, backend: str = "serial", workers: int = 1, store: str | Path | None = None,
                      progress: bool | None = None, first_replication: int = 0,
                      samples: Callable[[Any], dict[str, Any]] | None = None, tag: str = "") -> list[dict[str, Any]]:
    """:func:`replicate`'s plain results (one dict per run, in task order), with optional ``samples``."""
    policies = list(policies)
    data = scenario.model_dump()
    tasks = [Task(data, p, seed, r, samples=samples, tag=tag)
             for r in range(first_replication, first_replication + replications) for p in policies]
    return execute(tasks, backend=backend, workers=workers,
                   store=ResultStore(store) if store is not None else None, progress=progress)


def runs_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in results:
        row = {"scenario": r["scenario"], "point": r.get("point", 0), "policy": r["policy"], "seed": r["seed"],
               "replication": r["replication"]}
        row.update(r["metrics"])
        rows.append(row)
    return pd.DataFrame(rows)


def _paired(runs: pd.DataFrame, metric: str, baseline: str, alternative: str) -> tuple[np.ndarray, np.ndarray]:
    a = runs[runs.policy == baseline].set_index("replication")[metric]
    b = runs[runs.policy == alternative].set_index("replication")[metric]
    common = a.index.intersection(b.index)
    return a.loc[common].to_numpy(float), b.loc[common].to_numpy(float)


def compare(runs: pd.DataFrame, metrics: list[str] | None = None, baseline: str = "fast",
            alternative: str = "targeted", confidence: float = 0.95) -> pd.DataFrame:
    """Paired comparison table, one row per metric."""
    metrics = [m for m in (metrics or DEFAULT_METRICS) if m in runs.columns]
    rows = []
    for m in metrics:
        a, b = _paired(runs, m, baseline, alternative)
        ca, cb = t_ci(a, confidence), t_ci(b, confidence)
        d = paired_diff_ci(a, b, confidence)
        row = {"metric": m, "n": len(a),
               f"mean_{baseline}": ca.estimate, f"hw_{baseline}": ca.half_width,
               f"mean_{alternative}": cb.estimate, f"hw_{alternative}": cb.half_width,
               "diff": d.estimate, "diff_low": d.low, "diff_high": d.high}
        if np.all(a > 0) and len(a) >= 2:
            r = ratio_ci(a, b, confidence, method="delta")
            row.update(ratio=r.estimate, ratio_low=r.low, ratio_high=r.high)
        elif a.mean() > 0:
            row.update(ratio=b.mean() / a.mean(), ratio_low=np.nan, ratio_high=np.nan)
        else:
            row.update(ratio=np.nan, ratio_low=np.nan, ratio_high=np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def replicate_to_precision(scenario: Scenario, metrics: list[str], target_rel_half_width: float = 0.02,
                           baseline: str = "fast", alternative: str = "targeted", seed: int = 1,
                           min_reps: int = 3, max_reps: int = 100, batch: int = 2, backend: str = "serial",
                           workers: int = 1, store: str | Path | None = None, confidence: float = 0.95,
                           progress: Callable[[int, dict[str, float]], None] | None = None
                           ) -> tuple[pd.DataFrame, str]:
    """Add replications in batches until every metric's paired ratio CI is within the target.

    Returns (runs, stopped_by) with stopped_by "precision" or "max_reps". The
    stopping rule is :func:`desim.stats.precision_reached` (Hoad, Robinson &
    Davies 2010, with look-ahead), applied to the per-replication ratio.
    """
    runs = pd.DataFrame()
    done = 0
    while True:
        k = min(batch, max_reps - done)
        new = replicate(scenario, [baseline, alternative], k, seed, backend, workers, store, progress=False,
                        first_replication=done)
        runs = pd.concat([runs, new], ignore_index=True)
        done += k
        pairs = {m: _paired(runs, m, baseline, alternative) for m in metrics}
        values = {m: list(zip(a, b)) for m, (a, b) in pairs.items()}
        if done >= min_reps:
            dec = precision_reached(values, target_rel_half_width, confidence, min_reps=min_reps,
                                    compare="ratio", ratio_method="delta")
            if progress is not None:
                progress(done, {m: iv.relative_half_width for m, iv in dec.intervals.items()})
            if dec.stop:
                keep = runs.replication < dec.n
                return runs[keep].reset_index(drop=True), "precision"
        if done >= max_reps:
            return runs, "max_reps"


def format_table(table: pd.DataFrame, baseline: str = "fast", alternative: str = "targeted",
                 confidence: float = 0.95) -> str:
    """A human-readable comparison table."""
    pct = int(round(confidence * 100))
    lines = [f"{'metric':<26} {baseline:>14} {alternative:>14} {'difference [' + str(pct) + '% CI]':>40} "
             f"{'ratio [' + str(pct) + '% CI]':>26}"]
    for _, r in table.iterrows():
        def num(x: float) -> str:
            if not np.isfinite(x):
                return "n/a"
            ax = abs(x)
            return f"{x:.4g}" if ax < 1e6 else f"{x:.4e}"
        diff = f"{num(r['diff'])} [{num(r['diff_low'])}, {num(r['diff_high'])}]"
        if np.isfinite(r["ratio"]):
            lo, hi = r["ratio_low"], r["ratio_high"]
            ratio = f"{r['ratio']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "")
        else:
            ratio = "n/a"
        lines.append(f"{r['metric']:<26} {num(r['mean_' + baseline]):>14} {num(r['mean_' + alternative]):>14} "
                     f"{diff:>40} {ratio:>26}")
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, files: dict[str, Callable[[Path], None]]) -> Path:
    """Write result files atomically: into a temporary directory, then renamed into place.

    ``files`` maps a file name to a function writing it to the given path. If
    any writer fails, nothing appears at ``out_dir``.
    """
    out = Path(out_dir)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        for name, writer in files.items():
            writer(tmp / name)
        if out.exists():
            # keep files of earlier runs that we are not replacing
            for p in tmp.iterdir():
                os.replace(p, out / p.name)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def json_writer(obj: Any) -> Callable[[Path], None]:
    def w(p: Path) -> None:
        p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return w


def csv_writer(df: pd.DataFrame) -> Callable[[Path], None]:
    def w(p: Path) -> None:
        df.to_csv(p, index=False)
    return w


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Interval):
        return o.to_dict()
    raise TypeError(type(o).__name__)


def steady_state(result: Any, bins: int = 400, n_batches: int = 20, confidence: float = 0.95) -> dict[str, Any]:
    """Steady-state analysis of one long run (a ``RunResult`` with raw metrics).

    Two output series of the run are analysed: the fault rate per time bin
    (faults per simulated ms) and the fault latency in fault order. Each gets
    MSER-5 warm-up truncation (White 1997) and then a non-overlapping
    batch-means CI of its steady-state mean on what is kept. A warning is
    raised by MSER-5 when the truncation point passes half the run (no steady
    state reached: run longer).
    """
    from .stats import steady_state_ci

    raw = result.raw
    edges, per_bin, _ = raw.faults_over_time(bins)
    width_ms = (edges[1] - edges[0]) / 1e6
    series = {"fault_rate_per_ms": per_bin / width_ms,
              "fault_latency_ns": np.frombuffer(raw.fault_latency, dtype=np.float64)}
    out: dict[str, Any] = {}
    for name, x in series.items():
        if len(x) < 10 * n_batches:
            out[name] = {"error": f"only {len(x)} observations: too few for {n_batches} batches; run longer"}
            continue
        trunc, bm = steady_state_ci(x, n_batches=n_batches, confidence=confidence)
        out[name] = {"warmup_truncation": trunc.truncation, "observations": int(len(x)),
                     "mser5_warning": trunc.message if trunc.warning else "",
                     "mean": bm.interval.estimate, "ci_low": bm.interval.low, "ci_high": bm.interval.high,
                     "batches": bm.n_batches, "batch_size": bm.batch_size,
                     "lag1_autocorrelation": bm.lag1_autocorrelation}
    return out
