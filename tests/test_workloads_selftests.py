"""The KVM selftest mirrors in workloads/selftests/: they load, run (shrunk) under both zap
policies with the model's invariant audit on, and show what each selftest is about.

Each file is shrunk with ``Scenario.with_overrides`` so that a run takes well under a second; a few
checks that are about the files' own default sizes run the full file under the targeted policy only
(the policy under which the vCPUs finish first), which takes ~1 s.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from desim.scenario import Scenario, load_scenario
from desim.vm import RunResult, run_scenario

ROOT = Path(__file__).resolve().parents[1]
DIR = ROOT / "workloads" / "selftests"
POLICIES = ("fast", "targeted")
PAGE = 4096

# Overrides that shrink each file to a < 1 s run (the full sizes are what `desim run FILE` uses).
SHRINK: dict[str, dict] = {
    "demand_paging_test": {"vm.memslots.1.size": "16MiB"},
    "dirty_log_perf_test": {"vm.memslots.1.size": "8MiB"},
    "memslot_modification_stress_test": {
        "vm.memslots.1.size": "8MiB",              # 512 pages per vCPU: a pass is ~50 us once mapped
        "phases.0.memslot_ops.0.at_us": 100,        # -d 100
        "phases.0.memslot_ops.0.every_us": 180,
        "phases.0.memslot_ops.0.repeat": 10,        # -i 10: script ~1.9 ms < ~4 ms of vCPU work
    },
    "memslot_perf_test_map": {"phases.0.passes": 3},
    "memslot_perf_test_unmap": {},
    "memslot_perf_test_rw": {"phases.0.size": "32MiB", "phases.0.passes": 2},
    "memslot_perf_test_move_active": {"phases.0.passes": 1500, "phases.0.memslot_ops.0.repeat": 50,
                                      "phases.0.memslot_ops.1.repeat": 50},
    "memslot_perf_test_move_inactive": {"phases.0.passes": 1500, "phases.0.memslot_ops.0.repeat": 50,
                                        "phases.0.memslot_ops.1.repeat": 50},
}
FILES = sorted(p.stem for p in DIR.glob("*.toml"))


@functools.lru_cache(maxsize=None)
def full(name: str) -> Scenario:
    return load_scenario(DIR / f"{name}.toml")


@functools.lru_cache(maxsize=None)
def small(name: str) -> Scenario:
    return full(name).with_overrides(SHRINK[name])


@functools.lru_cache(maxsize=None)
def run_small(name: str, policy: str, backing: str | None = None) -> RunResult:
    sc = small(name)
    if backing is not None:
        sc = sc.with_overrides({"profile_overrides.kernel.backing": backing})
    return run_scenario(sc, policy, seed=1, audit=True)


@functools.lru_cache(maxsize=None)
def run_full_targeted(name: str) -> RunResult:
    return run_scenario(full(name), "targeted", seed=1)


def both(name: str, backing: str | None = None) -> tuple[dict, dict]:
    return run_small(name, "fast", backing).metrics, run_small(name, "targeted", backing).metrics


def script_end_ns(res: RunResult) -> float:
    raw = res.raw
    t = np.frombuffer(raw.ioctl_time, dtype=np.float64)
    lat = np.frombuffer(raw.ioctl_latency, dtype=np.float64)
    return float((t + lat).max())


def first_vcpu_finish_ns(res: RunResult) -> float:
    return min(v.finish_ns for v in res.raw.vcpus)


# -- every file --------------------------------------------------------------------------------

def test_every_file_has_a_shrink_entry():
    assert FILES, "no workloads found"
    assert set(FILES) == set(SHRINK), "add a SHRINK entry for each new selftest workload (and drop stale ones)"


@pytest.mark.parametrize("name", FILES)
def test_file_cites_its_selftest_and_is_listed(name):
    text = (DIR / f"{name}.toml").read_text()
    source = "memslot_perf_test" if name.startswith("memslot_perf_test") else name
    assert f"tools/testing/selftests/kvm/{source}.c" in text
    assert f"selftests/{name}.toml" in (ROOT / "workloads" / "README.md").read_text()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", FILES)
def test_runs_under_both_policies_with_audit(name, policy):
    res = run_small(name, policy)   # audit=True: the model raises InvariantViolation on its own
    m = res.metrics
    assert res.policy == policy
    assert m["faults"] > 0
    # every access the scenario assigned was executed (no vCPU stopped early)
    assert m["accesses"] == res.raw.accesses_assigned > 0
    assert list(res.raw.phase_end_ns) == [p.name for p in small(name).phases]


# -- demand_paging_test -----------------------------------------------------------------------

def test_demand_paging_faults_once_per_page_and_policies_agree():
    fast, targeted = both("demand_paging_test")
    pages = small("demand_paging_test").vm.memslots[1].size // PAGE
    for m in (fast, targeted):
        assert m["faults"] == m["faults_first_touch"] == pages
        assert m["host_page_allocs_4k"] == pages
        assert m["memslot_ioctls"] == 0 and m["zaps_fast"] == m["zaps_targeted"] == 0
    assert fast == targeted   # nothing is deleted or moved: the policy cannot matter


def test_demand_paging_each_vcpu_faults_its_own_partition():
    res = run_small("demand_paging_test", "fast")
    sc = small("demand_paging_test")
    per = sc.vm.memslots[1].size // PAGE // sc.vm.vcpus
    assert [r["faults"] for r in res.per_vcpu] == [per] * sc.vm.vcpus
    assert res.metrics["faults_spurious"] == 0   # partitioned: no two vCPUs fault the same page


# -- dirty_log_perf_test ----------------------------------------------------------------------

def _faults_between(res: RunResult, t0: float, t1: float) -> int:
    t = np.frombuffer(res.raw.fault_time, dtype=np.float64)
    return int(((t >= t0) & (t < t1)).sum())


def test_dirty_log_flags_ops_happen_and_4k_iterations_do_not_fault():
    sc = small("dirty_log_perf_test")
    pages = sc.vm.memslots[1].size // PAGE
    for policy in POLICIES:
        res = run_small("dirty_log_perf_test", policy)
        m = res.metrics
        assert m["memslot_ioctls"] == 2 and list(res.raw.ioctl_ops) == ["flags", "flags"]
        assert m["faults"] == m["faults_first_touch"] == pages     # only the populate pass faults
        ends = res.raw.phase_end_ns
        assert _faults_between(res, ends["populate"], ends["disable_dirty_logging"] + 1) == 0
        assert ends["iteration_2"] > ends["iteration_1"] > ends["enable_dirty_logging"] >= ends["populate"]
    fast, targeted = both("dirty_log_perf_test")
    assert fast == targeted


def test_dirty_log_with_thp_eager_split_needs_no_refaults():
    """tdp-icelake (kvm.eager_page_split=Y): enabling dirty logging splits the 2 MiB SPTEs in place."""
    sc = small("dirty_log_perf_test")
    pages = sc.vm.memslots[1].size // PAGE
    fast, targeted = both("dirty_log_perf_test", backing="thp")
    assert fast == targeted
    assert targeted["faults_first_touch"] == pages // 512 == targeted["faults"]
    assert targeted["sptes_zapped"] == 0 and targeted["faults_after_zap"] == 0
    assert targeted["sptes_installed"] == pages // 512 * 512     # 2M leaves, then 511 more per split


def test_dirty_log_with_thp_without_eager_split_refaults_in_the_first_iteration():
    """legacy-2020 (no eager splitting): the huge SPTEs are zapped and iteration 1 re-faults at 4 KiB."""
    sc = small("dirty_log_perf_test").with_overrides({"profile": "legacy-2020",
                                                      "profile_overrides.kernel.backing": "thp"})
    pages = sc.vm.memslots[1].size // PAGE
    res = run_scenario(sc, "targeted", seed=1, audit=True)
    m = res.metrics
    assert m["faults_first_touch"] == pages // 512
    assert m["sptes_zapped"] == pages // 512
    # legacy MMU: each re-fault prefetches up to 7 resident neighbours (direct_pte_prefetch)
    assert pages // 8 <= m["faults_after_zap"] <= pages
    assert m["faults_after_zap"] + m["sptes_prefetched"] == pages
    ends = res.raw.phase_end_ns
    assert _faults_between(res, ends["enable_dirty_logging"], ends["iteration_1"]) == m["faults_after_zap"]
    assert _faults_between(res, ends["iteration_1"], ends["disable_dirty_logging"] + 1) == 0


# -- memslot_modification_stress_test -----------------------------------------------------------

def test_modification_stress_targeted_zap_spares_the_test_memory():
    fast, targeted = both("memslot_modification_stress_test")
    sc = small("memslot_modification_stress_test")
    pages = sc.vm.memslots[1].size // PAGE
    iterations = sc.phases[0].memslot_ops[0].repeat
    for m in (fast, targeted):
        assert m["memslot_ioctls"] == 2 * iterations             # -i creates and -i deletes
        assert m["faults_first_touch"] == pages
    assert fast["zaps_fast"] == iterations and targeted["zaps_targeted"] == iterations
    assert targeted["faults"] == pages and targeted["faults_after_zap"] == 0   # the dummy slot is never touched
    assert fast["faults_after_zap"] > targeted["faults_after_zap"]
    assert fast["faults_after_zap"] > pages // 4                  # the fast zaps cost real re-faults
    assert fast["completion_ns"] > targeted["completion_ns"]


def test_modification_stress_vcpus_outlast_the_memslot_script():
    """The file sizes `passes` so the vCPUs are still running when the last delete happens."""
    for res in (run_full_targeted("memslot_modification_stress_test"),
                run_small("memslot_modification_stress_test", "targeted")):
        assert script_end_ns(res) < first_vcpu_finish_ns(res)


# -- memslot_perf_test ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, pages", [("memslot_perf_test_map", 8192), ("memslot_perf_test_rw", 8192),
                                         ("memslot_perf_test_unmap", 2)])
def test_memslot_perf_controls_fault_once_and_ignore_the_policy(name, pages):
    fast, targeted = both(name)
    assert fast == targeted
    assert fast["faults"] == fast["faults_first_touch"] == pages
    assert fast["memslot_ioctls"] == 0 and fast["mmio_exits"] == 0


def test_memslot_perf_map_area_spans_all_test_slots():
    sc = full("memslot_perf_test_map")
    area = sc.phases[0]
    lo, hi = area.gpa, area.gpa + area.size
    test_slots = [s for s in sc.vm.memslots if s.id > 0]
    assert len(test_slots) == 32
    assert lo == test_slots[0].gpa + PAGE and hi == test_slots[-1].gpa + test_slots[-1].size


def test_memslot_perf_move_inactive_costs_nothing_under_targeted_zap():
    fast, targeted = both("memslot_perf_test_move_inactive")
    loops = small("memslot_perf_test_move_inactive").phases[0].memslot_ops[0].repeat
    for m in (fast, targeted):
        assert m["memslot_ioctls"] == 2 * loops
        assert m["mmio_exits"] == 0            # the area never lies in the moved slot
    assert targeted["zaps_targeted"] == 2 * loops
    assert targeted["faults"] == targeted["faults_first_touch"] == 50
    assert targeted["faults_after_zap"] == targeted["faults_retry"] == 0
    assert fast["zaps_fast"] == 2 * loops and fast["faults_after_zap"] > 2 * loops


def test_memslot_perf_move_active_refaults_the_moved_half_under_both():
    fast, targeted = both("memslot_perf_test_move_active")
    for m in (fast, targeted):
        assert m["mmio_exits"] > 0             # writes to the moved-away half are MMIO exits
        assert m["faults_after_zap"] > 0       # the moved half re-faults when it comes back
        assert m["faults_first_touch"] == 50
    assert targeted["faults_after_zap"] < fast["faults_after_zap"]


@pytest.mark.parametrize("name", ["memslot_perf_test_move_active", "memslot_perf_test_move_inactive"])
def test_memslot_perf_move_vcpu_outlasts_the_moves(name):
    for res in (run_full_targeted(name), run_small(name, "targeted")):
        assert script_end_ns(res) < first_vcpu_finish_ns(res)
