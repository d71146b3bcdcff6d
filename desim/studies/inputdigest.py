"""Content digests of the files a scenario reads, for the result store's key.

A scenario names some of its inputs by path: recordings of real boots
(``recording``, :mod:`desim.replay`), ``perf script`` traces (``perf_trace``)
and QEMU memslot traces (``memslot_trace.path``). The store key
(:meth:`desim.sweep.Task.key`) hashes the resolved scenario, which holds only
those paths: a recording re-recorded at the same path would otherwise be
answered with the results of the old one. :func:`input_digests` gives the
SHA-256 of each file's contents, which the key includes.

Hashing a file is cheap next to running it (a recording of a 6 GiB boot is
about 0.5 MB), and it is done once per file version: the digest is remembered
per (path, inode, size, modification time in ns), so the 100,000 keys of a
large sweep stat each input file once per key but read it once. A file rewritten
within the same nanosecond timestamp at the same size and inode is not noticed
(no filesystem desim runs on has such coarse timestamps in practice).
A file that cannot be read gets the digest ``"missing"``: the task then fails
with the reader's one-line error, never with a stale result.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

_CACHE: dict[tuple[str, int, int, int], str] = {}
_CACHE_MAX = 4096


def scenario_input_files(scenario: dict[str, Any]) -> list[str]:
    """The paths of the files a scenario (plain data: ``Scenario.model_dump()``) reads, in order."""
    out: list[str] = []

    def add(v: Any) -> None:
        if isinstance(v, str) and v:
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(f for f in v if isinstance(f, str) and f)

    for ph in scenario.get("phases") or []:
        if not isinstance(ph, dict):
            continue
        trace = ph.get("memslot_trace")
        if isinstance(trace, dict):
            add(trace.get("path"))
        for touch in [ph, *(ph.get("touches") or [])]:
            if isinstance(touch, dict):
                add(touch.get("recording"))
                add(touch.get("perf_trace"))
    return list(dict.fromkeys(out))


def file_digest(path: str) -> str:
    """SHA-256 of the file's contents (remembered per path, inode, size and mtime), or ``"missing"``."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return "missing"
    k = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _CACHE.get(k)
    if hit is not None:
        return hit
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except (OSError, ValueError):
        return "missing"
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[k] = digest
    return digest


def input_digests(scenario: dict[str, Any]) -> dict[str, str]:
    """``{path: sha256 of its contents}`` for every file the scenario reads (empty for most scenarios)."""
    return {p: file_digest(p) for p in scenario_input_files(scenario)}
