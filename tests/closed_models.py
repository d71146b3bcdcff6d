"""Closed queueing models for the theory tests (a helper module, not a test file).

* :func:`closed_lock` -- N closed-loop clients on desim's ``MmuLock`` alone, exponential think and
  hold: the machine-repairman model M/M/1//N (tests/test_theory_lock.py, tests/test_capacity_theory.py);
* :func:`mm1n_scenario` -- the same model as a full desim scenario: vCPUs faulting on fresh pages
  under an exclusive ``mmu_lock`` (the legacy MMU of the seed's era), the costs drawn from
  exponential distributions through desim/costs.py (tests/test_capacity_theory.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from desim.lock import WRITE, MmuLock
from desim.profile import load_profile
from desim.scenario import Scenario, validate_scenario


def closed_lock(seed: Any, n: int, think: float, hold: float, horizon: float) -> tuple[float, float, MmuLock]:
    """N clients alternating think (exponential, mean ``think``) and an exclusive hold of the lock
    (exponential, mean ``hold``) until ``horizon``: (mean response time, throughput, the lock)."""
    rng = np.random.default_rng(seed)
    env = simpy.Environment()
    lock = MmuLock(env, kind="spinlock")
    resp: list[float] = []

    def client(i):
        while True:
            yield env.timeout(rng.exponential(think))
            t0 = env.now
            ev = lock.acquire(WRITE, "fault", i)
            if ev is not None:
                yield ev
            yield env.timeout(rng.exponential(hold))
            lock.release(i)
            resp.append(env.now - t0)

    for i in range(n):
        env.process(client(i))
    env.run(until=horizon)
    return float(np.mean(resp)), len(resp) / horizon, lock


def exponential_dist(step: float = 0.05, top: float = 14.0) -> dict[str, Any]:
    """A unit-mean exponential as a desim quantile table (``Dist(kind="quantiles")``).

    The knots are the exact exponential quantiles ``-ln(1 - p)`` every ``step`` up to ``top``
    (p = 1 - e^-14, the last 8e-7 of probability spread up to top + 1); between knots the
    table is uniform. desim scales it to the cost's ``value``, so the mean is exact; its
    squared coefficient of variation is 1.000 to 3 decimals (checked by the test).
    """
    xs = np.arange(0.0, top + step / 2, step)
    p = (1.0 - np.exp(-xs)).tolist() + [1.0]
    return {"kind": "quantiles", "p": p, "ns": xs.tolist() + [top + 1.0],
            "source": "exponential: knots at -ln(1 - p) (closed-model theory tests)"}


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items() if x is not None) + " }"


def mm1n_profile(path: Path, think_host_ns: float, hold_ns: float) -> Path:
    """A host profile for M/M/1//N: the legacy MMU of legacy-2020 (spinlock ``mmu_lock`` taken for
    write by every fault), 4 KiB host pages, no PTE prefetch, and every cost zero except two
    exponential ones: ``spte_install`` (the only work under the lock: the hold, mean ``hold_ns``)
    and ``fault_handle`` (host work outside the lock, mean ``think_host_ns``)."""
    base = load_profile("legacy-2020").model_dump()
    expo = exponential_dist()
    costs: dict[str, Any] = {k: {"value": 0.0, "source": "zero: not part of the closed model"} for k in base["costs"]}
    costs["fault_handle"] = {"value": think_host_ns, "source": "M/M/1//N: host part of the think time", "dist": expo}
    costs["spte_install"] = {"value": hold_ns, "source": "M/M/1//N: the mmu_lock hold", "dist": expo}
    kernel = dict(base["kernel"], backing="4k", pte_prefetch=False)
    lines = ['name = "mm1n"', 'description = "M/M/1//N on an exclusive mmu_lock"', "", "[kernel]"]
    lines += [f"{k} = {_toml(v)}" for k, v in kernel.items() if v is not None]
    lines += ["", "[costs]"] + [f"{k} = {_toml(v)}" for k, v in costs.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def mm1n_scenario(profile: Path, vcpus: int, pages: int, access_ns: float) -> Scenario:
    """``vcpus`` vCPUs each touching its own share of ``pages`` fresh 4 KiB pages once, in order:
    every access is a first-touch fault (no prefetch, 4 KiB backing), preceded by ``access_ns``
    of guest time. Think time Z = ``access_ns`` + fault_handle; response time R = the wait for
    ``mmu_lock`` + the hold; a fault's latency (exit to entry) = fault_handle + R."""
    assert pages % 4 == 0 and math.isfinite(access_ns)
    return validate_scenario({
        "name": "mm1n", "description": "vCPUs faulting under an exclusive mmu_lock (M/M/1//N)",
        "profile": str(profile),
        "vm": {"vcpus": vcpus, "memslots": [{"id": 0, "gpa": 0, "size": f"{pages * 4}KiB"}]},
        "phases": [{"name": "faults", "pattern": "sequential", "slot": 0, "sharing": "private",
                    "access_ns": access_ns}],
    }, "closed_models.mm1n_scenario")
