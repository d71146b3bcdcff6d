"""Packaging and CI hygiene: the licence the metadata claims, project links, .gitignore, .ci/run's clean-up."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_license_file_matches_the_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]  # PEP 639 (SPDX)
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    assert not any(c.startswith("License ::") for c in meta["classifiers"])  # deprecated beside an SPDX license
    assert meta["urls"] and all(u.startswith("https://") for u in meta["urls"].values())


def test_no_tracked_file_is_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    p = subprocess.run(["git", "ls-files", "-i", "-c", "--exclude-standard"], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [], f".gitignore matches tracked files: {p.stdout.split()}"


def _fake_python(bindir: Path, rc: int) -> None:
    """A ``python3`` whose ``-m venv DIR`` makes a venv whose python 'installs' and 'tests' with exit ``rc``."""
    inner = f"#!/bin/sh\ncase \"$*\" in *pytest*) exit {rc};; esac\nexit 0\n"
    script = ("#!/bin/sh\n"
              "if [ \"$1\" = -m ] && [ \"$2\" = venv ]; then\n"
              "  mkdir -p \"$3/bin\"; mkdir -p \"$3/lib/big\"; head -c 4096 /dev/zero > \"$3/lib/big/blob\"\n"
              f"  printf '%s' '{inner}' > \"$3/bin/python\"; chmod +x \"$3/bin/python\"; exit 0\n"
              "fi\nexit 1\n")
    f = bindir / "python3"
    f.write_text(script)
    f.chmod(f.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("rc", [0, 1])
def test_ci_run_removes_its_venv_whatever_the_outcome(tmp_path, rc):
    bindir, tmp = tmp_path / "bin", tmp_path / "tmp"
    bindir.mkdir()
    tmp.mkdir()
    _fake_python(bindir, rc)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", TMPDIR=str(tmp))
    p = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == rc, p.stderr
    assert list(tmp.iterdir()) == [], "the CI venv was left behind"
