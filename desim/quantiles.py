"""Latency samples that stay exact while they are few and become a mergeable quantile sketch beyond.

A run keeps every fault latency (8 bytes a sample, no Python object) while the
run has at most :data:`EXACT_SAMPLE_LIMIT` of them, so its percentiles are the
exact ``numpy.percentile`` of the samples (every shipped workload and
experiment at its default size stays below the limit: their results do not
depend on this module). A run with more samples (a 4 TiB guest faulting on
4 KiB pages has a billion) folds them into a :class:`LogSketch`, whose memory
is bounded whatever the sample count, and from then on reports percentiles
from the sketch.

:class:`LogSketch` is the DDSketch of Masson, Rim and Lee ("DDSketch: a fast and
fully-mergeable quantile sketch with relative-error guarantees", VLDB 2019):
a positive value ``x`` falls in bucket ``k = ceil(log_gamma(x))`` with
``gamma = (1 + alpha) / (1 - alpha)``, i.e. bucket ``k`` holds
``(gamma^(k-1), gamma^k]``; a quantile is answered with the bucket's
``2 gamma^k / (gamma + 1)``, which is within a relative ``alpha`` of every
value in the bucket. So the sketch's q-quantile is within ``alpha`` (relative)
of the exact sample of rank ``floor(q (n - 1))`` (the "lower" quantile; the
exact percentile with linear interpolation lies between that sample and the
next). Two sketches with the same ``alpha`` merge exactly (bucket counts
add): the sketch of the union of two sample sets is the merge of their
sketches, whatever order they were added in. Zero and negative values (a
latency cannot be negative) go to a bucket of their own reported as 0.

:class:`TimeHistogram` is the streaming counterpart of a per-sample time
stamp: counts in ``bins`` equal bins from 0, whose width doubles (adjacent
bins merge) whenever a time beyond the last bin arrives. Rebinned to fewer
bins over ``[0, end]`` it is exact up to one native bin width.
"""
from __future__ import annotations

import math
from array import array

import numpy as np

# The most samples of one kind kept exactly in one run: 2^24 (16.8 million; 134 MB of float64 for
# the latencies and as much for their time stamps). The largest shipped experiment run at its
# default size has far fewer (see benchmarks/bench_memory.py), so shipped results stay exact.
EXACT_SAMPLE_LIMIT = 1 << 24
# relative accuracy of the sketch beyond: 0.5% of the value (a 10 us p99 is within +-50 ns)
SKETCH_ALPHA = 0.005


class LogSketch:
    """A DDSketch: quantiles within a relative ``alpha`` of the exact ones, mergeable, bounded memory."""

    __slots__ = ("alpha", "gamma", "_lng", "offset", "counts", "zeros", "n", "total", "vmin", "vmax")

    def __init__(self, alpha: float = SKETCH_ALPHA) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self.gamma = (1.0 + alpha) / (1.0 - alpha)
        self._lng = math.log(self.gamma)
        self.offset = 0  # bucket key of counts[0]
        self.counts = np.zeros(0, np.int64)
        self.zeros = 0  # values <= 0
        self.n = 0
        self.total = 0.0
        self.vmin = math.inf
        self.vmax = -math.inf

    def _keys(self, x: np.ndarray) -> np.ndarray:
        return np.ceil(np.log(x) / self._lng).astype(np.int64)

    def _grow(self, kmin: int, kmax: int) -> None:
        if len(self.counts) == 0:
            self.offset, self.counts = kmin, np.zeros(kmax - kmin + 1, np.int64)
            return
        lo, hi = min(kmin, self.offset), max(kmax, self.offset + len(self.counts) - 1)
        if lo == self.offset and hi == self.offset + len(self.counts) - 1:
            return
        new = np.zeros(hi - lo + 1, np.int64)
        new[self.offset - lo:self.offset - lo + len(self.counts)] = self.counts
        self.offset, self.counts = lo, new

    def add_many(self, values: np.ndarray) -> None:
        """Add an array of values (vectorised)."""
        v = np.asarray(values, dtype=np.float64)
        if len(v) == 0:
            return
        self.n += len(v)
        self.total += float(v.sum())
        self.vmin = min(self.vmin, float(v.min()))
        self.vmax = max(self.vmax, float(v.max()))
        pos = v[v > 0]
        self.zeros += len(v) - len(pos)
        if len(pos):
            k = self._keys(pos)
            self._grow(int(k.min()), int(k.max()))
            self.counts += np.bincount(k - self.offset, minlength=len(self.counts))

    def add(self, value: float) -> None:
        self.add_many(np.array([value]))

    def add_weighted(self, value: float, count: int) -> None:
        """Add ``count`` samples of ``value`` at once (a histogram's bin)."""
        if count <= 0:
            return
        self.n += count
        self.total += value * count
        self.vmin = min(self.vmin, value)
        self.vmax = max(self.vmax, value)
        if value <= 0:
            self.zeros += count
            return
        k = int(self._keys(np.array([value]))[0])
        self._grow(k, k)
        self.counts[k - self.offset] += count

    def merge(self, other: "LogSketch") -> None:
        """Add ``other``'s samples (same ``alpha``): exact, order-independent."""
        if other.alpha != self.alpha:
            raise ValueError(f"cannot merge sketches of accuracy {self.alpha} and {other.alpha}")
        if len(other.counts):
            self._grow(other.offset, other.offset + len(other.counts) - 1)
            i = other.offset - self.offset
            self.counts[i:i + len(other.counts)] += other.counts
        self.zeros += other.zeros
        self.n += other.n
        self.total += other.total
        self.vmin = min(self.vmin, other.vmin)
        self.vmax = max(self.vmax, other.vmax)

    def quantiles(self, qs: list[float] | tuple[float, ...]) -> list[float]:
        """The q-quantiles (q in [0, 1]) within a relative ``alpha`` of the exact lower quantiles."""
        if self.n == 0:
            return [0.0 for _ in qs]
        cum = np.cumsum(self.counts)
        out = []
        for q in qs:
            rank = math.floor(q * (self.n - 1))  # 0-based rank of the lower quantile
            if rank < self.zeros:
                out.append(0.0)
                continue
            i = int(np.searchsorted(cum, rank - self.zeros, side="right"))
            est = 2.0 * self.gamma ** (self.offset + i) / (self.gamma + 1.0)
            out.append(min(max(est, self.vmin), self.vmax))  # never outside the samples' range (still within alpha)
        return out

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes


class LatencySamples:
    """Samples kept exactly up to ``limit``, then in a :class:`LogSketch` (with exact count/sum/min/max)."""

    __slots__ = ("values", "limit", "sketch")

    def __init__(self, limit: int = EXACT_SAMPLE_LIMIT, alpha: float = SKETCH_ALPHA) -> None:
        self.values = array("d")  # the exact samples (all of them while exact; the latest unfolded ones after)
        self.limit = limit
        self.sketch: LogSketch | None = None
        if alpha <= 0:
            raise ValueError("alpha must be > 0")

    @property
    def exact(self) -> bool:
        return self.sketch is None

    def __len__(self) -> int:
        return len(self.values) + (self.sketch.n if self.sketch is not None else 0)

    def spill(self, count: int | None = None, alpha: float = SKETCH_ALPHA) -> None:
        """Fold the first ``count`` exact samples (default: all) into the sketch, as one block.

        ``values`` loses them in place, so a reference to it held by a hot loop stays valid. Folding
        the same blocks gives the same sketch and sums however the samples were appended."""
        if self.sketch is None:
            self.sketch = LogSketch(alpha)
        count = len(self.values) if count is None else count
        self.sketch.add_many(np.frombuffer(self.values, dtype=np.float64, count=count).copy())
        del self.values[:count]

    def maybe_spill(self) -> None:
        if len(self.values) > self.limit:
            self.spill()

    def _folded(self) -> LogSketch:
        sk = LogSketch(self.sketch.alpha)
        sk.merge(self.sketch)
        sk.add_many(np.frombuffer(self.values, dtype=np.float64))
        return sk

    def percentiles(self, ps: list[float] | tuple[float, ...]) -> list[float]:
        """Percentiles (0-100): ``numpy.percentile`` of the samples while exact, the sketch's beyond."""
        if self.sketch is None:
            v = np.frombuffer(self.values, dtype=np.float64)
            return [float(x) for x in np.percentile(v, list(ps))] if len(v) else [0.0 for _ in ps]
        return self._folded().quantiles([p / 100.0 for p in ps])

    def mean(self) -> float:
        v = np.frombuffer(self.values, dtype=np.float64)
        if self.sketch is None:
            return float(v.mean()) if len(v) else 0.0
        return (self.sketch.total + float(v.sum())) / len(self)

    def max(self) -> float:
        v = np.frombuffer(self.values, dtype=np.float64)
        m = float(v.max()) if len(v) else -math.inf
        if self.sketch is not None:
            m = max(m, self.sketch.vmax)
        return m if len(self) else 0.0

    def sum(self) -> float:
        v = np.frombuffer(self.values, dtype=np.float64)
        return float(v.sum()) + (self.sketch.total if self.sketch is not None else 0.0)

    @property
    def nbytes(self) -> int:
        return self.values.itemsize * len(self.values) + (self.sketch.nbytes if self.sketch is not None else 0)


class TimeHistogram:
    """Counts of events over time in ``bins`` bins from 0, widening (doubling) as time goes on."""

    __slots__ = ("width", "counts")

    def __init__(self, bins: int = 4096, width: float = 1000.0) -> None:
        self.width = width
        self.counts = np.zeros(bins, np.int64)

    def add_many(self, t: np.ndarray) -> None:
        t = np.asarray(t, dtype=np.float64)
        if len(t) == 0:
            return
        top = float(t.max())
        while top >= self.width * len(self.counts):
            self._widen()
        self.counts += np.bincount((np.maximum(t, 0.0) // self.width).astype(np.int64), minlength=len(self.counts))

    def _widen(self) -> None:
        c = self.counts
        self.counts = np.zeros_like(c)
        self.counts[:len(c) // 2] = c[0::2] + c[1::2]
        self.width *= 2

    def merge(self, other: "TimeHistogram") -> None:
        """Add ``other``'s counts (same bin count, widths a power of 2 apart: the narrower one widens)."""
        ratio = max(self.width, other.width) / min(self.width, other.width)
        if len(other.counts) != len(self.counts) or ratio != 2.0 ** round(math.log2(ratio)):
            raise ValueError("time histograms of different bins cannot merge")
        b = TimeHistogram(len(other.counts), other.width)
        b.counts = other.counts.copy()
        while self.width < b.width:
            self._widen()
        while b.width < self.width:
            b._widen()
        self.counts += b.counts

    def rebin(self, edges: np.ndarray) -> np.ndarray:
        """Counts in the bins ``edges`` (each native bin goes where its midpoint falls)."""
        mid = (np.arange(len(self.counts)) + 0.5) * self.width
        idx = np.clip(np.searchsorted(edges, mid, side="right") - 1, 0, len(edges) - 2)
        return np.bincount(idx, weights=self.counts, minlength=len(edges) - 1)[:len(edges) - 1].astype(np.int64)

    @property
    def end(self) -> float:
        nz = np.flatnonzero(self.counts)
        return float((nz[-1] + 1) * self.width) if len(nz) else 0.0


__all__ = ["EXACT_SAMPLE_LIMIT", "SKETCH_ALPHA", "LogSketch", "LatencySamples", "TimeHistogram"]
