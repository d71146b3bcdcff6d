"""desim capacity against theory: vCPUs contending for an exclusive ``mmu_lock`` (M/M/1//N).

N vCPUs alternate guest work (think time, mean Z) and a fault that holds
``mmu_lock`` exclusively (exponential, mean S), as on the legacy MMU: the
machine-repairman model. Mean value analysis gives the mean response time
R(N) exactly; the capacity search, deciding each step from a CI over simulated
replications, must find the same largest N with R(N) <= SLO. Twice: on
desim's ``MmuLock`` with exponential clients, and on a full scenario run by
``desim capacity``'s Python API (tests/closed_models.py). The other tests
check the search's logic on evaluators with known answers.
"""
from __future__ import annotations

import numpy as np
import pytest

from desim.errors import DesimInputError
from desim.laws import mva_exclusive
from desim.profile import Dist
from desim.studies.capacity import capacity, find_capacity, parse_slo

from closed_models import closed_lock, exponential_dist, mm1n_profile, mm1n_scenario

Z, S, HORIZON = 10.0, 1.0, 4000.0


def mean_response(n: int, seed: int) -> float:
    """One replication: N closed-loop vCPUs on an exclusive mmu_lock; the mean fault response time."""
    return closed_lock([seed, n], n, Z, S, HORIZON)[0]


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


def test_the_exponential_table_is_exponential():
    d = Dist.model_validate(exponential_dist())
    p, x = np.array(d.p), np.array(d.ns)
    mean = d.table_mean()
    # second moment of the piecewise-uniform table: sum over segments of dp (a^2 + ab + b^2) / 3
    m2 = float(np.sum(np.diff(p) * (x[:-1] ** 2 + x[:-1] * x[1:] + x[1:] ** 2) / 3))
    assert mean == pytest.approx(1.0, abs=2e-3)
    assert m2 / mean**2 - 1 == pytest.approx(1.0, abs=2e-3)  # squared coefficient of variation of an exponential


# The full scenario (ns): guest work between faults A (fixed), fault handling outside the lock
# H (exponential) and the SPTE install under the lock S (exponential); think time Z = A + H.
A_NS, H_NS, S_NS, PAGES = 500.0, 3500.0, 1000.0, 4000


def test_desim_capacity_on_a_full_scenario_equals_mean_value_analysis(tmp_path):
    """``capacity()`` over ``vm.vcpus`` of a real scenario (vCPUs faulting under the legacy MMU's
    exclusive mmu_lock) finds the largest N whose mean fault latency meets the SLO; MVA gives it.

    A fault's latency (exit to entry) is H + R(N), R the lock's response time (wait + hold). The
    think time need not be exponential for MVA (an infinite-server station is insensitive to its
    distribution); its host part is, and the hold is, as M/M/1//N has them. Every vCPU faults on
    its own fresh pages (PAGES in all, whatever N), so a replication costs the same at every N.
    """
    z = A_NS + H_NS
    latency = {n: H_NS + mva_exclusive(n, z, S_NS)[0] for n in range(1, 17)}
    bound = (latency[7] + latency[8]) / 2  # 6,969 ns and 7,751 ns: the SLO sits between them
    expected = max(n for n, v in latency.items() if v <= bound)
    assert expected == 7
    sc = mm1n_scenario(mm1n_profile(tmp_path / "mm1n.toml", H_NS, S_NS), 1, PAGES, A_NS)
    res = capacity(sc, "vm.vcpus", 1, 16, "fault_latency_mean_ns", f"<={bound:.0f}", policy="fast",
                   min_reps=3, max_reps=12, batch=3)
    assert res.decided and res.answer == expected, res.points
    assert res.bracket == (7, 8) and res.mode == "largest" and not res.notes
    for p in res.points:  # every measured point agrees with MVA: its verdict, and its mean within 3%
        assert (p.verdict == "meets") == (latency[int(p.value)] <= bound), p
        assert p.mean == pytest.approx(latency[int(p.value)], rel=0.03), p  # measured: within 1%


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
