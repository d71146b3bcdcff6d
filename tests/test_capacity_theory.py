"""desim capacity against theory: vCPUs contending for an exclusive ``mmu_lock`` (M/M/1//N).

N vCPUs alternate guest work (exponential, mean Z) and a fault that holds
``mmu_lock`` exclusively (exponential, mean S), as on the legacy MMU: the
machine-repairman model. Mean value analysis gives the mean response time
R(N) exactly; the capacity search, deciding each step from a CI over simulated
replications, must find the same largest N with R(N) <= SLO. The other tests
check the search's logic on evaluators with known answers.
"""
from __future__ import annotations

import numpy as np
import pytest
import simpy

from desim.errors import DesimInputError
from desim.laws import mva_exclusive
from desim.lock import WRITE, MmuLock
from desim.studies.capacity import find_capacity, parse_slo

Z, S, HORIZON = 10.0, 1.0, 4000.0


def mean_response(n: int, seed: int) -> float:
    """One replication: N closed-loop vCPUs on an exclusive mmu_lock; the mean fault response time."""
    rng = np.random.default_rng([seed, n])
    env = simpy.Environment()
    lock = MmuLock(env, kind="spinlock")
    resp: list[float] = []

    def vcpu(i):
        while True:
            yield env.timeout(rng.exponential(Z))
            t0 = env.now
            ev = lock.acquire(WRITE, "fault", i)
            if ev is not None:
                yield ev
            yield env.timeout(rng.exponential(S))
            lock.release(i)
            resp.append(env.now - t0)

    for i in range(n):
        env.process(vcpu(i))
    env.run(until=HORIZON)
    return float(np.mean(resp))


def test_largest_n_meeting_a_response_time_slo_equals_mean_value_analysis():
    slo_value = 4.5
    expected = max(n for n in range(1, 64) if mva_exclusive(n, Z, S)[0] <= slo_value)
    assert expected == 13  # R(13) = 4.20, R(14) = 4.84: the SLO sits between them
    slo = parse_slo(f"<={slo_value}", "response")
    res = find_capacity(lambda n, reps: [mean_response(int(n), r) for r in reps], 1, 32, slo, vary="vcpus",
                        min_reps=3, max_reps=40, batch=3)
    assert res.decided and res.answer == expected, res.points
    assert res.bracket == (13, 14) and res.mode == "largest" and not res.notes
    # every decided point agrees with MVA
    for p in res.points:
        assert (p.verdict == "meets") == (mva_exclusive(int(p.value), Z, S)[0] <= slo_value), p


def _noisy(f, sd=1.0):
    def ev(x, reps):
        return [f(x) + sd * np.random.default_rng([int(x * 1000), r]).standard_normal() for r in reps]
    return ev


def test_budget_exhaustion_is_undecided_between_two_values():
    slo = parse_slo("<=50", "m")
    # the metric crosses the bound exactly at 50: points near it can never be decided
    res = find_capacity(_noisy(lambda x: x, sd=5.0), 1, 100, slo, min_reps=3, max_reps=6, batch=3, scale="linear")
    assert not res.decided and res.answer is None
    lo, hi = res.bracket
    assert lo < 50 < hi and "undecided" in res.stopped
    assert res.summary().startswith(f"undecided between {lo:g} and {hi:g}")
    res = find_capacity(_noisy(lambda x: x, sd=5.0), 1, 100, slo, budget=10, scale="linear")
    assert not res.decided and "budget" in res.stopped and res.replications <= 10


def test_a_non_monotone_metric_is_reported():
    slo = parse_slo("<=10", "m")
    # falls from 7.9 at 1 to 4.8 at 32 (against the trend towards the violating end), then jumps to 20
    res = find_capacity(_noisy(lambda x: 8.0 - x / 10 if x <= 40 else 20.0, sd=0.1), 1, 64, slo, scale="linear")
    assert res.decided and res.answer == 40
    assert any("not monotone" in n and "CIs disjoint" in n for n in res.notes), res.notes


def test_a_metric_that_improves_with_the_factor_gives_the_smallest_value():
    slo = parse_slo("<=10", "m")
    res = find_capacity(_noisy(lambda x: 1000.5 / x, sd=0.01), 1, 1000, slo)
    assert res.decided and res.mode == "smallest" and res.answer == 101 and res.bracket == (101, 100)


def test_ratio_slo_between_policies():
    slo = parse_slo("ratio<=0.9", "completion_ns")
    # the alternative saves 30% at x=1, losing 1% of that per unit of x: ratio = 0.7 + 0.01 (x - 1)
    def ev(x, reps):
        return [(100.0, 100.0 * (0.705 + 0.01 * (x - 1)) + 0.01 * np.random.default_rng([int(x), r]).standard_normal())
                for r in reps]
    res = find_capacity(ev, 1, 100, slo, scale="linear")
    assert res.decided and res.answer == 20  # 0.895 meets, 0.905 violates
    assert slo.ratio and res.points[0].mean == pytest.approx(0.705, abs=1e-3)


@pytest.mark.parametrize("text,err", [("fast", "expected e.g."), ("5 parsecs", "unit"), ("ratio<=2us", "unit")])
def test_bad_slo_is_one_error(text, err):
    with pytest.raises(DesimInputError, match=err):
        parse_slo(text, "fault_latency_p99_ns")


def test_slo_units():
    assert parse_slo("50us", "fault_latency_p99_ns").bound == 50_000
    assert parse_slo(">=2ms", "completion_ns").op == ">="
