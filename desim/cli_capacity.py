"""``desim capacity``: the largest value of a scenario field that keeps a metric within an SLO.

    desim capacity workloads/x.toml --vary vm.vcpus --range 1:896 \\
        --metric fault_latency_p99_ns --slo 50us --policy targeted
    desim capacity --vary vm.memslots.0.size --range 64MiB:8GiB --step 64MiB \\
        --metric completion_ns --slo 'ratio<=0.9' --policy targeted --baseline fast

See :mod:`desim.studies.capacity` for how each step is decided.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .errors import DesimInputError


def _parse_value(text: str, what: str) -> tuple[float, bool]:
    """A number or a size ("64MiB"): (value, is_size)."""
    from .scenario import parse_size

    t = text.strip()
    try:
        v = float(t)
        return v, False
    except ValueError:
        pass
    try:
        return float(parse_size(t)), True
    except Exception:  # noqa: BLE001
        raise DesimInputError(f"{what} {text!r}: expected a number or a size such as 64MiB") from None


def _fmt_for(is_size: bool) -> Callable[[float], str]:
    if not is_size:
        return lambda v: f"{v:g}"
    from .studies.tables import fmt_bytes

    return fmt_bytes


def cmd_capacity(args: argparse.Namespace, backend_of: Callable, check_out: Callable) -> int:
    from .cli import _scenario
    from .studies.capacity import find_capacity, parse_slo, plot_curve, scenario_evaluator
    from .studies.cluster import open_backend
    from .studies.store import ResultStore

    if ":" not in args.range:
        raise DesimInputError(f"--range {args.range!r}: expected LO:HI, e.g. 1:896 or 64MiB:8GiB")
    lo_t, hi_t = args.range.split(":", 1)
    lo, size_lo = _parse_value(lo_t, "--range")
    hi, size_hi = _parse_value(hi_t, "--range")
    is_size = size_lo or size_hi
    step = _parse_value(args.step, "--step")[0] if args.step else (4096.0 if is_size else 1.0)
    integer = all(float(v).is_integer() for v in (lo, hi, step))
    slo = parse_slo(args.slo, args.metric)
    if args.policy not in ("fast", "targeted") or args.baseline not in ("fast", "targeted"):
        raise DesimInputError("--policy and --baseline: fast or targeted")
    if slo.ratio and args.policy == args.baseline:
        raise DesimInputError(f"--slo {args.slo}: a ratio needs --policy and --baseline to differ")
    sc = _scenario(args)
    for v in (lo, hi):  # both ends must be valid scenarios before any run
        sc.with_overrides({args.vary: int(v) if integer else v})
    from .studies.sweepfile import known_metric

    if not known_metric(args.metric, sc):
        raise DesimInputError(f"--metric {args.metric}: unknown (e.g. fault_latency_p99_ns, completion_ns, faults, "
                              f"vcpu_stall_ns; `desim run` prints them all)")
    backend = backend_of(args)
    check_out(args.out)
    fmt = _fmt_for(is_size)
    print(f"capacity: {args.vary} in [{fmt(lo)}, {fmt(hi)}] (step {fmt(step)}), {args.policy} zap, "
          f"SLO {'ratio ' + args.policy + '/' + args.baseline + ' of ' if slo.ratio else ''}{slo.metric} "
          f"{slo.op} {slo.bound:g}; each step decided from a {args.confidence:.0%} CI "
          f"({args.min_reps}-{args.max_reps} replications)", file=sys.stderr)
    t0 = time.perf_counter()
    store = ResultStore(args.store) if args.store else None
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if not args.quiet else None
    with open_backend(backend) as be:
        ev = scenario_evaluator(sc, args.vary, slo, args.policy, args.baseline, args.seed, be, store, integer,
                                progress=args.progress if args.progress is not None else False)
        res = find_capacity(ev, lo, hi, slo, vary=args.vary, step=step, scale=args.scale,
                            confidence=args.confidence, min_reps=args.min_reps, max_reps=args.max_reps,
                            batch=args.batch, budget=args.budget, progress=say)
    print(res.summary(fmt))
    print(f"stopped: {res.stopped}")
    for n in res.notes:
        print(f"note: {n}")
    unit = " (ratio)" if slo.ratio else ""
    print(f"{'value':>12}  {'n':>3}  {'mean' + unit:>14}  {'CI low':>14}  {'CI high':>14}  verdict")
    for p in res.points:
        print(f"{fmt(p.value):>12}  {p.n:>3}  {p.mean:>14.6g}  {p.low:>14.6g}  {p.high:>14.6g}  {p.verdict}")
    print(f"{res.replications} replications per policy, {time.perf_counter() - t0:.1f} s")
    if args.out:
        import json

        from .experiment import write_outputs

        def curve(p: Path) -> None:
            plot_curve(res, p, fmt)
        files: dict[str, Any] = {"capacity.png": curve, "capacity.svg": curve, "capacity.json": lambda p: p.write_text(
            json.dumps({"summary": res.summary(fmt), "answer": res.answer, "decided": res.decided,
                        "bracket": res.bracket, "mode": res.mode, "stopped": res.stopped, "notes": res.notes,
                        "vary": args.vary, "slo": {"metric": slo.metric, "op": slo.op, "bound": slo.bound,
                                                   "ratio": slo.ratio, "text": slo.text},
                        "policy": args.policy, "baseline": args.baseline, "confidence": args.confidence,
                        "points": [p.__dict__ for p in res.points]}, indent=1, default=str) + "\n")}
        write_outputs(args.out, files)
        print(f"wrote capacity.png, capacity.svg, capacity.json to {args.out}")
    return 0 if res.decided else 3


def register(sub: argparse._SubParsersAction, backend_options: Callable, backend_of: Callable,
             check_out: Callable) -> None:
    from .argtypes import int_at_least

    c = sub.add_parser("capacity", help="the largest value of a field that keeps a metric within an SLO, "
                                        "decided from CIs",
                       description="Find the largest value of --vary in --range for which --metric meets --slo "
                                   "under --policy, deciding each step from a confidence interval (bisection on "
                                   "a monotone factor). Exit 0 when decided, 3 when undecided.")
    c.add_argument("scenario", nargs="?", default=None, help="scenario TOML (default: built-in)")
    c.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a scenario field (repeatable)")
    c.add_argument("--seed", type=int_at_least(0), default=1, help="base seed (default 1)")
    c.add_argument("--vary", required=True, metavar="FIELD",
                   help="the scenario field to vary (dotted path: vm.vcpus, vm.memslots.0.size, "
                        "phases.1.memslot_ops.0.every_us, ...)")
    c.add_argument("--range", required=True, metavar="LO:HI", help="the values to search, e.g. 1:896 or 64MiB:8GiB")
    c.add_argument("--step", default=None, help="resolution of the answer (default 1; 4KiB for sizes)")
    c.add_argument("--scale", choices=["auto", "linear", "log"], default="auto",
                   help="bisection midpoints: geometric (log) or arithmetic; auto: log when HI/LO >= 16")
    c.add_argument("--metric", required=True, help="the metric the SLO bounds, e.g. fault_latency_p99_ns")
    c.add_argument("--slo", required=True,
                   help="the bound: 50us, <=2ms, >=1000, or ratio<=0.9 (policy over baseline, paired)")
    c.add_argument("--policy", default="targeted", help="the zap policy planned for (default targeted)")
    c.add_argument("--baseline", default="fast", help="the other side of a ratio SLO (default fast)")
    c.add_argument("--confidence", type=float, default=0.95, help="confidence of each decision (default 0.95)")
    c.add_argument("--min-reps", type=int_at_least(2), default=3, help="replications before deciding (default 3)")
    c.add_argument("--max-reps", type=int_at_least(2), default=20,
                   help="replications at most per point (default 20); then the point is undecided")
    c.add_argument("--batch", type=int_at_least(1), default=3, help="replications added at a time (default 3)")
    c.add_argument("--budget", type=int_at_least(1), default=None,
                   help="replications in total (per policy) before stopping undecided (default: no limit)")
    c.add_argument("--store", default=None, metavar="DIR", help="keep every run here (a re-run is instant)")
    c.add_argument("--out", default=None, metavar="DIR", help="write capacity.png/svg (the curve) and capacity.json")
    c.add_argument("--quiet", action="store_true", help="no per-step lines on stderr")
    backend_options(c)
    c.set_defaults(func=lambda a: cmd_capacity(a, backend_of, check_out))
