"""Bad input: one clear message naming the problem, exit status 2, nothing written."""
from __future__ import annotations

from pathlib import Path

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
    assert rc == 2 and "nope.toml: cannot read scenario file: no such file" in err
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


# ---- issue 10: each reproducer of the QA pass ends in one line and exit 2, before any work ----------

def _one_line(rc: int, err: str) -> None:
    assert rc == 2, err
    assert err.startswith("desim: error:") and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("extra,needle", [
    # item 4: KVM's limits on slot sizes and addresses
    (["--set", 'vm.memslots.0.size="1000TiB"'], "KVM_MEM_MAX_NR_PAGES"),
    (["--set", "vm.memslots.0.gpa=18446744073709551616"], "46-bit guest physical address space"),
    (["--set", 'vm.memslots.0.gpa="64TiB"'], "46-bit guest physical address space"),
    # item 7: silent wrong meanings
    (["--set", "phases.0.vcpus=-1"], "phases.0.vcpus"),
    (["--set", "phases.0.vcpus=0"], "phases.0.vcpus"),
    (["--set", "phases.0.vcpus=3"], "phases.0.vcpus: 3 but the VM has 2"),
    (["--set", "phases.-1.name=x"], "negative indices are not accepted"),
    (["--set", "phases.0.vcpus=true"], "must be an integer"),
    (["--set", "access_dist.kind=lognormal"], "access_dist: kind = 'lognormal' needs sigma"),
    (["--set", 'vm.memslots.0.prealloc="yes"'], "must be true or false"),
    (["--set", 'zap_control="1"'], "zap_control: must be an integer"),
    (["--set", "vm.memslots.0.size=8388608.0"], "vm.memslots.0.size"),
    # item 8: NaN and infinities, the field named
    (["--set", "profile_overrides.costs.vm_exit=inf"], "profile_overrides.costs.vm_exit: must be a finite number"),
    (["--set", "phases.0.access_ns=nan"], "phases.0.access_ns: must be a finite number"),
    (["--set", "time_limit_ms=inf"], "time_limit_ms: must be a finite number"),
    # item 9: run-away work
    (["--set", "phases.0.passes=1_000_000_000"], "over the limit of 1e+09"),
    # item 1: output paths
    (["--out", ""], "--out: an empty path"),
])
def test_issue10_reproducers(tmp_path, capsys, extra, needle):
    f = tmp_path / "s.toml"
    f.write_text(GOOD)
    args = ["run", str(f), *extra]
    if "--out" not in extra:
        args += ["--out", str(tmp_path / "out")]
    rc = main(args)
    err = capsys.readouterr().err
    _one_line(rc, err)
    assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


def test_duplicate_phase_names_and_address_space(tmp_path, capsys):
    dup = GOOD + '[[phases]]\nname = "p"\npattern = "sequential"\nslot = 0\n'
    rc, err, out = _run(tmp_path, capsys, dup)
    _one_line(rc, err)
    assert "phase name 'p' appears twice" in err and not out.exists()
    trace = Path(__file__).resolve().parents[1] / "workloads/traces/qemu-7.2/seabios-pc-6G.memslots.log"
    bad_as = GOOD + f'[phases.memslot_trace]\npath = "{trace}"\naddress_space = -1\n'
    rc, err, out = _run(tmp_path, capsys, bad_as)
    _one_line(rc, err)
    assert "address_space" in err


@pytest.mark.parametrize("text,needle", [
    ("x = " + "[" * 2000 + "]" * 2000 + "\n", "nested 2000 levels deep"),
    ('name = "caf\xe9"\n', "expected UTF-8 text"),
])
def test_parser_limits(tmp_path, capsys, text, needle):
    f = tmp_path / "s.toml"
    f.write_bytes(text.encode("latin-1"))
    rc = main(["run", str(f)])
    err = capsys.readouterr().err
    _one_line(rc, err)
    assert needle in err


def test_non_regular_trace_and_long_profile(tmp_path, capsys):
    rc, err, out = _run(tmp_path, capsys, GOOD + '[phases.memslot_trace]\npath = "/dev/zero"\n')
    _one_line(rc, err)
    assert "/dev/zero: cannot read trace file: not a regular file" in err
    rc, err, out = _run(tmp_path, capsys, GOOD.replace('name = "t"', f'name = "t"\nprofile = "{"x" * 300}"'))
    _one_line(rc, err)
    assert "unknown (named profiles" in err
    (tmp_path / "p.toml").write_bytes(b"name = '\xff'\n")
    rc, err, out = _run(tmp_path, capsys, GOOD.replace('name = "t"', f'name = "t"\nprofile = "{tmp_path}/p.toml"'))
    _one_line(rc, err)
    assert "expected UTF-8" in err


@pytest.mark.parametrize("argv,needle", [
    (["compare", "--metrics", "nosuch", "-n", "2"], "--metrics nosuch: no such metric (known: faults,"),
    (["compare", "--metrics", "nosuch", "--precision", "0.5", "-n", "2"], "--metrics nosuch: no such metric"),
    (["compare", "--scheduler", "tcp://"], "expected a Dask scheduler address"),
    (["compare", "--scheduler", "inproc://x"], "inproc:// address exists only inside"),
    (["compare", "--store", "FILE"], "--store"),
    (["compare", "--out", "FILE"], "--out"),
    (["run", "--out", "FILE/sub"], "is a file, not a directory"),
    (["run", "--out", "/proc/desim-x"], "cannot create anything in /proc"),
])
def test_issue9_and_10_arguments_checked_before_any_work(tmp_path, capsys, monkeypatch, argv, needle):
    """Issue 9 items 2-3, issue 10 items 1, 6, 12: refused before any run and before anything is created."""
    import desim.vm

    def no_run(*a, **k):
        raise AssertionError("a run started before the arguments were checked")
    monkeypatch.setattr(desim.vm.Vm, "run", no_run)
    (tmp_path / "FILE").write_text("x")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    rc = main(argv[:1] + [str(_small(tmp_path))] + argv[1:])
    err = capsys.readouterr().err
    _one_line(rc, err)
    assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "s.toml"]


def _small(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(GOOD)
    return f


def test_no_store_created_before_a_failing_input(tmp_path, capsys):
    """Issue 10 item 12: a missing perf trace fails validation; the --store directory is never created."""
    bad = GOOD.replace('pattern = "sequential"\nslot = 0', 'pattern = "trace"\nperf_trace = "missing.txt"')
    f = tmp_path / "s.toml"
    f.write_text(bad)
    rc = main(["compare", str(f), "-n", "2", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    _one_line(rc, err)
    assert "missing.txt: cannot read trace file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]
