"""The result store: entries are checked (schema, checksum against the key), damaged ones named and
recomputed; per-task JSON stores of earlier versions are read and converted; pandas reads the store."""
from __future__ import annotations

import json
import sqlite3
import zlib

import pandas as pd
import pytest

from desim.studies.store import ResultStore, check_result
from desim.sweep import Task, execute

from conftest import scenario


def _task(rep: int = 0) -> Task:
    sc = scenario(vcpus=1, ram_mib=2, phases=[{"name": "work", "pattern": "uniform", "slot": 0, "accesses": 500}])
    return Task(sc.model_dump(), "fast", 1, rep)


def test_a_result_round_trips_and_pandas_reads_the_store(tmp_path):
    t = _task()
    first = execute([t], store=tmp_path, progress=False)[0]
    st = ResultStore(tmp_path)
    assert st.get(t.key(), t.expect()) == first
    con = sqlite3.connect(tmp_path / "results.sqlite")
    runs = pd.read_sql("SELECT * FROM runs", con)
    assert runs.loc[0, ["policy", "seed", "replication"]].tolist() == ["fast", 1, 0]
    assert runs.loc[0, "faults"] == first["metrics"]["faults"]
    assert set(first["metrics"]) <= set(runs.columns)


def test_an_edited_metric_is_named_and_recomputed(tmp_path, capsys):
    t = _task()
    first = execute([t], store=tmp_path, progress=False)[0]
    con = sqlite3.connect(tmp_path / "results.sqlite")
    payload = con.execute("SELECT payload FROM results").fetchone()[0]
    edited = json.loads(zlib.decompress(payload))
    edited["metrics"]["faults"] += 1
    con.execute("UPDATE results SET payload = ?", (zlib.compress(json.dumps(edited).encode()),))
    con.commit()
    calls = []
    again = execute([t], store=tmp_path, progress=False, on_result=lambda i, r: calls.append(i))
    assert calls == [0] and again[0]["metrics"] == first["metrics"]
    err = capsys.readouterr().err
    assert f"entry {t.key()[:16]}" in err and "checksum" in err and "recomputing" in err


@pytest.mark.parametrize("content,why", [("{}", "field 'scenario' is missing"),
                                         ("[]", "not a JSON object but list"),
                                         ("{ half", "not JSON"),
                                         ('{"scenario": "s", "policy": "fast", "seed": 1, "replication": 0}',
                                          "field 'metrics' is missing"),
                                         (None, "not a regular file")])
def test_damaged_legacy_json_entries_are_named_and_recomputed(tmp_path, capsys, content, why):
    t = _task()
    k = t.key()
    p = tmp_path / k[:2] / f"{k}.json"
    p.parent.mkdir()
    if content is None:
        p.mkdir()  # a directory in place of the entry
    else:
        p.write_text(content)
    res = execute([t], store=tmp_path, progress=False)
    assert res[0]["metrics"]["faults"] > 0
    err = capsys.readouterr().err
    assert str(p) in err and why in err
    assert ResultStore(tmp_path).get(k) == res[0]  # now in the database


def test_a_legacy_entry_of_another_task_is_refused(tmp_path, capsys):
    t0, t1 = _task(0), _task(1)
    r1 = execute([t1], progress=False)[0]
    p = tmp_path / t0.key()[:2] / f"{t0.key()}.json"
    p.parent.mkdir()
    p.write_text(json.dumps(r1))  # replication 1's result filed under replication 0's key
    res = execute([t0], store=tmp_path, progress=False)
    assert res[0]["replication"] == 0
    assert "its replication is 1, the task's is 0" in capsys.readouterr().err


def test_a_legacy_store_is_read_and_converted(tmp_path):
    tasks = [_task(0), _task(1)]
    results = execute(tasks, progress=False)
    for t, r in zip(tasks, results):
        p = tmp_path / t.key()[:2] / f"{t.key()}.json"
        p.parent.mkdir(exist_ok=True)
        p.write_text(json.dumps(r))
    st = ResultStore(tmp_path)
    assert st.import_legacy() == (2, 0)
    assert len(st) == 2
    calls = []
    again = execute(tasks, store=tmp_path, progress=False, on_result=lambda i, r: calls.append(i))
    assert calls == [] and again == results


def test_check_result_wants_numbers():
    ok = {"scenario": "s", "policy": "fast", "seed": 1, "replication": 0, "metrics": {"faults": 3}}
    assert check_result(ok) is None
    assert "metric 'faults' is str" in check_result({**ok, "metrics": {"faults": "3"}})
    assert "its seed is 1" in check_result(ok, {"seed": 2})


def test_desim_results_converts_a_legacy_store(tmp_path, capsys):
    from desim.cli import main

    tasks = [_task(0), _task(1)]
    for t, r in zip(tasks, execute(tasks, progress=False)):
        p = tmp_path / t.key()[:2] / f"{t.key()}.json"
        p.parent.mkdir(exist_ok=True)
        p.write_text(json.dumps(r))
    assert main(["results", str(tmp_path), "--table", "runs"]) == 0
    cap = capsys.readouterr()
    assert "converted the per-task JSON store" in cap.err and "2 entries" in cap.err
    assert cap.out.startswith("scenario,policy,seed,replication,") and len(cap.out.splitlines()) == 3
    assert (tmp_path / "results.sqlite").is_file()


def test_the_key_hashes_the_contents_of_a_recording_not_only_its_path(tmp_path):
    """A recording changed in place (re-recorded at the same path) makes new tasks: its stored results
    are not reused; restoring the old contents finds the old ones again."""
    import shutil
    from pathlib import Path

    from desim.scenario import load_scenario

    root = Path(__file__).resolve().parents[1] / "workloads"
    rec = tmp_path / "boot.npz"
    shutil.copyfile(root / "recordings" / "boot-6g-q35-1.npz", rec)
    data = load_scenario(root / "boot" / "boot-6g-q35.toml").model_dump()
    for ph in data["phases"]:
        if ph.get("recording"):
            ph["recording"] = str(rec)
    before = Task(data, "fast", 1, 0).key()
    assert Task(data, "fast", 1, 0).key() == before  # unchanged file: same key (digest cached per version)
    assert Task(data, "targeted", 1, 0).key() != before
    shutil.copyfile(root / "recordings" / "boot-6g-q35-2.npz", rec)  # same path, another boot
    changed = Task(data, "fast", 1, 0).key()
    assert changed != before
    shutil.copyfile(root / "recordings" / "boot-6g-q35-1.npz", rec)
    assert Task(data, "fast", 1, 0).key() == before
    # a scenario that reads no file keeps the key it had before recordings were hashed
    from desim.studies.inputdigest import input_digests

    assert input_digests(_task().scenario) == {}
