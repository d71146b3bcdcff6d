"""The README runs as printed: its TOML, its commands, its table, its file names.

What is run in full and what is shortened is stated in the README ("This README is tested").
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from desim.cli import build_parser, main
from desim.scenario import load_scenario
from tests.conftest import kvm_unusable

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "README.md").read_text()


def fenced(lang: str) -> list[str]:
    """The bodies of the ```lang blocks."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", TEXT, re.S | re.M)


def inline_code() -> list[str]:
    outside = re.sub(r"^```.*?^```$", "", TEXT, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", outside)


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _resolve(tokens: list[str]) -> tuple[argparse.ArgumentParser, list[str]] | None:
    """The subparser a ``desim ...`` line names, and the rest of its tokens (None: a placeholder)."""
    p = build_parser()
    rest = tokens[1:]
    while rest and _subparsers(p):
        sub = _subparsers(p)
        if rest[0] not in sub:
            assert rest[0].isupper(), f"'desim {' '.join(tokens[1:])}': {rest[0]} is not a desim command"
            return None
        p, rest = sub[rest[0]], rest[1:]
    return p, rest


def test_the_first_screen_has_exactly_the_two_commands():
    first = TEXT.split("\n---\n", 1)[0]
    commands = [line.strip() for line in first.splitlines() if line.startswith("    ")]
    assert len(commands) == 2
    assert commands[0].endswith(".venv/bin/desim compare") and "pip install -q -e ." in commands[0]
    assert commands[1].endswith(".venv/bin/python -m pytest -q") and '-e ".[test]"' in commands[1]


def test_the_scenario_toml_is_the_builtin_default_and_runs_as_printed(tmp_path, capsys):
    (toml,) = [b for b in fenced("toml") if 'name = "rom-toggle"' in b]
    f = tmp_path / "rom-toggle.toml"
    f.write_text(toml)
    sc, default = load_scenario(f), load_scenario(None)
    mine = sc.model_dump(exclude={"description"})
    theirs = default.model_dump(exclude={"description"})
    # the same scenario apart from the toggle spelling out the default's create + delete pairs
    assert {k: v for k, v in mine.items() if k != "phases"} == {k: v for k, v in theirs.items() if k != "phases"}
    from desim.scenario import phase_ops
    for a, b in zip(sc.phases, default.phases):
        assert [(o.time_ns, o.op, o.slot) for o in phase_ops(a)] == [(o.time_ns, o.op, o.slot) for o in phase_ops(b)]
        assert a.touch_list() == b.touch_list()
    assert main(["run", str(f), "--policy", "targeted", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rom-toggle: policy=targeted seed=1") and "faults_after_zap" in out


def _table_layout(text: str) -> tuple[str, list[tuple[str, str]]]:
    lines = text.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    header = " ".join(lines[start].split())
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break  # compare prints the latency tails after a blank line (see "Latency tails")
        rows.append(tuple(line.split()[:2]))
    return header, rows


def test_compare_prints_the_readme_table(default_compare):
    block = next(b for b in fenced("text") if "paired replications (common random numbers)" in b)
    out, err, code, _ = default_compare  # `desim compare -n 2` (the README's run has the default -n 10)
    assert code == 0, err
    assert out.startswith("rom-toggle: 2 paired replications (common random numbers), seed 1, ")
    assert _table_layout(out) == _table_layout(block)


def test_every_desim_command_in_the_text_names_real_commands_and_options():
    seen = 0
    for code in inline_code():
        if not code.startswith("desim "):
            continue
        r = _resolve(shlex.split(code.replace("\\|", "|")))
        if r is None:
            continue
        parser, rest = r
        known = {s for a in parser._actions for s in a.option_strings}
        for tok in rest:
            if tok.startswith("-") and not tok.lstrip("-").isdigit():
                assert tok in known, f"README: '{code}': {parser.prog} has no option {tok}"
        seen += 1
    assert seen >= 10


def test_the_readme_says_which_commands_take_set():
    m = re.search(r"`run`, `compare`, `show` and `capacity` take a scenario file and `--set FIELD=VALUE`", TEXT)
    assert m, "README: the sentence saying which commands take --set changed: update this test"
    takes = {name for name, p in _subparsers(build_parser()).items()
             if "--set" in {s for a in p._actions for s in a.option_strings}}
    assert takes == {"run", "compare", "show", "capacity", "sweep"}
    assert "`sweep`\ntakes a sweep file, and its `--set` changes the sweep's base scenario" in TEXT


def test_shell_blocks_are_accepted_as_printed_and_probe_runs_where_kvm_works(capsys):
    lines = [line.split("#", 1)[0].strip() for b in fenced("sh") for line in b.splitlines()]
    lines = [line for line in lines if line]
    assert lines, "no ```sh block in the README"
    kvm = kvm_unusable(targeted=False) is None
    for line in lines:
        tokens = shlex.split(line)
        assert tokens[0] == "desim", line
        if tokens[1:] == ["kvm", "probe"] and kvm:
            assert main(tokens[1:]) == 0
            continue
        args = build_parser().parse_args(tokens[1:])  # exits 2 on anything argparse refuses
        assert callable(args.func)
    capsys.readouterr()


def test_files_and_modules_named_in_the_readme_exist():
    for code in inline_code():
        words = code.split()
        if len(words) >= 3 and words[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(words[2]) is not None, code
        elif len(words) >= 2 and words[0] == "python":
            assert (ROOT / words[1]).is_file(), code
        elif re.fullmatch(r"(desim|workloads|experiments|benchmarks|docs|tests)/[\w./-]*", code) and "*" not in code:
            assert (ROOT / code).exists() or (ROOT / "workloads" / code).exists(), f"README names {code}"
    for target in re.findall(r"\]\(([^)#]+)\)", TEXT):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links {target}"


@pytest.mark.parametrize("name", ["DESIGN.md", "/work/shared"])
def test_the_readme_stands_alone(name):
    assert name not in TEXT


def _section(title: str) -> str:
    return TEXT.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_sweep_file_is_the_shipped_one_and_its_commands_run_as_printed(capsys):
    import tomllib

    from desim.studies.sweepfile import load_sweep, sweep_from_dict

    sec = _section("Sweeps and capacity planning")
    (block,) = re.findall(r"^```toml\n(.*?)^```$", sec, re.S | re.M)
    shipped = load_sweep(ROOT / "workloads" / "sweeps" / "vcpus-rom.toml")
    printed = sweep_from_dict(tomllib.loads(block), "README")
    assert [p.labels for p in printed.points] == [p.labels for p in shipped.points]
    assert (printed.name, printed.metrics, printed.replications) == (shipped.name, shipped.metrics,
                                                                     shipped.replications)
    # the indented command lines (backslash continuations joined): each is accepted as printed;
    # the dry run runs in full (the sweep, the SLURM jobs and the 80-s capacity search do not)
    joined = re.sub(r"\\\n\s+", "", sec)
    lines = [ln.strip() for ln in joined.splitlines() if ln.startswith("    ") and "desim " in ln]
    cmds = [shlex.split(ln.split("desim ", 1)[1].split("#", 1)[0]) for ln in lines
            if ln.split()[0].endswith("desim")]
    assert {c[0] for c in cmds} == {"sweep", "results", "capacity"}
    for c in cmds:
        args = build_parser().parse_args(c)
        assert callable(args.func)
    dry = next(c for c in cmds if "--dry-run" in c)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        assert main(dry) == 0
    assert "6 points x 2 policies" in capsys.readouterr().out
