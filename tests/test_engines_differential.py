"""Differential test: the ``fast`` and ``reference`` engines give identical results, bit for bit.

Not a tolerance: every metric, every per-vCPU row and every fault-latency sample of a run must be
the same float on both engines (compared as their exact JSON/bytes representations), on

* hypothesis-generated scenarios (the memslot scripts and access patterns of
  ``tests/test_invariants.py``, all three profiles, all host backings, 1-6 vCPUs, both policies);
* every shipped workload (``workloads/**.toml`` and the built-in default), shrunk with the same
  overrides their own tests use so that the reference engine runs each in about a second.

A deliberately broken fast engine (one that processes a yielded event even when another event
is due first) must fail the comparison: the test can fail.
"""
from __future__ import annotations

import importlib.util
import json
from heapq import heapify
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desim.engine import FastEnvironment, FastProcess, make_environment
from desim.errors import DesimInputError
from desim.scenario import load_scenario
from desim.vm import Vm

from conftest import MiB, scenario

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _module(name: str):
    """A sibling test module (for its shrink overrides and strategies), loaded without collecting it."""
    spec = importlib.util.spec_from_file_location(f"_diff_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


INV = _module("test_invariants")
SELFTESTS = _module("test_workloads_selftests").SHRINK
STEADY = _module("test_workloads_steady").SHRINK
BOOT_SHORT = _module("test_workloads_boot").SHORT


def fingerprint(vm: Vm) -> str:
    """Everything a run reports, as exact text: metrics, per-vCPU rows, raw latency and time samples."""
    res = vm.run()
    raw = res.raw
    d = res.to_dict()
    d.pop("model_version")
    d["raw"] = {k: bytes(getattr(raw, k)).hex() for k in ("fault_latency", "fault_time", "fault_is_refault",
                                                           "ioctl_latency", "ioctl_time", "zap_duration")}
    d["ioctl_ops"] = list(raw.ioctl_ops)
    d["lock"] = vm.lock.summary()
    return json.dumps(d, sort_keys=True, default=repr)


def both(sc, policy: str, seed: int = 1, audit: bool = False) -> tuple[str, str, Vm]:
    ref = fingerprint(Vm(sc, policy, seed=seed, audit=audit, engine="reference"))
    fast_vm = Vm(sc, policy, seed=seed, audit=audit, engine="fast")
    return ref, fingerprint(fast_vm), fast_vm


def _first_difference(a: str, b: str) -> str:
    da, db = json.loads(a), json.loads(b)
    for k in da["metrics"]:
        if da["metrics"][k] != db["metrics"].get(k):
            return f"metrics[{k}]: reference {da['metrics'][k]!r} fast {db['metrics'].get(k)!r}"
    return "elsewhere (per-vCPU rows, raw samples or lock summary)"


def assert_same(ref: str, fast: str, what: str) -> None:
    assert ref == fast, f"{what}: engines differ at {_first_difference(ref, fast)}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phases=INV.scripts(), profile=st.sampled_from(INV.PROFILES), policy=st.sampled_from(["fast", "targeted"]),
       vcpus=st.integers(1, 6), backing=st.sampled_from(["4k", "thp", "hugetlbfs-1g"]),
       seed=st.integers(0, 2**32 - 1))
def test_engines_agree_on_generated_scenarios(phases, profile, policy, vcpus, backing, seed):
    sc = scenario(vcpus=vcpus, ram_mib=8, phases=phases, profile=profile, kernel={"backing": backing})
    ref, fast, _ = both(sc, policy, seed=seed, audit=True)
    assert_same(ref, fast, f"{profile}/{policy}/{backing}/{vcpus} vCPUs")


def _shipped() -> list[tuple[str, dict]]:
    out = [("desim/scenarios/default.toml", {})]
    out += [(f"workloads/selftests/{k}.toml", v) for k, v in sorted(SELFTESTS.items())]
    out += [(f"workloads/steady/{k}.toml", v) for k, v in sorted(STEADY.items())
            if (ROOT / f"workloads/steady/{k}.toml").exists()]
    out += [(f"workloads/boot/assumed/{p.name}", BOOT_SHORT)
            for p in sorted((ROOT / "workloads/boot/assumed").glob("*.toml"))]
    out += [(f"workloads/boot/{p.name}", {}) for p in sorted((ROOT / "workloads/boot").glob("*.toml"))]
    return out


def test_every_shipped_workload_is_covered():
    covered = {p for p, _ in _shipped()}
    # every scenario file (workloads/sweeps/ holds sweep definitions over scenarios, not scenarios)
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "workloads").rglob("*.toml")
               if p.parent.name != "sweeps"}
    assert shipped <= covered, f"shipped workloads without a differential run: {sorted(shipped - covered)}"


@pytest.mark.parametrize("path,shrink", _shipped(), ids=[p for p, _ in _shipped()])
def test_engines_agree_on_shipped_workloads(path, shrink):
    sc = load_scenario(ROOT / path)
    if shrink:
        sc = sc.with_overrides(shrink)
    for policy in ("fast", "targeted"):
        ref, fast, _ = both(sc, policy)
        assert_same(ref, fast, f"{path} ({policy})")


def test_fast_engine_advances_a_lone_vcpu_without_the_event_queue():
    """One vCPU populating: (nearly) every guest run and fault is processed inside the vCPU's own loop."""
    sc = scenario(vcpus=1, ram_mib=16, kernel={"backing": "4k"})
    ref, fast, vm = both(sc, "fast")
    assert_same(ref, fast, "lone vCPU")
    faults = vm.metrics.vcpus[0].total_faults
    assert faults == 4096 and vm.env.inlined >= faults


def test_runs_are_split_where_another_process_intervenes():
    """vCPUs kicked out of their runs by zaps (IPIs, requests, retries on INVALID slots): same results."""
    ops = [{"at_us": 20 + 40 * i, "op": op, "slot": 5, **({"gpa": 16 * MiB, "size": 2 * MiB} if op == "create" else {})}
           for i, op in enumerate(["create", "delete"] * 6)]
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0},
              {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 20000, "access_ns": 20.0,
               "sharing": "shared", "memslot_ops": ops}]
    for profile in INV.PROFILES:
        sc = scenario(vcpus=4, ram_mib=8, phases=phases, profile=profile, kernel={"backing": "4k"})
        ref, fast, vm = both(sc, "fast")
        assert_same(ref, fast, profile)
        m = json.loads(fast)["metrics"]
        assert m["ipis_sent"] > 0 and vm.env.inlined > 0, profile


def test_engines_agree_with_guest_processes_under_shadow_paging():
    """Per-CR3 roots, prev_roots, private pages, page-table writes and a root in a moved slot (desim/guest_as.py)."""
    ops = [{"at_us": 30, "op": "toggle", "slot": 5, "gpa": 16 * MiB, "size": 2 * MiB, "hold_us": 10, "repeat": 2,
            "every_us": 30}, {"at_us": 50, "op": "move", "slot": 1, "gpa": 32 * MiB}]
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0, "size": 2 * MiB},
              {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 1000, "access_ns": 20.0,
               "sharing": "shared", "memslot_ops": ops}]
    guest = {"processes": 5, "context_switch_us": 5, "pt_write_share": 0.01, "process_pages": 32,
             "process_gpa": 4 * MiB, "user_share": 0.3, "pgd_gpa": 8 * MiB - 2 * 4096}
    sc = scenario(vcpus=2, ram_mib=8, phases=phases, profile="shadow-pvm", kernel={"backing": "4k"}, guest=guest,
                  extra_slots=[{"id": 1, "gpa": 8 * MiB, "size": 2 * MiB}])
    for policy in ("fast", "targeted"):
        ref, fast, vm = both(sc, policy, audit=True)
        assert_same(ref, fast, f"guest processes ({policy})")
        m = json.loads(fast)["metrics"]
        assert m["cr3_switches"] > 0 and m["faults_wp"] > 0 and vm.env.inlined > 0, policy


def test_a_broken_fast_engine_is_caught(monkeypatch):
    """Process a yielded timeout even when another event is due first: the comparison must fail."""
    sc = scenario(vcpus=3, ram_mib=4, kernel={"backing": "4k"}, profile="legacy-2020")
    ref = fingerprint(Vm(sc, "fast", seed=1, engine="reference"))

    def overtaking(self, event):
        # the event is due no later than the head of the queue: take it out of the queue wherever it is
        for i, item in enumerate(self._queue):
            if item[3] is event:
                self._queue[i] = self._queue[-1]
                self._queue.pop()
                heapify(self._queue)
                self._queue.insert(0, item)
                return True
        return False

    monkeypatch.setattr(FastEnvironment, "_is_next", overtaking)
    broken = fingerprint(Vm(sc, "fast", seed=1, engine="fast"))
    assert ref != broken


def test_engine_selection(monkeypatch):
    assert isinstance(make_environment("fast"), FastEnvironment)
    assert not isinstance(make_environment("reference"), FastEnvironment)
    monkeypatch.setenv("DESIM_ENGINE", "reference")
    assert not isinstance(make_environment(), FastEnvironment)
    monkeypatch.setenv("DESIM_ENGINE", "turbo")
    with pytest.raises(DesimInputError, match="DESIM_ENGINE"):
        make_environment()
    with pytest.raises(DesimInputError, match="engine 'turbo'"):
        make_environment("turbo")
