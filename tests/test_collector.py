"""Vm.run quiets Python's cyclic garbage collector while the model runs (desim/vm.py ``_collector_quiet``, a
speed setting) and gives it back as it was, also when the run fails."""
from __future__ import annotations

import gc

import pytest

from desim.vm import Vm

from conftest import scenario


def test_the_collector_is_quiet_during_a_run_and_restored_after():
    before = gc.get_threshold()
    seen = []
    sc = scenario(vcpus=2, ram_mib=4, phases=[{"name": "touch", "pattern": "uniform", "slot": 0, "accesses": 20000}])
    Vm(sc, "fast", seed=1).run(progress=lambda status: seen.append((gc.get_threshold()[0], gc.get_freeze_count())))
    assert seen and all(t >= 50_000 and frozen > 0 for t, frozen in seen)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_the_collector_is_restored_when_a_run_is_interrupted():
    """A progress callback that raises (as Ctrl-C would inside a run) leaves through the run's ``finally``."""
    before = gc.get_threshold()
    sc = scenario(vcpus=2, ram_mib=4, phases=[{"name": "touch", "pattern": "uniform", "slot": 0, "accesses": 20000}])

    def stop(status):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        Vm(sc, "fast", seed=1).run(progress=stop)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
