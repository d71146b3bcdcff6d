"""What every experiment script shares: the same options, the same entry point, one namespace.

An experiment script (``experiments/*.py``) is a thin user of the studies layer::

    from desim.studies import toolkit as C

    ap = C.make_parser(__doc__, "my_study", default_reps=10)
    args = C.parse_args(ap)
    grid = C.run_grid(points, C.POLICIES, args.replications, args.seed, extra=extra,
                      backend=args.backend, store=args.store, progress=args.progress, desc="my_study")
    summary = C.summarize(grid.runs, ["vcpus"], METRICS)

Every script takes the same options: ``--quick`` (seconds-long smoke version),
``--out DIR``, ``--replications N``, ``--seed S``, ``--store DIR`` (keep every
run; a killed script resumes), ``--workers N`` (local Dask cluster),
``--scheduler tcp://HOST:PORT`` (an existing one) and ``--progress/--no-progress``.
This module re-exports the names of :mod:`~desim.studies.grid`,
:mod:`~desim.studies.tables` and :mod:`~desim.studies.figures` that scripts use.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from .. import model_fingerprint
from ..errors import DesimInputError, DesimRunError
from .cluster import BackendSpec
from .figures import (POLICY_COLORS, PROFILE_MMU, auto_yscale, band_panel, errorbar_panel,  # noqa: F401
                      figure_writers, log2_xaxis, plt_module, policy_mmu_label, policy_mmu_style, short_series)
from .grid import (POLICIES, GridResult, Point, phase_fault_latencies, phase_fault_stats,  # noqa: F401
                   phase_window, run_grid, scenario_from)
from .tables import (GiB, KiB, MiB, clean_json, compare_points, fmt_bytes, fmt_ci, format_wide,  # noqa: F401
                     paired_diff, parse_size_list, summarize)

__all__ = ["POLICY_COLORS", "PROFILE_MMU", "auto_yscale", "band_panel", "errorbar_panel", "figure_writers",
           "log2_xaxis", "plt_module", "policy_mmu_label", "policy_mmu_style", "short_series", "POLICIES",
           "GridResult", "Point", "phase_fault_latencies", "phase_fault_stats", "phase_window", "run_grid",
           "scenario_from", "GiB", "KiB", "MiB", "clean_json", "compare_points", "fmt_bytes", "fmt_ci",
           "format_wide", "paired_diff", "parse_size_list", "summarize", "add_run_options", "make_parser",
           "parse_args", "pick", "args_record", "guarded_main", "json_summary", "write_all", "BackendSpec"]


def add_run_options(ap: argparse.ArgumentParser, stored: bool = True) -> None:
    """``--workers --scheduler --progress`` (and ``--store`` when ``stored``): where and how tasks run."""
    ap.add_argument("--workers", "-w", type=int, default=1,
                    help="worker processes on a local Dask cluster (default 1: run in this process)")
    ap.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                    help="run on an existing Dask cluster (its workers need desim installed)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress on stderr (default: a bar on a terminal, a line every few seconds otherwise)")
    if stored:
        ap.add_argument("--store", default=None, metavar="DIR",
                        help="keep every finished run in DIR/results.sqlite; a killed run resumes without "
                             "recomputing")


def make_parser(description: str, name: str, default_reps: int, quick_reps: int = 2) -> argparse.ArgumentParser:
    """The common options: ``--quick --out --replications --seed --store --workers --scheduler --progress``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke version (small VM, few points)")
    ap.add_argument("--out", default=str(Path("results") / name),
                    help=f"output directory (default results/{name})")
    ap.add_argument("--replications", "-n", type=int, default=None,
                    help=f"paired replications per point (default {default_reps}; quick: {quick_reps})")
    ap.add_argument("--seed", type=int, default=1, help="base seed (replication r of every point uses seed/r)")
    add_run_options(ap)
    ap.set_defaults(_default_reps=default_reps, _quick_reps=quick_reps)
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, fill the replication default, and check the backend (``args.backend``) before any work."""
    args = ap.parse_args(argv)
    if getattr(args, "replications", 1) is None and hasattr(args, "_default_reps"):
        args.replications = args._quick_reps if args.quick else args._default_reps
    reps = getattr(args, "replications", None)
    if reps is not None and reps < 1:  # 0 too: not "the default", and no experiment can summarise 0 runs
        ap.error("--replications must be >= 1")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    args.backend = BackendSpec(workers=args.workers, scheduler=args.scheduler)
    from ..outputs import check_output_dir  # output paths checked before any work, as by desim

    try:
        args.backend.check()
        if getattr(args, "out", None) is not None:
            check_output_dir(args.out, "--out")
        if getattr(args, "store", None) is not None:
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
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "backend"}

def guarded_main(main: Callable[[], int]) -> None:
    """Run ``main``; bad input prints one line and exits 2, a run that cannot go on exits 1 (like the CLI)."""
    try:
        code = main()
    except DesimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except DesimRunError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt as e:
        print("interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        code = 130
    sys.exit(code)


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
    from ..experiment import write_outputs

    try:
        return write_outputs(out, files)
    finally:
        plt_module().close("all")

