"""Host-side contention of first touches (desim/hostmm.py): zone->lock refills, lru_lock drains and
memory bandwidth shared by the vCPUs that fault at once."""
from __future__ import annotations

from desim.hostmm import PCP_BATCH, FifoServer, HostMm
from desim.scenario import validate_scenario
from desim.vm import run_scenario


def test_fifo_server_queues_holds_in_arrival_order():
    z = FifoServer()
    assert z.hold(0, 100) == 0 and z.hold(10, 100) == 90 and z.hold(500, 100) == 0
    assert z.contended == 1 and z.wait_ns == 90


def test_one_cpu_refills_its_per_cpu_list_every_batch_without_waiting():
    h = HostMm(zone_lock_page=40, lru_lock_page=30, clear_page_4k=400, membw_4k=27)
    extra = [h.first_touch(0, i * 2000.0, 1) for i in range(3 * PCP_BATCH)]
    assert sum(extra) == 0 and h.zone.holds == 3


def test_cpus_faulting_together_queue_on_the_zone_lock_and_share_bandwidth():
    h = HostMm(zone_lock_page=40, lru_lock_page=30, clear_page_4k=400, membw_4k=27)
    extra = [h.first_touch(cpu, 0.0, 1) for cpu in range(64)]
    # the 64 refills queue behind each other: the last waits 63 holds of 63 pages
    assert h.zone.wait_ns > 0 and max(extra) >= 63 * PCP_BATCH * 40
    # without the lock, 64 zeroings start together: 64 x 27 ns per 4 KiB > 400 ns, bandwidth-bound
    b = HostMm(zone_lock_page=0, lru_lock_page=0, clear_page_4k=400, membw_4k=27)
    extra = [b.first_touch(cpu, 0.0, 1) for cpu in range(64)]
    assert extra[0] == 0 and extra[-1] == 64 * 27 - 400 and b.stretch_ns > 0


def _demand_paging(vcpus: int) -> dict:
    data = {"name": "dp", "profile": "tdp-icelake", "profile_overrides": {"kernel": {"backing": "4k"}},
            "vm": {"vcpus": vcpus, "memslots": [{"id": 1, "gpa": "1GiB", "size": vcpus * (2 << 20)}]},
            "phases": [{"name": "touch", "slot": 1, "sharing": "private", "access_ns": 50}]}
    return run_scenario(validate_scenario(data, "test"), "fast").metrics


def test_read_locked_first_touches_no_longer_scale_perfectly():
    one, many = _demand_paging(1), _demand_paging(64)
    assert one["zone_lock_wait_ns"] == 0 and one["membw_stretch_ns"] == 0
    assert many["zone_lock_contended"] > 0 and many["membw_stretch_ns"] > 0
    # same work per vCPU: without host contention the TDP MMU's read-locked faults took the same time
    assert many["completion_ns"] > 1.2 * one["completion_ns"]
