"""The sweep engine: run (scenario, policy, seed, replication) tasks, serially or on Dask.

A *task* is one replication of one policy on one scenario *point*. Its result
depends on nothing but the task, so it is stored under a key hashing
(model version, the fully resolved scenario and host profile, the contents of
the recordings and traces it reads, policy, seed, replication): a killed sweep resumes without recomputing what is stored, and
results are identical whatever the number of workers or the order in which
they finish (results are always returned in task order).

Where tasks run is a backend (:mod:`desim.studies.cluster`): ``serial`` in this
process, ``local`` (a Dask ``LocalCluster`` of ``workers`` processes), a
scheduler address ``tcp://host:port``, or an open backend object shared by
several calls (a capacity search or a sequential sweep runs many rounds on one
cluster). Results are written to the store (:mod:`desim.studies.store`, one
SQLite database) as soon as each task finishes, one transaction each, so a
crash never leaves a half-written or duplicated result.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import model_fingerprint
from .errors import DesimInterrupted, DesimRunError
from .scenario import Scenario, validate_scenario
from .studies.cluster import BackendSpec, open_backend
from .studies.inputdigest import input_digests
from .studies.progress import Progress
from .studies.store import ResultStore

__all__ = ["Task", "run_task", "run_batch", "execute", "grid", "ResultStore"]


@functools.lru_cache(maxsize=4096)
def _scenario_digest(scenario_json: str) -> str:
    """Hash of the fully resolved scenario and host profile (validated once per distinct scenario)."""
    sc = validate_scenario(json.loads(scenario_json), "task")
    blob = json.dumps({"scenario": sc.model_dump(), "profile": sc.host_profile().model_dump()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


_DIGEST_BY_ID: dict[int, tuple[dict, str]] = {}


def _digest_of(scenario: dict[str, Any]) -> str:
    """:func:`_scenario_digest`, remembered per scenario dict object (a sweep point's tasks share one)."""
    hit = _DIGEST_BY_ID.get(id(scenario))
    if hit is not None and hit[0] is scenario:
        return hit[1]
    digest = _scenario_digest(json.dumps(scenario, sort_keys=True, default=str))
    if len(_DIGEST_BY_ID) >= 4096:
        _DIGEST_BY_ID.clear()
    _DIGEST_BY_ID[id(scenario)] = (scenario, digest)  # holding the dict keeps its id from being reused
    return digest


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
        digest = _digest_of(self.scenario)
        fields = {"model": model_fingerprint(), "scenario": digest, "policy": self.policy,
                  "seed": self.seed, "replication": self.replication, "tag": self.tag,
                  "samples": self.samples is not None}
        inputs = input_digests(self.scenario)
        if inputs:  # the contents of the recordings and traces it reads (a file changed in place is a new task)
            fields["inputs"] = inputs
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def expect(self) -> dict[str, Any]:
        """What a stored result of this task must say about itself."""
        return {"policy": self.policy, "seed": self.seed, "replication": self.replication}


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


def run_batch(tasks: list[Task]) -> list[dict[str, Any]]:
    """Run a batch of tasks in one worker call (what the Dask backends submit)."""
    return [run_task(t) for t in tasks]


@contextlib.contextmanager
def collector_settled():
    """Run a series of tasks with the objects that outlive them (modules, compiled code, profiles read once:
    about 130,000 objects in an experiment) out of Python's full garbage collections: collected once, then
    ``gc.freeze``; given back (``gc.unfreeze``) after, also on an error or Ctrl-C, so nothing built before is kept
    from the collector for longer. The tasks' own garbage is collected as usual (no threshold changes; an earlier
    try that froze at every run and raised the young threshold to 50,000 made peak RSS 9x). A speed setting only:
    the model never depends on when garbage is collected. Used by the serial backend (a series of tasks in this process), not
    for a Dask worker's batches (about 2 s each: a collection at each would cost more than it saves). A nested use
    does nothing."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _plain(v: Any) -> Any:
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _backend_cm(backend: Any, workers: int):
    if isinstance(backend, BackendSpec):
        return open_backend(backend)
    if not isinstance(backend, str):
        return contextlib.nullcontext(backend)  # an open backend: the caller closes it
    if backend == "serial" or (backend == "local" and workers <= 1):
        return open_backend(BackendSpec())
    if backend == "local":
        return open_backend(BackendSpec(workers=workers))
    if backend.startswith(("tcp://", "tls://")) or "://" in backend:
        return open_backend(BackendSpec(scheduler=backend))
    from .errors import DesimInputError

    raise DesimInputError(f"backend '{backend}': use 'serial', 'local' or a scheduler address tcp://HOST:PORT")


def execute(tasks: list[Task], backend: Any = "serial", workers: int = 1, store: ResultStore | str | Path | None = None,
            progress: bool | str | None = None, on_result: Callable[[int, dict], None] | None = None,
            order: list[int] | None = None, desc: str = "replications") -> list[dict]:
    """Run ``tasks`` and return their results in task order.

    ``backend``: ``"serial"``, ``"local"`` (with ``workers``), a scheduler
    address, a :class:`~desim.studies.cluster.BackendSpec`, or an open backend from :func:`desim.studies.cluster.open_backend`.
    ``order`` is the submission order (e.g. the most expensive tasks first); it
    changes only the wall time, never the results. ``progress``: see
    :class:`desim.studies.progress.Progress`.
    """
    if store is not None and not isinstance(store, ResultStore):
        store = ResultStore(store)
    results: list[dict | None] = [None] * len(tasks)
    keys = [t.key() for t in tasks] if store is not None else [None] * len(tasks)
    seq = list(order) if order is not None else list(range(len(tasks)))
    found = store.get_many(keys, [t.expect() for t in tasks]) if store is not None else {}  # type: ignore[arg-type]
    todo = []
    for i in seq:
        if keys[i] in found:
            results[i] = found[keys[i]]
        else:
            todo.append(i)
    if not todo:
        return results  # type: ignore[return-value]
    bar = Progress([t.point for t in tasks], desc, progress)
    for i in seq:
        if results[i] is not None:
            bar.update(tasks[i].point, fresh=False)

    def finish(i: int, r: dict) -> None:
        results[i] = r
        if store is not None:
            store.put(keys[i], r)  # type: ignore[arg-type]
        if on_result is not None:
            on_result(i, r)
        bar.update(tasks[i].point)

    try:
        with _backend_cm(backend, workers) as be:
            be.run(tasks, todo, finish)
    except DesimRunError as e:
        raise DesimRunError(f"{e}; {_what_finished(results, store)}") from None
    except KeyboardInterrupt:
        raise DesimInterrupted(_what_finished(results, store)) from None
    finally:
        bar.close()
    return results  # type: ignore[return-value]


def _what_finished(results: list, store: ResultStore | None) -> str:
    done = sum(r is not None for r in results)
    if store is None:
        return f"{done} of {len(results)} tasks had finished (no --store: not kept)"
    return (f"{done} of {len(results)} tasks finished and are in the store {store.path}; "
            f"run the same command again to compute the rest")


def grid(base: Scenario, axes: dict[str, Iterable[Any]]) -> list[tuple[dict[str, Any], Scenario]]:
    """The full factorial grid of dotted-path overrides: ``[(overrides, scenario), ...]``."""
    import itertools

    names = list(axes)
    points = []
    for values in itertools.product(*(list(axes[n]) for n in names)):
        ov = dict(zip(names, values))
        points.append((ov, base.with_overrides(ov)))
    return points
