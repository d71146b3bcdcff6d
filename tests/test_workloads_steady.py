"""The steady-state workloads in workloads/steady/: they load, run (shrunk) under both zap policies
with the model's invariant audit on, and behave as their headers say.

Every steady file has a "populate" phase (each vCPU first-touches its share of the main RAM slot) and
a "steady" phase in which a memslot is toggled (create ... delete) while the vCPUs work. The toggled
slot is never touched by the guest, so under the targeted zap nothing re-faults, while every delete
under the fast zap costs re-faults of the working set.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from desim.memslot import MrChange
from desim.scenario import Scenario, load_scenario, phase_ops
from desim.streams import stream
from desim.vm import RunResult, run_scenario

ROOT = Path(__file__).resolve().parents[1]
DIR = ROOT / "workloads" / "steady"
POLICIES = ("fast", "targeted")
PAGE = 4096
MAIN = 1        # the RAM slot the vCPUs touch
STEADY = 1      # index of the steady phase

_OP = "phases.1.memslot_ops.0."
# Overrides that shrink each file to a < 1 s run: smaller RAM, less work, a few faster events.
SHRINK: dict[str, dict] = {
    "uniform_shared_rom_poisson": {
        "vm.memslots.1.size": "8MiB", "phases.1.accesses": 40000,          # 8 ms of work per vCPU
        _OP + "at_us": 500, _OP + "hold_us": 100, _OP + "every_us": 500, _OP + "repeat": 4,
    },
    "zipf_private_device_hotplug": {
        "vm.memslots.1.size": "16MiB", "phases.1.accesses": 20000,         # 4 ms of work per vCPU
        _OP + "at_us": 500, _OP + "hold_us": 300, _OP + "every_us": 800, _OP + "repeat": 4,
    },
    "hotcold_shared_virtio_mem": {
        "vm.memslots.1.size": "16MiB", "phases.1.accesses": 20000,
        _OP + "at_us": 500, _OP + "hold_us": 300, _OP + "every_us": 800, _OP + "repeat": 4,
    },
    "stream_private_virtio_mem_poisson": {
        # 512 pages per vCPU: a pass is ~51 us once mapped, ~1.3 ms when it re-faults everything;
        # deletes at least hold_us = 1.5 ms apart, so every gap between zaps holds a full pass
        "vm.memslots.1.size": "8MiB", "phases.1.passes": 100,
        _OP + "at_us": 300, _OP + "hold_us": 1500, _OP + "every_us": 300, _OP + "repeat": 2,
    },
}
FILES = sorted(p.stem for p in DIR.glob("*.toml"))


@functools.lru_cache(maxsize=None)
def full(name: str) -> Scenario:
    return load_scenario(DIR / f"{name}.toml")


@functools.lru_cache(maxsize=None)
def small(name: str) -> Scenario:
    return full(name).with_overrides(SHRINK[name])


@functools.lru_cache(maxsize=None)
def run_small(name: str, policy: str) -> RunResult:
    return run_scenario(small(name), policy, seed=1, audit=True)


def both(name: str) -> tuple[dict, dict]:
    return run_small(name, "fast").metrics, run_small(name, "targeted").metrics


def main_pages(sc: Scenario) -> int:
    return next(s.size for s in sc.vm.memslots if s.id == MAIN) // PAGE


def repeat(sc: Scenario) -> int:
    return sc.phases[STEADY].memslot_ops[0].repeat


# -- every file --------------------------------------------------------------------------------

def test_at_least_four_files_and_a_shrink_entry_each():
    assert len(FILES) >= 4
    assert set(FILES) == set(SHRINK), "add a SHRINK entry for each new steady workload (and drop stale ones)"


@pytest.mark.parametrize("name", FILES)
def test_file_shape_and_listed_in_readme(name):
    sc = full(name)
    assert [p.name for p in sc.phases] == ["populate", "steady"]
    ops = sc.phases[STEADY].memslot_ops
    assert len(ops) == 1 and ops[0].op == "toggle" and ops[0].repeat >= 6
    toggled = ops[0].slot
    assert all(t.slot == MAIN for p in sc.phases for t in p.touch_list())   # the guest never touches the toggled slot
    assert toggled not in {s.id for s in sc.vm.memslots}
    assert sc.host_profile().kernel.backing == "4k"
    assert f"steady/{name}.toml" in (ROOT / "workloads" / "README.md").read_text()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", FILES)
def test_runs_under_both_policies_with_audit(name, policy):
    res = run_small(name, policy)   # audit=True: the model raises InvariantViolation on its own
    m = res.metrics
    sc = small(name)
    assert m["accesses"] == res.raw.accesses_assigned > 0
    assert m["memslot_ioctls"] == 2 * repeat(sc)          # a create and a delete per event
    assert m[f"zaps_{policy}"] == repeat(sc)               # every delete runs the policy once
    assert m["faults_first_touch"] == main_pages(sc)       # populate touched all of the main RAM slot


@pytest.mark.parametrize("name", FILES)
def test_targeted_zap_never_refaults_and_fast_zap_does(name):
    fast, targeted = both(name)
    pages = main_pages(small(name))
    assert targeted["faults"] == targeted["faults_first_touch"] == pages
    assert targeted["faults_after_zap"] == targeted["faults_retry"] == 0
    assert fast["faults_first_touch"] == pages
    assert 0 < fast["faults_after_zap"] <= repeat(small(name)) * pages   # at most the whole RAM per zap
    assert fast["completion_ns"] > targeted["completion_ns"]


def guest_work_ns(sc: Scenario) -> float:
    """A lower bound on every vCPU's time in the steady phase: its own guest time, with no fault."""
    ph = sc.phases[STEADY]
    if ph.pattern == "sequential":
        share = main_pages(sc) // sc.vm.vcpus if ph.sharing == "private" else main_pages(sc)
        return ph.passes * share * ph.access_ns
    return ph.accesses * ph.access_ns


@pytest.mark.parametrize("name", FILES)
def test_events_end_before_the_work_under_both_policies(name):
    """Every event must meet running vCPUs: the script's last delete comes before any vCPU can have
    finished its steady-phase work, under either policy (faults only make the vCPUs slower).

    For Poisson scripts the span is drawn per replication from the VMM's own named stream (as in the
    model), so 20 seeds are checked; 1 ms of slack covers the ioctls themselves.
    """
    sc = full(name)
    phase = sc.phases[STEADY]
    seeds = range(1, 21) if phase.memslot_ops[0].poisson else [1]
    for seed in seeds:
        ops = phase_ops(phase, stream(seed, 0, f"vmm/{phase.name}"))
        last = max(o.time_ns for o in ops if o.op == MrChange.DELETE)
        assert last + 1e6 < guest_work_ns(sc), f"seed {seed}: the script can outlast the vCPUs' work"


def test_work_bound_matches_a_real_run():
    """The bound above is tight enough to mean something: a real run's steady phase is not much longer."""
    sc = small("stream_private_virtio_mem_poisson")
    res = run_small("stream_private_virtio_mem_poisson", "targeted")
    steady_ns = res.raw.phase_end_ns["steady"] - res.raw.phase_end_ns["populate"]
    assert guest_work_ns(sc) <= steady_ns < 1.2 * guest_work_ns(sc)


# -- per pattern ---------------------------------------------------------------------------------

def test_stream_refaults_all_of_ram_once_per_fast_zap():
    """A stream visits every page every pass: each fast zap costs exactly one re-fault per page
    (the shrunk file leaves a full pass between zaps and after the last one)."""
    fast, _ = both("stream_private_virtio_mem_poisson")
    sc = small("stream_private_virtio_mem_poisson")
    assert fast["faults_after_zap"] == repeat(sc) * main_pages(sc)


def test_hotcold_fast_zap_refaults_at_least_the_hot_set_each_time():
    fast, _ = both("hotcold_shared_virtio_mem")
    sc = small("hotcold_shared_virtio_mem")
    hot = int(main_pages(sc) * sc.phases[STEADY].hot_fraction)
    assert fast["faults_after_zap"] >= 0.9 * repeat(sc) * hot


@pytest.mark.parametrize("name", ["zipf_private_device_hotplug", "stream_private_virtio_mem_poisson"])
def test_private_shares_never_fault_spuriously(name):
    """Private shares: no two vCPUs fault the same page, so no RET_PF_SPURIOUS."""
    for m in both(name):
        assert m["faults_spurious"] == 0


def test_shared_uniform_sees_spurious_faults_under_fast_zap():
    """Shared uniform access: after a fast zap several vCPUs race to re-fault the same pages."""
    fast, targeted = both("uniform_shared_rom_poisson")
    assert fast["faults_spurious"] > 0 and targeted["faults_spurious"] == 0


def test_zipf_refaults_less_than_uniform_per_zap_and_page():
    """Zipf concentrates accesses, so a window between zaps re-touches a smaller share of RAM than
    uniform access does (per zap and per page of RAM, at the shrunk sizes' similar windows)."""
    z, _ = both("zipf_private_device_hotplug")
    u, _ = both("uniform_shared_rom_poisson")
    zs, us = small("zipf_private_device_hotplug"), small("uniform_shared_rom_poisson")
    z_share = z["faults_after_zap"] / (repeat(zs) * main_pages(zs))
    u_share = u["faults_after_zap"] / (repeat(us) * main_pages(us))
    assert z_share < u_share
