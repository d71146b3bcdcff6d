"""A series of tasks run in this process keeps what outlives them out of Python's full garbage collections
(desim/sweep.py ``collector_settled``: ``gc.freeze`` after one collection, a speed setting) and gives it back
after, also when a task fails; the tasks' own garbage is still collected, and the results are the same."""
from __future__ import annotations

import gc

import pytest

from desim.sweep import Task, execute, run_task

from conftest import scenario

_SC = scenario(vcpus=2, ram_mib=2, phases=[{"name": "touch", "pattern": "uniform", "slot": 0, "accesses": 2000}])


def _frozen(res) -> dict[str, float]:
    return {"frozen_objects": float(gc.get_freeze_count())}


def _fails(res) -> dict[str, float]:
    raise RuntimeError("a task that fails")


def test_tasks_run_with_the_objects_before_them_frozen_and_given_back_after():
    assert gc.get_freeze_count() == 0
    tasks = [Task(_SC.model_dump(), policy, 1, 0, extra=_frozen) for policy in ("fast", "targeted")]
    got = execute(tasks)
    assert all(r["metrics"]["frozen_objects"] > 1000 for r in got)  # the modules, at least
    assert gc.get_freeze_count() == 0
    # the same numbers as a task run on its own, with nothing frozen
    alone = run_task(tasks[0])
    assert alone["metrics"]["frozen_objects"] == 0
    assert {k: v for k, v in got[0]["metrics"].items() if k != "frozen_objects"} == \
        {k: v for k, v in alone["metrics"].items() if k != "frozen_objects"}


def test_a_task_that_fails_gives_the_frozen_objects_back():
    with pytest.raises(RuntimeError, match="a task that fails"):
        execute([Task(_SC.model_dump(), "fast", 1, 0, extra=_fails)])
    assert gc.get_freeze_count() == 0


def test_the_tasks_own_garbage_is_still_collected():
    """A cycle a task leaves behind is collected while the series runs (nothing made during it is frozen)."""
    seen = []

    class Cycle:
        def __init__(self):
            self.me = self

    def leave_a_cycle(res):
        c = Cycle()
        seen.append(gc.get_freeze_count())
        import weakref

        ref = weakref.ref(c)
        del c
        gc.collect()
        return {"cycle_left": float(ref() is not None)}

    got = execute([Task(_SC.model_dump(), "fast", 1, 0, extra=leave_a_cycle)])
    assert seen[0] > 0 and got[0]["metrics"]["cycle_left"] == 0.0
