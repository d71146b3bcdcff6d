"""Operational laws (Denning & Buzen 1978) checked on the ``mmu_lock`` of a finished run.

Over an observation period T in which every acquisition completed:

* Little's law: mean number at the lock (holders + waiters) = X * R, where
  X = acquisitions / T and R = mean (wait + hold) per acquisition;
* utilisation law (exclusive lock): U = X * S, the busy fraction equals
  throughput times mean hold;
* response-time law (closed system of N clients with think time Z): R = N / X - Z.

These hold exactly for any correct accounting, so a violation is a bug in the
model's bookkeeping, not noise.
"""
from __future__ import annotations

from typing import Any


def lock_laws(lock_summary: dict[str, Any], period_ns: float) -> dict[str, tuple[float, float]]:
    """{law: (left side, right side)} for the lock statistics of a run."""
    roles = lock_summary["roles"].values()
    n = sum(r["acquisitions"] for r in roles)
    wait = sum(r["wait_ns"] for r in roles)
    hold = sum(r["hold_ns"] for r in roles)
    T = period_ns
    X = n / T if T else 0.0
    R = (wait + hold) / n if n else 0.0
    S = hold / n if n else 0.0
    return {
        "little": (lock_summary["mean_holders"] + lock_summary["mean_waiters"], X * R),
        "little_queue": (lock_summary["mean_waiters"], X * (wait / n if n else 0.0)),
        "utilisation": (lock_summary["mean_holders"], X * S),
    }


def response_time_law(n_clients: int, throughput: float, think: float) -> float:
    """R = N / X - Z."""
    return n_clients / throughput - think


def mva_exclusive(n_clients: int, think: float, service: float) -> tuple[float, float]:
    """Exact MVA of one FCFS server with N closed clients: (response time R, throughput X)."""
    q = 0.0
    r = x = 0.0
    for n in range(1, n_clients + 1):
        r = service * (1 + q)
        x = n / (r + think)
        q = x * r
    return r, x


def machine_repairman(n_clients: int, think: float, service: float) -> tuple[float, float]:
    """M/M/1//N closed form: (R, X) with p0 = 1 / sum_k N!/(N-k)! (S/Z)^k."""
    rho = service / think
    term, total = 1.0, 1.0
    for k in range(1, n_clients + 1):
        term *= (n_clients - k + 1) * rho
        total += term
    x = (1 - 1 / total) / service
    return n_clients / x - think, x


def lock_laws_of_run(metrics: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """:func:`lock_laws` from a run's flat metrics (``RunResult.metrics``)."""
    roles: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        for field, prefix, suffix in (("wait_ns", "lock_wait_", "_ns"), ("hold_ns", "lock_hold_", "_ns"),
                                      ("acquisitions", "lock_acquisitions_", "")):
            if k.startswith(prefix) and k.endswith(suffix):
                role = k[len(prefix):len(k) - len(suffix)] if suffix else k[len(prefix):]
                roles.setdefault(role, {})[field] = v
    summary = {"roles": roles, "mean_holders": metrics["lock_mean_holders"],
               "mean_waiters": metrics["lock_mean_waiters"]}
    return lock_laws(summary, metrics["completion_ns"])
