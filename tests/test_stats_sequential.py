"""Tests of desim.stats.sequential (Hoad, Robinson & Davies 2010 stopping rule)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from desim.stats import (
    SequentialMonitor,
    look_ahead_window,
    precision_reached,
    run_sequential,
    run_sequential_paired,
    t_ci,
)


def normal_run(seed: int, mean: float = 100.0, sd: float = 10.0):
    """A fake replication: metric ``x`` ~ normal(mean, sd), ``y`` = 2x + noise."""

    def run_one(i: int) -> dict[str, float]:
        rng = np.random.default_rng([seed, i])
        x = float(rng.normal(mean, sd))
        return {"x": x, "y": 2 * x + float(rng.normal(0, 1)), "unused": -1.0}

    return run_one


def test_stops_by_precision() -> None:
    res = run_sequential(normal_run(1), ["x", "y"], target_rel_half_width=0.02)
    assert res.stopped_by == "precision"
    assert all(r <= 0.02 for r in res.rel_half_widths.values())
    # hw = t * 10 / sqrt(n) <= 2 needs n ~ 100 (sd/mean = 0.1), plus look-ahead 5
    assert 60 <= res.n_solution <= 160
    assert res.n_replications == res.n_solution + 5
    assert len(res.records) == res.n_replications
    assert res.records[0] == normal_run(1)(0)
    assert res.intervals["x"].contains(100.0)
    assert res.intervals["x"] == t_ci([r["x"] for r in res.records])


def test_tighter_target_needs_more_replications() -> None:
    loose = run_sequential(normal_run(2), ["x"], target_rel_half_width=0.05)
    tight = run_sequential(normal_run(2), ["x"], target_rel_half_width=0.01)
    assert loose.stopped_by == tight.stopped_by == "precision"
    assert tight.n_replications > 3 * loose.n_replications
    assert tight.rel_half_widths["x"] <= 0.01


def test_stops_by_max_reps_when_unreachable() -> None:
    res = run_sequential(normal_run(3), ["x"], target_rel_half_width=1e-4, max_reps=40)
    assert res.stopped_by == "max_reps"
    assert res.n_replications == 40
    assert res.n_solution is None
    assert res.rel_half_widths["x"] > 1e-4
    assert res.to_dict()["stopped_by"] == "max_reps"


def test_progress_callback() -> None:
    seen: list[tuple[int, dict[str, float]]] = []
    res = run_sequential(
        normal_run(4), ["x"], target_rel_half_width=0.05, progress=lambda d, r: seen.append((d, r))
    )
    assert [d for d, _ in seen] == list(range(1, res.n_replications + 1))
    assert math.isinf(seen[0][1]["x"])  # one replication: no interval yet
    assert seen[-1][1]["x"] == res.rel_half_widths["x"]


def test_missing_metric_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="'nope'"):
        run_sequential(normal_run(5), ["nope"])


def test_look_ahead_window() -> None:
    assert look_ahead_window(5, 3) == 5
    assert look_ahead_window(5, 100) == 5
    assert look_ahead_window(5, 250) == 12  # floor(5 * 250 / 100)


def test_look_ahead_forgets_a_premature_solution() -> None:
    # Precise at n = 3..4 (three equal values then one close), broken by an
    # outlier at n = 5, precise again from n = 6 on.
    values = [100.0, 100.0, 100.0, 100.1, 160.0] + [100.0] * 30
    mon = SequentialMonitor(["m"], target_rel_half_width=0.2, min_reps=3, look_ahead=5)
    decisions = [mon.add({"m": v}) for v in values]
    assert [d.n_solution for d in decisions[:5]] == [None, None, 3, 3, None]
    first_stop = next(d for d in decisions if d.stop)
    sol = first_stop.n_solution
    assert sol is not None and sol > 5
    assert first_stop.n == sol + 5
    assert all(d.n_solution == sol for d in decisions[sol - 1 : first_stop.n])
    assert not decisions[first_stop.n - 2].stop


def test_precision_reached_matches_serial_run() -> None:
    run_one = normal_run(6)
    res = run_sequential(run_one, ["x", "y"], target_rel_half_width=0.03)
    n = res.n_replications
    extra = [run_one(i) for i in range(n, n + 17)]  # a parallel batch that overshot
    rows = res.records + extra
    values = {m: [r[m] for r in rows] for m in ("x", "y")}
    dec = precision_reached(values, target_rel_half_width=0.03)
    assert dec.stop and dec.n == n and dec.n_solution == res.n_solution
    assert dec.intervals == res.intervals
    short = {m: v[: n - 1] for m, v in values.items()}
    not_yet = precision_reached(short, target_rel_half_width=0.03)
    assert not not_yet.stop and not_yet.n == n - 1


def test_precision_reached_rejects_ragged_input() -> None:
    with pytest.raises(ValueError, match="same number"):
        precision_reached({"a": [1.0, 2.0], "b": [1.0]})


def test_paired_ratio_run() -> None:
    # Common random numbers: the alternative is 10 % slower on the same seed.
    def run_pair(i: int) -> tuple[dict[str, float], dict[str, float]]:
        rng = np.random.default_rng([9, i])
        base = float(rng.lognormal(np.log(100.0), 0.3))
        alt = base * 1.1 * float(rng.lognormal(0.0, 0.05))
        return {"lat": base}, {"lat": alt}

    res = run_sequential_paired(run_pair, ["lat"], compare="ratio", target_rel_half_width=0.01)
    assert res.stopped_by == "precision"
    iv = res.intervals["lat"]
    assert iv.method == "ratio-log" and iv.contains(1.1)
    assert iv.relative_half_width <= 0.01
    # The alternative's mean latency alone (sd/mean ~0.3 vs ~0.05 for the
    # paired ratio) is far from 1 % precision even with 4x the replications.
    single = run_sequential(
        lambda i: run_pair(i)[1], ["lat"], target_rel_half_width=0.01,
        max_reps=4 * res.n_replications,
    )
    assert single.stopped_by == "max_reps"
    assert single.rel_half_widths["lat"] > 0.02

    diff = run_sequential_paired(run_pair, ["lat"], compare="diff", target_rel_half_width=0.05)
    assert diff.stopped_by == "precision"
    assert diff.intervals["lat"].method == "paired-t"
