"""desim.timeline.run_ends gives the scalar recurrence's bits, not an approximation of them.

The recurrence is the vCPU's guest-run timeline (desim/vcpu.py): ``g1 = t + c + e + x``,
``t' = t + (g1 - t + y)``, stopping at the first ``t' >= head``. Compared bit for bit (``==`` on
floats, and the lengths) on drawn-looking costs over many binades, integer costs, clocks just below
a power of two (every block crosses a binade), ties (values exactly halfway between grid points, so
round-half-to-even depends on the clock) and a head cutting the runs.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from desim.timeline import _loop, run_ends


def scalar(now, c, e, x, y, head):
    """The recurrence one run at a time: the float operations of the per-fault path (Vcpu.run's guest
    run, FaultRun.run), which tests/test_engines_differential.py checks against the reference engine."""
    return _loop(now, c, e, x, y, head)


def same(now, c, e, x, y, head=math.inf):
    want = scalar(now, c, e, x, y, head)
    got = run_ends(now, c, e, x, y, head)
    assert len(got) == len(want)
    assert got.tobytes() == want.tobytes()
    return got


@pytest.mark.parametrize("now", [0.0, 1.0, 1234.5678, 2.0 ** 20 - 3.0, 1e9 + 0.123, 3.7e12, 2.0 ** 45 - 1e3,
                                 2.0 ** 52 - 5e4])
def test_drawn_costs_match_the_loop(now):
    rng = np.random.default_rng(int(now) % 1000)
    k = 3000
    c = rng.lognormal(5, 1, k)
    e = rng.lognormal(6, 0.5, k)
    x = rng.integers(0, 20, k) * 20.1
    y = rng.lognormal(7, 1.5, k)
    same(now, c, e, x, y)


def test_integer_costs_and_a_head():
    k = 5000
    c = np.full(k, 150.0)
    e = np.full(k, 250.0)
    x = np.arange(k) % 7 * 50.0
    y = np.full(k, 1900.0)
    ends = same(1e6, c, e, x, y)
    head = float(ends[1234])
    got = same(1e6, c, e, x, y, head)
    assert len(got) == 1234  # the run ending at the head is not taken
    same(1e6, c, e, x, y, head + 1e-9)


def test_ties_are_broken_as_the_loop_breaks_them():
    # the clock in [2**40, 2**41): the grid is 2**-12; costs of an odd number of half-grid steps are
    # exactly halfway, and round-half-to-even then depends on the clock's own last bit
    half = 2.0 ** -13
    rng = np.random.default_rng(7)
    k = 2000
    c = (2 * rng.integers(1, 10 ** 6, k) + 1) * half
    e = np.where(rng.random(k) < 0.5, 250.0, 250.0 + half)
    x = np.zeros(k)
    y = (2 * rng.integers(1, 10 ** 6, k) + 1) * half
    same(2.0 ** 40 + 3 * 2.0 ** -12, c, e, x, y)
    same(2.0 ** 40, c, e, x, y)


def test_crossing_binades_at_every_run():
    k = 200
    rng = np.random.default_rng(3)
    c, e, y = rng.random(k) * 3, rng.random(k) * 5, rng.random(k) * 7
    x = np.zeros(k)
    same(1e-3, c, e, x, y)  # the clock grows from 0.001 past 2**9: a new binade every few runs


def test_empty_and_immediate_head():
    z = np.zeros(0)
    assert len(run_ends(5.0, z, z, z, z, math.inf)) == 0
    one = np.ones(3)
    assert len(run_ends(5.0, one, one, one, one, 5.0)) == 0


def test_values_that_are_no_costs_take_the_loop():
    k = 50
    c = np.linspace(-5.0, 5.0, k)
    one = np.ones(k)
    same(1e6, c, one, one, one)
    same(1e6, one, one, one, np.where(np.arange(k) == 7, np.nan, 1.0))
