"""The cohort's planning heuristics after a zap (desim/cohort.py): a zap ends a vCPU's backoff for hits, and a
plan looks no further than the loop's horizon. Both are speed heuristics only: the results stay identical to
the reference engine's, and each heuristic, switched off, must show in what the cohort planned."""
from __future__ import annotations

import json

from desim.cohort import Cohort
from desim.vm import Vm

from conftest import scenario
from test_engines_differential import assert_same, fingerprint


def _work_with_fast_zaps():
    """vcpu_scaling's point, small: 8 vCPUs first-touch 1 MiB each, then make 4,000 hot/cold accesses to it
    while the VMM creates and deletes a 64 KiB ROM slot three times (each DELETE a fast zap: every vCPU
    re-faults its working set)."""
    rom = {"slot": 5, "repeat": 3, "every_us": 200.0}
    ops = [{"at_us": 50.0, "op": "create", "gpa": 0xFEBC0000, "size": 64 * 1024, "flags": ["readonly"], **rom},
           {"at_us": 150.0, "op": "delete", **rom}]
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0, "sharing": "private", "access_ns": 200.0},
              {"name": "work", "pattern": "hotcold", "slot": 0, "sharing": "private", "accesses": 4000,
               "access_ns": 200.0, "hot_fraction": 0.1, "hot_probability": 0.9, "memslot_ops": ops}]
    return scenario(vcpus=8, ram_mib=8, phases=phases, kernel={"backing": "4k"}, costs="sampled")


def _fast(sc, monkeypatch=None, **patch):
    if monkeypatch is not None:
        for name, f in patch.items():
            monkeypatch.setattr(Cohort, name, f)
    vm = Vm(sc, "fast", seed=1, engine="fast")
    return fingerprint(vm), vm.cohort


def test_replanning_after_a_fast_zap(monkeypatch):
    sc = _work_with_fast_zaps()
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))
    fast, co = _fast(sc)
    assert_same(ref, fast, "cohort after fast zaps")
    faults = json.loads(fast)["metrics"]["faults"]
    assert json.loads(fast)["metrics"]["faults_after_zap"] > 0.3 * faults
    # a backoff that outlives the zap (the work phase hit everything before it) leaves the re-faults plain
    stale, co_stale = _fast(sc, monkeypatch, _skip_left=lambda self, x: (self._skip.get(x) or (0,))[0])
    assert_same(ref, stale, "cohort, backoff kept across zaps")
    assert co.planned > co_stale.planned + 0.05 * faults
    # plans looking past the loop's horizon: more faults planned for the same faults taken
    monkeypatch.undo()
    far, co_far = _fast(sc, monkeypatch, _horizon_of=lambda self, queue, procs: float("inf"))
    assert_same(ref, far, "cohort, plans past the horizon")
    assert co.planned_ahead < 0.8 * co_far.planned_ahead
