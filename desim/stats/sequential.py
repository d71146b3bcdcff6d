"""Sequential replication: run replications until the answer is precise enough.

Instead of guessing "30 replications", run them one at a time and after each
one compute the confidence interval of every metric of interest. Stop when the
*relative* half-width (half-width / |mean|) of every metric is at most the
target -- e.g. 0.02 means "the mean is known to within +-2 %".

A single check is fooled by early luck: with few replications the sample
variance can be small by chance. Hoad, Robinson & Davies (2010), "Automated
selection of the number of replications for a discrete-event simulation",
JORS 61(11):1632-1644, therefore use a *look-ahead*: when the precision is
first reached at n = Nsol replications, run f(kLimit, Nsol) more, and accept
Nsol only if the precision holds at every one of them; otherwise forget Nsol
and carry on. Their f is kLimit while Nsol <= 100 and floor(kLimit * Nsol /
100) beyond, and they recommend kLimit = 5 and at least 3 replications.

Pieces:

* :class:`SequentialMonitor` -- the stopping rule as a small state machine fed
  one replication result at a time (in replication-index order).
* :func:`precision_reached` -- a pure function over the results so far, for
  callers that run replications in parallel batches and ask whether to stop.
  It replays the rule, so the answer equals that of a one-at-a-time run.
* :func:`run_sequential` / :func:`run_sequential_paired` -- the serial loops.
  Nothing here is parallel; wrap parallel execution around the pure pieces.

With several metrics all must be precise at once; no multiplicity (Bonferroni)
correction is applied to the individual intervals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from desim.stats.ci import Interval, paired_diff_ci, ratio_ci, t_ci

Estimator = Callable[[np.ndarray], Interval]
Progress = Callable[[int, dict[str, float]], None]


def look_ahead_window(look_ahead: int, n_solution: int) -> int:
    """Hoad et al.'s f(kLimit, Nsol): extra replications that must confirm Nsol."""
    if n_solution <= 100:
        return look_ahead
    return (look_ahead * n_solution) // 100


def make_estimator(
    confidence: float = 0.95, compare: str | None = None, ratio_method: str = "log"
) -> Estimator:
    """The interval used per metric.

    ``compare=None``: values are one number per replication, :func:`t_ci`.
    ``compare="diff"`` / ``"ratio"``: values are (baseline, alternative) pairs,
    shape (n, 2), and the interval is :func:`paired_diff_ci` / :func:`ratio_ci`.
    """
    if compare is None:
        return lambda x: t_ci(x, confidence)
    if compare == "diff":
        return lambda x: paired_diff_ci(x[:, 0], x[:, 1], confidence)
    if compare == "ratio":
        return lambda x: ratio_ci(x[:, 0], x[:, 1], confidence, ratio_method)
    raise ValueError(f"compare must be None, 'diff' or 'ratio', got {compare!r}")


@dataclass(frozen=True)
class StopDecision:
    """The stopping rule's verdict after ``n`` replications."""

    stop: bool
    n: int
    n_solution: int | None
    intervals: dict[str, Interval]

    @property
    def rel_half_widths(self) -> dict[str, float]:
        return {m: iv.relative_half_width for m, iv in self.intervals.items()}


class SequentialMonitor:
    """Hoad-Robinson-Davies stopping rule, fed one replication at a time.

    ``add(observation)`` takes a mapping metric -> value (or -> (a, b) pair when
    the estimator is paired), and returns the :class:`StopDecision`.
    """

    def __init__(
        self,
        metrics: Sequence[str],
        target_rel_half_width: float = 0.02,
        confidence: float = 0.95,
        min_reps: int = 3,
        look_ahead: int = 5,
        estimator: Estimator | None = None,
    ) -> None:
        """``estimator`` defaults to :func:`t_ci` at ``confidence``; if given,
        it should use the same ``confidence``."""
        if not metrics:
            raise ValueError("metrics must name at least one metric")
        if target_rel_half_width <= 0:
            raise ValueError("target_rel_half_width must be > 0")
        if min_reps < 2:
            raise ValueError("min_reps must be >= 2 (a CI needs two replications)")
        if look_ahead < 0:
            raise ValueError("look_ahead must be >= 0")
        self.metrics = list(metrics)
        self.target = target_rel_half_width
        self.min_reps = min_reps
        self.look_ahead = look_ahead
        self.confidence = confidence
        self.estimator = estimator or make_estimator(confidence)
        self._values: dict[str, list[Any]] = {m: [] for m in self.metrics}
        self._n_solution: int | None = None

    @property
    def n(self) -> int:
        return len(self._values[self.metrics[0]])

    def add(self, observation: Mapping[str, Any]) -> StopDecision:
        for m in self.metrics:
            if m not in observation:
                raise KeyError(
                    f"replication {self.n} has no metric {m!r}; it has {sorted(observation)}"
                )
        for m in self.metrics:
            self._values[m].append(observation[m])
        intervals = {}
        for m in self.metrics:
            try:
                intervals[m] = self.estimator(np.asarray(self._values[m], dtype=float))
            except ValueError as exc:
                raise ValueError(f"metric {m!r}: {exc}") from exc
        n = self.n
        precise = n >= self.min_reps and all(
            iv.relative_half_width <= self.target for iv in intervals.values()
        )
        if not precise:
            self._n_solution = None
        elif self._n_solution is None:
            self._n_solution = n
        sol = self._n_solution
        stop = sol is not None and n >= sol + look_ahead_window(self.look_ahead, sol)
        return StopDecision(stop, n, sol, intervals)


def precision_reached(
    values_by_metric: Mapping[str, Sequence[Any]],
    target_rel_half_width: float = 0.02,
    confidence: float = 0.95,
    min_reps: int = 3,
    look_ahead: int = 5,
    compare: str | None = None,
    ratio_method: str = "log",
) -> StopDecision:
    """Pure stopping check over all results so far (replication-index order).

    ``values_by_metric[m][i]`` is metric m of replication i (a number, or an
    (a, b) pair when ``compare`` is "diff"/"ratio"). Replays the rule over
    i = 0, 1, ...; if it fires before the last replication (a parallel batch
    overshot), the decision at that replication is returned -- ``n`` says
    which -- so batch and one-at-a-time runs agree on the stopping point.
    """
    metrics = list(values_by_metric)
    lengths = {len(values_by_metric[m]) for m in metrics}
    if len(lengths) > 1:
        raise ValueError(f"all metrics need the same number of replications, got {sorted(lengths)}")
    monitor = SequentialMonitor(
        metrics, target_rel_half_width, confidence, min_reps, look_ahead,
        make_estimator(confidence, compare, ratio_method),
    )
    decision = StopDecision(False, 0, None, {})
    for i in range(lengths.pop() if lengths else 0):
        decision = monitor.add({m: values_by_metric[m][i] for m in metrics})
        if decision.stop:
            break
    return decision


@dataclass(frozen=True)
class SequentialResult:
    """Outcome of a sequential run.

    ``records[i]`` is what replication i returned (a (baseline, alternative)
    pair of dicts for the paired runner). ``intervals`` use all replications;
    ``n_solution`` is Hoad et al.'s recommended count (None if not reached).
    """

    records: list[Any] = field(repr=False)
    intervals: dict[str, Interval]
    n_replications: int
    n_solution: int | None
    stopped_by: str
    target_rel_half_width: float
    confidence: float

    @property
    def rel_half_widths(self) -> dict[str, float]:
        return {m: iv.relative_half_width for m, iv in self.intervals.items()}

    def to_dict(self) -> dict[str, Any]:
        """Summary without the per-replication records."""
        return {
            "n_replications": self.n_replications,
            "n_solution": self.n_solution,
            "stopped_by": self.stopped_by,
            "target_rel_half_width": self.target_rel_half_width,
            "confidence": self.confidence,
            "intervals": {m: iv.to_dict() for m, iv in self.intervals.items()},
        }


def _run(
    run_rep: Callable[[int], Any],
    to_observation: Callable[[Any], Mapping[str, Any]],
    monitor: SequentialMonitor,
    max_reps: int,
    progress: Progress | None,
) -> SequentialResult:
    if max_reps < monitor.min_reps:
        raise ValueError(f"max_reps ({max_reps}) must be >= min_reps ({monitor.min_reps})")
    records: list[Any] = []
    decision = StopDecision(False, 0, None, {})
    for i in range(max_reps):
        record = run_rep(i)
        records.append(record)
        decision = monitor.add(to_observation(record))
        if progress is not None:
            progress(decision.n, decision.rel_half_widths)
        if decision.stop:
            break
    return SequentialResult(
        records, decision.intervals, len(records),
        decision.n_solution if decision.stop else None,
        "precision" if decision.stop else "max_reps",
        monitor.target, monitor.confidence,
    )


def run_sequential(
    run_one: Callable[[int], Mapping[str, float]],
    metrics: list[str],
    target_rel_half_width: float = 0.02,
    confidence: float = 0.95,
    min_reps: int = 3,
    max_reps: int = 1000,
    look_ahead: int = 5,
    progress: Progress | None = None,
) -> SequentialResult:
    """Call ``run_one(0), run_one(1), ...`` until every metric is precise.

    Stops by "precision" (Hoad et al. 2010 rule, see module doc) or
    "max_reps". ``progress(done, rel_half_widths)`` is called after each
    replication.
    """
    monitor = SequentialMonitor(
        metrics, target_rel_half_width, confidence, min_reps, look_ahead,
        make_estimator(confidence),
    )
    return _run(lambda i: dict(run_one(i)), dict, monitor, max_reps, progress)


def run_sequential_paired(
    run_pair: Callable[[int], tuple[Mapping[str, float], Mapping[str, float]]],
    metrics: list[str],
    compare: str = "ratio",
    target_rel_half_width: float = 0.02,
    confidence: float = 0.95,
    min_reps: int = 3,
    max_reps: int = 1000,
    look_ahead: int = 5,
    ratio_method: str = "log",
    progress: Progress | None = None,
) -> SequentialResult:
    """Like :func:`run_sequential` for two policies run on the same seeds.

    ``run_pair(i)`` returns (baseline metrics, alternative metrics) of
    replication i. Precision is judged on the ratio interval
    (``compare="ratio"``, relative to the ratio: 0.02 = ratio known to +-2 %)
    or the paired difference (``compare="diff"``, relative to the mean
    difference -- never reached if the true difference is 0).
    """
    monitor = SequentialMonitor(
        metrics, target_rel_half_width, confidence, min_reps, look_ahead,
        make_estimator(confidence, compare, ratio_method),
    )

    def to_observation(pair: tuple[Mapping[str, float], Mapping[str, float]]) -> dict[str, Any]:
        base, alt = pair
        missing = [m for m in metrics if m not in base or m not in alt]
        if missing:
            raise KeyError(f"paired replication lacks metrics {missing} in one of its two results")
        return {m: (base[m], alt[m]) for m in metrics}

    return _run(run_pair, to_observation, monitor, max_reps, progress)
