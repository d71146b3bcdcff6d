"""The lock model against queueing theory (seeded, so deterministic; checked within a 99% CI).

* N closed-loop clients with exponential think and hold times on an exclusive
  lock: the machine-repairman model M/M/1//N (closed form and exact MVA).
* Open Poisson arrivals: M/M/1 (W = 1/(mu - lambda)) and M/D/1
  (Pollaczek-Khinchine: Wq = rho S / (2 (1 - rho))).
* The operational laws hold exactly on every run.
"""
from __future__ import annotations

import numpy as np
import pytest
import simpy

from desim.laws import lock_laws, machine_repairman, mva_exclusive, response_time_law
from desim.lock import WRITE, MmuLock
from desim.stats import t_ci

from closed_models import closed_lock


def test_machine_repairman_closed_form_matches_mva():
    r, x = machine_repairman(8, 10.0, 1.0)
    assert r == pytest.approx(2.0904, abs=1e-4)
    assert x == pytest.approx(0.6617, abs=1e-4)
    assert (r, x) == pytest.approx(mva_exclusive(8, 10.0, 1.0), rel=1e-12)


def test_closed_lock_matches_machine_repairman():
    R_th, X_th = machine_repairman(8, 10.0, 1.0)
    runs = [closed_lock(seed, 8, 10.0, 1.0, 20_000.0) for seed in range(10)]
    R = t_ci([r for r, _, _ in runs], 0.99)
    X = t_ci([x for _, x, _ in runs], 0.99)
    assert R.low <= R_th <= R.high, (R, R_th)
    assert X.low <= X_th <= X.high, (X, X_th)
    # response-time law on the simulated means
    assert response_time_law(8, X.estimate, 10.0) == pytest.approx(R.estimate, rel=0.02)


def _open(seed: int, lam: float, service, horizon: float):
    rng = np.random.default_rng(seed)
    env = simpy.Environment()
    lock = MmuLock(env, kind="rwlock")
    waits: list[float] = []

    def job(i):
        t0 = env.now
        ev = lock.acquire(WRITE, "zap", i)
        if ev is not None:
            yield ev
        waits.append(env.now - t0)
        yield env.timeout(service(rng))
        lock.release(i)

    def source():
        i = 0
        while True:
            yield env.timeout(rng.exponential(1 / lam))
            env.process(job(i))
            i += 1

    env.process(source())
    env.run(until=horizon)
    return float(np.mean(waits[len(waits) // 10:]))


@pytest.mark.parametrize("kind,service,wq", [
    ("M/M/1", lambda rng: rng.exponential(1.0), 0.5 / (1 - 0.5)),        # Wq = rho / (mu - lambda)
    ("M/D/1", lambda rng: 1.0, 0.5 * 1.0 / (2 * (1 - 0.5))),            # Pollaczek-Khinchine
])
def test_open_arrivals_match_queueing_formulas(kind, service, wq):
    waits = [_open(seed, 0.5, service, 40_000.0) for seed in range(10)]
    ci = t_ci(waits, 0.99)
    assert ci.low <= wq <= ci.high, (kind, ci, wq)


def test_operational_laws_on_the_closed_model():
    _, _, lock = closed_lock(3, 8, 10.0, 1.0, 5_000.0)
    # finish the period with nothing in flight: compare the laws up to the last event
    laws = lock_laws(lock.summary(), lock.env.now)
    for name, (lhs, rhs) in laws.items():
        # in-flight holds and waits at the horizon are not yet counted on the right-hand side
        assert lhs == pytest.approx(rhs, rel=0.02), name
