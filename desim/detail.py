"""Detail of every replication, small enough to keep: what the detail plots draw.

A comparison's detail plots (fault-latency CDF, faults over time) cover *all*
replications, not one. Each run keeps a compact summary instead of its raw
samples (120,000 fault latencies would be 2 MB of JSON per run in a store):

* ``latency_counts``: fault latencies counted in fixed log-spaced bins,
  :data:`LATENCY_BINS_PER_DECADE` per decade from 10 ns to 10 s, the same
  edges in every run, so the replications pool exactly (a pooled CDF is
  exact at every bin edge, within 2.3% in latency between them);
* ``fault_counts`` with ``fault_bin_ns``: faults per time bin of a power-of-two
  width, the smallest that fits the run in :data:`TIME_BINS` bins. Runs of
  different lengths are re-binned to the widest width by adding whole bins,
  which is exact;
* ``zap_ioctl_ns``: start times of the DELETE/MOVE ioctls (the markers).

:func:`detail_samples` is the :class:`desim.sweep.Task` ``samples`` hook; the
merge functions take the kept summaries of one policy's replications.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

LATENCY_BINS_PER_DECADE = 100
LATENCY_EDGES_NS = np.logspace(1, 10, 9 * LATENCY_BINS_PER_DECADE + 1)  # 10 ns .. 10 s
TIME_BINS = 1024


def time_bin_ns(end_ns: float) -> float:
    """The smallest power of two (ns) with ``end_ns`` fitting in :data:`TIME_BINS` bins."""
    k = max(0, int(np.ceil(np.log2(max(end_ns, 1.0) / TIME_BINS))))
    return float(2 ** k)


def detail_samples(res: Any) -> dict[str, Any]:
    """The compact detail of one run (a ``RunResult`` with raw metrics)."""
    raw = res.raw
    lat = np.frombuffer(raw.fault_latency, dtype=np.float64)
    clipped = np.clip(lat, LATENCY_EDGES_NS[0], LATENCY_EDGES_NS[-1])
    lat_counts = np.histogram(clipped, LATENCY_EDGES_NS)[0]
    t = np.frombuffer(raw.fault_time, dtype=np.float64)
    end = max(raw.completion_ns, float(t.max()) if len(t) else 0.0, 1.0)
    w = time_bin_ns(end)
    nb = int(np.ceil(end / w))
    counts = np.bincount(np.minimum((t // w).astype(np.int64), nb - 1), minlength=nb) if len(t) else np.zeros(nb)
    ops = raw.ioctl_ops
    times = np.frombuffer(raw.ioctl_time, dtype=np.float64)
    zap = [tt for op, tt in zip(ops, times) if op in ("delete", "move")]
    return {"latency_counts": lat_counts, "fault_counts": counts, "fault_bin_ns": [w], "zap_ioctl_ns": zap}


def pooled_latency_counts(kept: Iterable[dict[str, Any]]) -> np.ndarray:
    """Latency counts of all given runs added up (bins of :data:`LATENCY_EDGES_NS`)."""
    total = np.zeros(len(LATENCY_EDGES_NS) - 1)
    for k in kept:
        total += np.asarray(k["latency_counts"], dtype=float)
    return total


def fault_series(kept: list[dict[str, Any]], width_ns: float | None = None) -> tuple[float, np.ndarray]:
    """(bin width ns, array runs x bins): every run's faults per bin on one common grid.

    The width is the widest of the runs (or ``width_ns``, a power-of-two
    multiple of all of them); shorter runs are padded with zeros after they end.
    """
    widths = [float(k["fault_bin_ns"][0]) for k in kept]
    w = max(widths + ([width_ns] if width_ns else []))
    series = []
    for k, wk in zip(kept, widths):
        c = np.asarray(k["fault_counts"], dtype=float)
        f = int(round(w / wk))
        c = np.pad(c, (0, (-len(c)) % f)).reshape(-1, f).sum(axis=1)
        series.append(c)
    n = max(len(c) for c in series)
    return w, np.vstack([np.pad(c, (0, n - len(c))) for c in series])
