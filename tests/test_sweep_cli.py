"""desim sweep / results / capacity end to end: sweep files expand as written, bad ones are one line
(exit 2, nothing written), tables and plots come out, and 1, 2 or 4 workers give identical results."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from desim.cli import main
from desim.errors import DesimInputError
from desim.studies.sweepfile import sweep_from_dict

BASE = {"set": {"phases.0.size": "2MiB", "phases.1.accesses": 1500}}


def sweep_file(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


TINY = """name = "tiny"
replications = 2
metrics = ["faults", "completion_ns"]

[set]
"phases.0.size" = "2MiB"
"phases.1.accesses" = 1500
"vm.memslots.0.size" = "8MiB"

[factors]
vm.vcpus = [1, 2]
"""


def test_factors_zip_exclude_where():
    spec = sweep_from_dict({**BASE, "factors": {"vm": {"vcpus": [1, 2, 4]}, "vm.memslots.0.size": ["8MiB", "16MiB", "32MiB"],
                                                "profile": ["tdp-icelake", "legacy-2020"]},
                            "zip": [["vm.vcpus", "vm.memslots.0.size"]],
                            "exclude": [{"vm.vcpus": 4, "profile": "legacy-2020"}],
                            "where": ["vm.memslots.0.size >= '16MiB' or profile == 'tdp-icelake'"]})
    got = [(p.labels["vm.vcpus"], p.labels["vm.memslots.0.size"], p.labels["profile"]) for p in spec.points]
    assert got == [(1, "8MiB", "tdp-icelake"), (2, "16MiB", "tdp-icelake"), (2, "16MiB", "legacy-2020"),
                   (4, "32MiB", "tdp-icelake")]
    assert spec.points[3].scenario.vm.vcpus == 4 and spec.points[3].scenario.vm.memslots[0].size == 32 << 20
    assert spec.task_count() == str(4 * 2 * 5)


@pytest.mark.parametrize("data,msg", [
    ({"factors": {"vm.vcpus": [1, -3]}}, "point 1 (vm.vcpus=-3)"),
    ({"factors": {"vm.memslots.3.size": ["1MiB"]}}, "vm.memslots.3.size"),
    ({"factors": {"vm.nosuch": [1]}}, "nosuch"),
    ({"factors": {"vm.vcpus": []}}, "factor vm.vcpus: give a non-empty list"),
    ({"factors": {"vm.vcpus": [1]}, "zip": [["vm.vcpus", "profile"]]}, "zip names 'profile'"),
    ({"factors": {"vm.vcpus": [1]}, "where": ["vcpus > 1"]}, "'vcpus' is not a factor"),
    ({"factors": {"vm.vcpus": [1]}, "where": ["__import__('os')"]}, "not allowed"),
    ({"factors": {"vm.vcpus": [1]}, "metrics": ["nosuch"]}, "unknown metric 'nosuch'"),
    ({"replications": 2, "precision": 0.02}, "not both"),
    ({"policies": ["slow"]}, "policies"),
    ({"replicatons": 2}, "unknown key 'replicatons'"),
])
def test_bad_sweep_is_one_error_naming_the_factor(data, msg):
    with pytest.raises(DesimInputError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        sweep_from_dict({**BASE, **data})


def test_invalid_point_exits_2_before_any_work_and_writes_nothing(tmp_path, capsys):
    p = sweep_file(tmp_path, TINY.replace("[1, 2]", "[1, 0]"))
    out, store = tmp_path / "out", tmp_path / "store"
    assert main(["sweep", str(p), "--out", str(out), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("desim: error: ") and "vm.vcpus=0" in err[0]
    assert not out.exists() and not store.exists()


def test_dry_run_prints_points_and_task_count(tmp_path, capsys):
    p = sweep_file(tmp_path, TINY)
    assert main(["sweep", str(p), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "2 points x 2 policies" in out and ": 8 tasks" in out and "nothing written" in out
    assert not (tmp_path / "o").exists()


def _sweep(tmp_path: Path, *extra: str) -> pd.DataFrame:
    p = sweep_file(tmp_path, TINY)
    out = tmp_path / "out"
    assert main(["sweep", str(p), "--out", str(out), "--no-progress", *extra]) == 0
    return pd.read_csv(out / "runs.csv")


@pytest.fixture(scope="module")
def serial_runs(tmp_path_factory):
    return _sweep(tmp_path_factory.mktemp("serial"))


def test_sweep_tables_and_results(serial_runs, tmp_path, capsys):
    runs = serial_runs
    assert list(runs.columns) == ["point", "vm.vcpus", "policy", "seed", "replication", "faults", "completion_ns"]
    assert len(runs) == 8 and not runs.duplicated(["point", "policy", "replication"]).any()
    out = tmp_path / "out"
    _sweep(tmp_path)  # computed again into a fresh store: same numbers
    assert main(["results", str(out), "--format", "json", "--plot", "completion_ns", "--vs", "vm.vcpus",
                 "--out", str(tmp_path / "r")]) == 0
    tidy = pd.read_json(tmp_path / "r" / "runs.json")
    pd.testing.assert_frame_equal(tidy[runs.columns].reset_index(drop=True), runs, check_dtype=False)
    summary = pd.read_json(tmp_path / "r" / "summary.json")
    assert {"vm.vcpus", "metric", "n", "mean_fast", "mean_targeted", "diff_low", "ratio_high",
            "confidence"} <= set(summary.columns)
    png = tmp_path / "r" / "completion_ns_vs_vm.vcpus.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.with_suffix(".svg").is_file()
    capsys.readouterr()
    assert main(["results", str(out / "store"), "--table", "runs"]) == 0
    assert capsys.readouterr().out.startswith("point,vm.vcpus,policy,seed,replication")


def test_identical_for_1_and_4_workers(serial_runs, tmp_path):
    # 2 workers: tests/test_sweep_faults.py (a real scheduler with two worker processes) and test_sweep.py
    for w in (4,):
        d = tmp_path / f"w{w}"
        d.mkdir()
        pd.testing.assert_frame_equal(_sweep(d, "--workers", str(w)), serial_runs)


def test_sequential_replications_per_point(tmp_path):
    spec = sweep_from_dict({**BASE, "factors": {"vm.vcpus": [1, 2]}, "precision": 0.05, "min_replications": 2,
                            "max_replications": 4, "precision_metrics": ["completion_ns"]})
    from desim.studies.sweeprun import run_sweep

    res = run_sweep(spec, progress=False)
    assert set(res.stopped) == {0, 1} and all("replications" in w for w in res.stopped.values())
    assert res.runs.groupby("point").replication.nunique().between(2, 4).all()


def test_capacity_cli_on_a_scenario(tmp_path, capsys):
    rc = main(["capacity", "--vary", "vm.vcpus", "--range", "1:8",
               "--metric", "completion_ns", "--slo", "<=22ms", "--set", "phases.0.size=2MiB",
               "--set", "phases.1.accesses=1500", "--set", "vm.memslots.0.size=8MiB",
               "--out", str(tmp_path / "cap"), "--quiet"])
    out, err = capsys.readouterr()
    assert rc in (0, 3), err
    assert "vm.vcpus" in out and "stopped:" in out and "verdict" in out
    js = json.loads((tmp_path / "cap" / "capacity.json").read_text())
    assert js["points"] and js["slo"]["bound"] == 22e6
    assert (tmp_path / "cap" / "capacity.png").read_bytes()[:4] == b"\x89PNG"
