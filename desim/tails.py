"""Latency tails across replications: percentiles with bootstrap CIs, per phase, around memslot ioctls.

A mean hides what users ask about: the p99 of fault latency, the longest
stall of a vCPU while the VMM deletes a slot. This module turns each
replication into a compact, storable summary (:func:`latency_samples`, a
``Task.samples`` hook run in the worker) and pools the summaries of many
replications:

* **Latency histograms** with log-spaced bins (``BINS_PER_DECADE`` = 100 per
  decade from 1 ns to 100 s: each bin 2.3% wide, so a percentile read from
  the pooled histogram is within ~1.2% of the exact one) for

  - ``fault``: every fault's latency (VM exit to VM entry), all of the run,
    per phase (by the fault's start) and during DELETE/MOVE ioctls;
  - ``access``: per-access latency, as the real guest measures it with rdtsc:
    hits at their touch's ``access_ns`` (or distributed as the scenario's
    ``access_dist`` around it, :mod:`desim.hitdist`) plus every access that stalled (a
    fault, RET_PF_RETRY while the slot is INVALID, a kick) from its start to
    its completion after re-entry; per phase and during DELETE/MOVE only the
    stalled accesses (hits carry no time stamp).

* **Percentile CIs across replications** (:func:`tails_table`): a cluster
  bootstrap (Efron & Tibshirani 1993, ch. 13; resample whole replications,
  since events of one run are correlated) with
  :func:`desim.stats.bootstrap_ci` on replication indices. The ratio
  alternative/baseline resamples the *same* replications for both policies
  (paired, as the replications share their random streams).

* **Latency around each memslot ioctl** (:func:`around_ops`): for each DELETE
  or MOVE, time bins relative to the ioctl's start: the number of vCPUs
  stalled in an access (the stall) and the faults per microsecond (the
  re-fault storm), averaged over the ioctls of a run; :func:`around_band`
  averages the runs with a 95% t band.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .hitdist import hit_histogram
from .stats import t_ci

if TYPE_CHECKING:  # pragma: no cover
    from .metrics import Metrics
    from .vm import RunResult

BINS_PER_DECADE = 100
LAT_EDGES = np.logspace(0.0, 11.0, 11 * BINS_PER_DECADE + 1)  # 1 ns .. 100 s
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
AROUND_BEFORE_NS = 500_000.0
AROUND_AFTER_NS = 5_000_000.0
AROUND_BINS = 110
ZAP_OPS = ("delete", "move")
TAILS_TAG = "tails/1"  # names what latency_samples computes (part of a stored result's key)


def _hist(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    idx = np.clip(np.searchsorted(LAT_EDGES, values, side="right") - 1, 0, len(LAT_EDGES) - 2)
    return np.bincount(idx, weights=weights, minlength=len(LAT_EDGES) - 1)


def _sparse(h: np.ndarray) -> list[list[float]]:
    nz = np.flatnonzero(h)
    return [[float(i), float(h[i])] for i in nz]


def _dense(pairs: Any) -> np.ndarray:
    h = np.zeros(len(LAT_EDGES) - 1)
    for i, c in pairs:
        h[int(i)] += c
    return h


def hist_percentile(h: np.ndarray, q: float) -> float:
    """The q-th percentile of a histogram on ``LAT_EDGES`` (geometric interpolation in the bin)."""
    return float(hist_percentiles(np.asarray(h, dtype=float)[None, :], q)[0])


def hist_percentiles(rows: np.ndarray, q: float) -> np.ndarray:
    """:func:`hist_percentile` of every row of a (k, bins) array; NaN for an empty row."""
    cum = np.cumsum(rows, axis=1)
    total = cum[:, -1]
    target = q / 100.0 * total
    i = np.minimum((cum < target[:, None]).sum(axis=1), rows.shape[1] - 1)
    k = np.arange(len(rows))
    h = rows[k, i]
    below = cum[k, i] - h
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(h > 0, (target - below) / np.where(h > 0, h, 1.0), 0.5)
    lo, hi = LAT_EDGES[i], LAT_EDGES[i + 1]
    out = lo * (hi / lo) ** np.clip(frac, 0.0, 1.0)
    return np.where(total > 0, out, np.nan)


def _windows(m: "Metrics") -> list[tuple[float, float]]:
    t = np.frombuffer(m.ioctl_time, dtype=np.float64)
    lat = np.frombuffer(m.ioctl_latency, dtype=np.float64)
    return [(float(a), float(a + b)) for op, a, b in zip(m.ioctl_ops, t, lat) if op in ZAP_OPS]


def _inside(t: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    mask = np.zeros(len(t), dtype=bool)
    for a, b in windows:
        mask |= (t >= a) & (t < b)
    return mask


def latency_histograms(m: "Metrics") -> dict[str, np.ndarray]:
    """Histograms (on ``LAT_EDGES``) of fault and access latency, by class (see the module docstring)."""
    ft = np.frombuffer(m.fault_time, dtype=np.float64)
    fl = np.frombuffer(m.fault_latency, dtype=np.float64)
    st = np.frombuffer(m.access_stall_time, dtype=np.float64)
    sl = np.frombuffer(m.access_stall, dtype=np.float64)
    out: dict[str, np.ndarray] = {"fault/all": _hist(fl)}
    hv = np.array(list(m.hit_ns), dtype=np.float64)
    hc = np.array([max(c, 0) for c in m.hit_ns.values()], dtype=np.float64)
    if m.hit_dist is not None:  # each hit drawn from the scenario's access_dist (desim/hitdist.py)
        hits = hit_histogram({v: max(c, 0) for v, c in m.hit_ns.items()}, m.hit_dist, LAT_EDGES)
    else:
        hits = _hist(hv, hc) if len(hv) else 0.0
    out["access/all"] = _hist(sl) + hits
    start = 0.0
    for name, end in m.phase_end_ns.items():
        out[f"fault/phase:{name}"] = _hist(fl[(ft >= start) & (ft < end)])
        out[f"stall/phase:{name}"] = _hist(sl[(st >= start) & (st < end)])
        start = end
    w = _windows(m)
    out["fault/during_delete_move"] = _hist(fl[_inside(ft, w)])
    out["stall/during_delete_move"] = _hist(sl[_inside(st, w)])
    return out


def around_ops(m: "Metrics", before_ns: float = AROUND_BEFORE_NS, after_ns: float = AROUND_AFTER_NS,
               bins: int = AROUND_BINS) -> dict[str, np.ndarray]:
    """Per time bin around each DELETE/MOVE (averaged over them): stalled vCPUs and faults per us.

    ``stalled_vcpus`` is the mean number of vCPUs inside a stalled access in the
    bin (the integral of the stall intervals over the bin, divided by its width).
    """
    edges = np.linspace(-before_ns, after_ns, bins + 1)
    width = edges[1] - edges[0]
    ft = np.frombuffer(m.fault_time, dtype=np.float64)
    st = np.frombuffer(m.access_stall_time, dtype=np.float64)
    sl = np.frombuffer(m.access_stall, dtype=np.float64)
    starts = [a for a, _ in _windows(m)]
    stalled = np.zeros(bins)
    faults = np.zeros(bins)
    for a in starts:
        faults += np.histogram(ft - a, edges)[0]
        sel = (st + sl > a + edges[0]) & (st < a + edges[-1])
        s, ln = st[sel] - a, sl[sel]
        # C(t) = sum_i clip(t - s_i, 0, l_i): stall time accumulated until t
        cov = np.array([np.clip(e - s, 0.0, ln).sum() for e in edges])
        stalled += np.diff(cov) / width
    n = max(len(starts), 1)
    return {"edges_ns": edges, "stalled_vcpus": stalled / n, "faults_per_us": faults / n / (width / 1e3),
            "ops": np.array([float(len(starts))])}


def latency_samples(res: "RunResult") -> dict[str, Any]:
    """``Task.samples`` hook: the run's latency histograms (sparse) and its around-ioctl series."""
    m = res.raw
    out: dict[str, Any] = {f"hist/{k}": np.asarray(_sparse(h)).reshape(-1, 2)
                           for k, h in latency_histograms(m).items()}
    for k, v in around_ops(m).items():
        out[f"around/{k}"] = v
    return out


class WithTails:
    """A ``Task.samples`` hook: another hook's samples (or none) plus :func:`latency_samples`.

    A module-level class, so that it pickles for Dask workers; ``tag`` names
    both parts (part of a stored result's key)."""

    def __init__(self, other: Any = None) -> None:
        self.other = other
        self.tag = f"{getattr(other, '__name__', 'none')}+{TAILS_TAG}"

    def __call__(self, res: "RunResult") -> dict[str, Any]:
        out = dict(self.other(res)) if self.other is not None else {}
        out.update(latency_samples(res))
        return out


def _hists_by_rep(samples: dict[int, dict[str, Any]], key: str, reps: list[int]) -> np.ndarray:
    return np.array([_dense(samples[r].get(key, [])) for r in reps])


def _boot_weights(reps: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, reps) multiplicities of each replication in each bootstrap resample."""
    idx = np.random.default_rng(seed).integers(0, reps, size=(n_boot, reps))
    w = np.zeros((n_boot, reps))
    np.add.at(w, (np.repeat(np.arange(n_boot), reps), idx.ravel()), 1.0)
    return w


def _interval(theta: float, boot: np.ndarray, confidence: float) -> tuple[float, float]:
    boot = boot[np.isfinite(boot)]
    if not np.isfinite(theta) or len(boot) == 0:
        return float("nan"), float("nan")
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def tails_table(samples: dict[str, dict[int, dict[str, Any]]], baseline: str = "fast",
                alternative: str = "targeted", confidence: float = 0.95, n_boot: int = 2000,
                seed: int = 1) -> pd.DataFrame:
    """Percentiles of every latency class pooled over replications, with cluster-bootstrap CIs.

    ``samples[policy][replication]`` is :func:`latency_samples`'s output. One
    row per (class, percentile): each policy's estimate and CI, and the paired
    ratio alternative/baseline with its CI. The interval is the percentile
    bootstrap of :func:`desim.stats.bootstrap_ci` with whole replications as
    the resampled units, computed for all resamples at once (a resample is a
    vector of multiplicities, the pooled histogram a matrix product); the same
    resamples serve both policies and every class. Deterministic for ``seed``.
    """
    reps = sorted(set(samples[baseline]) & set(samples[alternative]))
    keys = sorted({k for p in (baseline, alternative) for r in reps for k in samples[p][r]
                   if k.startswith("hist/")}, key=_class_order)
    w = _boot_weights(len(reps), n_boot, seed)
    rows = []
    for key in keys:
        ha = _hists_by_rep(samples[baseline], key, reps)
        hb = _hists_by_rep(samples[alternative], key, reps)
        na, nb = ha.sum(), hb.sum()
        if na == 0 and nb == 0:
            continue
        ba, bb = w @ ha, w @ hb
        for q in PERCENTILES:
            row: dict[str, Any] = {"class": key[len("hist/"):], "percentile": q, "n": len(reps),
                                   f"events_{baseline}": na, f"events_{alternative}": nb}
            ests = {}
            for pol, h, boot in ((baseline, ha, ba), (alternative, hb, bb)):
                est = hist_percentile(h.sum(0), q)
                bq = hist_percentiles(boot, q)
                lo, hi = _interval(est, bq, confidence) if len(reps) >= 2 else (float("nan"),) * 2
                row.update({pol: est, f"{pol}_low": lo, f"{pol}_high": hi})
                ests[pol] = (est, bq)
            (ea, qa), (eb, qb) = ests[baseline], ests[alternative]
            ratio = eb / ea if ea > 0 else float("nan")
            with np.errstate(invalid="ignore", divide="ignore"):
                lo, hi = _interval(ratio, qb / qa, confidence) if len(reps) >= 2 else (float("nan"),) * 2
            row.update(ratio=ratio, ratio_low=lo, ratio_high=hi)
            rows.append(row)
    return pd.DataFrame(rows)


def _class_order(key: str) -> tuple[int, str]:
    order = ("hist/access/all", "hist/fault/all", "hist/stall/during", "hist/fault/during")
    for i, p in enumerate(order):
        if key.startswith(p):
            return i, key
    return len(order), key


def format_tails(table: pd.DataFrame, baseline: str = "fast", alternative: str = "targeted",
                 confidence: float = 0.95) -> str:
    """The tails table for a terminal, in the comparison table's format (:func:`desim.report.format_table`).

    Columns: class, percentile, the row's display unit, each policy's
    estimate with its CI as ``v [low to high]``, and the paired ratio
    alternative/baseline with its CI. Each row picks one unit from its
    largest value (:func:`desim.report.display_scale`), so the numbers of a
    row are read on one scale.
    """
    from .report import display_scale, fmt, fmt_quantity

    pct = f"{confidence * 100:g}%"
    header = ["class", "pct", "unit", f"{baseline} [{pct} CI]", f"{alternative} [{pct} CI]",
              f"{alternative} / {baseline} [{pct} CI]"]
    rows = []
    for _, r in table.iterrows():
        cols = [baseline, baseline + "_low", baseline + "_high", alternative, alternative + "_low",
                alternative + "_high"]
        name, div, dec = display_scale([r[c] for c in cols], "ns")

        def cell(v: float) -> str:
            s = fmt(v, div, dec)
            # a value too small for the row's scale keeps its own unit instead of reading as 0
            return fmt_quantity(v, "ns") if s.lstrip("-") == "0" and np.isfinite(v) and v != 0 else s

        def est(p: str) -> str:
            out = cell(r[p])
            if np.isfinite(r[p + "_low"]) and np.isfinite(r[p + "_high"]):
                out += f" [{cell(r[p + '_low'])} to {cell(r[p + '_high'])}]"
            return out
        rat = "n/a"
        if np.isfinite(r["ratio"]):
            rat = f"{r['ratio']:.3f}"
            if np.isfinite(r["ratio_low"]) and np.isfinite(r["ratio_high"]):
                rat += f" [{r['ratio_low']:.3f} to {r['ratio_high']:.3f}]"
        rows.append([r["class"], "p" + format(r["percentile"], "g"), name, est(baseline), est(alternative), rat])
    widths = [max(len(str(x[i])) for x in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}  {cells[1]:>{widths[1]}}  {cells[2]:<{widths[2]}}"
        return "  ".join([first] + [f"{c:>{w}}" for c, w in zip(cells[3:], widths[3:])]).rstrip()
    title = f"latency tails, pooled over replications ({pct} cluster-bootstrap CIs)"
    return "\n".join([title] + [line(c) for c in [header] + rows])


def around_band(samples: dict[int, dict[str, Any]], series: str, confidence: float = 0.95
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bin centres ns, mean, low, high) of an around-ioctl series over replications (t band)."""
    reps = sorted(samples)
    edges = np.asarray(samples[reps[0]]["around/edges_ns"], dtype=float)
    ys = np.array([np.asarray(samples[r][f"around/{series}"], dtype=float) for r in reps])
    mean = ys.mean(0)
    low, high = mean.copy(), mean.copy()
    if len(reps) >= 2:
        for j in range(ys.shape[1]):
            iv = t_ci(ys[:, j], confidence)
            low[j], high[j] = iv.low, iv.high
    return (edges[:-1] + edges[1:]) / 2, mean, low, high
