"""benchmarks/compare_experiments.py runs each side's own desim, and says so when it did not.

Until this was checked, most experiment scripts imported the desim installed in the interpreter's
environment (they do not put their checkout on ``sys.path``), so both sides of a comparison ran the
same code and came out "identical" by construction.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

import desim

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cmp():
    spec = importlib.util.spec_from_file_location("compare_experiments", ROOT / "benchmarks" / "compare_experiments.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_side_imports_its_own_checkout(cmp, tmp_path):
    # a copy of the package with one source byte changed: another fingerprint, and the copy is what runs
    src = tmp_path / "other"
    shutil.copytree(ROOT / "desim", src / "desim", ignore=shutil.ignore_patterns("__pycache__"))
    with open(src / "desim" / "errors.py", "a") as f:
        f.write("\n# changed\n")
    got = cmp.side_fingerprint(src)
    assert got != desim.model_fingerprint()
    assert cmp.side_fingerprint(ROOT) == desim.model_fingerprint()
    env = cmp.side_env(src, "fast")
    assert env["PYTHONPATH"].split(":")[0] == str(src) and env["DESIM_ENGINE"] == "fast"


def test_a_checkout_without_its_own_desim_is_refused(cmp, tmp_path):
    (tmp_path / "experiments").mkdir()
    with pytest.raises(SystemExit, match="not the checkout's own package|fails there"):
        cmp.side_fingerprint(tmp_path)


def test_outputs_of_other_code_are_found(cmp, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"a": [{"model_version": "1-aaaa"}], "model_version": "1-bbbb"}))
    (tmp_path / "sub" / "runs.csv").write_text("x,model_version\n1,1-cccc\n2,\n")
    assert cmp.recorded_versions(tmp_path) == {"1-aaaa", "1-bbbb", "1-cccc"}
    assert cmp.recorded_versions(tmp_path / "sub") == {"1-cccc"}


def test_reused_outputs_are_checked_against_their_run_record(cmp, tmp_path, monkeypatch, capsys):
    # outputs kept from an earlier run (--reuse, --sides none) with no model_version of their own, as
    # seed_claims wrote them before 711d240: only the run record says which code and engine made them
    work = tmp_path / "work"
    for side in ("base", "head"):
        (work / side / "seed_claims-quick").mkdir(parents=True)
        (work / side / "seed_claims-quick" / "claims.csv").write_text("claim,simulated\n1,-0.25\n")
    monkeypatch.setattr(cmp, "checkout", lambda rev, work: ROOT)
    mine = desim.model_fingerprint()
    argv = ["--base", "x", "--head", "y", "--modes", "quick", "--only", "seed_claims", "--work", str(work),
            "--reuse", "--sides", "none"]

    cmp.write_run_record(work / "base" / "seed_claims-quick", mine, "reference", 0, 12.34)
    cmp.write_run_record(work / "head" / "seed_claims-quick", mine, "reference", 0, 5.0)
    assert cmp.main(argv) == 0
    assert "| seed_claims | quick | 1 | 12 / 5 | identical |" in capsys.readouterr().out

    cmp.write_run_record(work / "head" / "seed_claims-quick", "1-0000000000000000", "reference", 0, 5.0)
    assert cmp.main(argv) == 1
    assert "WRONG CODE: outputs or run record name model_version head ['1-0000000000000000']" in capsys.readouterr().out

    cmp.write_run_record(work / "head" / "seed_claims-quick", mine, "fast", 0, 5.0)
    assert cmp.main(argv) == 1
    assert "WRONG ENGINE: head ran with DESIM_ENGINE=fast" in capsys.readouterr().out

    (work / "head" / "seed_claims-quick.run.json").unlink()  # made before the tool kept records
    assert cmp.main(argv) == 0
    assert "| 12 / ? | identical |" in capsys.readouterr().out


def test_two_sides_started_together_share_one_checkout(cmp, tmp_path, monkeypatch):
    # `--sides base` and `--sides head` run as two processes at once; both check out both revisions
    import subprocess
    import threading

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    for i in range(200):  # enough files that a checkout takes a moment
        (repo / f"f{i}.txt").write_text(f"{i}\n" * 200)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    monkeypatch.setattr(cmp, "ROOT", repo)
    for round_ in range(4):
        work = tmp_path / f"work{round_}"
        work.mkdir()
        got, errors = [], []

        def side():
            try:
                got.append(cmp.checkout("HEAD", work))
            except SystemExit as e:
                errors.append(str(e))

        threads = [threading.Thread(target=side) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(got) == 2 and got[0] == got[1]
        assert (got[0] / "f199.txt").read_text() == "199\n" * 200
