"""Checks a command runs before any work: metric names and a Dask scheduler address.

A command validates *everything* it was given before it runs anything or
creates anything (an output directory, a result store): the scenario and its
overrides (:mod:`desim.scenario`), output paths (:mod:`desim.outputs`), the
work and memory a run needs (:mod:`desim.limits`), and the two arguments
checked here. Each check raises :class:`desim.errors.DesimInputError` with one
line naming the argument and the fix.
"""
from __future__ import annotations

import re
from typing import Iterable

from .errors import DesimInputError
from .metrics import metric_names

# tcp://HOST:PORT or tls://HOST:PORT (HOST a name, an IPv4 address or [IPv6]); the port may be left out (8786)
_ADDRESS = re.compile(r"(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?/?")


def check_metrics(names: Iterable[str] | None, phase_names: Iterable[str], flag: str = "--metrics") -> None:
    """Every name must be a metric a run reports (see :func:`desim.metrics.metric_names`)."""
    if names is None:
        return
    known = metric_names(list(phase_names))
    unknown = [n for n in names if n not in known]
    if unknown:
        shown = " ".join(n if len(n) <= 40 else n[:40] + "..." for n in unknown[:3])
        raise DesimInputError(f"{flag} {shown}: no such metric (known: {', '.join(known)})")


def check_scheduler_address(address: str | None, flag: str = "--scheduler") -> None:
    """A Dask scheduler address this process can connect to: ``tcp://HOST:PORT`` or ``tls://HOST:PORT``."""
    if address is None:
        return
    if address.startswith("inproc://"):
        raise DesimInputError(f"{flag} {address}: an inproc:// address exists only inside the process that "
                              "created it; give the scheduler's tcp://HOST:PORT")
    m = _ADDRESS.fullmatch(address)
    if m is None or (m.group(3) is not None and not 0 < int(m.group(3)) < 65536):
        shown = address if len(address) <= 60 else address[:60] + "..."
        raise DesimInputError(f"{flag} {shown!r}: expected a Dask scheduler address tcp://HOST:PORT "
                              "(e.g. tcp://10.0.0.5:8786)")
