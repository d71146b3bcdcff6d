"""Numbers for people: one engineering format with units, and the comparison table printed from it.

A metric's unit comes from its name: ``*_ns`` is a time (shown in ns, us, ms
or s), anything else a count (thousands separators). Each row of a table picks
*one* display unit from its largest value, so the two policies, the difference
and its CI bounds in a row are read on the same scale, and shows four
significant digits of that largest value. Numeric columns are right-aligned.
ASCII only (``us``, not ``µs``): the table must print on any terminal or log.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

TIME_UNITS = (("ns", 1.0), ("us", 1e3), ("ms", 1e6), ("s", 1e9))


def metric_unit(metric: str) -> str:
    """The unit of a metric's raw values: ``"ns"`` for ``*_ns`` metrics, else ``"count"``."""
    return "ns" if metric.endswith("_ns") else "count"


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and np.isfinite(v)]


def display_scale(values: Iterable[float], unit: str) -> tuple[str, float, int]:
    """(display unit, divisor, decimals) for a row of values of one metric."""
    vals = _finite(values)
    big = max((abs(v) for v in vals), default=0.0)
    name, div = (unit, 1.0)
    if unit == "ns":
        for n, d in TIME_UNITS:
            if big >= d or n == "ns":
                name, div = n, d
    scaled = big / div
    if unit == "count" and all(float(v).is_integer() for v in vals):
        return name, div, 0
    decimals = 0 if scaled == 0 else max(0, 3 - int(math.floor(math.log10(scaled))))
    return name, div, min(decimals, 3)


def fmt(value: float, div: float = 1.0, decimals: int = 0) -> str:
    """One number on a row's scale: thousands separators, fixed decimals, ``n/a`` for NaN/inf."""
    if value is None or not np.isfinite(value):
        return "n/a"
    x = value / div
    s = f"{x:,.{decimals}f}"
    return "0" if s.lstrip("-").strip("0.,") == "" else s  # no "-0.0"


def fmt_quantity(value: float, unit: str) -> str:
    """A single value with its unit, e.g. ``1.66 us`` or ``53,880`` (counts carry no unit word)."""
    name, div, dec = display_scale([value], unit)
    s = fmt(value, div, dec)
    return s if unit == "count" else f"{s} {name}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def replications_phrase(n: int) -> str:
    """``"1 paired replication"`` / ``"10 paired replications"``."""
    return _plural(n, "paired replication")


def format_table(table: pd.DataFrame, baseline: str = "fast", alternative: str = "targeted",
                 confidence: float = 0.95) -> str:
    """The comparison table of :func:`desim.experiment.compare` as aligned text.

    Columns: metric, display unit, the two policies' means, the paired
    difference (alternative - baseline) with its CI, and the ratio
    alternative/baseline with its CI (``n/a`` with the reason when the
    baseline is 0 and a ratio means nothing).
    """
    pct = f"{confidence * 100:g}%"
    header = ["metric", "unit", baseline, alternative, f"{alternative} - {baseline} [{pct} CI]",
              f"{alternative} / {baseline} [{pct} CI]"]
    rows = []
    for _, r in table.iterrows():
        unit = metric_unit(r["metric"])
        ma, mb = r[f"mean_{baseline}"], r[f"mean_{alternative}"]
        d, dl, dh = r["diff"], r["diff_low"], r["diff_high"]
        name, div, dec = display_scale([ma, mb, d, dl, dh], unit)

        def cell(v: float, div: float = div, dec: int = dec) -> str:
            s = fmt(v, div, dec)
            # a value too small for the row's scale keeps its own unit instead of reading as 0
            return fmt_quantity(v, unit) if s.lstrip("-") == "0" and np.isfinite(v) and v != 0 else s
        diff = cell(d)
        if np.isfinite(dl) and np.isfinite(dh):
            diff += f" [{cell(dl)} to {cell(dh)}]"
        if np.isfinite(r["ratio"]):
            ratio = f"{r['ratio']:.3f}"
            if np.isfinite(r["ratio_low"]) and np.isfinite(r["ratio_high"]):
                ratio += f" [{r['ratio_low']:.3f} to {r['ratio_high']:.3f}]"
        else:
            ratio = f"n/a ({baseline} = 0)" if ma == 0 else "n/a"
        rows.append([r["metric"], name, cell(ma), cell(mb), diff, ratio])
    widths = [max(len(str(x[i])) for x in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}"
        return "  ".join([first] + [f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:])]).rstrip()
    return "\n".join(line(c) for c in [header] + rows)
