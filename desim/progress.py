"""Progress of one long run: a bar on a terminal, a line now and then in a log.

:meth:`desim.vm.Vm.run` calls its ``progress`` callback at simulated-time
checkpoints with a :class:`RunStatus`; :class:`RunProgress` shows it on
stderr: a ``tqdm`` bar when stderr is a terminal, else one plain line every
``interval_s`` seconds of wall time (so a CI log or ``nohup`` file shows that a
16-second run is alive, and nothing for a run shorter than that). The
fraction done is a per-phase estimate (phases weigh the same; within a phase,
the accesses consumed out of those planned, or the VMM ops issued when the
vCPUs' work is open-ended), not a promise of the remaining time.
"""
from __future__ import annotations

import sys
import time
from typing import IO

from .vm import RunStatus  # noqa: F401 - re-exported: what update() receives


class RunProgress:
    """Context manager whose :meth:`update` receives :class:`RunStatus` checkpoints."""

    def __init__(self, desc: str, enabled: bool = True, stream: IO[str] | None = None,
                 interval_s: float = 10.0, tty: bool | None = None) -> None:
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval_s = interval_s
        self._bar = None
        self._t0 = time.perf_counter()
        self._last_line = self._t0

    def __enter__(self) -> "RunProgress":
        if self.enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=1000, desc=self.desc, file=self.stream, leave=False,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, st: RunStatus) -> None:
        if not self.enabled:
            return
        where = (f"phase {st.phase_index + 1}/{st.phases} {st.phase}, simulated {st.sim_ns / 1e6:,.1f} ms, "
                 f"{st.faults:,} faults")
        if self._bar is not None:
            self._bar.n = int(round(min(max(st.fraction, 0.0), 1.0) * 1000))
            self._bar.set_postfix_str(where, refresh=True)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            print(f"{self.desc}: ~{st.fraction:.0%} done, {where}, {now - self._t0:.0f} s", file=self.stream,
                  flush=True)
