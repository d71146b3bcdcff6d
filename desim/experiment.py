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

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from .errors import DesimInputError
from .scenario import Scenario, load_scenario
from .stats import paired_diff_ci, precision_reached, ratio_ci, t_ci
from .sweep import ResultStore, Task, execute
from . import outputs as _outputs

# writing results (desim.outputs), part of the experiment API: ex.write_outputs(out, {"runs.csv": ex.csv_writer(df)})
write_outputs = _outputs.write_outputs
json_writer = _outputs.json_writer
csv_writer = _outputs.csv_writer

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
              progress: bool | None = None, first_replication: int = 0,
              samples: Callable[[Any], dict[str, Any]] | None = None) -> pd.DataFrame:
    """Run every policy for replications ``first_replication ..`` and return a tidy table.

    One row per (policy, replication), one column per metric. With
    ``samples`` (a :class:`desim.sweep.Task` hook such as :func:`detail_samples`)
    ``table.attrs["samples"]`` maps (policy, replication) to what it kept.
    """
    policies = list(policies)
    data = scenario.model_dump()
    tag = getattr(samples, "tag", "detail-1") if samples is not None else ""  # names what the hook keeps
    tasks = [Task(data, p, seed, r, samples=samples, tag=tag)
             for r in range(first_replication, first_replication + replications) for p in policies]
    results = execute(tasks, backend=backend, workers=workers,
                      store=ResultStore(store) if store is not None else None, progress=progress)
    table = runs_table(results)
    if samples is not None:
        table.attrs["samples"] = {(r["policy"], r["replication"]): r.get("samples", {}) for r in results}
    return table


def runs_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: ``scenario``, ``policy``, ``seed``, ``replication``, then the metrics.

    A lock role that never took ``mmu_lock`` in a run (e.g. ``teardown`` under
    the targeted zap) has no statistics there: its ``lock_*`` columns are 0, not
    missing, and a metric that is an integer in every run stays an integer
    column (pandas would make it float to hold a NaN).
    """
    rows = []
    ints: set[str] = set()
    floats: set[str] = set()
    for r in results:
        row = {"scenario": r["scenario"], "policy": r["policy"], "seed": r["seed"],
               "replication": r["replication"]}
        for k, v in r["metrics"].items():
            (ints if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else floats).add(k)
        row.update(r["metrics"])
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in df.columns:
        if col.startswith("lock_") and df[col].isna().any():
            df[col] = df[col].fillna(0)
        if col in ints and col not in floats and not df[col].isna().any():
            df[col] = df[col].astype("int64")
    return df


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


PRECISION_METRICS = ["faults", "completion_ns"]  # what --precision watches unless told otherwise
LOOK_AHEAD = 5  # Hoad, Robinson & Davies (2010): kLimit


def replicate_to_precision(scenario: Scenario, metrics: list[str], target_rel_half_width: float = 0.02,
                           baseline: str = "fast", alternative: str = "targeted", seed: int = 1,
                           min_reps: int = 3, max_reps: int = 100, batch: int = 2, backend: str = "serial",
                           workers: int = 1, store: str | Path | None = None, confidence: float = 0.95,
                           progress: Callable[[int, Any], None] | None = None,
                           samples: Callable[[Any], dict[str, Any]] | None = None
                           ) -> tuple[pd.DataFrame, str]:
    """Add replications in batches until every metric's paired ratio CI is within the target.

    Returns (runs, stopped_by) with stopped_by "precision" or "max_reps". The
    stopping rule is :func:`desim.stats.precision_reached` (Hoad, Robinson &
    Davies 2010, with a look-ahead of :data:`LOOK_AHEAD` replications),
    applied to the per-replication ratio; :func:`precision_stop_reason` says in
    words why it stopped. ``progress(n, decision)`` gets the
    :class:`desim.stats.StopDecision` after each batch.
    """
    runs = pd.DataFrame()
    kept: dict[Any, Any] = {}
    done = 0
    while True:
        k = min(batch, max_reps - done)
        new = replicate(scenario, [baseline, alternative], k, seed, backend, workers, store, progress=False,
                        first_replication=done, samples=samples)
        kept.update(new.attrs.pop("samples", {}))
        runs = pd.concat([runs, new], ignore_index=True)
        done += k
        missing = [m for m in metrics if m not in runs.columns]
        if missing:
            known = ", ".join(c for c in runs.columns if c not in ("scenario", "policy", "seed", "replication"))
            raise DesimInputError(f"--precision-metrics {' '.join(missing)}: no such metric (known: {known})")
        pairs = {m: _paired(runs, m, baseline, alternative) for m in metrics}
        values = {m: list(zip(a, b)) for m, (a, b) in pairs.items()}
        if done >= min_reps:
            dec = precision_reached(values, target_rel_half_width, confidence, min_reps=min_reps,
                                    look_ahead=LOOK_AHEAD, compare="ratio", ratio_method="delta")
            if progress is not None:
                progress(done, dec)
            if dec.stop:
                runs = runs[runs.replication < dec.n].reset_index(drop=True)
                if samples is not None:
                    runs.attrs["samples"] = {k: v for k, v in kept.items() if k[1] < dec.n}
                return runs, "precision"
        if done >= max_reps:
            if samples is not None:
                runs.attrs["samples"] = kept
            return runs, "max_reps"


def precision_stop_reason(runs: pd.DataFrame, metrics: list[str], target_rel_half_width: float,
                          stopped_by: str, baseline: str = "fast", alternative: str = "targeted",
                          confidence: float = 0.95, min_reps: int = 3) -> str:
    """Why :func:`replicate_to_precision` stopped, in one sentence a user can act on."""
    pairs = {m: _paired(runs, m, baseline, alternative) for m in metrics}
    dec = precision_reached({m: list(zip(a, b)) for m, (a, b) in pairs.items()}, target_rel_half_width,
                            confidence, min_reps=min_reps, look_ahead=LOOK_AHEAD, compare="ratio",
                            ratio_method="delta")
    n = int(runs.replication.nunique())
    watched = ", ".join(metrics)
    rhw = dec.rel_half_widths
    worst = max(rhw, key=lambda m: rhw[m]) if rhw else None
    worst_txt = f"{worst} +-{rhw[worst]:.2%}" if worst is not None else "no CI yet"
    if stopped_by == "precision":
        return (f"stopped after {n} replications: the {alternative}/{baseline} ratio CI of every watched "
                f"metric ({watched}) was within +-{target_rel_half_width:.2%} at {dec.n_solution} and stayed "
                f"there for {n - (dec.n_solution or n)} more (look-ahead, Hoad, Robinson & Davies 2010: an "
                f"early lucky CI does not stop the run); now worst {worst_txt}")
    if dec.n_solution is not None:
        return (f"stopped at the maximum of {n} replications (-n): the target +-{target_rel_half_width:.2%} was "
                f"reached at {dec.n_solution}, but the {LOOK_AHEAD}-replication look-ahead that confirms it "
                f"had not finished; raise -n to confirm")
    return (f"stopped at the maximum of {n} replications (-n) before the target: worst {worst_txt} > "
            f"+-{target_rel_half_width:.2%} (watched: {watched}); raise -n or relax --precision")


def format_table(table: pd.DataFrame, baseline: str = "fast", alternative: str = "targeted",
                 confidence: float = 0.95) -> str:
    """A human-readable comparison table (see :func:`desim.report.format_table`)."""
    from .report import format_table as fmt_table

    return fmt_table(table, baseline, alternative, confidence)


def comparison_long(table: pd.DataFrame, baseline: str = "fast", alternative: str = "targeted",
                    confidence: float = 0.95) -> pd.DataFrame:
    """The comparison as a long (tidy) table: one row per metric and statistic.

    Columns: ``metric``, ``unit`` (``ns`` or ``count``), ``statistic``
    (``mean`` of one policy, ``difference`` = alternative - baseline, paired,
    or ``ratio`` = alternative / baseline, ratio of means), ``policy`` (the
    policy, or ``targeted-fast`` / ``targeted/fast``), ``estimate``, ``ci_low``,
    ``ci_high``, ``confidence`` and ``n`` (paired replications). A CI that
    cannot be computed (n = 1, a baseline of 0) is empty.
    """
    from .report import metric_unit

    rows = []
    for _, r in table.iterrows():
        base = {"metric": r["metric"], "unit": metric_unit(r["metric"])}
        for pol in (baseline, alternative):
            m, hw = r[f"mean_{pol}"], r[f"hw_{pol}"]
            rows.append({**base, "statistic": "mean", "policy": pol, "estimate": m, "ci_low": m - hw,
                         "ci_high": m + hw})
        rows.append({**base, "statistic": "difference", "policy": f"{alternative}-{baseline}",
                     "estimate": r["diff"], "ci_low": r["diff_low"], "ci_high": r["diff_high"]})
        rows.append({**base, "unit": "ratio", "statistic": "ratio", "policy": f"{alternative}/{baseline}",
                     "estimate": r["ratio"], "ci_low": r["ratio_low"], "ci_high": r["ratio_high"]})
        for row in rows[-4:]:
            row.update(confidence=confidence, n=int(r["n"]))
    cols = ["metric", "unit", "statistic", "policy", "estimate", "ci_low", "ci_high", "confidence", "n"]
    return pd.DataFrame(rows, columns=cols)


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
