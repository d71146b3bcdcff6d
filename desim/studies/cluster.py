"""Where tasks run: in this process, on an embedded Dask cluster, an existing one, or a batch system.

* ``serial`` — in this process, one task after another (tiny sweeps: no start-up cost);
* ``--workers N`` — an embedded Dask ``LocalCluster`` of N single-threaded worker processes;
* ``--scheduler tcp://HOST:PORT`` — an existing Dask cluster (``dask scheduler`` and
  ``dask worker`` processes with desim installed);
* ``--jobqueue slurm|pbs|sge|lsf`` — N batch jobs started through ``dask-jobqueue``
  (``--jobqueue-opt key=value`` is passed to its ``SLURMCluster`` etc.: ``queue``,
  ``account``, ``walltime``, ``memory``, ``cores``, ...).

Dask is an optional extra (``pip install 'desim[cluster]'``); without it, every
backend but ``serial`` stops with one line saying what to install.

Tasks travel in *batches* sized to take about ``batch_seconds`` each (the first
batches hold one task; later sizes follow the measured task time), so a sweep of
millisecond tasks does not drown the scheduler, and at most about two batches
per worker are in flight, so the last ones still spread over every worker.
Batches get Dask ``retries`` (a task that raised is re-run elsewhere); a worker
lost mid-batch (killed, OOM) makes the scheduler run its batch again on another
worker: it costs only time, never a result, since each task is deterministic.

A cluster with no worker for ``no_worker_timeout`` seconds (every worker
killed, jobs never started) stops the run with one line; what finished is in
the store. Ctrl-C stops it cleanly: the embedded cluster's processes ignore
SIGINT (the driver shuts them down), and Dask's shutdown chatter is silenced.
(They inherit "ignore" from the driver, which therefore ignores SIGINT itself
for the second or two the cluster takes to start: a Ctrl-C then is lost.)
"""
from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from ..errors import DesimInputError, DesimRunError

JOBQUEUES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
CLUSTER_EXTRA = "pip install 'desim[cluster]'"


@dataclass
class BackendSpec:
    """What the user asked for (``--workers``, ``--scheduler``, ``--jobqueue`` ...)."""

    workers: int = 1
    scheduler: str | None = None
    jobqueue: str | None = None
    jobqueue_opts: dict[str, Any] = field(default_factory=dict)
    no_worker_timeout: float | None = None  # default: 60 s, or 1 h for batch jobs waiting in a queue
    batch_seconds: float = 2.0
    retries: int = 2
    announce: Callable[[str], None] | None = None  # where the dashboard address goes (default stderr)

    @property
    def kind(self) -> str:
        if self.jobqueue:
            return "jobqueue"
        if self.scheduler:
            return "scheduler"
        return "local" if self.workers > 1 else "serial"

    def check(self) -> None:
        """Refuse a bad backend before any work (one line each)."""
        if sum(bool(x) for x in (self.scheduler, self.jobqueue)) > 1:
            raise DesimInputError("--scheduler and --jobqueue: give one of them")
        if self.workers < 1:
            raise DesimInputError(f"--workers {self.workers}: must be >= 1")
        if self.scheduler:
            check_scheduler_address(self.scheduler)
        if self.jobqueue and self.jobqueue not in JOBQUEUES:
            raise DesimInputError(f"--jobqueue {self.jobqueue}: unknown (choose one of: {', '.join(JOBQUEUES)})")
        if self.kind != "serial":
            need_dask(self.kind)
        if self.jobqueue:
            need_jobqueue()
        if self.no_worker_timeout is not None and not self.no_worker_timeout > 0:
            raise DesimInputError(f"--no-worker-timeout {self.no_worker_timeout}: must be > 0 seconds")

    def timeout(self) -> float:
        if self.no_worker_timeout is not None:
            return self.no_worker_timeout
        return 3600.0 if self.kind == "jobqueue" else 60.0


def check_scheduler_address(addr: str) -> None:
    u = urlparse(addr)
    try:
        port = u.port
    except ValueError:
        port = None
    if u.scheme not in ("tcp", "tls") or not u.hostname or port is None:
        raise DesimInputError(f"--scheduler {addr!r}: expected a Dask scheduler address tcp://HOST:PORT "
                              f"(e.g. tcp://127.0.0.1:8786)")


def need_dask(what: str) -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise DesimInputError(f"the {what} backend needs Dask, which is not installed: {CLUSTER_EXTRA}") from None


def need_jobqueue():
    try:
        import dask_jobqueue
    except ImportError:
        raise DesimInputError(f"--jobqueue needs dask-jobqueue, which is not installed: {CLUSTER_EXTRA}") from None
    return dask_jobqueue


def parse_opts(items: list[str] | None) -> dict[str, Any]:
    """``--jobqueue-opt walltime=01:00:00 --jobqueue-opt cores=4`` -> {walltime: "01:00:00", cores: 4}."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise DesimInputError(f"--jobqueue-opt {item!r}: expected KEY=VALUE, e.g. --jobqueue-opt queue=normal")
        k, v = (s.strip() for s in item.split("=", 1))
        try:
            out[k] = tomllib.loads(f"x = {v}")["x"]
        except tomllib.TOMLDecodeError:
            out[k] = v
    return out


# -- backends ----------------------------------------------------------------------------------
Finish = Callable[[int, dict], None]


class SerialBackend:
    kind = "serial"
    workers = 1

    def run(self, tasks: list, todo: list[int], finish: Finish) -> None:
        from ..sweep import collector_settled, run_task

        with collector_settled():
            for i in todo:
                finish(i, run_task(tasks[i]))

    def describe(self) -> str:
        return "serial (this process)"

    def map_calls(self, fn: Callable, argss: list[tuple]) -> list:
        """``[fn(*a) for a in argss]`` (a generic job that is not a sweep task)."""
        return [fn(*a) for a in argss]


class DaskBackend:
    """A Dask client (and the cluster it owns, if any) that runs batches of tasks."""

    def __init__(self, spec: BackendSpec, client: Any, cluster: Any = None) -> None:
        self.spec = spec
        self.client = client
        self.cluster = cluster
        self.kind = spec.kind

    @property
    def workers(self) -> int:
        try:
            return max(1, len(self.client.nthreads()))
        except Exception:  # noqa: BLE001 - a lost scheduler shows up in run()
            return 1

    def describe(self) -> str:
        return f"{self.kind} ({self.client.scheduler.address})"

    def map_calls(self, fn: Callable, argss: list[tuple]) -> list:
        """``[fn(*a) for a in argss]`` on the cluster, results in order (with retries)."""
        futs = [self.client.submit(fn, *a, pure=False, retries=self.spec.retries) for a in argss]
        return [self._result(f) for f in futs]

    def run(self, tasks: list, todo: list[int], finish: Finish) -> None:
        from distributed import wait

        from ..sweep import run_batch

        pending = deque(todo)
        inflight: dict[Any, list[int]] = {}
        per_task_s: float | None = None
        measured = 0
        no_worker_since: float | None = None
        next_check = 0.0
        timeout = self.spec.timeout()
        while pending or inflight:
            nworkers = self.workers
            while pending and len(inflight) < 2 * nworkers:
                if per_task_s is None:
                    size = 1
                else:
                    size = max(1, int(self.spec.batch_seconds / max(per_task_s, 1e-6)))
                    size = min(size, max(1, math.ceil(len(pending) / (2 * nworkers))))
                batch = [pending.popleft() for _ in range(min(size, len(pending)))]
                fut = self.client.submit(run_batch, [tasks[i] for i in batch], pure=False,
                                         retries=self.spec.retries)
                inflight[fut] = batch
            try:
                done, _ = wait(list(inflight), timeout=1.0, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for fut in done:
                batch = inflight.pop(fut)
                results = self._result(fut)
                for i, r in zip(batch, results):
                    finish(i, r)
                    w = float(r.get("wall_s", 0.0))
                    measured += 1
                    per_task_s = w if per_task_s is None else per_task_s + (w - per_task_s) / measured
            now = time.monotonic()
            if now >= next_check:  # is anybody still working for us?
                next_check = now + 1.0
                try:
                    n = len(self.client.nthreads())
                except Exception as e:  # noqa: BLE001
                    raise DesimRunError(f"lost the Dask scheduler ({type(e).__name__}: {e})") from None
                if n:
                    no_worker_since = None
                elif no_worker_since is None:
                    no_worker_since = now
                elif now - no_worker_since > timeout:
                    raise DesimRunError(f"the Dask cluster has had no worker for {timeout:.0f} s: stopped")

    @staticmethod
    def _result(fut: Any) -> list[dict]:
        try:
            return fut.result()
        except Exception as e:
            name = type(e).__name__
            if name == "KilledWorker":
                raise DesimRunError("a batch of tasks killed every worker that ran it (out of memory? "
                                    f"{e})") from None
            if name == "CancelledError":
                raise DesimRunError("the Dask scheduler cancelled the tasks (it restarted or lost its "
                                    "workers)") from None
            raise

    def close(self) -> None:
        with quiet_dask():
            try:
                self.client.close(timeout=5)
            except Exception:  # noqa: BLE001 - closing a dead client: nothing to keep
                pass
            if self.cluster is not None:
                try:
                    self.cluster.close(timeout=10)
                except Exception:  # noqa: BLE001
                    pass


@contextlib.contextmanager
def quiet_dask() -> Iterator[None]:
    """Silence Dask's loggers (shutdown warnings, closed-stream errors) for the duration."""
    names = ("distributed", "tornado", "asyncio", "bokeh")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes started inside inherit SIG_IGN for SIGINT (a Ctrl-C reaches only the driver)."""
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to do
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _announce(spec: BackendSpec, client: Any) -> None:
    say = spec.announce or (lambda m: print(m, file=sys.stderr, flush=True))
    link = getattr(client, "dashboard_link", None)
    try:
        import bokeh  # noqa: F401
        has_bokeh = True
    except ImportError:
        has_bokeh = False
    if spec.kind == "local" and not has_bokeh:
        say(f"desim: Dask scheduler at {client.scheduler.address} (no dashboard: pip install bokeh for one)")
    else:
        say(f"desim: Dask dashboard at {link} (scheduler {client.scheduler.address})")


@contextlib.contextmanager
def open_backend(spec: BackendSpec) -> Iterator[SerialBackend | DaskBackend]:
    """The backend ``spec`` names, started here and closed on exit."""
    spec.check()
    if spec.kind == "serial":
        yield SerialBackend()
        return
    with quiet_dask():
        backend = _start(spec)
    try:
        _announce(spec, backend.client)
        yield backend
    finally:
        backend.close()


def local_cluster_config() -> dict[str, Any]:
    """Dask settings of the embedded ``--workers N`` cluster: its workers spend their CPU on tasks.

    Measured on the 2-core development machine (1 s tasks of the built-in scenario, CPU seconds
    per task in a Dask worker against the same task in-process; CPU time, since the machine was
    shared): with Dask's defaults a task cost 33 % more CPU in a worker (its own thread +21 %,
    the worker's other threads +12 %); with these settings, 4 % (+2.4 % and +1.5 %):

    * the worker's statistical profiler (a thread sampling the task thread's stack every 10 ms,
      for the dashboard's profile tab) takes the GIL from the task each time and walks desim's
      deep SimPy stacks: off;
    * the memory monitors of the nannies and workers (every 100 ms), the system monitor
      (500 ms) and the event loop's tick watchdog (20 ms): every 500 ms / 2 s / 200 ms (the
      driver, where the nannies and the scheduler run, used 0.7 instead of 1.3 CPU-s in an 8-task
      sweep). A worker over its memory limit is still paused, spilled or restarted, at most
      half a second later;
    * workers start by ``forkserver`` (where the platform has it) from a server process that
      imported Dask and desim once (:func:`_preload_forkserver`), instead of ``spawn``, where
      each worker imports them anew (~0.7 CPU-s each) and its first task then imports desim:
      a second cluster in the same process starts in ~0.3 s instead of ~2.4 s, and shutting the
      cluster down takes ~0.1 s instead of 0.4-1.2 s (measured under load 6).
    Dask's own defaults still put ``OMP_NUM_THREADS=1`` etc. in the workers' environment
    (``distributed.nanny.pre-spawn-environ``): one BLAS thread per single-threaded worker.
    """
    cfg: dict[str, Any] = {
        "distributed.worker.profile.enabled": False,
        "distributed.worker.memory.monitor-interval": "500ms",
        "distributed.admin.system-monitor.interval": "2s",
        "distributed.admin.tick.interval": "200ms",
    }
    if "forkserver" in multiprocessing.get_all_start_methods():
        cfg["distributed.worker.multiprocessing-method"] = "forkserver"
    return cfg


FORKSERVER_PRELOAD = ["distributed", "desim.sweep", "desim.vm", "desim.scenario"]


def _preload_forkserver() -> None:
    """Have the forkserver import Dask and desim before it forks the first worker.

    Called with :func:`local_cluster_config` in force, before the cluster starts. Dask's
    ``get_mp_context`` sets its own preload list (Dask and its dependencies) the first time;
    ours replaces it with the same plus desim's task modules. The forkserver itself starts
    when the first worker does, after the nanny has put ``pre-spawn-environ`` (one BLAS
    thread) in the environment, so numpy in the forkserver and every worker sees it. Once the
    forkserver runs (a second cluster in this process), the list no longer matters.
    """
    import dask
    from distributed.utils import get_mp_context

    if dask.config.get("distributed.worker.multiprocessing-method") != "forkserver":
        return
    get_mp_context().set_forkserver_preload(FORKSERVER_PRELOAD)


def _start(spec: BackendSpec) -> DaskBackend:
    from distributed import Client, LocalCluster

    if spec.kind == "local":
        import dask

        with _children_ignore_sigint(), dask.config.set(local_cluster_config()):
            _preload_forkserver()
            cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=logging.CRITICAL)
        return DaskBackend(spec, Client(cluster), cluster)
    if spec.kind == "scheduler":
        try:
            client = Client(spec.scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise DesimInputError(f"--scheduler {spec.scheduler}: cannot connect ({e})") from None
        return DaskBackend(spec, client)
    jq = need_jobqueue()
    cls = getattr(jq, JOBQUEUES[spec.jobqueue])
    try:
        cluster = cls(**spec.jobqueue_opts)
        cluster.scale(jobs=spec.workers)
    except (TypeError, ValueError, KeyError) as e:
        raise _jobqueue_error(spec, e) from None
    return DaskBackend(spec, Client(cluster), cluster)


def _jobqueue_error(spec: BackendSpec, e: Exception) -> DesimInputError:
    """dask-jobqueue's (multi-line) complaint as one line, with the fix when we know it."""
    text = " ".join(str(e).split())
    if "cores and memory" in text:
        return DesimInputError(f"--jobqueue {spec.jobqueue}: say what one job gets, e.g. --jobqueue-opt cores=1 "
                               f"--jobqueue-opt memory=4GB")
    if len(text) > 240:
        text = text[:240] + " ..."
    return DesimInputError(f"--jobqueue {spec.jobqueue} with options {spec.jobqueue_opts}: {text}")


def job_script(spec: BackendSpec) -> str:
    """The batch script dask-jobqueue would submit (for ``--dry-run``)."""
    jq = need_jobqueue()
    cls = getattr(jq, JOBQUEUES[spec.jobqueue])
    try:
        with quiet_dask():
            cluster = cls(**spec.jobqueue_opts)
            try:
                return cluster.job_script()
            finally:
                cluster.close()
    except (TypeError, ValueError, KeyError) as e:
        raise _jobqueue_error(spec, e) from None
