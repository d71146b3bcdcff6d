"""Running a sweep file: every point x policy x replication, into the store, then tidy tables.

Fixed replications: one :func:`desim.sweep.execute` call for all tasks, the
biggest points first. Sequential (``precision``): rounds; each round gives
every undecided point ``batch`` more replications (all points' tasks in one
call, so a cluster stays busy), and a point is done when the stopping rule
(:func:`desim.stats.precision_reached`, paired ratio CIs with two policies)
says so or it reached ``max_replications``. Which replications a point keeps
depends only on its own results, so the tables are the same whatever the
backend, the worker count or an interruption in between.

Every task is recorded in the store's ``sweep_tasks`` table under the sweep's
name, so ``desim results STORE`` rebuilds the tables (and re-running the same
sweep computes only what is missing).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..sweep import ResultStore, Task, execute
from .cluster import BackendSpec, open_backend
from .sweepfile import SweepSpec


@dataclass
class SweepResult:
    runs: pd.DataFrame                          # one row per task: factors, policy, seed, replication, metrics
    stopped: dict[int, str] = field(default_factory=dict)  # point -> why it stopped (sequential)
    wall_s: float = 0.0


def _cost(spec: SweepSpec, i: int) -> float:
    sc = spec.points[i].scenario
    return sc.vm.vcpus * sum(s.size for s in sc.vm.memslots)


def tasks_for(spec: SweepSpec, point: int, reps: range) -> list[Task]:
    data = spec.points[point].scenario.model_dump()
    return [Task(data, pol, spec.seed, r, point=point) for r in reps for pol in spec.policies]


def run_sweep(spec: SweepSpec, backend: BackendSpec | None = None, store: ResultStore | None = None,
              progress: bool | str | None = None) -> SweepResult:
    """Run ``spec`` (see the module docstring) and return its tidy run table."""
    t0 = time.perf_counter()
    backend = backend or BackendSpec()
    with open_backend(backend) as be:
        if spec.precision is None:
            reps = {i: spec.replications for i in range(len(spec.points))}
            tasks = [t for i in reps for t in tasks_for(spec, i, range(reps[i]))]
            results = _run(spec, tasks, be, store, progress)
            stopped: dict[int, str] = {}
        else:
            results, tasks, stopped = _sequential(spec, be, store, progress)
    runs = tidy(spec, tasks, results)
    return SweepResult(runs, stopped, time.perf_counter() - t0)


def _run(spec: SweepSpec, tasks: list[Task], be: Any, store: ResultStore | None, progress: Any) -> list[dict]:
    if store is not None:
        store.record_sweep(spec.name, [(t.point, spec.points[t.point].labels, t.policy, t.seed, t.replication,
                                        t.key()) for t in tasks])
    order = sorted(range(len(tasks)), key=lambda k: -_cost(spec, tasks[k].point))
    return execute(tasks, backend=be, store=store, progress=progress, order=order, desc=f"sweep {spec.name}")


def _sequential(spec: SweepSpec, be: Any, store: ResultStore | None, progress: Any):
    from ..stats import precision_reached

    n = {i: 0 for i in range(len(spec.points))}
    want = {i: spec.min_replications for i in n}
    by_point: dict[int, list[tuple[Task, dict]]] = {i: [] for i in n}
    stopped: dict[int, str] = {}
    while True:
        tasks = [t for i in n if i not in stopped for t in tasks_for(spec, i, range(n[i], want[i]))]
        if tasks:
            for t, r in zip(tasks, _run(spec, tasks, be, store, progress)):
                by_point[t.point].append((t, r))
        for i in n:
            if i in stopped:
                continue
            n[i] = want[i]
            values = _precision_values(spec, by_point[i])
            dec = precision_reached(values, spec.precision, spec.confidence, min_reps=spec.min_replications,
                                    compare="ratio" if len(spec.policies) == 2 else None, ratio_method="delta")
            if dec.stop:
                stopped[i] = f"precision reached after {dec.n} replications"
                by_point[i] = [(t, r) for t, r in by_point[i] if t.replication < dec.n]
            elif n[i] >= spec.max_replications:
                stopped[i] = f"max_replications ({spec.max_replications}) reached before the precision"
            else:
                want[i] = min(spec.max_replications, n[i] + spec.batch)
        if len(stopped) == len(n):
            break
    pairs = [tr for i in sorted(by_point) for tr in sorted(by_point[i], key=lambda x: (x[0].replication,
                                                                                        spec.policies.index(x[0].policy)))]
    return [r for _, r in pairs], [t for t, _ in pairs], stopped


def _precision_values(spec: SweepSpec, done: list[tuple[Task, dict]]) -> dict[str, list]:
    by_rep: dict[int, dict[str, dict]] = {}
    for t, r in done:
        by_rep.setdefault(t.replication, {})[t.policy] = r["metrics"]
    reps = sorted(by_rep)
    out = {}
    for m in spec.precision_metrics:
        if len(spec.policies) == 2:
            a, b = spec.policies
            out[m] = [(by_rep[r][a].get(m, float("nan")), by_rep[r][b].get(m, float("nan"))) for r in reps]
        else:
            out[m] = [by_rep[r][spec.policies[0]].get(m, float("nan")) for r in reps]
    return out


def tidy(spec: SweepSpec, tasks: list[Task], results: list[dict]) -> pd.DataFrame:
    """One row per task: point, every factor, policy, seed, replication, then the sweep's metrics."""
    rows = []
    for t, r in zip(tasks, results):
        row = {"point": t.point, **spec.points[t.point].labels, "policy": t.policy, "seed": t.seed,
               "replication": t.replication}
        row.update({m: r["metrics"].get(m) for m in spec.metrics})
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values(["point", "policy", "replication"], kind="stable").reset_index(drop=True)
