"""What a user reads and loads: the comparison table's format and the tidy CSV tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from desim import experiment as ex
from desim.report import display_scale, fmt, format_table, metric_unit, replications_phrase
from tests.conftest import MiB, scenario


def _table(**over) -> pd.DataFrame:
    row = {"metric": "completion_ns", "n": 10, "mean_fast": 7.7829e7, "hw_fast": 1e4, "mean_targeted": 6.0156e7,
           "hw_targeted": 1e4, "diff": -1.7672e7, "diff_low": -1.7700e7, "diff_high": -1.7645e7,
           "ratio": 0.773, "ratio_low": 0.7725, "ratio_high": 0.7735}
    row.update(over)
    return pd.DataFrame([row])


def test_units_come_from_the_metric_name():
    assert metric_unit("completion_ns") == "ns" and metric_unit("faults") == "count"
    assert display_scale([7.7829e7, 6.0156e7], "ns")[:2] == ("ms", 1e6)
    assert display_scale([1560.0, 0.0], "ns")[:2] == ("us", 1e3)
    assert display_scale([480.0], "ns")[:2] == ("ns", 1.0)
    assert display_scale([119400.0, 65536.0], "count") == ("count", 1.0, 0)


def test_one_row_one_scale_four_significant_digits_and_separators():
    text = format_table(_table())
    header, row = text.splitlines()
    assert row.split()[:4] == ["completion_ns", "ms", "77.83", "60.16"]
    assert "-17.67 [-17.70 to -17.64]" in row and "0.773 [0.772 to 0.773]" in row
    counts = format_table(_table(metric="faults", mean_fast=119400.0, mean_targeted=65536.0, diff=-53864.0,
                                 diff_low=-53960.0, diff_high=-53800.0))
    assert "119,400" in counts and "-53,864 [-53,960 to -53,800]" in counts
    assert "e+0" not in text + counts  # no scientific notation


def test_columns_are_right_aligned_and_the_header_names_the_confidence():
    t = pd.concat([_table(), _table(metric="faults", mean_fast=5.0, mean_targeted=12345678.0)])
    lines = format_table(t, confidence=0.9).splitlines()
    assert "[90% CI]" in lines[0]
    assert len({len(line) for line in lines}) == 1  # every column padded to its width, right-aligned


def test_no_ratio_says_why_and_a_tiny_value_keeps_its_unit():
    text = format_table(_table(metric="zap_duration_total_ns", mean_fast=2.8238e6, mean_targeted=480.0,
                               diff=-2.8233e6, diff_low=-2.8242e6, diff_high=-2.8224e6))
    assert "480.0 ns" in text.splitlines()[1]  # not "0" on the ms scale
    text = format_table(_table(metric="remote_flushes", mean_fast=0.0, mean_targeted=0.0, diff=0.0, diff_low=0.0,
                               diff_high=0.0, ratio=np.nan, ratio_low=np.nan, ratio_high=np.nan))
    assert "n/a (fast = 0)" in text


def test_plural_and_negative_zero():
    assert replications_phrase(1) == "1 paired replication"
    assert replications_phrase(3) == "3 paired replications"
    assert fmt(-0.0001, 1.0, 2) == "0" and fmt(float("nan")) == "n/a"


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    sc = scenario(vcpus=2, ram_mib=8, extra_slots=[{"id": 1, "gpa": 64 * MiB, "size": MiB}], phases=[
        {"name": "populate", "pattern": "sequential", "slot": 0},
        {"name": "work", "pattern": "uniform", "slot": 0, "accesses": 3000,
         "memslot_ops": [{"at_us": 50, "op": "delete", "slot": 1}]}])
    return ex.replicate(sc, ["fast", "targeted"], 3, seed=4)


def test_runs_table_has_no_point_no_nan_and_integer_counts(runs, tmp_path):
    assert "point" not in runs.columns
    ex.csv_writer(runs)(tmp_path / "runs.csv")
    back = pd.read_csv(tmp_path / "runs.csv")
    lock_cols = [c for c in back.columns if c.startswith("lock_")]
    assert lock_cols and not back[lock_cols].isna().any().any()
    for c in ("faults", "ipis_sent", "lock_acquisitions_fault", "sptes_zapped"):
        assert back[c].dtype.kind == "i", c
    assert "lock_acquisitions_teardown" in back.columns  # a fast-zap-only role: 0 for targeted, not empty
    assert (back.loc[back.policy == "targeted", "lock_acquisitions_teardown"] == 0).all()


def test_csv_drops_float_noise(tmp_path):
    ex.csv_writer(pd.DataFrame({"x": [2824500.000000462, 0.1 + 0.2]}))(tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[1:] == ["2824500", "0.3"]


def test_long_comparison_table(runs):
    table = ex.compare(runs, ["faults", "completion_ns", "remote_flushes"], confidence=0.9)
    long = ex.comparison_long(table, confidence=0.9)
    assert list(long.columns) == ["metric", "unit", "statistic", "policy", "estimate", "ci_low", "ci_high",
                                  "confidence", "n"]
    assert len(long) == 4 * 3 and (long.confidence == 0.9).all() and (long.n == 3).all()
    d = long[(long.metric == "faults") & (long.statistic == "difference")].iloc[0]
    w = table.set_index("metric").loc["faults"]
    assert (d.estimate, d.ci_low, d.ci_high) == (w["diff"], w["diff_low"], w["diff_high"])
    m = long[(long.metric == "completion_ns") & (long.policy == "fast")].iloc[0]
    assert m.unit == "ns" and m.ci_low <= m.estimate <= m.ci_high
