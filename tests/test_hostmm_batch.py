"""HostMm.first_touches_4k (the fast engine's batch of one CPU's first touches) against first_touch one
call at a time: the same state afterwards, no extra time in the calls it applies, and where it stops
(memory bandwidth, a lock held by another CPU) the next call would indeed have waited.

Allocation times jitter as drawn costs make them (a time is its fault's end minus a drawn allocation
cost, so the times are not in order) and the bandwidth is tight (two zeroings in flight saturate it,
as ``shadow-pvm``'s ``membw_4k = 200`` with ``clear_page_4k = 400``): stops on bandwidth happen, and
runs of many calls go through between them.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from desim.hostmm import HostMm


def state(h: HostMm) -> tuple:
    return (h.zone.free_at, h.zone.holds, h.lru.free_at, h.lru.holds, dict(h._pcp), dict(h._lru_pending),
            sorted(h._zeroing), h.stretch_ns)


@pytest.mark.parametrize("seed", range(6))
def test_a_batch_is_the_calls_one_by_one(seed):
    rng = np.random.default_rng(seed)
    h = HostMm(zone_lock_page=40, lru_lock_page=30, clear_page_4k=400, membw_4k=200)
    calls = stops = 0
    now = 1e6
    while calls < 3000:
        k = int(rng.integers(1, 400))
        order = now + np.cumsum(rng.uniform(300, 5000, k))
        x = rng.choice([1000.0, 2500.0, 9000.0, 21000.0], k, p=[0.6, 0.3, 0.07, 0.03]) + rng.random(k)
        t = order - x
        if rng.random() < 0.3:  # another CPU holds zone->lock or lru_lock into this batch
            lock = h.zone if rng.random() < 0.5 else h.lru
            lock.free_at = max(lock.free_at, float(t[int(rng.integers(0, k))]))
        ref = copy.deepcopy(h)
        m = h.first_touches_4k(0, t, order, float(x.max() - x.min()))
        extra = [ref.first_touch(0, tj, 1) for tj in t[:m].tolist()]
        assert extra == [0.0] * m and state(ref) == state(h)
        if m < k:
            # stopped on bandwidth or at a refill or drain that finds its lock held: for real
            assert h.first_touch(0, float(t[m]), 1) > 0
            stops += 1
            m += 1
        now = float(order[m - 1])
        calls += m
    assert stops > 0
