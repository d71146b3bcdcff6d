"""``desim``: the command line.

    desim run [SCENARIO.toml] --policy fast|targeted --seed N --out DIR
    desim compare [SCENARIO.toml] --replications N [--workers W] [--out DIR]
    desim profiles                       list the host profiles
    desim show [SCENARIO.toml]           print the resolved scenario and profile
    desim kvm probe|measure ...          the real KVM of this host (desim.kvm)
    desim calibrate --out PROFILE.toml   fit host-profile costs on the real KVM
    desim validate [--profile P]         real KVM vs simulator, per scenario and metric
    desim sweep SWEEP.toml               a sweep file on any backend, into a result store
    desim results STORE                  a store as tidy tables, per-point CIs, plots
    desim capacity --vary F --range A:B --metric M --slo X   the largest F meeting an SLO
    desim record --kernel K --out F.npz  record a real Linux boot under QEMU TCG (desim.record)

Without a scenario file the built-in default is used. Bad input gives one
line ``desim: error: ...`` naming the field and exit status 2, and nothing is
written: every command checks all its arguments, the scenario, its output
paths (:mod:`desim.outputs`) and the work a run needs (:mod:`desim.limits`)
before it runs or creates anything.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from . import __version__
from .argtypes import int_at_least as _int_at_least  # noqa: F401 - the name other CLI modules import
from .engine_cli import add_engine_option, engine_from_args
from .errors import DesimInputError, DesimRunError


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line, exit status 2: the problem, then the subcommand's usage.

    ``desim: error: run: argument --seed: must be >= 0, got -3 (usage: desim run [-h] ...; desim run --help)``
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog.removeprefix("desim").strip()
        where = f"{sub}: " if sub else ""
        usage = _one_line(self.format_usage()).strip()
        self.exit(2, f"desim: error: {where}{_one_line(message)} ({usage}; {self.prog} --help)\n")


def _parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set vm.vcpus=8 --set phases.0.passes=2`` -> overrides (values parsed as TOML, else kept as text)."""
    from .inputfiles import parse_toml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            shown = item if len(item) <= 60 else item[:60] + "..."
            raise DesimInputError(f"--set {shown!r}: expected FIELD=VALUE, e.g. --set vm.vcpus=8")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = parse_toml(f"x = {v.strip()}", f"--set {k.strip()}")["x"]
        except DesimInputError as e:
            if "nested" in str(e):
                raise
            out[k.strip()] = v.strip()  # not a TOML value: a bare string (--set profile=legacy-2020)
    return out


def _scenario(args: argparse.Namespace):
    from .scenario import load_scenario

    sc = load_scenario(args.scenario)
    ov = _parse_set(getattr(args, "set", None))
    return sc.with_overrides(ov) if ov else sc


def _fraction(example: str):
    """argparse type: a number strictly between 0 and 1 (the subcommand's usage is printed on error)."""
    def conv(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, e.g. {example}; got {v!r}") from None
        if not 0 < x < 1:
            raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), e.g. {example}; got {v}")
        return x
    return conv


def cmd_run(args: argparse.Namespace) -> int:
    from .limits import check_work
    from .outputs import check_output_dir, csv_writer, json_writer, write_outputs
    from .vm import run_scenario

    if args.out is not None:
        check_output_dir(args.out, "--out")
    sc = _scenario(args)
    policy = sc.resolved_policy(args.policy)
    check_work(sc, args.allow_large)
    from .progress import RunProgress

    t0 = time.perf_counter()
    with RunProgress(f"{sc.name} {policy}", enabled=not args.quiet) as prog:
        res = run_scenario(sc, policy, args.seed, args.replication, progress=prog.update)
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
    if args.out is not None:
        out = write_outputs(args.out, {"summary.json": json_writer(summary),
                                       "vcpus.csv": csv_writer(pd.DataFrame(res.per_vcpu))})
        print(f"wrote {out}/summary.json and {out}/vcpus.csv")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import experiment as ex
    from .limits import check_work
    from .outputs import check_output_dir
    from .preflight import check_metrics, check_scheduler_address
    from .report import replications_phrase
    from .tails import WithTails, format_tails, tails_table

    if args.parquet:
        if args.out is None:
            raise DesimInputError("--parquet writes files: give --out DIR too")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise DesimInputError("--parquet needs pyarrow: pip install 'desim[parquet]'") from None
    if args.precision_metrics and not args.precision:
        raise DesimInputError("--precision-metrics says what --precision watches: give --precision REL too")
    if args.out is not None:
        check_output_dir(args.out, "--out")
    if args.store is not None:
        check_output_dir(args.store, "--store")
    check_scheduler_address(args.scheduler)
    sc = _scenario(args)
    check_metrics(args.metrics, [p.name for p in sc.phases])
    check_metrics(args.precision_metrics, [p.name for p in sc.phases], "--precision-metrics")
    check_work(sc, args.allow_large, concurrent_runs=args.workers if args.scheduler is None else 1)
    backend = args.scheduler or ("local" if args.workers > 1 else "serial")
    base, alt = "fast", "targeted"
    detail = None
    if args.out is not None and not args.no_plots:
        from .detail import detail_samples as detail
    hook = detail if args.no_tails else WithTails(detail)  # the latency tails ride along (desim/tails.py)
    t0 = time.perf_counter()
    if args.precision:
        metrics = args.precision_metrics or ex.PRECISION_METRICS

        def prog(n: int, dec) -> None:
            rhw = dec.rel_half_widths
            worst = max(rhw, key=lambda m: rhw[m])
            state = (f"within target since {dec.n_solution}, confirming (look-ahead {ex.LOOK_AHEAD})"
                     if dec.n_solution is not None else f"target +-{args.precision:.2%}")
            print(f"  {n} replications: worst ratio CI +-{rhw[worst]:.2%} ({worst}); {state}", file=sys.stderr)
        runs, stopped = ex.replicate_to_precision(sc, metrics, args.precision, seed=args.seed,
                                                  max_reps=args.replications, backend=backend,
                                                  workers=args.workers, store=args.store,
                                                  confidence=args.confidence, progress=prog, samples=hook)
        print(ex.precision_stop_reason(runs, metrics, args.precision, stopped, base, alt, args.confidence))
    else:
        runs = ex.replicate(sc, [base, alt], args.replications, args.seed, backend, args.workers, args.store,
                            samples=hook)
    kept = runs.attrs.pop("samples", None)  # before any filtering: pandas copies attrs along
    table = ex.compare(runs, args.metrics, base, alt, args.confidence)
    wall = time.perf_counter() - t0
    n = int(runs.replication.nunique())
    print(f"{sc.name}: {replications_phrase(n)} (common random numbers), seed {args.seed}, {wall:.1f} s")
    print(ex.format_table(table, base, alt, args.confidence))
    tails = tail_samples = None
    if not args.no_tails and kept:
        reps = sorted(runs.replication.unique())
        tail_samples = {p: {r: kept[(p, r)] for r in reps} for p in (base, alt)}
        tails = tails_table(tail_samples, base, alt, args.confidence, seed=args.seed)
        print()
        print(format_tails(tails, base, alt, args.confidence))
    if args.out is not None:
        summary = {"scenario": sc.name, "seed": args.seed, "replications": n,
                   "confidence": args.confidence, "baseline": base, "alternative": alt,
                   "comparison": table.to_dict(orient="records")}
        files = {"runs.csv": ex.csv_writer(runs),
                 "comparison.csv": ex.csv_writer(table.assign(confidence=args.confidence)),
                 "comparison_long.csv": ex.csv_writer(ex.comparison_long(table, base, alt, args.confidence)),
                 "summary.json": ex.json_writer(summary)}
        if tails is not None:
            files["tails.csv"] = ex.csv_writer(tails)
        if args.parquet:
            files["runs.parquet"] = lambda p: runs.to_parquet(p, index=False)
            files["comparison.parquet"] = lambda p: table.to_parquet(p, index=False)
        if not args.no_plots:
            from .plots import plot_comparison, plot_fault_latency_cdf, plot_faults_over_time, plot_lock_wait

            by_policy = {p: [kept[(p, r)] for r in sorted(runs.replication.unique())] for p in (base, alt)}
            title = f"{sc.name} ({replications_phrase(n)})"
            for ext in ("png", "svg"):
                files[f"comparison.{ext}"] = lambda p: plot_comparison(table, p, base, alt, title=title,
                                                                       confidence=args.confidence)
                files[f"fault_latency_cdf.{ext}"] = lambda p: plot_fault_latency_cdf(by_policy, p, title=title)
                files[f"faults_over_time.{ext}"] = lambda p: plot_faults_over_time(by_policy, p, title=title)
                files[f"lock_wait.{ext}"] = lambda p: plot_lock_wait(runs, p, title=title,
                                                                     confidence=args.confidence)
                if tails is not None:
                    from .tailplots import plot_around_ops, plot_latency_percentiles

                    files[f"latency_percentiles.{ext}"] = lambda p: plot_latency_percentiles(
                        tails, p, (base, alt), title=title)
                    files[f"latency_around_ops.{ext}"] = lambda p: plot_around_ops(tail_samples, p, title=title)
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
    p = _Parser(prog="desim", description="Discrete-event simulator of KVM memslot zapping: "
                "fast global zap vs targeted zap.",
                epilog="desim COMMAND --help describes each command. run, compare and show take "
                       "a scenario file (default: the built-in one) and --set FIELD=VALUE.")
    p.add_argument("--version", action="version", version=f"desim {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("scenario", nargs="?", default=None, help="scenario TOML (default: built-in)")
        sp.add_argument("--set", action="append", metavar="FIELD=VALUE",
                        help="override a scenario field, e.g. --set vm.vcpus=8 (repeatable)")
        sp.add_argument("--seed", type=_int_at_least(0), default=1, help="base seed (default 1)")

    def large(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--allow-large", action="store_true",
                        help="run a scenario over the work limits (10^9 guest accesses or 10^6 memslot ioctls "
                             "per run; see desim.limits); memory is still checked")

    r = sub.add_parser("run", help="run one replication of one policy",
                       description="Run one replication of one zap policy and print its metrics. Progress: a "
                                   "bar on a terminal, a line every 10 s otherwise (--quiet: none).")
    common(r)
    r.add_argument("--policy", choices=["fast", "targeted"], default=None,
                   help="zap policy (default: the scenario's, else fast)")
    r.add_argument("--replication", type=_int_at_least(0), default=0, help="replication index (default 0)")
    r.add_argument("--out", metavar="DIR", help="write summary.json and vcpus.csv here")
    r.add_argument("--steady", action="store_true",
                   help="steady-state analysis of this one long run: MSER-5 warm-up deletion and batch means")
    r.add_argument("--quiet", action="store_true", help="no progress bar or progress lines on stderr")
    large(r)
    r.set_defaults(func=cmd_run)
    add_engine_option(r)

    c = sub.add_parser("compare", help="fast vs targeted under common random numbers, with paired CIs",
                       description="Run both zap policies on the same guest behaviour (replication r draws "
                                   "the same accesses under both) and print means, paired differences and "
                                   "ratios with confidence intervals.")
    common(c)
    c.add_argument("--replications", "-n", type=_int_at_least(1), default=10,
                   help="replications per policy (the maximum with --precision; default 10)")
    c.add_argument("--precision", type=_fraction("0.02"), default=None, metavar="REL",
                   help="add replications (2 at a time, up to -n) until the targeted/fast ratio CI of every "
                        "watched metric is within +-REL of the ratio (e.g. 0.02), confirmed over 5 more "
                        "replications (look-ahead); says why it stopped")
    c.add_argument("--precision-metrics", nargs="+", default=None, metavar="METRIC",
                   help="the metrics --precision watches (default: faults completion_ns)")
    c.add_argument("--metrics", nargs="+", default=None, help="metrics to compare (default: a standard set)")
    c.add_argument("--confidence", type=_fraction("0.95"), default=0.95, metavar="LEVEL",
                   help="confidence level of every CI (default 0.95)")
    c.add_argument("--workers", type=_int_at_least(1), default=1,
                   help="parallel worker processes on a local Dask cluster (default 1: in-process)")
    c.add_argument("--scheduler", default=None, metavar="ADDRESS", help="an existing Dask scheduler tcp://...")
    c.add_argument("--store", default=None, metavar="DIR", help="keep each replication's result here (resumable)")
    c.add_argument("--out", metavar="DIR", help="write runs.csv, comparison.csv, comparison_long.csv, "
                                                 "summary.json and plots here")
    c.add_argument("--no-plots", action="store_true", help="with --out: skip the PNG/SVG plots")
    c.add_argument("--parquet", action="store_true", help="with --out: also write the tables as Parquet")
    c.add_argument("--no-tails", action="store_true",
                   help="skip the latency-tails table (percentile CIs, per phase, around DELETE/MOVE) and its plots")
    large(c)
    c.set_defaults(func=cmd_compare)
    add_engine_option(c)

    pr = sub.add_parser("profiles", help="list the named host profiles",
                        description="List the host profiles shipped with desim (costs in ns with their sources, "
                                    "and kernel configuration); use one with profile = NAME in a scenario or "
                                    "--set profile=NAME. desim show prints a profile in full.")
    pr.set_defaults(func=cmd_profiles)

    sh = sub.add_parser("show", help="print the resolved scenario and host profile",
                        description="Print the scenario (after --set overrides and defaults) and its host "
                                    "profile as JSON.")
    common(sh)
    sh.set_defaults(func=cmd_show)

    from .kvm.cli import register as register_kvm
    from .kvm.cli import register_top_level

    register_kvm(sub)
    register_top_level(sub)  # desim calibrate / desim validate
    from .cli_studies import register as register_studies

    register_studies(sub)  # desim sweep / results / capacity
    from .record.cli import register as register_record

    register_record(sub)  # desim record: real guest boots under QEMU TCG
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with engine_from_args(args):
            return int(args.func(args) or 0)
    except DesimInputError as e:
        print(f"desim: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except DesimRunError as e:
        print(f"desim: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("desim: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)  # what finished, where
        return 130
    except BrokenPipeError:  # the reader went away (``desim run | head``): not an error of desim's
        _silence_stdout()
        return 0
    except OSError as e:  # the filesystem refused a write (disk full, permissions changed mid-run)
        where = f"{e.filename}: " if e.filename else ""
        print(f"desim: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so that the interpreter's final flush stays quiet."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
