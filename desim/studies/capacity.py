"""Capacity planning: the largest value of a factor for which a metric stays within an SLO.

The question "how many vCPUs (how big a slot, how many memslot updates per
second) before p99 fault latency passes 50 us?" is answered with statistical
confidence, each step decided from a confidence interval, never from a point
estimate:

* **deciding a point**: run replications (``min_reps`` first, then ``batch``
  more at a time) until the CI of the metric's mean -- or, for a ratio SLO,
  the paired ratio CI of ``policy`` over ``baseline`` (common random numbers)
  -- lies entirely on one side of the bound: *meets* or *violates*. If
  ``max_reps`` (or the total ``budget``) runs out first the point is
  *undecided*, and the search stops there, reporting the answer as
  "undecided between A and B";
* **searching**: the factor is assumed monotone. Both ends of the range are
  decided first (both meet: the whole range meets; both violate: nothing
  does; the low end violates and the high end meets: the metric improves with
  the factor and the answer is the *smallest* value that meets), then
  bisection between the largest value known to meet and the smallest known to
  violate (geometric midpoints on ranges spanning 16x or more), on the grid of
  ``step``, until the two are adjacent;
* **monotonicity**: a measured point that meets beyond one that violates, or
  means that move against the trend with disjoint CIs, is reported: the answer
  then holds only for the points measured.

Each decision is made at ``confidence``; the answer's statement is "A meets
and A + step violates, each at that confidence". :func:`find_capacity` works on
any evaluator (a function from factor value and replication indices to
per-replication values); :func:`scenario_evaluator` makes one that runs desim
scenarios on the sweep engine (any backend, with a store).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DesimInputError
from ..stats import ratio_ci, t_ci

Evaluator = Callable[[float, range], list]  # (value, replications) -> per-replication values or (base, alt) pairs
_UNITS = {"ns": 1.0, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9}


@dataclass(frozen=True)
class Slo:
    """``metric op bound`` (``ratio``: of the policy's metric over the baseline's, paired)."""

    metric: str
    op: str          # "<=" or ">="
    bound: float
    ratio: bool = False
    text: str = ""

    def holds(self, x: float) -> bool:
        return x <= self.bound if self.op == "<=" else x >= self.bound

    def describe(self) -> str:
        return self.text or f"{self.metric} {self.op} {self.bound:g}"


def parse_slo(text: str, metric: str) -> Slo:
    """``50us``, ``<=50us``, ``>=1e6``, ``ratio<=0.9`` (times in ns, us, ms, s; bare numbers as they are)."""
    m = re.fullmatch(r"\s*(ratio)?\s*(<=|>=|<|>)?\s*([-+0-9.eE]+)\s*([a-zµ]*)\s*", text)
    if not m:
        raise DesimInputError(f"--slo {text!r}: expected e.g. 50us, <=2ms, >=1000 or ratio<=0.9")
    ratio, op, num, unit = m.groups()
    op = {"<": "<=", ">": ">="}.get(op or "<=", op or "<=")
    try:
        bound = float(num)
    except ValueError:
        raise DesimInputError(f"--slo {text!r}: {num!r} is not a number") from None
    if unit:
        if unit not in _UNITS or ratio:
            raise DesimInputError(f"--slo {text!r}: unit {unit!r} unknown (use ns, us, ms or s; a ratio has none)")
        if not metric.endswith("_ns"):
            raise DesimInputError(f"--slo {text!r}: a time bound for {metric}, which is not a time (*_ns)")
        bound *= _UNITS[unit]
    if not math.isfinite(bound):
        raise DesimInputError(f"--slo {text!r}: the bound must be finite")
    return Slo(metric, op, bound, bool(ratio), text.strip())


@dataclass
class Measured:
    value: float
    n: int
    mean: float
    low: float
    high: float
    verdict: str  # "meets", "violates", "undecided"
    why: str = ""


@dataclass
class CapacityResult:
    slo: Slo
    vary: str
    mode: str                 # "largest" (the metric worsens as the factor grows) or "smallest"
    answer: float | None      # the largest (smallest) value that meets, if decided
    bracket: tuple[float, float] | None  # (meets, violates) neighbours, or the undecided interval
    decided: bool
    stopped: str              # why the search stopped
    points: list[Measured] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    confidence: float = 0.95
    replications: int = 0

    def summary(self, fmt: Callable[[float], str] = lambda v: f"{v:g}") -> str:
        c = f"{self.confidence:.0%}"
        word = "largest" if self.mode == "largest" else "smallest"
        if self.decided and self.answer is not None:
            head = f"{word} {self.vary} meeting {self.slo.describe()}: {fmt(self.answer)}"
            if self.bracket is not None and self.bracket[1] is not None:
                head += f" ({fmt(self.bracket[0])} meets and {fmt(self.bracket[1])} violates, each decided at {c})"
            else:
                head += f" (decided at {c})"
        elif self.decided:
            head = f"no {self.vary} in the range meets {self.slo.describe()} (decided at {c})"
        else:
            a, b = self.bracket if self.bracket else (math.nan, math.nan)
            head = f"undecided between {fmt(a)} and {fmt(b)}: {word} {self.vary} meeting {self.slo.describe()}"
        return head


def _interval(vals: list, slo: Slo, confidence: float) -> tuple[float, float, float]:
    if slo.ratio:
        a = np.array([v[0] for v in vals], float)
        b = np.array([v[1] for v in vals], float)
        if len(a) < 2 or not np.all(a > 0):
            est = b.mean() / a.mean() if a.mean() > 0 else math.nan
            return est, -math.inf, math.inf
        iv = ratio_ci(a, b, confidence, method="delta")
    else:
        x = np.array(vals, float)
        if len(x) < 2:
            return float(x.mean()) if len(x) else math.nan, -math.inf, math.inf
        iv = t_ci(x, confidence)
    return iv.estimate, iv.low, iv.high


class _Search:
    def __init__(self, evaluate: Evaluator, slo: Slo, confidence: float, min_reps: int, max_reps: int, batch: int,
                 budget: int | None, progress: Callable[[str], None] | None) -> None:
        self.evaluate, self.slo, self.confidence = evaluate, slo, confidence
        self.min_reps, self.max_reps, self.batch, self.budget = min_reps, max_reps, batch, budget
        self.used = 0
        self.values: dict[float, list] = {}
        self.measured: dict[float, Measured] = {}
        self.progress = progress

    def out_of_budget(self) -> bool:
        return self.budget is not None and self.used >= self.budget

    def decide(self, x: float) -> Measured:
        vals = self.values.setdefault(x, [])
        while True:
            n = len(vals)
            want = self.min_reps if n < self.min_reps else min(self.max_reps, n + self.batch)
            if self.budget is not None:
                want = min(want, n + max(0, self.budget - self.used))
            if want > n:
                vals.extend(self.evaluate(x, range(n, want)))
                self.used += want - n
            mean, lo, hi = _interval(vals, self.slo, self.confidence)
            b = self.slo.bound
            if self.slo.op == "<=":
                verdict = "meets" if hi <= b else "violates" if lo > b else "undecided"
            else:
                verdict = "meets" if lo >= b else "violates" if hi < b else "undecided"
            m = Measured(x, len(vals), mean, lo, hi, verdict)
            if verdict != "undecided" or len(vals) >= self.max_reps or self.out_of_budget() or want == n:
                if verdict == "undecided":
                    m.why = ("the replication budget ran out" if self.out_of_budget() else
                             f"max_reps ({self.max_reps}) reached")
                self.measured[x] = m
                if self.progress:
                    self.progress(f"  {x:g}: {verdict} after {len(vals)} replications "
                                  f"(mean {mean:.6g}, CI [{lo:.6g}, {hi:.6g}])")
                return m


def _grid_mid(good: float, bad: float, step: float, geometric: bool) -> float | None:
    lo, hi = min(good, bad), max(good, bad)
    mid = math.sqrt(lo * hi) if geometric and lo > 0 else (lo + hi) / 2
    mid = round(mid / step) * step
    if mid <= lo:
        mid = lo + step
    if mid >= hi:
        mid = hi - step
    return mid if lo < mid < hi else None


def find_capacity(evaluate: Evaluator, lo: float, hi: float, slo: Slo, vary: str = "x", step: float = 1,
                  scale: str = "auto", confidence: float = 0.95, min_reps: int = 3, max_reps: int = 30,
                  batch: int = 3, budget: int | None = None,
                  progress: Callable[[str], None] | None = None) -> CapacityResult:
    """Search ``[lo, hi]`` (see the module docstring); ``evaluate(value, reps)`` runs replications."""
    if not lo < hi:
        raise DesimInputError(f"--range {lo:g}:{hi:g}: the low end must be below the high end")
    if not step > 0:
        raise DesimInputError(f"--step {step:g}: must be > 0")
    if min_reps < 2 or max_reps < min_reps or batch < 1:
        raise DesimInputError("replications: need 2 <= min-reps <= max-reps and batch >= 1")
    geometric = scale == "log" or (scale == "auto" and lo > 0 and hi / lo >= 16)
    s = _Search(evaluate, slo, confidence, min_reps, max_reps, batch, budget, progress)
    res = CapacityResult(slo, vary, "largest", None, None, False, "", confidence=confidence)

    a, b = s.decide(lo), s.decide(hi)
    if a.verdict == "undecided" or b.verdict == "undecided":
        u = a if a.verdict == "undecided" else b
        res.bracket = (lo, hi)
        res.stopped = f"undecided at the end of the range {u.value:g} ({u.why})"
    elif a.verdict == b.verdict == "meets":
        res.answer, res.decided, res.bracket = hi, True, (hi, None)
        res.stopped = "the whole range meets the SLO: widen --range to find the limit"
    elif a.verdict == b.verdict == "violates":
        res.decided = True
        res.stopped = "no value in the range meets the SLO"
    else:
        good, bad = (lo, hi) if a.verdict == "meets" else (hi, lo)
        res.mode = "largest" if good < bad else "smallest"
        while True:
            mid = _grid_mid(good, bad, step, geometric)
            if mid is None:
                res.answer, res.decided, res.bracket = good, True, (good, bad)
                res.stopped = f"bisection converged: {good:g} and {bad:g} are adjacent (step {step:g})"
                break
            if s.out_of_budget():
                res.bracket = (good, bad)
                res.stopped = f"the replication budget ({budget}) ran out"
                break
            m = s.decide(mid)
            if m.verdict == "meets":
                good = mid
            elif m.verdict == "violates":
                bad = mid
            else:
                res.bracket = (good, bad)
                res.stopped = (f"{mid:g} is undecided ({m.why}; CI [{m.low:.6g}, {m.high:.6g}] contains "
                               f"{slo.bound:g})")
                break
    res.points = sorted(s.measured.values(), key=lambda m: m.value)
    res.replications = s.used
    # the direction of the trend is known only when the two ends got different verdicts
    res.notes = monotonicity_notes(res.points, res.mode, slo, trend=a.verdict != b.verdict)
    return res


def monotonicity_notes(points: Sequence[Measured], mode: str, slo: Slo, trend: bool = True) -> list[str]:
    """What contradicts a monotone metric among the measured points."""
    notes = []
    pts = sorted(points, key=lambda m: m.value)
    decided = [p for p in pts if p.verdict != "undecided"]
    for i, p in enumerate(decided):
        for q in decided[i + 1:]:
            bad_order = (p.verdict == "violates" and q.verdict == "meets") if mode == "largest" else \
                        (p.verdict == "meets" and q.verdict == "violates")
            if bad_order:
                notes.append(f"not monotone: {q.value:g} {q.verdict} but {p.value:g} {p.verdict}; "
                             f"the answer holds only for the points measured")
                break
    # the trend: the metric worsens towards the violating end
    worse_up = (mode == "largest") == (slo.op == "<=")
    for p, q in zip(pts, pts[1:]) if trend else ():
        against = (q.high < p.low) if worse_up else (q.low > p.high)
        if against:
            notes.append(f"not monotone: the mean at {q.value:g} ({q.mean:.6g}) is "
                         f"{'below' if worse_up else 'above'} the one at {p.value:g} ({p.mean:.6g}), CIs disjoint")
    return notes


# -- desim scenarios as the evaluator ------------------------------------------------------------------
def scenario_evaluator(scenario: Any, vary: str, slo: Slo, policy: str = "targeted", baseline: str = "fast",
                       seed: int = 1, backend: Any = "serial", store: Any = None, integer: bool = True,
                       progress: bool | str | None = False) -> Evaluator:
    """Run ``scenario`` with ``vary`` set to the value, on the sweep engine (any open backend, a store)."""
    from ..sweep import Task, execute

    def evaluate(value: float, reps: range) -> list:
        v: Any = int(round(value)) if integer else float(value)
        sc = scenario.with_overrides({vary: v})
        data = sc.model_dump()
        pols = [baseline, policy] if slo.ratio else [policy]
        tasks = [Task(data, p, seed, r) for r in reps for p in pols]
        res = execute(tasks, backend=backend, store=store, progress=progress, desc=f"{vary}={v}")
        out = []
        for k in range(len(reps)):
            ms = [res[k * len(pols) + j]["metrics"] for j in range(len(pols))]
            if slo.metric not in ms[0]:
                raise DesimInputError(f"--metric {slo.metric}: a run does not report it "
                                      f"(e.g. {', '.join(list(ms[0])[:8])})")
            out.append((ms[0][slo.metric], ms[1][slo.metric]) if slo.ratio else ms[0][slo.metric])
        return out
    return evaluate


def capacity(scenario: Any, vary: str, lo: float, hi: float, metric: str, slo: str | Slo,
             policy: str = "targeted", baseline: str = "fast", seed: int = 1, backend: Any = None,
             store: Any = None, step: float | None = None, **search: Any) -> CapacityResult:
    """The Python API of ``desim capacity``: ``capacity(load_scenario(...), "vm.vcpus", 1, 896, ...)``.

    ``backend`` is a :class:`~desim.studies.cluster.BackendSpec` (default serial);
    ``search`` goes to :func:`find_capacity` (confidence, min_reps, max_reps, batch, budget, scale).
    """
    from .cluster import BackendSpec, open_backend

    s = slo if isinstance(slo, Slo) else parse_slo(slo, metric)
    integer = float(lo).is_integer() and float(hi).is_integer() and (step is None or float(step).is_integer())
    with open_backend(backend or BackendSpec()) as be:
        ev = scenario_evaluator(scenario, vary, s, policy, baseline, seed, be, store, integer)
        return find_capacity(ev, lo, hi, s, vary=vary, step=step or 1, **search)


def plot_curve(res: CapacityResult, path: Path, fmt: Callable[[float], str] = lambda v: f"{v:g}") -> None:
    """The measured points with their CIs, the SLO bound and the answer."""
    from .figures import plt_module

    plt = plt_module()
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"meets": "#00798c", "violates": "#d1495b", "undecided": "#888888"}
    for verdict, c in colors.items():
        pts = [p for p in res.points if p.verdict == verdict]
        if not pts:
            continue
        x = np.array([p.value for p in pts], float)
        m = np.array([p.mean for p in pts], float)
        lo = np.array([p.low if math.isfinite(p.low) else p.mean for p in pts], float)
        hi = np.array([p.high if math.isfinite(p.high) else p.mean for p in pts], float)
        ax.errorbar(x, m, yerr=[m - lo, hi - m], fmt="o", color=c, capsize=4, label=verdict)
    xs = [p.value for p in res.points]
    ax.plot(xs, [p.mean for p in res.points], color="grey", lw=0.8, alpha=0.6)
    ax.axhline(res.slo.bound, color="black", ls="--", lw=1, label=f"SLO {res.slo.describe()}")
    if res.answer is not None:
        ax.axvline(res.answer, color="#00798c", ls=":", lw=1.2, label=f"answer {fmt(res.answer)}")
    if len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 16:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(res.vary)
    ax.set_ylabel(("ratio " if res.slo.ratio else "") + res.slo.metric)
    ax.set_title(res.summary(fmt), fontsize=9, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130 if path.suffix == ".png" else None)
    plt.close(fig)
