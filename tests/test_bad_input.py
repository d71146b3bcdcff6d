"""Bad input: one clear message naming the problem, exit status 2, nothing written."""
from __future__ import annotations

import pytest

from desim.cli import main

GOOD = """
name = "t"
[vm]
vcpus = 2
[[vm.memslots]]
id = 0
gpa = 0
size = "8MiB"
[[phases]]
name = "p"
pattern = "sequential"
slot = 0
"""


def _run(tmp_path, capsys, text: str | None, *extra: str):
    args = ["run"]
    if text is not None:
        f = tmp_path / "s.toml"
        f.write_text(text)
        args.append(str(f))
    out = tmp_path / "out"
    rc = main(args + ["--out", str(out), *extra])
    err = capsys.readouterr().err
    return rc, err, out


def test_good_file_runs(tmp_path, capsys):
    rc, err, out = _run(tmp_path, capsys, GOOD)
    assert rc == 0 and (out / "summary.json").is_file() and (out / "vcpus.csv").is_file()


@pytest.mark.parametrize("text,needle", [
    (GOOD.replace('name = "t"', 'name = "t"\ncolour = "red"'), "colour: unknown field"),
    (GOOD + '\n[[vm.memslots]]\nid = 1\ngpa = "4MiB"\nsize = "8MiB"\n', "overlap"),
    (GOOD.replace('size = "8MiB"', "size = -4096"), "vm.memslots.0.size"),
    (GOOD.replace('name = "t"', 'name = "t"\nzap_control = 2'), "EINVAL"),
    (GOOD.replace('size = "8MiB"', 'size = "8 parsecs"'), "vm.memslots.0.size"),
    (GOOD.replace('size = "8MiB"', "size = 4097"), "multiple of 4 KiB"),
    (GOOD.replace("vcpus = 2", "vcpus = 0"), "vm.vcpus"),
    (GOOD.replace("slot = 0", "slot = 9"), "memslot 9"),
    (GOOD + '[[phases.memslot_ops]]\nat_us = 1\nop = "delete"\nslot = 4\n', "no such slot"),
    (GOOD.replace('name = "t"', 'name = "t"\nprofile = "nope"'), "profile 'nope'"),
    ("this is = = not toml", "not valid TOML"),
])
def test_bad_scenario_files(tmp_path, capsys, text, needle):
    rc, err, out = _run(tmp_path, capsys, text)
    assert rc == 2
    assert needle in err, err
    assert err.startswith("desim: error:") and err.count("\n") == 1
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_file(tmp_path, capsys):
    rc = main(["run", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.toml: scenario file not found" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,needle", [
    (["run", "--policy", "sloppy"], "invalid choice"),
    (["compare", "--replications", "0"], "--replications/-n: must be >= 1"),
    (["compare", "--replications", "many"], "must be an integer"),
    (["run", "--seed", "-3"], "must be >= 0"),
    (["compare", "--confidence", "95"], "argument --confidence: must be between 0 and 1"),
])
def test_bad_arguments(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_bad_override(tmp_path, capsys):
    rc, err, out = _run(tmp_path, capsys, GOOD, "--set", "vm.vcpus=-1")
    assert rc == 2 and "vm.vcpus" in err and not out.exists()
    rc, err, out = _run(tmp_path, capsys, GOOD, "--set", "novalue")
    assert rc == 2 and "FIELD=VALUE" in err
