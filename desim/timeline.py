"""The timeline of a vCPU's back-to-back guest runs, computed for many runs at once, bit for bit.

A vCPU whose every guest run ends in a fault (:meth:`desim.vcpu.Vcpu.run`) advances
its clock by one float recurrence per run: starting at ``t`` (the previous fault's
end), it pays the rest of the previous lock hold ``c``, VM entry ``e``, the accesses
``x = n * access_ns``, and the exit and fault path ``y``::

    g0 = t + c
    g1 = g0 + e + x                 # (g0 + e) + x
    t' = t + (g1 - t + y)           # SimPy's now + delay, delay = (g1 - t) + y

Each ``+`` rounds, and the rounding of each step depends on ``t``, so the plain
way to get the same bits is a Python loop over the runs (:mod:`desim.faultrun`
used one). This module gets them without the loop. While ``t`` and every
intermediate sum lie in one binade ``[2**p, 2**(p+1))``, every float there is a
multiple of the same ``u = 2**(p-52)``, so ``t + v`` rounds to ``t`` plus ``v``
rounded to a multiple of ``u`` (round to nearest), whatever ``t`` is. Then

* ``g0 - t``, ``g1 - g0`` are ``c``, ``e``, ``x`` each rounded to the grid of ``u``;
* ``g1 - t`` is their sum, exact (a multiple of ``u`` below ``2**p``: Sterbenz);
* ``(g1 - t) + y`` is one IEEE addition of two values that do not involve ``t``;
* ``t' - t`` is that rounded to the grid of ``u``.

So each run's increment ``t' - t`` is computed elementwise, independently of
``t``, and ``t`` itself is ``now`` plus a cumulative sum of integers (in units of
``u``, exact below ``2**53``). Two things depend on ``t`` after all and are
checked: the binade (the runs are cut where ``t'`` would reach ``2**(p+1)``; the
next runs start over in the next binade, and a run that crosses it is computed
by the scalar recurrence) and ties (round-half-to-even picks the neighbour by the
parity of the sum, hence of ``t``: a value exactly halfway between two grid
points cuts the runs there too; with drawn costs it essentially never happens,
with integer costs never below 2**52 ns).

A ``cumsum`` of the raw increments would be wrong in the last bits; the result here
equals the scalar recurrence exactly (``tests/test_timeline.py`` checks it
against the loop on random and adversarial inputs, binade crossings and ties
included), so the fast engine's vectorised fault blocks keep the reference
engine's numbers.
"""
from __future__ import annotations

import math

import numpy as np

_TWO53 = float(2 ** 53)


def run_ends(now: float, c: np.ndarray, e: np.ndarray, x: np.ndarray, y: np.ndarray, head: float) -> np.ndarray:
    """The end ``t'`` of each run, from ``t = now``, for as many runs as end strictly before ``head``
    (the runs of ``c, e, x, y`` in order; the first run that would end at or after ``head`` is not
    included, nor any after it). Bit for bit the scalar recurrence (module docstring)."""
    n = len(c)
    out: list[np.ndarray] = []
    start = 0
    t = float(now)
    if n == 0:
        return np.zeros(0)
    if not all(a.min() >= 0 for a in (c, e, x, y)):  # a negative or not-a-number value (never a cost)
        return _loop(t, c, e, x, y, head)
    # where each run ends, roughly (rounding aside): only to cut the input at each binade's end, so
    # that no run past it is computed in vain; the ends themselves come from _in_binade
    approx = t + np.cumsum(c + e + x + y)
    while start < n:
        top = math.ldexp(1.0, math.frexp(t)[1])  # the end of t's binade
        stop = max(min(n, int(np.searchsorted(approx, top)) + 2), start + 1)
        ends, stopped = _in_binade(t, c[start:stop], e[start:stop], x[start:stop], y[start:stop], head)
        if len(ends) == 0 and not stopped:
            # the next run leaves the binade (or hits a tie): the scalar recurrence, once
            ends = _loop(t, c[start:start + 1], e[start:start + 1], x[start:start + 1], y[start:start + 1], head)
            if len(ends) == 0:
                break
        if len(ends):
            out.append(ends)
            start += len(ends)
            t = float(ends[-1])
        if stopped:
            break
    if not out:
        return np.zeros(0)
    return out[0] if len(out) == 1 else np.concatenate(out)


def _loop(t: float, c: np.ndarray, e: np.ndarray, x: np.ndarray, y: np.ndarray, head: float) -> np.ndarray:
    """The recurrence one run at a time, as the per-fault path computes it."""
    out = []
    for ci, ei, xi, yi in zip(c.tolist(), e.tolist(), x.tolist(), y.tolist()):
        g1 = t + ci + ei + xi
        t1 = t + (g1 - t + yi)
        if t1 >= head:
            break
        out.append(t1)
        t = t1
    return np.array(out)


def _in_binade(t: float, c: np.ndarray, e: np.ndarray, x: np.ndarray, y: np.ndarray,
               head: float) -> tuple[np.ndarray, bool]:
    """The ends of the runs from ``t`` that stay in ``t``'s binade and need no tie broken:
    ``(ends, stopped)``, ``stopped`` when the runs were cut by ``head`` (else by the binade, a tie,
    or the end of the input). Every value must be >= 0."""
    if not (t > 0.0 and math.isfinite(t)):
        return np.zeros(0), False
    m, p1 = math.frexp(t)  # t = m * 2**p1, 0.5 <= m < 1: the binade [2**(p1-1), 2**p1)
    u = math.ldexp(1.0, p1 - 53)
    if not 2.0 ** -1000 < u < 2.0 ** 1000:  # 1 / u exact and finite
        return np.zeros(0), False
    T0 = t / u  # an integer in [2**52, 2**53)
    inv = 1.0 / u  # a power of two: v * inv is v / u, exactly
    rc, tie = _to_grid(c * inv)
    re_, tie_e = _to_grid(e * inv)
    tie |= tie_e
    rx, tie_x = _to_grid(x * inv)
    tie |= tie_x
    D1 = rc + re_ + rx  # (g1 - t) / u, exact (integers; checked below 2**53 through T)
    rd, tie_d = _to_grid((D1 * u + y) * inv)  # ((g1 - t) + y) rounded onto the grid: t' - t, in units of u
    tie |= tie_d
    T = T0 + np.cumsum(rd)  # exact while below 2**53 (then each partial sum is an integer < 2**53)
    tie |= T >= _TWO53  # (every value is >= 0: run_ends checks)
    k = int(np.argmax(tie)) if tie.any() else len(T)
    ends = T[:k] * u
    j = int(np.searchsorted(ends, head, side="left"))
    if j < k:
        return ends[:j], True
    return ends, False


def _to_grid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``v`` rounded to the nearest integer, and where ``v`` lay exactly halfway (a tie: its rounding
    depends on the parity of what it is added to)."""
    r = np.rint(v)
    return r, np.abs(v - r) == 0.5  # v - r is exact (|v - r| <= 0.5)
