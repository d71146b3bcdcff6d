"""Speed of the sweep engine and of its result store (run on demand, not a test).

    python benchmarks/bench_sweep.py [--repeats 3] [--tasks 24] [--results 100000]

1. A fixed sweep (``--tasks`` tasks of the built-in scenario with 64 MiB touched and
   50,000 work accesses per vCPU, ~1 s each) with 1 worker (in the driver process, as ``desim sweep`` runs
   without ``--workers``) and with ``--workers 2`` (a local Dask cluster, its start-up and
   shutdown included, as a user sees it), interleaved ``--repeats`` times, each run in a fresh
   Python process (as each ``desim sweep`` command is: nothing imported or started by an earlier
   run helps); prints the median wall times and the speed-ups, end to end and of the tasks
   alone (target >= 1.8x on a 2-core machine), and the CPU seconds of the driver and of the
   worker processes (less sensitive to other load on the machine than wall times).
2. The result store with ``--results`` synthetic task results (45 metrics each, like a
   real run): the time to write them one transaction per task (what a sweep does),
   in one transaction, to look all of them up by key and check them (what a resumed
   sweep does), and to load the ``runs`` table into pandas. The load average is printed
   too: the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from desim.scenario import load_scenario
from desim.studies.cluster import BackendSpec, open_backend
from desim.studies.store import ResultStore
from desim.sweep import Task, execute


def sweep_once(workers: int, ntasks: int) -> tuple[float, float, float, float, float]:
    """(wall time with the cluster's start-up and shutdown, wall time of the tasks alone, tasks
    running at once on average, CPU seconds of the driver process, CPU seconds of its child
    processes: the forkserver and the workers); in this process."""
    sc = load_scenario().with_overrides({"phases.0.size": "64MiB", "phases.1.accesses": 50000})
    data = sc.model_dump()
    tasks = [Task(data, pol, 1, r) for r in range(ntasks // 2) for pol in ("fast", "targeted")]
    c0 = time.process_time()
    t0 = time.perf_counter()
    kids = 0.0
    with open_backend(BackendSpec(workers=workers, announce=lambda m: None)) as be:
        t1 = time.perf_counter()
        res = execute(tasks, backend=be, progress=False)
        t2 = time.perf_counter()
        if workers > 1:
            import psutil  # a Dask dependency

            kids = sum(sum(p.cpu_times()[:2]) for p in psutil.Process().children(recursive=True))
    return (time.perf_counter() - t0, t2 - t1, sum(r["wall_s"] for r in res) / (t2 - t1),
            time.process_time() - c0, kids)


def sweep_fresh(workers: int, ntasks: int) -> tuple[float, float, float, float, float]:
    """:func:`sweep_once` in a fresh Python process."""
    out = subprocess.run([sys.executable, __file__, "--one", str(workers), "--tasks", str(ntasks)],
                         check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))  # type: ignore[return-value]


def synthetic(i: int, rng: random.Random) -> dict:
    metrics = {f"metric_{k:02d}": rng.random() * 1e6 for k in range(40)}
    metrics.update(faults=rng.randrange(1, 10**6), completion_ns=rng.random() * 1e8, ipis_sent=rng.randrange(100),
                   fault_latency_p99_ns=2250.0, vcpu_stall_ns=rng.random() * 1e7)
    return {"scenario": "synthetic", "policy": "fast" if i % 2 else "targeted", "seed": 1, "replication": i // 2,
            "model_version": "bench", "metrics": metrics, "per_vcpu": [], "point": i // 20, "wall_s": 1.0}


def store_bench(n: int) -> dict[str, float]:
    rng = random.Random(1)
    items = [(f"{i:064x}", synthetic(i, rng)) for i in range(n)]
    out = {}
    with tempfile.TemporaryDirectory() as d:
        st = ResultStore(Path(d) / "per-task")
        t0 = time.perf_counter()
        for k, r in items:
            st.put(k, r)
        out["write, one transaction per task (s)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = st.get_many([k for k, _ in items])
        out["look up every key and check it (s)"] = time.perf_counter() - t0
        assert len(found) == n
        t0 = time.perf_counter()
        import pandas as pd

        df = pd.read_sql("SELECT * FROM runs", sqlite3.connect(st.path))
        out["pandas read_sql of the runs table (s)"] = time.perf_counter() - t0
        assert len(df) == n and len(df.columns) == 5 + 45
        out["database size (MB)"] = st.path.stat().st_size / 1e6
        st.close()
        st2 = ResultStore(Path(d) / "one-tx")
        t0 = time.perf_counter()
        st2.put_many(items)
        out["write, one transaction for all (s)"] = time.perf_counter() - t0
        st2.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=24)
    ap.add_argument("--results", type=int, default=100_000)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--one", type=int, metavar="WORKERS", help=argparse.SUPPRESS)  # one run, as JSON
    a = ap.parse_args()
    if a.one:
        print(json.dumps(sweep_once(a.one, a.tasks)))
        return

    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not a.skip_sweep:
        times: dict[int, list[tuple[float, float, float, float, float]]] = {1: [], 2: []}
        for _ in range(a.repeats):
            for w in (1, 2):
                times[w].append(sweep_fresh(w, a.tasks))
        for j, what in ((0, "end to end (cluster start-up and shutdown included)"), (1, "tasks alone")):
            m1 = statistics.median(t[j] for t in times[1])
            m2 = statistics.median(t[j] for t in times[2])
            print(f"sweep of {a.tasks} tasks, {what}: 1 worker {m1:.2f} s, 2 workers {m2:.2f} s "
                  f"(medians of {a.repeats}: {[round(t[j], 2) for t in times[1]]} / "
                  f"{[round(t[j], 2) for t in times[2]]}); speed-up {m1 / m2:.2f}x (target >= 1.8x)")
        busy = statistics.median(t[2] for t in times[2])
        print(f"with 2 workers, tasks running at once (sum of task times / wall time): {busy:.2f} of 2 "
              f"(on a shared machine each task then runs slower: compare with the load average)")
        cpu1 = statistics.median(t[3] for t in times[1])
        drv2 = statistics.median(t[3] for t in times[2])
        kid2 = statistics.median(t[4] for t in times[2])
        print(f"CPU seconds (less sensitive to a shared machine than wall times): 1 worker {cpu1:.2f}; "
              f"2 workers {drv2 + kid2:.2f} = driver {drv2:.2f} (scheduler, nannies, store) + "
              f"workers and forkserver {kid2:.2f}: {100 * ((drv2 + kid2) / cpu1 - 1):+.0f}% for the parallel run")
    for k, v in (store_bench(a.results) if a.results else {}).items():
        print(f"store, {a.results:,} synthetic results: {k}: {v:.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
