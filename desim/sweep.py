"""The sweep engine: run (scenario, policy, seed, replication) tasks, serially or on Dask.

A *task* is one replication of one policy on one scenario *point*. Its result
depends on nothing but the task, so it is stored under a key hashing
(model version, the fully resolved scenario and host profile, policy, seed,
replication): a killed sweep resumes without recomputing what is stored, and
results are identical whatever the number of workers or the order in which
they finish (results are always returned in task order).

Backends:

* ``serial`` — in this process (the default for small jobs; no start-up cost);
* ``local`` — a Dask ``LocalCluster`` with ``workers`` processes (embedded,
  no set-up);
* ``tcp://host:port`` — an existing Dask scheduler (e.g. one started by
  ``dask-jobqueue`` on a batch cluster).

Results are written to the store as soon as each task finishes (one JSON file
each, written to a temporary name and renamed, so a crash never leaves a
half-written result).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import model_fingerprint
from .errors import DesimInputError
from .scenario import Scenario, validate_scenario


@dataclass(frozen=True)
class Task:
    """One replication of one policy on one scenario point.

    ``extra`` and ``samples`` are optional hooks run in the worker on the full
    ``RunResult``: ``extra(res) -> {name: number}`` adds metrics, ``samples(res)
    -> {name: array}`` keeps raw samples (e.g. latencies for a CDF). They must be
    picklable (module-level functions, or cloudpickle-able for Dask); ``tag``
    names what they compute and is part of the key, so change it when they change.
    """

    scenario: dict[str, Any]  # Scenario.model_dump(): plain data, cheap to ship to workers
    policy: str
    seed: int
    replication: int
    point: int = 0  # index of the sweep point (for bookkeeping only, not part of the key)
    extra: Callable[[Any], dict[str, float]] | None = field(default=None, compare=False)
    samples: Callable[[Any], dict[str, Any]] | None = field(default=None, compare=False)
    tag: str = ""

    def key(self) -> str:
        sc = validate_scenario(self.scenario, "task")
        profile = sc.host_profile().model_dump()
        blob = json.dumps({"model": model_fingerprint(), "scenario": sc.model_dump(), "profile": profile,
                           "policy": self.policy, "seed": self.seed, "replication": self.replication,
                           "tag": self.tag, "samples": self.samples is not None},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def run_task(task: Task) -> dict[str, Any]:
    """Run one task (in whatever process) and return its plain-data result."""
    from .vm import run_scenario

    sc = validate_scenario(task.scenario, "task")
    t0 = time.perf_counter()
    res = run_scenario(sc, task.policy, task.seed, task.replication)
    out = res.to_dict()
    if task.extra is not None:
        out["metrics"].update({k: _plain(v) for k, v in task.extra(res).items()})
    if task.samples is not None:
        out["samples"] = {k: np.asarray(v, dtype=float).tolist() for k, v in task.samples(res).items()}
    out["point"] = task.point
    out["wall_s"] = time.perf_counter() - t0
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


class ResultStore:
    """A directory of finished task results, one JSON file per task key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged entry is recomputed

    def put(self, key: str, result: dict[str, Any]) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f)  # insertion order: the same columns whether fresh or stored
        os.replace(tmp, p)


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, disable=disable, leave=False)


def execute(tasks: list[Task], backend: str = "serial", workers: int = 1, store: ResultStore | None = None,
            progress: bool | None = None, on_result: Callable[[int, dict], None] | None = None,
            order: list[int] | None = None, desc: str = "replications") -> list[dict]:
    """Run ``tasks`` and return their results in task order.

    ``order`` is the submission order (e.g. the most expensive tasks first); it
    changes only the wall time, never the results.
    """
    results: list[dict | None] = [None] * len(tasks)
    keys = [t.key() for t in tasks] if store is not None else [None] * len(tasks)
    todo = []
    for i in (order if order is not None else range(len(tasks))):
        cached = store.get(keys[i]) if store is not None else None
        if cached is not None:
            results[i] = cached
        else:
            todo.append(i)
    bar = _progress(len(tasks), desc, progress)
    bar.update(len(tasks) - len(todo))

    def finish(i: int, r: dict) -> None:
        results[i] = r
        if store is not None:
            store.put(keys[i], r)
        if on_result is not None:
            on_result(i, r)
        bar.update(1)

    try:
        if backend == "serial" or (backend == "local" and workers <= 1) or not todo:
            for i in todo:
                finish(i, run_task(tasks[i]))
        else:
            _execute_dask(tasks, todo, backend, workers, finish)
    finally:
        bar.close()
    return results  # type: ignore[return-value]


def _execute_dask(tasks: list[Task], todo: list[int], backend: str, workers: int,
                  finish: Callable[[int, dict], None]) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    if backend == "local":
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=40)  # any free port: runs may overlap
        client = Client(cluster)
    elif backend.startswith(("tcp://", "tls://", "inproc://")):
        cluster = None
        try:
            client = Client(backend, timeout="10s")
        except OSError as e:
            raise DesimInputError(f"--scheduler {backend}: cannot connect ({e})") from None
    else:
        raise DesimInputError(f"backend '{backend}': use 'serial', 'local' or a scheduler address tcp://HOST:PORT")
    try:
        futs = {client.submit(run_task, tasks[i], pure=False): i for i in todo}
        for fut in as_completed(futs):
            finish(futs[fut], fut.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def grid(base: Scenario, axes: dict[str, Iterable[Any]]) -> list[tuple[dict[str, Any], Scenario]]:
    """The full factorial grid of dotted-path overrides: ``[(overrides, scenario), ...]``."""
    import itertools

    names = list(axes)
    points = []
    for values in itertools.product(*(list(axes[n]) for n in names)):
        ov = dict(zip(names, values))
        points.append((ov, base.with_overrides(ov)))
    return points
