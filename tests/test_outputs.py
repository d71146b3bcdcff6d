"""Output paths and atomic writes: checked before any work, never half-written, safe under concurrent writers."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from desim.errors import DesimInputError
from desim.outputs import check_output_dir, check_output_file, json_text, write_outputs

NAMES = ["a.txt", "b.txt", "c.txt", "summary.json"]


def _writer(args: tuple[str, int, int, object]) -> str:
    out, who, rounds, barrier = args
    for r in range(rounds):
        barrier.wait()  # every process renames at (nearly) the same moment
        files = {n: (lambda p, n=n, r=r: p.write_text(f"{who} {r} {n}\n" * 200)) for n in NAMES}
        write_outputs(Path(out) / f"round{r}", files)
    return "ok"


def test_concurrent_writers_of_the_same_new_out(tmp_path):
    """Issue 10 item 11: 8 processes x 10 rounds write the same new --out at once: no error, no mixed file."""
    procs, rounds = 8, 10
    ctx = mp.get_context("fork")
    barrier = ctx.Manager().Barrier(procs)
    with ctx.Pool(procs) as pool:
        assert pool.map(_writer, [(str(tmp_path), w, rounds, barrier) for w in range(procs)]) == ["ok"] * procs
    for r in range(rounds):
        d = tmp_path / f"round{r}"
        assert sorted(p.name for p in d.iterdir()) == sorted(NAMES)
        for n in NAMES:
            lines = set((d / n).read_text().splitlines())
            assert len(lines) == 1 and lines.pop().endswith(f" {r} {n}")  # one writer's complete file
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"round{r}" for r in range(rounds)]  # no temp dirs


def test_another_writer_wins_the_race(tmp_path, monkeypatch):
    """The race of item 11, made deterministic: another run creates --out between our check and our rename."""
    import desim.outputs as outputs

    out = tmp_path / "out"
    real_rename = os.rename

    def competitor_first(src, dst):
        if Path(dst) == out and not out.exists():
            out.mkdir()
            for n in NAMES:
                (out / n).write_text("competitor\n")
        return real_rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", competitor_first)
    write_outputs(out, {n: (lambda p, n=n: p.write_text(f"mine {n}\n")) for n in NAMES})
    assert {n: (out / n).read_text() for n in NAMES} == {n: f"mine {n}\n" for n in NAMES}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_writer_leaves_nothing(tmp_path):
    def boom(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        write_outputs(tmp_path / "out", {"a.txt": lambda p: p.write_text("x"), "b.txt": boom})
    assert list(tmp_path.iterdir()) == []


def test_existing_out_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    write_outputs(out, {"a.txt": lambda p: p.write_text("1"), "keep.txt": lambda p: p.write_text("k")})
    write_outputs(out, {"a.txt": lambda p: p.write_text("2")})
    assert (out / "a.txt").read_text() == "2" and (out / "keep.txt").read_text() == "k"


@pytest.mark.parametrize("make,flag,needle", [
    (lambda t: "", "--out", "empty path"),
    (lambda t: str(t / "f"), "--out", "exists and is not a directory"),
    (lambda t: str(t / "f" / "sub"), "--out", "is a file, not a directory"),
    (lambda t: "/proc/desim-x", "--store", "cannot create anything in /proc"),
    (lambda t: str(t / ("x" * 300)), "--out", "name too long"),
])
def test_bad_output_dirs(tmp_path, make, flag, needle):
    (tmp_path / "f").write_text("x")
    before = sorted(tmp_path.iterdir())
    with pytest.raises(DesimInputError, match=needle):
        check_output_dir(make(tmp_path), flag)
    assert sorted(tmp_path.iterdir()) == before  # the probe leaves nothing behind


def test_good_output_paths_create_nothing(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper")
    check_output_file(tmp_path / "p.toml", "--out", (".toml",))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DesimInputError, match="must end in .png"):
        check_output_file(tmp_path / "p.gif", "--plot", (".png", ".svg"))
    with pytest.raises(DesimInputError, match="is a directory"):
        check_output_file(tmp_path, "--out")


def test_json_is_strict():
    """Issue 10 item 10: NaN and infinities are written as null; the text parses with a strict parser."""
    text = json_text({"a": float("nan"), "b": [np.float64("inf"), -np.inf, 1.5, np.int64(3)], "c": {"d": np.nan}})
    def refuse(c: str) -> None:
        raise AssertionError(c)
    assert json.loads(text, parse_constant=refuse) == {"a": None, "b": [None, None, 1.5, 3], "c": {"d": None}}
    assert "NaN" not in text and "Infinity" not in text


def test_compare_summary_is_strict_json(tmp_path):
    """``compare -n 2`` has n/a ratios (zero baselines): summary.json carries null, not NaN."""
    from desim.cli import main

    sc = tmp_path / "s.toml"
    sc.write_text('name = "t"\n[vm]\nvcpus = 2\n[[vm.memslots]]\nid = 0\ngpa = 0\nsize = "4MiB"\n'
                  '[[phases]]\nname = "p"\npattern = "sequential"\nslot = 0\n')
    assert main(["compare", str(sc), "-n", "2", "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    text = (tmp_path / "o" / "summary.json").read_text()
    assert "NaN" not in text
    rows = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c)))["comparison"]
    assert any(r["ratio"] is None for r in rows)  # remote_flushes: 0 under both policies
    assert os.listdir(tmp_path) == ["o", "s.toml"] or sorted(os.listdir(tmp_path)) == ["o", "s.toml"]


def test_out_may_be_dot_or_dotdot(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    for where in (".", "..", "./", "c/.."):
        check_output_dir(where)
        write_outputs(where, {"x.txt": lambda p, w=where: p.write_text(w)})
    assert (tmp_path / "a" / "b" / "x.txt").read_text() == "c/.." and (tmp_path / "a" / "x.txt").read_text() == ".."
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["x.txt"]
