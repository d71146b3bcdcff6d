"""Detail plots cover every replication and show what they claim: pooled latencies, mean and band
over time, lock wait with CIs and visible zero bars, ratio whiskers with numbers, n/a rows kept."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from desim import experiment as ex
from desim import plots
from desim.detail import LATENCY_EDGES_NS, detail_samples, fault_series, pooled_latency_counts, time_bin_ns
from tests.conftest import MiB, scenario


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    sc = scenario(vcpus=2, ram_mib=8, extra_slots=[{"id": 1, "gpa": 64 * MiB, "size": MiB}], phases=[
        {"name": "populate", "pattern": "sequential", "slot": 0},
        {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 4000,
         "memslot_ops": [{"at_us": 100, "op": "delete", "slot": 1}]}])
    return ex.replicate(sc, ["fast", "targeted"], 3, seed=5, samples=detail_samples)


@pytest.fixture()
def figures(monkeypatch):
    """Keep the figures the plot functions close, to look at what they drew."""
    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    return kept


def _kept(runs):
    s = runs.attrs["samples"]
    return {p: [s[(p, r)] for r in range(3)] for p in ("fast", "targeted")}


def test_detail_of_every_replication_adds_up_to_its_faults(runs):
    kept = _kept(runs)
    for p, reps in kept.items():
        faults = runs[runs.policy == p].sort_values("replication")["faults"].to_numpy()
        assert [int(np.sum(k["latency_counts"])) for k in reps] == list(faults)
        assert [int(np.sum(k["fault_counts"])) for k in reps] == list(faults)
        assert pooled_latency_counts(reps).sum() == faults.sum()
        w, series = fault_series(reps)
        assert series.shape[0] == 3 and list(series.sum(axis=1)) == list(faults)
    assert len(kept["fast"][0]["zap_ioctl_ns"]) == 1


def test_time_bins_merge_exactly_across_run_lengths():
    assert time_bin_ns(1024) == 1 and time_bin_ns(1025) == 2 and time_bin_ns(5e7) == 65536
    a = {"fault_counts": [1, 2, 3, 4], "fault_bin_ns": [1.0]}
    b = {"fault_counts": [5, 6, 7], "fault_bin_ns": [2.0]}
    w, s = fault_series([a, b])
    assert w == 2.0 and s.tolist() == [[3, 7, 0], [5, 6, 7]]
    assert len(LATENCY_EDGES_NS) == 901


def test_detail_plots_say_they_pool_all_replications(runs, figures, tmp_path):
    kept = _kept(runs)
    plots.plot_fault_latency_cdf(kept, tmp_path / "cdf.png")
    labels = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert all("pooled over 3 replications" in lab for lab in labels)
    plots.plot_faults_over_time(kept, tmp_path / "t.png")
    labels = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert "fast: mean of 3 replications" in labels and "targeted: min-max over replications" in labels
    assert (tmp_path / "cdf.png").stat().st_size > 1000 and (tmp_path / "t.png").stat().st_size > 1000


def test_lock_wait_draws_zero_bars_and_the_mean_of_all_replications(runs, figures, tmp_path):
    plots.plot_lock_wait(runs, tmp_path / "lock.png")
    ax = figures[-1].axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights and min(heights) > 0  # a zero mean is a visible stub
    texts = [t.get_text() for t in ax.texts]
    assert "0" in texts
    mean_fault = runs[runs.policy == "fast"]["lock_wait_fault_ns"].mean() / 1e3
    assert any(abs(h - mean_fault) < 1e-9 for h in heights) or mean_fault == 0


def test_comparison_keeps_na_rows_and_writes_the_cis(runs, figures, tmp_path):
    table = ex.compare(runs, ["faults", "remote_flushes", "completion_ns"])
    table.loc[table.metric == "remote_flushes", ["mean_fast", "ratio", "ratio_low", "ratio_high"]] = [0, *[np.nan] * 3]
    plots.plot_comparison(table, tmp_path / "c.png")
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["faults", "remote_flushes", "completion_ns"]
    texts = " ".join(t.get_text() for t in ax.texts)
    r = table.set_index("metric").loc["faults"]
    assert f"{r['ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]" in texts
    assert "n/a (no ratio: fast mean is 0)" in texts
