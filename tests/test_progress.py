"""Progress of multi-task runs: a periodic line in a log (stderr not a terminal), a bar on a terminal."""
from __future__ import annotations

import io
import time

from desim.studies.progress import Progress, fmt_duration


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_every_interval_and_a_last_one():
    log = io.StringIO()
    p = Progress([0, 0, 1, 1], desc="sweep s", interval=0.1, stream=log)
    assert p.mode == "lines"  # StringIO is not a terminal
    p.update(0, fresh=False)
    p.update(0)
    time.sleep(0.35)
    p.update(1)
    p.close()
    lines = log.getvalue().splitlines()
    assert len(lines) >= 3
    assert lines[0].startswith("desim: sweep s: 2/4 tasks, 1/2 points, ") and "ETA" in lines[0]
    assert lines[-1].startswith("desim: sweep s: 3/4 tasks, 1/2 points")


def test_a_terminal_gets_a_bar_with_points():
    tty = Tty()
    p = Progress([0, 1], desc="replications", stream=tty)
    assert p.mode is True
    p.update(0)
    p.update(1)
    p.close()
    out = tty.getvalue()
    assert "replications" in out and "points " in out and "task" in out


def test_quiet_and_durations():
    log = io.StringIO()
    p = Progress([0], mode=False, stream=log, interval=0.01)
    p.update(0)
    time.sleep(0.05)
    p.close()
    assert log.getvalue() == ""
    assert [fmt_duration(s) for s in (5, 125, 7300)] == ["5s", "2m05s", "2h01m"]
