"""Steady-state analysis of one long run: MSER-5 finds the populate transient, batch means give a CI."""
from __future__ import annotations

import numpy as np

from desim.experiment import steady_state
from desim.streams import stream_seed
from desim.vm import run_scenario

from conftest import MiB, scenario


def test_mser5_cuts_the_first_touch_transient_of_a_long_run():
    toggles = [{"at_us": 100, "op": "toggle", "slot": 7, "gpa": 64 * MiB, "size": 65536, "hold_us": 50,
                "repeat": 400, "every_us": 400, "poisson": True}]
    sc = scenario(vcpus=2, ram_mib=8, kernel={"backing": "4k"}, phases=[
        {"name": "steady", "pattern": "uniform", "slot": 0, "accesses": 400000, "access_ns": 200,
         "sharing": "shared", "memslot_ops": toggles}])
    res = run_scenario(sc, "fast", seed=3)
    st = steady_state(res, bins=400)
    lat = st["fault_latency_ns"]
    # first touches (host page allocation: slower) are mixed with cheaper re-faults after the fast zaps
    # until the last of the 2048 pages was touched (uniform accesses: a coupon collector, ~2048 ln 2048
    # accesses); afterwards only re-faults. MSER-5 must cut that transient, not the whole run.
    n = len(res.raw.fault_latency)
    assert 2000 <= lat["warmup_truncation"] <= 0.2 * n and not lat["mser5_warning"]
    first = np.frombuffer(res.raw.fault_latency, dtype=np.float64)[:1000].mean()
    assert lat["mean"] < first
    assert lat["ci_low"] <= lat["mean"] <= lat["ci_high"] and np.isfinite(lat["ci_high"])
    assert st["fault_rate_per_ms"]["batches"] == 20


def test_streams_follow_seedsequence_spawn():
    import zlib

    root = np.random.SeedSequence(42).spawn(4)[3]
    ss = stream_seed(42, 3, "vmm/steady")
    assert ss.entropy == root.entropy and ss.spawn_key == root.spawn_key + (zlib.crc32(b"vmm/steady"),)
