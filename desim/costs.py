"""CostSampler: the one accessor through which the model reads a host cost.

A profile cost is a mean ``value`` (ns) and, optionally, the shape of its
distribution (:class:`desim.profile.Dist`: lognormal or an empirical quantile
table). Real costs vary from one event to the next (host page allocation and
zeroing, cache and TLB misses, host interrupts, neighbour load), and the
variance is what makes latency tails; a model with constant costs gives every
uncontended fault the same latency.

The model reads costs as attributes: ``P.vm_exit`` is the cost of *this* VM
exit. Two modes (the scenario's ``costs`` field, ``--set costs=mean``):

* ``sampled`` (default): a cost with a ``dist`` is a fresh draw at every read;
  a cost without one is its value.
* ``mean``: every cost is its value, as if no cost had a distribution. The
  theory tests and any question about means use it; results are those of a
  model with constant costs.

Streams and common random numbers: each *actor* (each vCPU, the VMM) owns one
view of the sampler, and each (actor, cost) pair has its own named stream
``cost/<actor>/<cost>`` (:mod:`desim.streams`). The k-th read of cost X by
vCPU i is the same number under both zap policies with the same seed and
replication: vCPU i's first touches, which both policies perform in the same
order, pay the same allocation and exit costs, whatever the other vCPUs or the
VMM do meanwhile. Where the policies do different work (a fast zap's
re-faults that a targeted zap never takes) the draws of later events shift,
which is as close to common random numbers as different work allows. Draws
come in blocks of ``BLOCK`` from each stream, so they do not depend on how
reads interleave across actors.

Which costs may have a distribution: those read once per event (an exit, a
fault, an ioctl, an SRCU sync). Per-unit costs (``PER_UNIT_COSTS``) are
multiplied by a count of SPTEs, gfns, pages or IPIs; one draw times a count
would exaggerate the variance of a sum of thousands of independent units,
whose relative spread shrinks as 1/sqrt(count), so they stay at their mean
(a profile giving them a ``dist`` is rejected). ``lock_handoff`` is charged by
:class:`desim.lock.MmuLock` at its mean. A hit (a touch's ``access_ns``, a
workload parameter, not a profile cost) has no distribution either: hits are
charged as sums, and their spread does not depend on the zap policy (the
reasons are in :mod:`desim.kvm.validate_tails`).

A quantile table is scaled by ``value / table_mean`` (:meth:`desim.profile.Dist.table_mean`,
the mean of the piecewise-linear quantile function). For a measured profile the
table and the value come from the same samples (:mod:`desim.kvm.fitdist`), so
the factor is ~1 and the measured shape is drawn as measured; for a shape
transferred to another host's mean (``tdp-icelake``, ``legacy-2020``) it
scales the whole shape.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np

from .streams import stream

if TYPE_CHECKING:  # pragma: no cover
    from .profile import Cost, HostProfile

CostMode = Literal["sampled", "mean"]
COST_MODES: tuple[str, ...] = ("sampled", "mean")
BLOCK = 1024  # draws fetched at once from one (actor, cost) stream

PER_UNIT_COSTS: dict[str, str] = {
    "spte_zap": "charged per zapped SPTE",
    "rmap_probe": "charged per probed gfn",
    "hash_probe": "charged per probed gfn",
    "sp_free": "charged per freed shadow page",
    "memslot_alloc_page": "charged per page of a slot",
    "memslot_free_page": "charged per page of a slot",
    "pt_page_alloc": "charged per allocated page-table page",
    "prefetch_spte": "charged per prefetched SPTE",
    "ipi_send": "charged per IPI target",
    "lock_handoff": "charged by the mmu_lock model at its mean",
    "spte_visit": "charged per visited SPTE",
    "zone_lock_page": "charged per page by the host zone->lock queue at its mean",
    "lru_lock_page": "charged per page by the host lru_lock queue at its mean",
    "clear_page_4k": "charged per page by the host memory-bandwidth model at its mean",
    "membw_4k": "charged per page by the host memory-bandwidth model at its mean",
}


def check_dist_allowed(name: str) -> None:
    """Raise ValueError if cost ``name`` may not have a distribution (see the module docstring)."""
    if name in PER_UNIT_COSTS:
        raise ValueError(f"{name}.dist: not allowed, {name} is {PER_UNIT_COSTS[name]} (a sum over many "
                         "units); remove dist (only per-event costs can be distributions)")


def lognormal_median(mean: float, sigma: float) -> float:
    """The median of a lognormal with this mean and log-sd: ``mean * exp(-sigma**2 / 2)``."""
    return mean * math.exp(-sigma * sigma / 2)


class _Draws:
    """Block-wise draws of one cost for one actor.

    The values come in blocks of ``BLOCK`` (one numpy call each: uniform or normal numbers
    transformed at once). ``arr`` holds the values not yet consumed from ``i`` on; ``buf`` is the
    same values as a Python list, made when a scalar read (:meth:`next`, :meth:`peek`) refills the block,
    unless a vectorised reader (:meth:`peek_many`) read the block before (``many``: it will likely read this
    one too); where there is no list (peek_many joined blocks, or did not want one) scalar reads index ``arr``
    until the next refill, so neither reader pays for a list of the other's values. Which numbers come out, and in
    which order, does not depend on how they are read."""

    __slots__ = ("rng", "kind", "a", "b", "arr", "buf", "i", "many")

    def __init__(self, cost: "Cost", rng: np.random.Generator) -> None:
        d = cost.dist
        assert d is not None
        self.rng = rng
        self.kind = d.kind
        if d.kind == "lognormal":
            self.a = lognormal_median(cost.value, d.sigma or 0.0)
            self.b = d.sigma or 0.0
        else:
            scale = cost.value / d.table_mean()
            self.a = np.asarray(d.p, dtype=np.float64)
            self.b = np.asarray(d.ns, dtype=np.float64) * scale
        self.arr = np.zeros(0)
        self.buf: list[float] | None = []
        self.i = 0
        self.many = False  # peek_many read since the last refill

    def next(self) -> float:
        i = self.i
        buf = self.buf
        if buf is None or i >= len(buf):  # (buf, when made, is arr as a list: the same length)
            if i >= len(self.arr):
                self.many = False  # a scalar reader refills: the next block as a list
            v = self.peek()
            self.i += 1
            return v
        self.i = i + 1
        return buf[i]

    def peek(self) -> float:
        """The value :meth:`next` returns next, without consuming it (the stream is the same either way:
        a refill draws the same block whenever it happens)."""
        if self.i >= len(self.arr):
            self.arr = self._block()
            self.buf = None if self.many else self.arr.tolist()
            self.many = False
            self.i = 0
        buf = self.buf
        if buf is None:
            # after peek_many joined blocks (a vectorised reader): the value itself, without a list of the
            # whole remaining array (the list comes back with the next refill)
            return float(self.arr[self.i])
        return buf[self.i]

    def peek_many(self, k: int) -> np.ndarray:
        """The next ``k`` values :meth:`next` would return, as an array, without consuming them
        (``i += n`` consumes n)."""
        self.many = True
        if len(self.arr) - self.i < k:
            # several blocks in one call: the same numbers as one call per block (each value uses the
            # generator's next output(s) in turn; tests/test_costs.py checks it for both kinds)
            more = self._block(-(-(k - (len(self.arr) - self.i)) // BLOCK))
            self.arr = np.concatenate([self.arr[self.i:], more])
            self.buf = None
            self.i = 0
        return self.arr[self.i:self.i + k]

    def _block(self, blocks: int = 1) -> np.ndarray:
        if self.kind == "lognormal":
            return self.a * np.exp(self.b * self.rng.standard_normal(blocks * BLOCK))
        return np.interp(self.rng.random(blocks * BLOCK), self.a, self.b)


class CostView:
    """One actor's view of the costs: ``view.<cost name>`` is a value or a fresh draw."""

    def __init__(self, profile: "HostProfile", mode: CostMode, seed: int, replication: int, actor: str) -> None:
        self._draws: dict[str, _Draws] = {}
        for name, c in profile.costs.items():
            if mode == "sampled" and c.dist is not None:
                self._draws[name] = _Draws(c, stream(seed, replication, f"cost/{actor}/{name}"))
            else:
                setattr(self, name, c.value)  # plain attribute: no draw, no overhead

    def __getattr__(self, name: str) -> float:
        # only reached for costs that are drawn (the others are instance attributes)
        d = self.__dict__.get("_draws", {}).get(name)
        if d is None:
            raise AttributeError(name)
        return d.next()

    def draws(self, name: str) -> "_Draws | None":
        """The draw buffer of cost ``name`` if it is drawn, else None (its value is ``getattr(view, name)``).
        For a caller that must look at a cost before deciding to use it (:mod:`desim.faultrun`):
        ``peek()`` then ``i += 1`` consumes exactly what one read of the attribute would."""
        return self._draws.get(name)

    @property
    def stochastic(self) -> bool:
        return bool(self._draws)


class CostSampler:
    """The costs of one VM run: one :class:`CostView` per actor, created on first use."""

    def __init__(self, profile: "HostProfile", mode: CostMode = "sampled", seed: int = 0,
                 replication: int = 0) -> None:
        if mode not in COST_MODES:
            raise ValueError(f"costs = {mode!r}: choose one of {', '.join(COST_MODES)}")
        self.profile = profile
        self.mode = mode
        self.seed = seed
        self.replication = replication
        self._views: dict[str, CostView] = {}

    def view(self, actor: str) -> CostView:
        v = self._views.get(actor)
        if v is None:
            v = self._views[actor] = CostView(self.profile, self.mode, self.seed, self.replication, actor)
        return v

    def mean(self, name: str) -> float:
        return self.profile.costs[name].value
