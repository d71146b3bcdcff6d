"""The sweep engine: identical results whatever the worker count; a stored sweep resumes without recomputing."""
from __future__ import annotations

import pandas as pd
import pytest

from desim import experiment as ex
from desim.sweep import ResultStore, Task, execute, grid

from conftest import scenario


def _small():
    return scenario(vcpus=2, ram_mib=4, phases=[
        {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 3000, "sharing": "shared",
         "memslot_ops": [{"at_us": 50, "op": "toggle", "slot": 3, "gpa": 64 << 20, "size": 65536,
                          "hold_us": 40, "repeat": 3, "every_us": 100, "poisson": True}]}])


def test_results_do_not_depend_on_the_number_of_workers():
    sc = _small()
    serial = ex.replicate(sc, ["fast", "targeted"], 3, seed=9, backend="serial", progress=False)
    parallel = ex.replicate(sc, ["fast", "targeted"], 3, seed=9, backend="local", workers=2, progress=False)
    pd.testing.assert_frame_equal(serial, parallel)


def test_store_resumes_without_recomputing(tmp_path, monkeypatch):
    sc = _small()
    store = tmp_path / "store"
    first = ex.replicate(sc, ["fast", "targeted"], 2, seed=3, store=store, progress=False)
    import desim.sweep as sweep

    calls = []
    real = sweep.run_task
    monkeypatch.setattr(sweep, "run_task", lambda t: calls.append(t.replication) or real(t))
    again = ex.replicate(sc, ["fast", "targeted"], 3, seed=3, store=store, progress=False)
    assert calls == [2, 2]                       # only the new replication ran, for both policies
    pd.testing.assert_frame_equal(first, again[again.replication < 2].reset_index(drop=True))


def test_task_key_covers_everything_that_changes_the_result():
    sc = _small().model_dump()
    base = Task(sc, "fast", 1, 0)
    assert base.key() == Task(sc, "fast", 1, 0, point=5).key()
    assert len({base.key(), Task(sc, "targeted", 1, 0).key(), Task(sc, "fast", 2, 0).key(),
                Task(sc, "fast", 1, 1).key(), Task({**sc, "profile": "legacy-2020"}, "fast", 1, 0).key()}) == 5


def test_damaged_store_entry_is_recomputed(tmp_path):
    sc = _small().model_dump()
    store = ResultStore(tmp_path)
    t = Task(sc, "fast", 1, 0)
    (tmp_path / t.key()[:2]).mkdir()
    (tmp_path / t.key()[:2] / f"{t.key()}.json").write_text("{ half a result")
    res = execute([t], store=store, progress=False)
    assert res[0]["metrics"]["faults"] > 0 and store.get(t.key()) == res[0]


def test_grid_of_overrides():
    points = grid(_small(), {"vm.vcpus": [1, 2], "profile": ["tdp-icelake", "legacy-2020"]})
    assert [(p["vm.vcpus"], p["profile"]) for p, _ in points] == [
        (1, "tdp-icelake"), (1, "legacy-2020"), (2, "tdp-icelake"), (2, "legacy-2020")]
    assert points[3][1].vm.vcpus == 2 and points[3][1].profile == "legacy-2020"


def test_bad_scheduler_address():
    from desim.errors import DesimInputError

    with pytest.raises(DesimInputError, match="backend"):
        execute([Task(_small().model_dump(), "fast", 1, 0)], backend="nonsense", workers=2, progress=False)


def test_replicate_to_precision_stops_by_precision_or_max_reps(tmp_path):
    from desim.scenario import load_scenario

    sc = load_scenario().with_overrides({"phases.0.size": "16MiB", "phases.1.accesses": 5000})
    runs, why = ex.replicate_to_precision(sc, ["faults"], 0.05, min_reps=3, max_reps=20, seed=2, store=tmp_path)
    assert why == "precision" and 3 <= runs.replication.nunique() < 20  # 8: the second call reuses 6 of them
    runs, why = ex.replicate_to_precision(sc, ["faults"], 1e-9, min_reps=3, max_reps=6, seed=2, store=tmp_path)
    assert why == "max_reps" and runs.replication.nunique() == 6
