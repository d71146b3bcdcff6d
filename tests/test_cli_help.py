"""The command line explains itself: help for every option, a description for every command,
errors that show the subcommand's usage, one home for calibrate/validate, progress of a long run."""
from __future__ import annotations

import argparse
import io

import pytest

from desim.cli import build_parser, main
from desim.progress import RunProgress
from desim.scenario import load_scenario
from desim.vm import RunStatus, run_scenario


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "desim"):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield f"{prefix} {name}", sp
                yield from _subparsers(sp, f"{prefix} {name}")


def test_every_command_has_a_description_and_every_option_help():
    for name, sp in _subparsers(build_parser()):
        assert sp.description, f"{name} has no description"
        for a in sp._actions:
            if a.option_strings and a.help != argparse.SUPPRESS and "-h" not in a.option_strings:
                assert a.help, f"{name} {a.option_strings[0]} has no help"


def test_calibrate_and_validate_live_at_the_top_and_kvm_says_it_aliases_them():
    cmds = dict(_subparsers(build_parser()))
    for c in ("calibrate", "validate"):
        assert "alias" not in cmds[f"desim {c}"].description
        assert cmds[f"desim kvm {c}"].description.startswith(f"alias of 'desim {c}'")


@pytest.mark.parametrize("argv,usage", [
    (["compare", "--precision", "2"], "usage: desim compare"),
    (["compare", "--confidence", "1.5"], "usage: desim compare"),
])
def test_bad_values_show_the_subcommands_usage(capsys, argv, usage):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and usage in err and "between 0 and 1" in err


def test_precision_metrics_needs_precision_and_its_default_is_in_the_help(capsys):
    assert main(["compare", "--precision-metrics", "faults"]) == 2
    assert "give --precision" in capsys.readouterr().err
    help_text = dict(_subparsers(build_parser()))["desim compare"].format_help()
    assert "default: faults completion_ns" in " ".join(help_text.split())


def test_unknown_precision_metric_is_one_line(capsys):
    rc = main(["compare", "--precision", "0.5", "-n", "3", "--precision-metrics", "nosuch",
               "--set", "phases.1.accesses=2000", "--set", "vm.memslots.0.size='8MiB'"])
    err = capsys.readouterr().err
    assert rc == 2 and "--precision-metrics nosuch: no such metric (known: faults" in err


def test_precision_says_why_it_stopped(capsys):
    varied = ["compare", "--set", "phases.1.accesses=20000", "--set", "vm.memslots.0.size='32MiB'"]
    assert main(varied + ["-n", "3", "--precision", "0.000001", "--precision-metrics", "faults"]) == 0
    out = capsys.readouterr().out
    assert "stopped at the maximum of 3 replications (-n) before the target: worst faults +-" in out
    argv = ["compare", "--set", "phases.1.accesses=2000", "--set", "vm.memslots.0.size='8MiB'"]
    assert main(argv + ["-n", "20", "--precision", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "was within +-50.00% at 3 and stayed there for 5 more (look-ahead" in out
    assert "8 paired replications" in out


def test_run_progress_bar_on_a_terminal_and_lines_in_a_log():
    st = RunStatus(sim_ns=41.2e6, phase="work", phase_index=1, phases=2, fraction=0.62, faults=81234)
    tty = io.StringIO()
    with RunProgress("rom-toggle fast", stream=tty, tty=True) as p:
        p.update(st)
    assert "62%" in tty.getvalue() and "phase 2/2 work" in tty.getvalue()
    log = io.StringIO()
    with RunProgress("rom-toggle fast", stream=log, tty=False, interval_s=0.0) as p:
        p.update(st)
    assert log.getvalue() == ("rom-toggle fast: ~62% done, phase 2/2 work, simulated 41.2 ms, 81,234 faults, "
                              f"{log.getvalue().rsplit(', ', 1)[1]}")
    quiet = io.StringIO()
    with RunProgress("x", enabled=False, stream=quiet, tty=False, interval_s=0.0) as p:
        p.update(st)
    assert quiet.getvalue() == ""


def test_progress_checkpoints_leave_the_results_alone():
    sc = load_scenario(None).with_overrides({"phases.1.accesses": 3000, "vm.memslots.0.size": "8MiB"})
    seen: list[RunStatus] = []
    plain = run_scenario(sc, "fast", 3, 1)
    watched = run_scenario(sc, "fast", 3, 1, progress=seen.append)
    assert watched.metrics == plain.metrics
    assert seen and [s.phase_index for s in seen] == sorted(s.phase_index for s in seen)
    fr = [s.fraction for s in seen]
    assert fr == sorted(fr) and 0 <= fr[0] and fr[-1] <= 1
    assert seen[-1].phases == 2 and seen[-1].sim_ns <= plain.metrics["completion_ns"]
