"""The latency of hits as a distribution, folded into the statistics without a draw per access.

A *hit* is an access that neither faults nor stalls: the simulator charges a
touch's hits ``access_ns`` each, as one sum per run of hits (:mod:`desim.vcpu`,
:mod:`desim.faultrun`), and counts them per ``access_ns`` in
:attr:`desim.metrics.Metrics.hit_ns`. A real hit's latency varies (measured
with rdtsc in the guest of :mod:`desim.kvm`: p50 ~40-50 ns, p99 ~230 ns,
p99.9 ~400 ns when every access touches a new 4 KiB page): a TLB miss and a
walk of the (shadow or two-dimensional) page tables, cache misses, a host
interrupt landing on it. None of that is a KVM mechanism; it is the guest's
own work on this host, so its shape is the *workload's*: the scenario's
``access_dist`` (a :class:`desim.profile.Dist`, a quantile table or a
lognormal), scaled so that its mean is the touch's ``access_ns``.

``access_ns`` stays the mean of a hit, and nothing in the simulation reads
the shape: every time, count and ordering of a run is the same with or without
``access_dist``. The shape only changes how the statistics read the hits: each
``access_ns`` counted ``c`` times in ``hit_ns`` stands for ``c`` independent
draws from the shape at that mean, and the per-access latency percentiles
(``access_latency_*``, the ``access/all`` histogram of :mod:`desim.tails`) are
those of the mixture of that distribution and the stalled accesses (faults,
retries, kicks), exactly (:func:`mixture_percentiles`, :func:`hit_histogram`),
not by sampling. Drawing per hit instead would cost a draw per access in every
engine and change no timing worth the cost: a vCPU's time over ``n`` hits is
their sum, whose relative spread shrinks as 1/sqrt(n) (hundreds of hits run
between two faults), as for the per-unit costs of :mod:`desim.costs`. What
folding leaves out: a hit's latency in the simulator never delays the next
event (the sum is charged at its mean), and correlation between neighbouring
hits (a host interrupt stretching one access, not the next) is not modelled.

With ``costs = "mean"`` the shape is ignored (hits at ``access_ns``), like
every other distribution.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .profile import Dist

LOGNORMAL_Z = np.linspace(-8.0, 8.0, 641)  # normal scores of a lognormal's table (1e-15 .. 1 - 1e-15)


def quantile_function(dist: "Dist", mean: float) -> tuple[np.ndarray, np.ndarray]:
    """(p, x): the piecewise-linear quantile function of ``dist`` scaled so that its mean is ``mean``.

    A quantile table is scaled as :mod:`desim.costs` scales a cost's table
    (``mean / table_mean``); a lognormal becomes a table at
    :data:`LOGNORMAL_Z` normal scores (its ends clipped at +-8 sd, a mass of
    1e-15), scaled the same way."""
    if dist.kind == "quantiles":
        p = np.asarray(dist.p, dtype=np.float64)
        x = np.asarray(dist.ns, dtype=np.float64)
    else:
        from statistics import NormalDist

        nd = NormalDist()
        p = np.array([nd.cdf(float(z)) for z in LOGNORMAL_Z])
        p[0], p[-1] = 0.0, 1.0
        x = np.exp((dist.sigma or 0.0) * LOGNORMAL_Z)
    tmean = float(np.sum(np.diff(p) * (x[1:] + x[:-1]) / 2))
    return p, x * (mean / tmean if tmean > 0 else 0.0)


def _cdf(p: np.ndarray, x: np.ndarray, v: np.ndarray, left: bool) -> np.ndarray:
    """F(v) (right-continuous) or F(v-) (``left``) of the quantile function (p, x)."""
    v = np.asarray(v, dtype=np.float64)
    if left:
        j = np.searchsorted(x, v, side="left")  # x[j-1] < v <= x[j]
    else:
        j = np.searchsorted(x, v, side="right")  # x[j-1] <= v < x[j]
    out = np.where(j >= len(x), 1.0, 0.0)
    mid = (j > 0) & (j < len(x))
    jm = j[mid]
    x0, x1, p0, p1 = x[jm - 1], x[jm], p[jm - 1], p[jm]
    span = np.where(x1 > x0, x1 - x0, 1.0)
    out[mid] = np.where(x1 > x0, p0 + (v[mid] - x0) / span * (p1 - p0), p1)
    return out


def _parts(hits: dict[float, int], dist: "Dist") -> list[tuple[float, np.ndarray, np.ndarray]]:
    return [(float(c),) + quantile_function(dist, a) for a, c in sorted(hits.items()) if c > 0]


def mixture_percentiles(hits: dict[float, int], dist: "Dist", stalls: np.ndarray,
                        qs: tuple[float, ...] = (50, 90, 99, 99.9)) -> list[float]:
    """Percentiles of per-access latency: ``hits[a]`` draws of ``dist`` at mean ``a`` for every ``a``, plus
    each value of ``stalls`` once. The q-th percentile is the smallest v with G(v) >= q% of all accesses
    (G: how many are <= v), as :meth:`desim.metrics.Metrics.access_latency_percentiles` reads the
    stalls; G is piecewise linear between the table's points and jumps at each stall, so it is inverted
    exactly."""
    parts = _parts(hits, dist)
    s = np.sort(np.asarray(stalls, dtype=np.float64))
    total = sum(c for c, _, _ in parts) + len(s)
    if total == 0:
        return [0.0 for _ in qs]
    b = np.unique(np.concatenate([s] + [x for _, _, x in parts]))
    g = np.searchsorted(s, b, side="right").astype(np.float64)
    g_left = np.searchsorted(s, b, side="left").astype(np.float64)
    for c, p, x in parts:
        g += c * _cdf(p, x, b, left=False)
        g_left += c * _cdf(p, x, b, left=True)
    out = []
    for q in qs:
        t = q / 100.0 * total
        i = min(int(np.searchsorted(g, t * (1 - 1e-12), side="left")), len(b) - 1)
        v = b[i]
        if i > 0 and g_left[i] >= t and g_left[i] > g[i - 1]:  # on the continuous part below b[i]
            v = b[i - 1] + (t - g[i - 1]) / (g_left[i] - g[i - 1]) * (b[i] - b[i - 1])
        out.append(float(v))
    return out


def hit_histogram(hits: dict[float, int], dist: "Dist", edges: np.ndarray) -> np.ndarray:
    """The hits' expected counts in the bins ``[edges[i], edges[i+1])`` (mass outside goes to the end bins,
    as :func:`desim.tails._hist` clips values); the counts sum to the number of hits."""
    h = np.zeros(len(edges) - 1)
    for c, p, x in _parts(hits, dist):
        f = _cdf(p, x, edges, left=True)
        f[0], f[-1] = 0.0, 1.0
        h += c * np.diff(f)
    return h


def hit_points(count: int, dist: "Dist", mean: float, k: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``count`` hits as at most ``k`` values with integer counts (equal-probability strata of the
    quantile function, each at its middle): for a quantile sketch, which takes whole counts."""
    n = int(min(max(count, 0), k))
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    p, x = quantile_function(dist, mean)
    mids = (np.arange(n) + 0.5) / n
    vals = np.interp(mids, p, x)
    cuts = np.round(np.arange(n + 1) * (count / n)).astype(np.int64)
    return vals, np.diff(cuts)


def shape_percentiles(dist: "Dist | None", mean: float, qs: tuple[float, ...] = (50, 90, 99, 99.9)) -> list[float]:
    """Percentiles of one hit: ``dist``'s at mean ``mean`` (every percentile ``mean`` without a shape)."""
    if dist is None:
        return [float(mean) for _ in qs]
    return mixture_percentiles({float(mean): 1}, dist, np.zeros(0), qs)
