"""Fuzz both trace readers with mutated real lines: they load or raise DesimInputError, nothing else."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desim.errors import DesimInputError
from desim.traces import read_perf_trace, read_qemu_trace

ROOT = Path(__file__).resolve().parents[1] / "workloads" / "traces"
SOURCES = {p.name: p.read_bytes().splitlines() for p in [
    *sorted((ROOT / "qemu-7.2").glob("*.memslots.log")), *sorted((ROOT / "perf").glob("*.txt"))]}
# a slice of the unfiltered log: kvm_vm_ioctl lines around the first memslot updates
SOURCES["seabios-pc-6G.full.log[:80]"] = (ROOT / "qemu-7.2" / "seabios-pc-6G.full.log").read_bytes().splitlines()[:80]

CHARS = st.sampled_from(list(b"0123456789abcdefxX#@:.=/ -_[]\t\n\x00\xff\xc3") + list(range(256)))


@st.composite
def mutated(draw) -> bytes:
    lines = list(SOURCES[draw(st.sampled_from(sorted(SOURCES)))])
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "flip", "truncate", "insert", "cut_file",
                                     "repeat"]))
        line = lines[i]
        pos = draw(st.integers(0, len(line)))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, line)
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "flip" and line:
            pos = min(pos, len(line) - 1)
            lines[i] = line[:pos] + bytes([draw(CHARS)]) + line[pos + 1:]
        elif kind == "truncate":
            lines[i] = line[:pos]
        elif kind == "insert":
            lines[i] = line[:pos] + draw(st.binary(min_size=1, max_size=8)) + line[pos:]
        elif kind == "repeat":  # a long line
            lines[i] = line[:pos] * draw(st.integers(2, 200)) + line[pos:]
        elif kind == "cut_file":
            lines = lines[:i] + [line[:pos]]
    return b"\n".join(lines) + b"\n" * draw(st.integers(0, 1))


def _load_both(data: bytes) -> None:
    fd, name = tempfile.mkstemp(suffix=".trace")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            trace = read_qemu_trace(name)
        except DesimInputError as e:
            assert str(e).startswith(name), e
        else:
            for timing in ("scaled", "ordered"):
                ops = trace.to_memslot_ops(timing)
                assert len(ops) == len(trace.updates)
                assert all(a.time_ns <= b.time_ns for a, b in zip(ops, ops[1:]))
            s = trace.summary()
            assert s.creates + s.deletes + s.moves + s.flags_only == s.updates
        try:
            perf = read_perf_trace(name)
        except DesimInputError as e:
            assert str(e).startswith(name), e
        else:
            for v, f in perf.faults.items():
                assert len(f.times_ns) == len(f.gfn) == len(f.address) == len(f.error_code) > 0
                assert np.all(np.diff(f.times_ns) >= 0) and f.times_ns[0] >= 0
            assert sum(perf.fault_counts().values()) == sum(len(s) for s in perf.to_access_streams().values())
            perf.exit_counts()
    finally:
        os.unlink(name)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_real_lines_load_or_raise_desim_input_error(data):
    _load_both(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_load_or_raise_desim_input_error(data):
    _load_both(data)
