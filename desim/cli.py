"""``desim``: the command line.

    desim run [SCENARIO.toml] --policy fast|targeted --seed N --out DIR
    desim compare [SCENARIO.toml] --replications N [--workers W] [--out DIR]
    desim profiles                       list the host profiles
    desim show [SCENARIO.toml]           print the resolved scenario and profile
    desim kvm probe|measure ...          the real KVM of this host (desim.kvm)
    desim calibrate --out PROFILE.toml   fit host-profile costs on the real KVM
    desim validate [--profile P]         real KVM vs simulator, per scenario and metric

Without a scenario file the built-in default is used. Bad input gives one
line ``desim: error: ...`` naming the field and exit status 2, and nothing is
written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from . import __version__
from .errors import DesimInputError


def _parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set vm.vcpus=8 --set phases.0.passes=2`` -> overrides (values parsed as TOML)."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise DesimInputError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set vm.vcpus=8")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = tomllib.loads(f"x = {v.strip()}")["x"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = v.strip()
    return out


def _scenario(args: argparse.Namespace):
    from .scenario import load_scenario

    sc = load_scenario(args.scenario)
    ov = _parse_set(getattr(args, "set", None))
    return sc.with_overrides(ov) if ov else sc


def _int_at_least(lo: int):
    """argparse type: an integer >= ``lo``."""
    def conv(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {v!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n
    return conv


def cmd_run(args: argparse.Namespace) -> int:
    from .experiment import csv_writer, json_writer, write_outputs
    from .vm import run_scenario

    sc = _scenario(args)
    policy = sc.resolved_policy(args.policy)
    t0 = time.perf_counter()
    res = run_scenario(sc, policy, args.seed, args.replication)
    wall = time.perf_counter() - t0
    import pandas as pd

    summary = res.to_dict()
    summary.pop("per_vcpu")
    summary["scenario_file"] = args.scenario or "(built-in default)"
    m = res.metrics
    print(f"{sc.name}: policy={policy} seed={args.seed} replication={args.replication}  "
          f"({wall:.2f} s wall, {m['faults'] / max(wall, 1e-9):,.0f} faults/s)")
    for k in ("faults", "faults_first_touch", "faults_after_zap", "faults_retry", "faults_spurious",
              "fault_latency_p50_ns", "fault_latency_p99_ns", "ipis_sent", "remote_flushes", "memslot_ioctls",
              "memslot_ioctl_mean_ns", "vcpu_stall_ns", "completion_ns"):
        print(f"  {k:<24} {m[k]:>16,.0f}")
    if args.steady:
        from .experiment import steady_state

        summary["steady_state"] = st = steady_state(res)
        print("steady state (MSER-5 warm-up deletion, then batch means, 95% CI):")
        for name, r in st.items():
            if "error" in r:
                print(f"  {name:<22} {r['error']}")
                continue
            warn = f"  WARNING: {r['mser5_warning']}" if r["mser5_warning"] else ""
            print(f"  {name:<22} {r['mean']:>12,.1f} [{r['ci_low']:,.1f}, {r['ci_high']:,.1f}]  "
                  f"warm-up {r['warmup_truncation']} of {r['observations']} observations, "
                  f"lag-1 autocorrelation {r['lag1_autocorrelation']:.2f}{warn}")
    if args.out:
        out = write_outputs(args.out, {"summary.json": json_writer(summary),
                                       "vcpus.csv": csv_writer(pd.DataFrame(res.per_vcpu))})
        print(f"wrote {out}/summary.json and {out}/vcpus.csv")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import experiment as ex
    from .tails import TAILS_TAG, format_tails, latency_samples, tails_table

    if args.parquet:
        if not args.out:
            raise DesimInputError("--parquet writes files: give --out DIR too")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise DesimInputError("--parquet needs pyarrow: pip install 'desim[parquet]'") from None
    sc = _scenario(args)
    backend = args.scheduler or ("local" if args.workers > 1 else "serial")
    base, alt = "fast", "targeted"
    t0 = time.perf_counter()
    if args.precision:
        metrics = args.metrics or ["faults", "completion_ns"]

        def prog(n: int, rhw: dict[str, float]) -> None:
            worst = max(rhw.values()) if rhw else float("inf")
            print(f"  {n} replications: worst relative half-width {worst:.2%}", file=sys.stderr)
        runs, stopped = ex.replicate_to_precision(sc, metrics, args.precision, seed=args.seed,
                                                  max_reps=args.replications, backend=backend,
                                                  workers=args.workers, store=args.store, progress=prog)
        print(f"stopped by {stopped} after {runs.replication.nunique()} replications")
        results = None
    else:
        results = None if args.no_tails else ex.replicate_results(
            sc, [base, alt], args.replications, args.seed, backend, args.workers, args.store,
            samples=latency_samples, tag=TAILS_TAG)
        runs = (ex.runs_table(results) if results is not None else
                ex.replicate(sc, [base, alt], args.replications, args.seed, backend, args.workers, args.store))
    table = ex.compare(runs, args.metrics, base, alt, args.confidence)
    if not args.no_tails and results is None:
        # --precision chose the number of replications: run them again, keeping their latencies
        results = ex.replicate_results(sc, [base, alt], int(runs.replication.nunique()), args.seed, backend,
                                       args.workers, args.store, samples=latency_samples, tag=TAILS_TAG)
    wall = time.perf_counter() - t0
    print(f"{sc.name}: {runs.replication.nunique()} paired replications (common random numbers), "
          f"seed {args.seed}, {wall:.1f} s")
    print(ex.format_table(table, base, alt, args.confidence))
    tails = tail_samples = None
    if results is not None:
        tail_samples = {p: {r["replication"]: r["samples"] for r in results if r["policy"] == p} for p in (base, alt)}
        tails = tails_table(tail_samples, base, alt, args.confidence, seed=args.seed)
        print()
        print(format_tails(tails, base, alt, args.confidence))
    if args.out:
        from .plots import plot_comparison

        summary = {"scenario": sc.name, "seed": args.seed, "replications": int(runs.replication.nunique()),
                   "confidence": args.confidence, "baseline": base, "alternative": alt,
                   "comparison": table.to_dict(orient="records")}
        files = {"runs.csv": ex.csv_writer(runs), "comparison.csv": ex.csv_writer(table),
                 "summary.json": ex.json_writer(summary)}
        if tails is not None:
            files["tails.csv"] = ex.csv_writer(tails)
        if args.parquet:
            files["runs.parquet"] = lambda p: runs.to_parquet(p, index=False)
            files["comparison.parquet"] = lambda p: table.to_parquet(p, index=False)
        if not args.no_plots:
            from .plots import plot_fault_latency_cdf, plot_faults_over_time, plot_lock_wait
            from .vm import run_scenario

            # detailed plots from replication 0 of each policy (re-run: same seed, same numbers)
            rep0 = {p: run_scenario(sc, p, args.seed, 0) for p in (base, alt)}
            for ext in ("png", "svg"):
                files[f"comparison.{ext}"] = lambda p: plot_comparison(table, p, base, alt, title=sc.name)
                files[f"fault_latency_cdf.{ext}"] = lambda p: plot_fault_latency_cdf(rep0, p, title=sc.name)
                files[f"faults_over_time.{ext}"] = lambda p: plot_faults_over_time(rep0, p, title=sc.name)
                files[f"lock_wait.{ext}"] = lambda p: plot_lock_wait(rep0, p, title=sc.name)
                if tails is not None:
                    from .tailplots import plot_around_ops, plot_latency_percentiles

                    files[f"latency_percentiles.{ext}"] = lambda p: plot_latency_percentiles(
                        tails, p, (base, alt), title=sc.name)
                    files[f"latency_around_ops.{ext}"] = lambda p: plot_around_ops(tail_samples, p, title=sc.name)
        out = ex.write_outputs(args.out, files)
        print(f"wrote {', '.join(sorted(files))} to {out}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    from .profile import load_profile, profile_names

    for n in profile_names():
        p = load_profile(n)
        print(f"{n:<14} {p.description}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    sc = _scenario(args)
    print(json.dumps({"scenario": sc.model_dump(), "profile": sc.host_profile().model_dump()}, indent=2,
                     default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="desim", description="Discrete-event simulator of KVM memslot zapping: "
                                "fast global zap vs targeted zap.")
    p.add_argument("--version", action="version", version=f"desim {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("scenario", nargs="?", default=None, help="scenario TOML (default: built-in)")
        sp.add_argument("--set", action="append", metavar="FIELD=VALUE",
                        help="override a scenario field, e.g. --set vm.vcpus=8 (repeatable)")
        sp.add_argument("--seed", type=_int_at_least(0), default=1, help="base seed (default 1)")

    r = sub.add_parser("run", help="run one replication of one policy")
    common(r)
    r.add_argument("--policy", choices=["fast", "targeted"], default=None,
                   help="zap policy (default: the scenario's, else fast)")
    r.add_argument("--replication", type=_int_at_least(0), default=0, help="replication index (default 0)")
    r.add_argument("--out", metavar="DIR", help="write summary.json and vcpus.csv here")
    r.add_argument("--steady", action="store_true",
                   help="steady-state analysis of this one long run: MSER-5 warm-up deletion and batch means")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="fast vs targeted under common random numbers, with paired CIs")
    common(c)
    c.add_argument("--replications", "-n", type=_int_at_least(1), default=10,
                   help="replications per policy (the maximum with --precision; default 10)")
    c.add_argument("--precision", type=float, default=None, metavar="REL",
                   help="add replications until every metric's ratio CI half-width is below REL (e.g. 0.02)")
    c.add_argument("--metrics", nargs="+", default=None, help="metrics to compare (default: a standard set)")
    c.add_argument("--confidence", type=float, default=0.95)
    c.add_argument("--workers", type=_int_at_least(1), default=1,
                   help="parallel worker processes on a local Dask cluster (default 1: in-process)")
    c.add_argument("--scheduler", default=None, metavar="ADDRESS", help="an existing Dask scheduler tcp://...")
    c.add_argument("--store", default=None, metavar="DIR", help="keep each replication's result here (resumable)")
    c.add_argument("--out", metavar="DIR", help="write runs.csv, comparison.csv, summary.json and plots here")
    c.add_argument("--no-plots", action="store_true", help="with --out: skip the PNG/SVG plots")
    c.add_argument("--parquet", action="store_true", help="with --out: also write the tables as Parquet")
    c.add_argument("--no-tails", action="store_true",
                   help="skip the latency-tails table (percentile CIs, per phase, around DELETE/MOVE) and its plots")
    c.set_defaults(func=cmd_compare)

    pr = sub.add_parser("profiles", help="list the named host profiles")
    pr.set_defaults(func=cmd_profiles)

    sh = sub.add_parser("show", help="print the resolved scenario and host profile")
    common(sh)
    sh.set_defaults(func=cmd_show)

    from .kvm.cli import register as register_kvm
    from .kvm.cli import register_top_level

    register_kvm(sub)
    register_top_level(sub)  # desim calibrate / desim validate
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "confidence", 0.5) is not None and not 0 < getattr(args, "confidence", 0.5) < 1:
        parser.error("--confidence must be between 0 and 1, e.g. 0.95")
    if getattr(args, "precision", None) is not None and not 0 < args.precision < 1:
        parser.error("--precision must be a fraction between 0 and 1, e.g. 0.02")
    try:
        return int(args.func(args) or 0)
    except DesimInputError as e:
        print(f"desim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("desim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
