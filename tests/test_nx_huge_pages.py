"""NX huge pages (desim/nx.py): code pages map at 4 KiB, their 2 MiB regions stay split, a fast zap
re-faults the text page by page while a targeted zap keeps it, and the recovery worker undoes splits."""
from __future__ import annotations

import numpy as np

from desim.nx import ExecRanges, recovery_period_ms
from desim.scenario import validate_scenario
from desim.vm import Vm


def _run(nx: bool, policy: str, exec_fraction: float = 0.02, **kernel) -> dict:
    data = {"name": "nx", "profile": "tdp-icelake",
            "profile_overrides": {"kernel": {"backing": "thp", "nx_huge_pages": nx, **kernel}},
            "vm": {"vcpus": 2, "memslots": [{"id": 0, "gpa": 0, "size": "64MiB"}]},
            "phases": [{"name": "boot", "slot": 0, "exec_fraction": exec_fraction},
                       {"name": "rom", "pattern": "none",
                        "memslot_ops": [{"at_us": 0, "op": "toggle", "slot": 5, "gpa": "1GiB", "size": "64KiB",
                                         "hold_us": 10}]},
                       {"name": "again", "slot": 0, "exec_fraction": exec_fraction}]}
    return Vm(validate_scenario(data, "test"), policy).run().metrics


def test_code_pages_are_a_fixed_property_of_the_gfn():
    r = ExecRanges()
    r.add(0, 1 << 16, 0.1)
    g = np.arange(1 << 16, dtype=np.int64)
    m = r.mask(g)
    assert 0.08 < m.mean() < 0.12
    assert [r.is_exec(int(x)) for x in g[:2000]] == m[:2000].tolist()
    assert not r.mask(np.array([1 << 16], dtype=np.int64))[0]


def test_nx_huge_pages_map_code_regions_at_4k():
    off, on = _run(False, "targeted"), _run(True, "targeted")
    # 32 THP regions: without NX each is one 2 MiB fault; with NX a fetch from a region mapped huge splits
    # it (an "nx" fault) and the region's pages re-fault at 4 KiB
    assert off["faults"] == 32 and off["nx_4k_maps"] == 0 and off["faults_nx"] == 0
    assert on["faults_first_touch"] == 32 and on["faults_nx"] > 0
    assert on["faults"] > 100 * off["faults"] and on["nx_4k_maps"] > 0


def test_fast_zap_refaults_the_text_at_4k_that_a_targeted_zap_keeps():
    fast_on, targ_on = _run(True, "fast"), _run(True, "targeted")
    fast_off, targ_off = _run(False, "fast"), _run(False, "targeted")
    # what the ROM delete costs: without NX the fast zap re-faults 32 huge pages, with NX page by page
    assert fast_off["faults"] - targ_off["faults"] == 32
    assert fast_on["faults"] - targ_on["faults"] > 100 * 32


def test_recovery_worker_zaps_one_ratio_of_the_splits_per_period():
    assert recovery_period_ms(60, 0) == 60_000 and recovery_period_ms(60, 5) == 5
    m = _run(True, "targeted", nx_recovery_ratio=1, nx_recovery_period_ms=0.05)
    assert m["nx_recovered"] > 0
