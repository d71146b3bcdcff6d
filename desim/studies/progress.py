"""Progress of a multi-task run on stderr: a bar on a terminal, a line every few seconds in a log.

On a terminal: a ``tqdm`` bar with tasks done, points done and the ETA. When
stderr is not a terminal (a batch job's log, CI), a bar would be one long line
of carriage returns, and silence looks like a hang, so a line such as::

    desim: sweep vcpus: 120/400 tasks, 11/40 points, 2m05s elapsed, ETA 4m52s

is printed every ``interval`` seconds (from a timer thread, so a long task does
not stop it), and a last one at the end if any was printed.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Iterable


def fmt_duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Progress:
    """Counts finished tasks (and the points they belong to) and shows them.

    ``mode``: ``None`` (bar on a terminal, periodic lines otherwise), ``True``
    (bar), ``False`` (nothing), ``"lines"`` (periodic lines).
    """

    def __init__(self, points: Iterable[int], desc: str = "tasks", mode: bool | str | None = None,
                 interval: float = 5.0, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.per_point = Counter(points)
        self.total = sum(self.per_point.values())
        self.left = Counter(self.per_point)
        self.done = 0
        self.points_done = 0
        self.desc = desc
        self.t0 = time.monotonic()
        self.fresh_done = 0  # finished in this run (not found in the store): the ETA's basis
        self.lines_printed = 0
        if mode is None:
            mode = True if self.stream.isatty() else "lines"
        self.mode = mode
        self._bar = None
        self._stop = threading.Event()
        self._thread = None
        if mode is True:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit="task", file=self.stream, leave=False,
                             dynamic_ncols=True)
            self._bar.set_postfix_str(f"points 0/{len(self.per_point)}")
        elif mode == "lines":
            self._thread = threading.Thread(target=self._tick, args=(interval,), daemon=True)
            self._thread.start()

    def update(self, point: int, fresh: bool = True) -> None:
        self.done += 1
        self.fresh_done += fresh
        self.left[point] -= 1
        if self.left[point] == 0:
            self.points_done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"points {self.points_done}/{len(self.per_point)}", refresh=False)
            self._bar.update(1)

    def eta(self) -> float | None:
        el = time.monotonic() - self.t0
        if self.fresh_done == 0:
            return None
        return el / self.fresh_done * (self.total - self.done)

    def line(self) -> str:
        el = time.monotonic() - self.t0
        eta = self.eta()
        return (f"desim: {self.desc}: {self.done}/{self.total} tasks, {self.points_done}/{len(self.per_point)} "
                f"points, {fmt_duration(el)} elapsed" + (f", ETA {fmt_duration(eta)}" if eta is not None
                                                           and self.done < self.total else ""))

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            print(self.line(), file=self.stream, flush=True)
            self.lines_printed += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            if self.lines_printed:
                print(self.line(), file=self.stream, flush=True)
        if self._bar is not None:
            self._bar.close()
