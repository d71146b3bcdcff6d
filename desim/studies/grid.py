"""Points, the grid runner and per-phase statistics: every (point, policy, replication) of a study.

A study builds a list of :class:`Point` (labels such as ``{"vcpus": 8, "mmu": "tdp"}``
plus a validated :class:`~desim.scenario.Scenario`), runs them with
:func:`run_grid` and gets back the tidy run table (one row per point x policy x
replication: the labels, ``policy``, ``seed``, ``replication`` and every metric).

The grid runner is :func:`desim.sweep.execute` fed with every task of the study
at once, largest points first, with two per-task hooks evaluated in the worker:
``extra`` (RunResult -> more scalar metrics, e.g. statistics of one phase) and
``samples`` (RunResult -> arrays such as latencies for CDF plots, kept for the
replications asked for). Each task is still exactly
``desim.vm.run_scenario(scenario, policy, seed, replication)``: replication
``r`` of ``seed`` draws the same random streams under every policy (common
random numbers), and results do not depend on the number of workers or on the
order in which tasks finish.

With a store every finished run is kept (keyed by the model fingerprint, the
resolved scenario and profile, policy, seed, replication, and a tag naming the
extras), so a killed study resumes and a changed model recomputes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from ..scenario import Scenario, validate_scenario
from .cluster import BackendSpec, open_backend

POLICIES = ("fast", "targeted")


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


def run_grid(points: list[Point], policies: Iterable[str] = POLICIES, replications: int = 10, seed: int = 1,
             workers: int = 1, extra: Callable[[Any], dict[str, float]] | None = None,
             samples: Callable[[Any], dict[str, np.ndarray]] | None = None, sample_replications: Iterable[int] = (0,),
             progress: bool | None = None, desc: str = "runs", store: str | Path | None = None,
             store_tag: str = "", backend: Any = None) -> GridResult:
    """Run every (point, policy, replication) on the sweep engine; return the tidy run table.

    One :func:`desim.sweep.execute` call for the whole grid, the most expensive
    points first. ``backend`` is a :class:`~desim.studies.cluster.BackendSpec`
    (or an open backend); without it, ``workers`` > 1 means a local Dask
    cluster. ``extra`` and ``samples`` run in the worker on the full RunResult
    (see :class:`desim.sweep.Task`); samples are kept for ``sample_replications``
    only. With ``store`` every finished run is kept there and found again on
    the next call (``store_tag`` names what ``extra``/``samples`` compute).
    Rows come back in (point, policy, replication) order whatever the workers do.
    """
    from ..sweep import ResultStore, Task, execute

    policies = list(policies)
    keep = set(sample_replications)
    tasks = [Task(p.scenario.model_dump(), pol, seed, r, point=i, extra=extra,
                  samples=samples if r in keep else None, tag=store_tag)
             for i, p in enumerate(points) for pol in policies for r in range(replications)]
    order = sorted(range(len(tasks)), key=lambda k: -points[tasks[k].point].cost)
    spec = backend if backend is not None else BackendSpec(workers=workers)
    t0 = time.perf_counter()
    st = ResultStore(store) if store is not None else None
    if isinstance(spec, BackendSpec):
        with open_backend(spec) as be:
            results = execute(tasks, backend=be, store=st, progress=progress, order=order, desc=desc)
    else:
        results = execute(tasks, backend=spec, store=st, progress=progress, order=order, desc=desc)
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
