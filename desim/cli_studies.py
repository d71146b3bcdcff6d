"""``desim sweep``, ``desim results`` and ``desim capacity``: the studies layer on the command line.

    desim sweep SWEEP.toml [--dry-run] [--workers N | --scheduler tcp://H:P | --jobqueue slurm ...]
    desim results STORE_OR_OUT [--plot METRIC --vs FACTOR] [--format csv|parquet|json] [--out DIR]
    desim capacity [SCENARIO] --vary FIELD --range LO:HI --metric M --slo 50us [--policy targeted]

Registered in :mod:`desim.cli`; every check (sweep file, points, backend,
output paths) runs before any task, and bad input is one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .errors import DesimInputError


def _backend_options(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("where tasks run (default: in this process)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N worker processes on an embedded Dask LocalCluster; with --jobqueue: N batch jobs")
    g.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT", help="an existing Dask scheduler")
    g.add_argument("--jobqueue", default=None, choices=["slurm", "pbs", "sge", "lsf"],
                   help="start the workers as batch jobs through dask-jobqueue (pip install 'desim[cluster]')")
    g.add_argument("--jobqueue-opt", action="append", default=None, metavar="KEY=VALUE",
                   help="passed to dask-jobqueue's cluster, e.g. queue=normal, walltime=01:00:00, cores=1, "
                        "memory=4GB, account=... (repeatable)")
    g.add_argument("--no-worker-timeout", type=float, default=None, metavar="S",
                   help="stop when the cluster has had no worker for S seconds (default 60; 3600 with --jobqueue)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr (default: a bar on a terminal, a line every 5 s otherwise)")


def _backend(args: argparse.Namespace):
    from .studies.cluster import BackendSpec, parse_opts

    spec = BackendSpec(workers=args.workers, scheduler=args.scheduler, jobqueue=args.jobqueue,
                       jobqueue_opts=parse_opts(args.jobqueue_opt), no_worker_timeout=args.no_worker_timeout)
    spec.check()
    return spec


def _check_out(path: str | None, what: str = "--out") -> None:
    """An output directory that can be created or written into (desim.outputs), checked before any work."""
    if path is None:
        return
    from .outputs import check_output_dir

    check_output_dir(path, what)


def _parse_set(items: list[str] | None) -> dict[str, Any]:
    from .cli import _parse_set as parse

    return parse(items)


# -- desim sweep -------------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from .studies.results import check_format
    from .studies.sweepfile import load_sweep

    spec = load_sweep(args.sweep, _parse_set(args.set))
    backend = _backend(args)
    check_format(args.format)
    out = Path(args.out) if args.out else Path("results") / spec.name
    store_dir = Path(args.store) if args.store else out / "store"
    _check_out(str(out))
    _check_out(str(store_dir), "--store")
    script = None
    if args.dry_run and backend.jobqueue:
        from .studies.cluster import job_script

        script = job_script(backend)  # a bad option fails here, before anything is printed
    print(f"sweep {spec.name}: {len(spec.points)} points x {len(spec.policies)} policies "
          f"({', '.join(spec.policies)}), " + (f"{spec.replications} replications" if spec.precision is None else
                                               f"replications until ±{spec.precision:.1%} on "
                                               f"{', '.join(spec.precision_metrics)} ({spec.min_replications}-"
                                               f"{spec.max_replications})")
          + f": {spec.task_count()} tasks, seed {spec.seed}")
    if args.dry_run:
        names = spec.factor_names
        if names:
            widths = [max(len(n), *(len(str(p.labels[n])) for p in spec.points)) for n in names]
            print("  point  " + "  ".join(n.ljust(w) for n, w in zip(names, widths)))
            for p in spec.points:
                print(f"  {p.index:>5}  " + "  ".join(str(p.labels[n]).ljust(w) for n, w in zip(names, widths)))
        if script is not None:
            print(f"\n{backend.jobqueue} job script ({backend.workers} job(s)):\n{script}")
        print("dry run: nothing ran, nothing written")
        return 0
    from .experiment import write_outputs
    from .studies.results import Loaded, format_summary, point_summary, write_table
    from .studies.store import ResultStore
    from .studies.sweeprun import run_sweep

    t0 = time.perf_counter()
    with ResultStore(store_dir) as store:
        res = run_sweep(spec, backend, store, args.progress)
    loaded = Loaded(res.runs, spec.factor_names, spec.metrics, spec.name)
    summary = point_summary(loaded, spec.metrics, spec.confidence)
    print(f"sweep {spec.name}: {len(res.runs)} tasks in {time.perf_counter() - t0:.1f} s; store {store.path}")
    for i, why in sorted(res.stopped.items()):
        print(f"  point {i}: {why}")
    show = [m for m in spec.metrics[:3]]
    print(format_summary(summary[summary.metric.isin(show)], spec.factor_names or ["scenario", "seed"]))
    import json

    files = {f"runs.{args.format}": lambda p: write_table(res.runs, p, args.format),
             f"summary.{args.format}": lambda p: write_table(summary, p, args.format),
             "sweep.json": lambda p: p.write_text(json.dumps({
                 "name": spec.name, "source": spec.source, "policies": spec.policies, "seed": spec.seed,
                 "replications": spec.replications, "precision": spec.precision, "metrics": spec.metrics,
                 "factors": spec.factors, "store": str(store.path), "confidence": spec.confidence,
                 "points": [{"point": p.index, **p.labels} for p in spec.points],
                 "stopped": {str(k): v for k, v in res.stopped.items()}}, indent=1, default=str) + "\n")}
    write_outputs(out, files)
    print(f"wrote {', '.join(files)} to {out}")
    return 0


# -- desim results -----------------------------------------------------------------------------------
def cmd_results(args: argparse.Namespace) -> int:
    from .studies.results import (check_format, format_summary, load_runs, plot_vs_factor, point_keys,
                                  point_summary, write_table)

    check_format(args.format)
    _check_out(args.out)
    if (args.plot is None) != (args.vs is None):
        raise DesimInputError("--plot METRIC and --vs FACTOR go together")
    if args.plot and not args.out:
        raise DesimInputError("--plot writes PNG and SVG files: give --out DIR too")
    loaded = load_runs(args.path, args.sweep)
    metrics = args.metrics or [m for m in loaded.metrics if m not in ("scenario",)]
    unknown = [m for m in metrics if m not in loaded.metrics]
    if unknown:
        raise DesimInputError(f"--metrics {unknown[0]}: not in this store (e.g. {', '.join(loaded.metrics[:8])})")
    writer = plot_vs_factor(loaded, args.plot, args.vs, args.confidence) if args.plot else None
    runs = loaded.runs[[c for c in loaded.runs.columns if c not in loaded.metrics or c in metrics]]
    summary = point_summary(loaded, metrics, args.confidence)
    if not args.out:
        if args.format == "parquet":
            raise DesimInputError("--format parquet is binary: give --out DIR")
        if args.table == "runs":
            sys.stdout.write(runs.to_csv(index=False) if args.format == "csv" else
                             runs.to_json(orient="records", indent=1) + "\n")
        else:
            print(format_summary(summary, point_keys(loaded)))
        return 0
    from .experiment import write_outputs

    files = {f"runs.{args.format}": lambda p: write_table(runs, p, args.format),
             f"summary.{args.format}": lambda p: write_table(summary, p, args.format)}
    if writer is not None:
        stem = f"{args.plot}_vs_{args.vs}".replace("/", "_")
        files[f"{stem}.png"] = writer
        files[f"{stem}.svg"] = writer
    write_outputs(args.out, files)
    print(f"{len(runs)} runs" + (f" of sweep {loaded.sweep}" if loaded.sweep else "")
          + f"; wrote {', '.join(files)} to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="run a sweep file (factors x policies x replications) into a result store",
                       description="Run every point of a sweep file (see desim.studies.sweepfile) under each "
                                   "policy, store every task as it finishes (a re-run computes only what is "
                                   "missing) and write tidy tables.")
    s.add_argument("sweep", help="sweep file (TOML)")
    s.add_argument("--dry-run", action="store_true", help="print the points and the task count; run nothing")
    s.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a field of the base scenario for every point (repeatable)")
    s.add_argument("--store", default=None, metavar="DIR", help="result store (default OUT/store)")
    s.add_argument("--out", default=None, metavar="DIR", help="output folder (default results/<sweep name>)")
    s.add_argument("--format", default="csv", help="table format: csv (default), parquet or json")
    _backend_options(s)
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("results", help="a result store as a tidy table, per-point paired CIs and plots",
                       description="Load a result store (or a sweep's output folder) into a tidy table "
                                   "(one row per task), summarise each point with paired CIs and plot a metric "
                                   "against a factor with CI bands.")
    r.add_argument("path", metavar="STORE_OR_OUT", help="a --store directory, its results.sqlite, or a sweep's --out")
    r.add_argument("--sweep", default=None, help="which sweep, when the store holds several")
    r.add_argument("--metrics", nargs="+", default=None, help="metrics to keep (default: all)")
    r.add_argument("--plot", default=None, metavar="METRIC", help="plot METRIC against --vs FACTOR (needs --out)")
    r.add_argument("--vs", default=None, metavar="FACTOR", help="the factor on the x axis")
    r.add_argument("--format", default="csv", help="csv (default), parquet or json")
    r.add_argument("--table", choices=["summary", "runs"], default="summary",
                   help="without --out: print the per-point summary (default) or the tidy runs (in --format)")
    r.add_argument("--confidence", type=float, default=0.95, help="confidence level of the CIs (default 0.95)")
    r.add_argument("--out", default=None, metavar="DIR", help="write runs.FMT, summary.FMT and the plot here")
    r.set_defaults(func=cmd_results)

    from .cli_capacity import register as register_capacity

    register_capacity(sub, _backend_options, _backend, _check_out)
