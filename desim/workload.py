"""Guest access streams: what each vCPU touches, in numpy chunks.

A phase of a workload gives each active vCPU an :class:`AccessStream`, an
iterator of ``int64`` gfn arrays. The vCPU never looks at accesses one by one
in Python: it looks up a whole chunk at once and only stops at faults.

Patterns (the region is a gfn range, split evenly among the active vCPUs
when ``sharing = "private"``, common to all when ``"shared"``):

* ``sequential`` — every page of the region in order, ``passes`` times
  (a memset, a kernel zeroing ``struct page``, ``demand_paging_test``);
* ``uniform`` — ``accesses`` pages drawn uniformly;
* ``zipf`` — ``accesses`` pages with Zipf popularity (exponent ``zipf_s``)
  over a random permutation of the region;
* ``hotcold`` — ``hot_probability`` of the accesses go to a hot set of
  ``hot_fraction`` of the pages;
* ``gfns`` — an explicit gfn list (e.g. from a ``perf script`` trace).

Random patterns draw from the vCPU's own named stream, so both zap policies
see the same accesses (common random numbers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

CHUNK = 4096


@dataclass
class AccessStream:
    """A finite stream of gfn chunks, each with the guest time per access (ns)."""

    chunks: Iterator[np.ndarray]
    total: int
    access_ns: float = 100.0
    _ahead: list = field(default_factory=list, repr=False, compare=False)  # chunks pulled by peek_chunk

    def next_chunk(self) -> np.ndarray | None:
        if self._ahead:
            return self._ahead.pop(0)
        return next(self.chunks, None)

    def peek_chunk(self, i: int) -> np.ndarray | None:
        """The chunk the ``i+1``-th next call of :meth:`next_chunk` will return (0: the next one), without
        consuming it; None past the stream's end, and always for a subclass (a chained, repeating or
        recorded stream: what comes next there may depend on the time it is asked).

        A plain stream's chunks do not depend on when they are made (a drawn pattern draws from its own
        generator, used by nothing else), so the fast engine's vectorised fault blocks look ahead
        across chunk ends (desim/faultrun.py) and get the same chunks later from :meth:`next_chunk`."""
        if type(self) is not AccessStream:
            return None
        while len(self._ahead) <= i:
            chunk = next(self.chunks, None)
            if chunk is None:
                return None
            self._ahead.append(chunk)
        return self._ahead[i]

    def pause(self):
        """An event to halt on before the next chunk (a replayed HLT or memslot ioctl), or None.

        A stream that has one returns an empty chunk from :meth:`next_chunk` first.
        """
        return None


class ChainedStream(AccessStream):
    """Several streams run one after another (a vCPU's touches within a phase)."""

    def __init__(self, streams: list[AccessStream]) -> None:
        self._streams = list(streams)
        self._i = 0
        super().__init__(iter(()), sum(s.total for s in self._streams),
                         self._streams[0].access_ns if self._streams else 100.0)

    def next_chunk(self) -> np.ndarray | None:
        while self._i < len(self._streams):
            cur = self._streams[self._i]
            chunk = cur.next_chunk()
            if chunk is not None:
                self.access_ns = cur.access_ns
                return chunk
            self._i += 1
        return None

    def pause(self):
        return self._streams[self._i].pause() if self._i < len(self._streams) else None


class RepeatingStream(AccessStream):
    """A touch repeated while ``keep_going()`` (``until = "vmm"``): a fresh pass or more draws each time."""

    def __init__(self, factory, keep_going) -> None:
        self._factory = factory
        self._keep_going = keep_going
        self._cur = factory()
        super().__init__(iter(()), 0, self._cur.access_ns)

    def next_chunk(self) -> np.ndarray | None:
        if not self._keep_going():
            return None
        chunk = self._cur.next_chunk()
        if chunk is None:
            self._cur = self._factory()
            chunk = self._cur.next_chunk()
        return chunk


def _sequential(lo: int, n: int, passes: int) -> Iterator[np.ndarray]:
    for _ in range(passes):
        for s in range(0, n, CHUNK):
            yield np.arange(lo + s, lo + min(s + CHUNK, n), dtype=np.int64)


def _drawn(draw, total: int) -> Iterator[np.ndarray]:
    left = total
    while left > 0:
        k = min(CHUNK, left)
        yield draw(k)
        left -= k


def make_stream(pattern: str, lo: int, n: int, *, rng: np.random.Generator, passes: int = 1,
                accesses: int = 0, zipf_s: float = 1.1, hot_fraction: float = 0.1,
                hot_probability: float = 0.9, gfns: np.ndarray | None = None) -> AccessStream:
    """The stream of one vCPU over gfns ``[lo, lo + n)``."""
    if pattern == "sequential":
        return AccessStream(_sequential(lo, n, passes), n * passes)
    if pattern == "gfns":
        arr = np.asarray(gfns, dtype=np.int64)
        return AccessStream(iter(np.array_split(arr, max(1, -(-len(arr) // CHUNK)))), len(arr))
    if pattern == "uniform":
        return AccessStream(_drawn(lambda k: lo + rng.integers(0, n, k, dtype=np.int64), accesses), accesses)
    if pattern == "zipf":
        perm = rng.permutation(n).astype(np.int64)
        ranks = np.arange(1, n + 1, dtype=np.float64)
        cdf = np.cumsum(ranks ** -zipf_s)
        cdf /= cdf[-1]

        def draw(k: int) -> np.ndarray:
            return lo + perm[np.minimum(np.searchsorted(cdf, rng.random(k)), n - 1)]
        return AccessStream(_drawn(draw, accesses), accesses)
    if pattern == "hotcold":
        nhot = max(1, int(n * hot_fraction))

        def draw(k: int) -> np.ndarray:
            hot = rng.random(k) < hot_probability
            out = np.where(hot, rng.integers(0, nhot, k), nhot + rng.integers(0, max(1, n - nhot), k))
            if nhot >= n:  # every page hot: the cold draw (nhot + 0) is clipped to the last page
                np.minimum(out, n - 1, out=out)
            out += lo  # int64 already (Generator.integers' default dtype)
            return out
        return AccessStream(_drawn(draw, accesses), accesses)
    raise ValueError(f"unknown pattern {pattern!r}")


def split_region(lo: int, n: int, parts: int, index: int) -> tuple[int, int]:
    """The ``index``-th of ``parts`` near-equal contiguous shares of ``[lo, lo + n)``."""
    a = lo + (n * index) // parts
    b = lo + (n * (index + 1)) // parts
    return a, b - a


def perf_streams(path: str, nvcpus: int) -> list[np.ndarray]:
    """Per-vCPU gfn streams from a ``perf script`` trace of ``kvm:kvm_page_fault``.

    vCPU i of the VM replays the faulting pages of the trace's i-th vCPU (in
    vCPU-id order); extra simulated vCPUs get nothing.
    """
    from .traces import read_perf_trace

    streams = read_perf_trace(path).to_access_streams()
    return [streams[k] for k in sorted(streams)][:nvcpus]
