"""Output analysis for desim: confidence intervals, sequential replication,
and steady-state (warm-up and batch-means) analysis of single runs.

Nothing here knows about the simulation model; every function takes plain
numbers. See the module docstrings for the statistics and their sources.
"""
from __future__ import annotations

from desim.stats.ci import (
    Interval,
    bootstrap_ci,
    paired_diff_ci,
    ratio_ci,
    relative_change_ci,
    t_ci,
)
from desim.stats.sequential import (
    SequentialMonitor,
    SequentialResult,
    StopDecision,
    look_ahead_window,
    make_estimator,
    precision_reached,
    run_sequential,
    run_sequential_paired,
)
from desim.stats.steady import (
    BatchMeansResult,
    Mser5Result,
    batch_means,
    lag1_autocorrelation,
    mser5,
    steady_state_ci,
)

__all__ = [
    "BatchMeansResult",
    "Interval",
    "Mser5Result",
    "SequentialMonitor",
    "SequentialResult",
    "StopDecision",
    "batch_means",
    "bootstrap_ci",
    "lag1_autocorrelation",
    "look_ahead_window",
    "make_estimator",
    "mser5",
    "paired_diff_ci",
    "precision_reached",
    "ratio_ci",
    "relative_change_ci",
    "run_sequential",
    "run_sequential_paired",
    "steady_state_ci",
    "t_ci",
]
