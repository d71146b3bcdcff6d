"""``desim kvm probe|measure|calibrate|validate``: the real-KVM harness on the command line.

:func:`register` adds the ``kvm`` subcommand to the parser of ``desim``
(``desim/cli.py``); :func:`register_top_level` adds ``calibrate`` and
``validate`` to any subparsers (``desim kvm`` has them; ``desim`` may add
them at its top level as ``desim calibrate``/``desim validate``). Every leaf sets ``func``, which takes the parsed args and
returns an exit code. Problems the user can fix (no ``/dev/kvm``, not
permitted, a bad scenario field, too little memory) raise
:class:`desim.errors.DesimInputError`, which ``desim`` prints on one line
before exiting with status 2. ``python -m desim.kvm.cli ...`` runs the same
commands standalone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from desim.argtypes import int_at_least
from desim.errors import DesimInputError
from desim.outputs import check_output_file, strict_json, write_file
from desim.kvm.scenario import GUEST_PAGES, OPS, POSITIONS, SCENARIOS, named
from desim.kvm.validate import TWO_VCPU_SCENARIOS, VALIDATION_SCENARIOS
from desim.kvm.vm import KVM_DEV, KvmError

DEFAULT_SCENARIO = "outside"

# option dest -> scenario field
_OVERRIDES = ("ram_mib", "vcpus", "extra_slots", "extra_slot_mib", "op", "target", "position",
              "guest_page", "accessed", "passes", "host_thp", "stride_kib",
              "busy_cpus")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``kvm {probe,measure}`` to ``desim``'s subparsers."""
    kvm = subparsers.add_parser("kvm", help="ground truth from this host's real KVM (/dev/kvm)",
                                description="Measure the zap policies on this host's real KVM.")
    kvm.set_defaults(func=lambda a: (kvm.print_help(), 2)[1])
    sub = kvm.add_subparsers(dest="kvm_command", metavar="{probe,measure,calibrate,validate}")

    p = sub.add_parser("probe", help="what this host's KVM offers (MMU, capabilities, quirks, stats)",
                       description="Open /dev/kvm and report the API version, the MMU kind (TDP, shadow), the "
                                   "capabilities and quirks that matter for memslot zapping (e.g. whether "
                                   "KVM_X86_QUIRK_SLOT_ZAP_ALL can be disabled) and the available KVM stats.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--device", default=KVM_DEV, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_probe)

    m = sub.add_parser("measure", help="run a scenario under both zap policies and compare",
                       description="Run a scenario on real KVM VMs under the fast (global) and the "
                                   "targeted zap policy; print median [min-max] per metric.")
    m.add_argument("--scenario", default=DEFAULT_SCENARIO,
                   help=f"named scenario to start from ({', '.join(SCENARIOS)}; default {DEFAULT_SCENARIO})")
    m.add_argument("--list", action="store_true", help="list the named scenarios and exit")
    m.add_argument("--vms", type=int_at_least(1), default=1, help="VMs run at once (phases in step); default 1")
    m.add_argument("--repeats", type=int_at_least(1), default=3, help="rounds per policy; default 3")
    m.add_argument("--warmup", type=int_at_least(0), default=0,
                   help="rounds run first and discarded (e.g. 1 with --thp, so that host THP runs "
                        "find free huge pages instead of paying for compaction); default 0")
    m.add_argument("--out", type=_path, help="write all runs and the summary as JSON to this file")
    m.add_argument("--quiet", action="store_true", help="no progress lines")
    m.add_argument("--exit", choices=("pio", "mmio"), default="pio",
                   help="how a guest pass returns to the VMM: out to port 0x80 (default) or a write "
                        "to a gpa without memslot (costs one fault per vCPU per pass)")
    g = m.add_argument_group("scenario fields (override the named scenario)")
    g.add_argument("--ram-mib", type=int, dest="ram_mib", help="guest RAM touched by the guest (MiB)")
    g.add_argument("--vcpus", type=int, help="vCPUs of each VM")
    g.add_argument("--extra-slots", type=int, dest="extra_slots", help="memslots besides the RAM slot")
    g.add_argument("--extra-slot-mib", type=int, dest="extra_slot_mib", help="size of each extra slot (MiB)")
    g.add_argument("--op", choices=OPS, help="the memslot operation measured on the target slot")
    g.add_argument("--target", type=int, help="index of the extra slot operated on")
    g.add_argument("--position", choices=POSITIONS, help="target slot inside or outside the touched range")
    g.add_argument("--guest-page", choices=tuple(GUEST_PAGES), dest="guest_page",
                   help="page size of the guest's own page tables")
    g.add_argument("--accessed", action=argparse.BooleanOptionalAction,
                   help="pre-set Accessed/Dirty bits in guest PTEs")
    g.add_argument("--passes", type=int, help="touch passes in populate and in retouch")
    g.add_argument("--stride-kib", type=int, dest="stride_kib", help="touch one byte every N KiB (default 4)")
    g.add_argument("--thp", action=argparse.BooleanOptionalAction, dest="host_thp",
                   help="back guest RAM with madvise(MADV_HUGEPAGE)")
    g.add_argument("--busy-cpus", action=argparse.BooleanOptionalAction, dest="busy_cpus",
                   help="time the memslot ioctls with the other host CPUs busy-looping (default), "
                        "so that the ioctls do not pay for waking an idle CPU (desim/kvm/spin.py)")
    m.add_argument("--device", default=KVM_DEV, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_measure)
    register_top_level(sub, alias_of="desim")
    return kvm


def register_top_level(subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
                       alias_of: str | None = None) -> None:
    """Add ``calibrate`` and ``validate``.

    Their home is the top level (``desim calibrate``, ``desim validate``);
    ``desim kvm`` registers them again with ``alias_of="desim"``, which says in
    their help that they are aliases of the top-level commands.
    """
    def said(cmd: str, text: str) -> str:
        return text if alias_of is None else f"alias of '{alias_of} {cmd}': {text}"

    c = subparsers.add_parser("calibrate", help=said("calibrate", "fit host-profile costs from microscenarios "
                                                                  "on the real KVM"),
                              description=said("calibrate", "Run microscenarios on the real KVM and write a "
                                               "host profile whose measurable costs are fitted "
                                               "(see desim.kvm.calibrate)."))
    c.add_argument("--base", default="shadow-pvm", help="profile supplying the kernel section and the "
                                                        "costs that cannot be measured (default shadow-pvm)")
    c.add_argument("--name", default=None, help="name of the written profile (default BASE-calibrated)")
    c.add_argument("--repeats", type=int_at_least(1), default=7, help="runs of each microscenario (median); default 7")
    c.add_argument("--out", type=_path, required=True, help="profile TOML to write")
    c.add_argument("--json", type=_path, default=None, help="also write the observations and runs as JSON")
    c.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    c.add_argument("--device", default=KVM_DEV, help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_calibrate)

    v = subparsers.add_parser("validate", help=said("validate", "compare real KVM runs with the simulator, "
                                                                "metric by metric"),
                              description=said("validate", "Run named scenarios on this host's real KVM under "
                                               "both zap policies and in the simulator with a host profile, "
                                               "and print real vs simulated per scenario and metric (counts "
                                               "exact, times within a relative error)."))
    v.add_argument("--scenario", action="append", default=None,
                   help=f"named kvm scenario (repeatable; default: 256 MiB versions of "
                        f"{', '.join(VALIDATION_SCENARIOS)} with 1 vCPU and of "
                        f"{', '.join(TWO_VCPU_SCENARIOS)} with 2); known: {', '.join(SCENARIOS)}")
    v.add_argument("--profile", default="shadow-pvm", help="host profile name or TOML (e.g. from calibrate)")
    v.add_argument("--repeats", type=int_at_least(1), default=5, help="real runs per policy (median); default 5")
    v.add_argument("--replications", type=int_at_least(1), default=1, help="simulated runs per policy; default 1")
    v.add_argument("--out", type=_path, default=None, help="write the rows as JSON")
    v.add_argument("--plot", type=_path, default=None, metavar="FILE",
                   help="draw real vs simulated (counts and times, log-log, with the ±20%% band) to "
                        "FILE (.png, .svg or .pdf)")
    v.add_argument("--max-error", type=_fraction, default=None, metavar="REL",
                   help="exit 1 if refaults, SPTEs zapped or first-touch faults differ by more than "
                        "REL (e.g. 0.01) and more than 16")
    v.add_argument("--max-time-error", type=_fraction, default=None, metavar="REL",
                   help="exit 1 if a time (ioctl, phase) differs from the real median by more than REL (e.g. 0.2)")
    v.add_argument("--no-tails", action="store_true",
                   help="skip the latency tails (per-access rdtsc in the guest: p50..p99.9, longest stall)")
    v.add_argument("--tails-only", action="store_true", help="only the latency tails, not the per-metric rows")
    v.add_argument("--tail-repeats", type=int, default=3, help="timed real runs per policy for the tails; default 3")
    v.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    v.add_argument("--device", default=KVM_DEV, help=argparse.SUPPRESS)
    v.set_defaults(func=cmd_validate)


def _fraction(v: str) -> float:
    """argparse type: a finite number >= 0 (a relative error)."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {v!r}") from None
    if not (x >= 0 and x != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {v!r}")
    return x


def _path(v: str) -> Path:
    """argparse type: a non-empty path (``Path("")`` would silently mean the current directory)."""
    if v == "":
        raise argparse.ArgumentTypeError("an empty path names nothing to write; give a path")
    return Path(v)


def _check_out(path: Path | None, flag: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Output files are checked before any KVM work (desim.outputs: one place for every output path)."""
    if path is not None:
        check_output_file(path, flag, suffixes)


def _write_json(path: Path, obj: Any) -> None:
    """Strict JSON (NaN and infinities as null), written atomically."""
    text = json.dumps(strict_json(obj), indent=1, allow_nan=False) + "\n"
    write_file(path, lambda p: p.write_text(text))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from desim.kvm.calibrate import calibrate, profile_toml

    _check_out(args.out, "--out")
    _check_out(args.json, "--json")
    progress = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        cal, base = calibrate(args.base, args.repeats, progress, args.device)
    except KvmError as e:
        print(f"desim kvm calibrate: KVM failed: {e}", file=sys.stderr)
        return 1
    name = args.name or f"{base.name}-calibrated"
    print(f"guest access time {cal.access_ns:.1f} ns per page; fitted costs (ns) [bootstrap 95% interval]:")
    for k, v in cal.costs.items():
        lo, hi = cal.ci95.get(k, (v, v))
        print(f"  {k:18s} {v:12.1f} [{lo:10.1f}, {hi:10.1f}]  {cal.sources.get(k, 'kept from ' + base.name)}")
    for k, d in list(cal.dists.items()) + [(f"hit ({k})", d) for k, d in cal.harness.items()]:
        q = dict(zip(d["p"], d["ns"]))
        ci = d.get("ci95_ns")
        p99 = f" [{ci[d['p'].index(0.99)][0]:.0f}, {ci[d['p'].index(0.99)][1]:.0f}]" if ci else ""
        scaled = "each scenario's access_ns" if k.startswith("hit") else "the mean above"
        print(f"  {k:18s} shape: p50 {q[0.5]:.0f}, p90 {q[0.9]:.0f}, p99 {q[0.99]:.0f}{p99}, p99.9 {q[0.999]:.0f} ns "
              f"(scaled to {scaled})")
    for w in cal.warnings:
        print(f"warning: host timing drifted during calibration: {w}", file=sys.stderr)
    if cal.warnings:
        print("warning: the fitted costs carry that drift; consider running calibrate again", file=sys.stderr)
    toml = profile_toml(cal, base, name)
    write_file(args.out, lambda p: p.write_text(toml))
    print(f"wrote {args.out}")
    if args.json is not None:
        _write_json(args.json, cal.to_dict())
        print(f"wrote {args.json}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from desim.kvm.validate import default_scenarios, format_rows, summary, validate, worst_error, worst_time_error
    from desim.profile import load_profile

    _check_out(args.out, "--out")
    _check_out(args.plot, "--plot", (".png", ".svg", ".pdf"))
    load_profile(args.profile)  # fail early on a bad name or file
    scenarios = [named(n) for n in args.scenario] if args.scenario else default_scenarios()
    progress = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.no_tails and args.tails_only:
        raise DesimInputError("--no-tails and --tails-only: give at most one of them")
    if args.tail_repeats < 1:
        raise DesimInputError(f"--tail-repeats must be >= 1 (got {args.tail_repeats})")
    try:
        if args.tails_only:
            from desim.kvm.simbridge import to_sim

            for sc in scenarios:  # what the simulator cannot mirror fails before any VM runs
                to_sim(sc, args.profile)
            res = {"tool": "desim kvm validate", "profile": args.profile, "repeats": 0, "rows": []}
        else:
            res = validate(scenarios, args.profile, args.repeats, args.replications, progress, args.device)
        if not args.no_tails:
            from desim.kvm.validate_tails import measure_tails, tail_rows

            real = measure_tails(scenarios, args.tail_repeats, progress, args.device)
            res["tail_repeats"] = args.tail_repeats
            res["tails"] = tail_rows(scenarios, real, args.profile, args.replications, progress)
    except KvmError as e:
        print(f"desim kvm validate: KVM failed: {e}", file=sys.stderr)
        return 1
    if not args.tails_only:
        print(format_rows(res))
    if "tails" in res:
        from desim.kvm.validate_tails import format_tail_rows

        print(format_tail_rows(res["tails"]))
    if not args.tails_only:
        print(summary(res))
    if "tails" in res:
        from desim.kvm.validate_tails import tails_summary, tails_why

        print(tails_summary(res["tails"]))
        for line in tails_why(res["tails"]):
            print(line)
    if args.out is not None:
        _write_json(args.out, res)
        print(f"wrote {args.out}")
    if args.plot is not None and res["rows"]:
        from desim.plots import plot_validation

        write_file(args.plot, lambda p: plot_validation(res["rows"], p, f"desim validate, profile {res['profile']}"))
        print(f"wrote {args.plot}")
    if args.plot is not None and res.get("tails"):
        from desim.tailplots import plot_validation_tails

        path = args.plot.with_name(f"{args.plot.stem}-tails{args.plot.suffix}")
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        from desim.kvm.validate_tails import tails_why

        plot_validation_tails(res["tails"], tmp, f"desim validate: latency tails, profile {res['profile']}",
                              tails_why(res["tails"]))
        os.replace(tmp, path)
        print(f"wrote {path}")
    if args.max_error is not None and worst_error(res) > args.max_error:
        print(f"a structural count is off by more than {args.max_error:.0%}", file=sys.stderr)
        return 1
    if args.max_time_error is not None and worst_time_error(res)[0] > args.max_time_error:
        print(f"a time is off by more than {args.max_time_error:.0%}", file=sys.stderr)
        return 1
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from desim.kvm.probe import format_probe, probe

    info = probe(args.device)
    print(json.dumps(info, indent=2) if args.json else format_probe(info))
    return 0


def scenario_from_args(args: argparse.Namespace) -> Any:
    sc = named(args.scenario)
    over = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k, None) is not None}
    if over:
        sc = replace(sc, name=f"{sc.name}+custom", **over)
    return sc


def cmd_measure(args: argparse.Namespace) -> int:
    from desim.kvm.measure import format_summary, measure

    if args.list:
        for name, sc in SCENARIOS.items():
            d = {k: v for k, v in sc.to_dict().items() if k not in ("name", "policy")}
            print(f"{name:12s} " + " ".join(f"{k}={v}" for k, v in d.items()))
        return 0
    sc = scenario_from_args(args)
    _check_out(args.out, "--out")
    progress = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        m = measure(sc, vms=args.vms, repeats=args.repeats, progress=progress, kvm_path=args.device, exit=args.exit,
                    warmup=args.warmup)
    except KvmError as e:
        print(f"desim kvm measure: KVM failed: {e}", file=sys.stderr)
        return 1
    print(format_summary(m))
    if args.out is not None:
        _write_json(args.out, m.to_dict())
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m desim.kvm.cli {probe,measure} ...``."""
    parser = argparse.ArgumentParser(prog="desim")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["kvm", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except DesimInputError as e:
        print(f"desim: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
