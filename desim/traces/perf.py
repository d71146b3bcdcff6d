"""Reader for ``perf script`` text output of ``kvm:kvm_page_fault`` and ``kvm:kvm_exit``.

Record and dump with::

    perf record -e kvm:kvm_page_fault -e kvm:kvm_exit -p $(pidof qemu-system-x86_64) -- sleep 10
    perf script > faults.perf.txt

``perf script`` prints one line per sample (tools/perf/builtin-script.c,
``perf_sample__fprintf_start``): ``COMM PID/TID [CPU] SECONDS.USECS: EVENT: PAYLOAD``
(``COMM`` is ``%16s`` and may contain spaces, e.g. QEMU's ``CPU 0/KVM`` threads;
``PID/`` only with ``-F +pid``; ``--ns`` prints nine fraction digits). The payload is
the tracepoint's ``TP_printk`` text from the kernel's ``arch/x86/kvm/trace.h``:

* ``kvm_page_fault``, since about Linux 6.1:
  ``"vcpu %u rip 0x%lx address 0x%016llx error_code 0x%llx"``;
  before: ``"address %lx error_code %x"`` (no vcpu, hex without ``0x``).
* ``kvm_exit``, recent kernels: ``"vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx
  info2 0x%016llx intr_info 0x%08x error_code 0x%08x"``; old kernels:
  ``"reason %s rip 0x%lx info %llx %llx"``. The reason is a symbolic name
  (``EPT_VIOLATION``, ``npf``, ...) and may hold several words.

Lines of other events, callchain lines, ``#`` comments and blank lines are
skipped (counted in ``skipped``); any other line, or a kvm_page_fault/kvm_exit
line missing a field, is an error.

vCPU ids come from the payload's ``vcpu N``. A line without it (old kernels)
takes the vCPU of its thread: the vCPU that thread reports on any other line
(kernels before ~6.1 print ``vcpu`` in kvm_exit but not in kvm_page_fault),
else the smallest id not yet used, given to threads in order of first
appearance. Such a trace needs the TID field. One VM per trace is assumed.

``address`` is what KVM faulted on: a GPA with TDP (EPT/NPT), a guest virtual
address with shadow paging. Times are ns since the first kvm event of the trace.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from desim.errors import DesimInputError
from desim.memslot import PAGE_SHIFT
from desim.traces.qemu import U32_MAX, _dec, _fail, _frac_ns, _hex, _read_lines

PAGE_FAULT = "kvm:kvm_page_fault"
EXIT = "kvm:kvm_exit"
INT64_MAX = (1 << 63) - 1

_TIME = re.compile(r"(?<!\S)(\d{1,10})\.(\d{1,9}):(?=\s|$)", re.ASCII)  # the first "SECONDS.FRACTION:" token
_EVENT = re.compile(r"\s*([^\s:]+(?::[^\s:]+)?):(?:\s+|$)", re.ASCII)  # "kvm:kvm_exit: " (not "1315219 cycles:P:")
_TID = re.compile(r"(?:-?\d{1,10}/)?(-?\d{1,10})", re.ASCII)  # "TID" or "PID/TID"
_CPU = re.compile(r"\[\d{1,6}\]", re.ASCII)
_PERIOD_EVENT = re.compile(r"\s*\d+\s+[^\s:]+(?::[^\s:]+)*:(?:\s|$)", re.ASCII)  # "    1315219 cycles:P: "
_CALLCHAIN = re.compile(r"\s+[0-9a-f]+\s", re.ASCII)  # "\t    ffffffff8106a1c5 native_write_msr+0x5 (...)"
_PF_KEYS = {"vcpu", "rip", "address", "error_code"}
_PF_WANT = "'vcpu N rip 0x<hex> address 0x<hex> error_code 0x<hex>' (or 'address <hex> error_code <hex>')"
_EXIT_KEYS = {"vcpu", "reason", "rip", "info", "info1", "info2", "intr_info", "error_code"}
_EXIT_WANT = ("'vcpu N reason NAME rip 0x<hex> info1 0x<hex> info2 0x<hex> ...' "
              "(or 'reason NAME rip 0x<hex> info <hex> <hex>')")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class VcpuFaults:
    """One vCPU's kvm_page_fault events in time order (read-only arrays)."""

    times_ns: np.ndarray  # int64, ns since the trace's first kvm event
    address: np.ndarray  # uint64, as printed
    gfn: np.ndarray  # int64, address >> PAGE_SHIFT
    error_code: np.ndarray  # uint64


@dataclass(frozen=True)
class VcpuExits:
    """One vCPU's kvm_exit events in time order (read-only arrays)."""

    times_ns: np.ndarray  # int64
    reason: np.ndarray  # str
    rip: np.ndarray  # uint64
    info1: np.ndarray  # uint64 (VMX: exit qualification; SVM: exit_info_1)
    info2: np.ndarray  # uint64 (SVM #NPF: the faulting GPA)


@dataclass(frozen=True)
class PerfTrace:
    path: str
    faults: dict[int, VcpuFaults]
    exits: dict[int, VcpuExits]
    start_ns: int  # the perf timestamp (ns) of time 0
    thread_vcpu: dict[int, int] = field(default_factory=dict)  # tid -> vCPU id, threads of kvm lines
    skipped: int = 0

    def to_access_streams(self) -> dict[int, np.ndarray]:
        """``{vcpu: gfns faulted on, in time order}`` for every vCPU with a page fault."""
        return {v: f.gfn.copy() for v, f in self.faults.items()}

    def fault_counts(self) -> dict[int, int]:
        return {v: len(f.gfn) for v, f in self.faults.items()}

    def exit_counts(self) -> dict[int, dict[str, int]]:
        """``{vcpu: {reason: count}}``."""
        out: dict[int, dict[str, int]] = {}
        for v, e in self.exits.items():
            names, counts = np.unique(e.reason, return_counts=True)
            out[v] = {str(n): int(c) for n, c in zip(names, counts)}
        return out


def _pairs(path: str, lineno: int, payload: str, event: str) -> dict[str, list[str]]:
    """Split a payload into ``{key: [value words]}``.

    Every key takes one value, except kvm_exit's ``reason`` (the words up to
    ``rip``) and the old ``info`` (two values).
    """
    short = event.split(":")[1]
    keys, want = (_PF_KEYS, _PF_WANT) if event == PAGE_FAULT else (_EXIT_KEYS, _EXIT_WANT)
    out: dict[str, list[str]] = {}
    key = None
    for tok in payload.split():
        more = (key == "reason" and tok != "rip" and out[key]) or (key == "info" and len(out[key]) < 2)
        if tok in keys and tok not in out and not more:
            key = tok
            out[key] = []
        elif key is None:
            raise _fail(path, lineno, f"{short} fields {want}", tok)
        else:
            out[key].append(tok)
    for key, words in out.items():
        if not words if key == "reason" else len(words) != (2 if key == "info" else 1):
            what = {"reason": "a name", "info": "two values"}.get(key, "one value")
            raise _fail(path, lineno, f"{what} after '{key}' in {short} line", " ".join([key, *words]))
    for key in ("address", "error_code") if event == PAGE_FAULT else ("reason", "rip"):
        if key not in out:
            raise _fail(path, lineno, f"'{key}' in {short} fields {want}", payload.strip())
    return out


def _num(path: str, lineno: int, out: dict[str, list[str]], key: str, i: int = 0) -> int:
    text = out[key][i]
    if key == "vcpu":
        return _dec(path, lineno, text, "'vcpu <decimal>'", lo=0, hi=U32_MAX)
    return _hex(path, lineno, text, f"'{key} <hex>'", prefix=False)


def _split_sample(text: str) -> tuple[int | None, int, str, str] | None:
    """``(tid, time_ns, event, payload)`` of a tracepoint sample line, else None.

    The header is parsed around its first ``SECONDS.FRACTION:`` token: to its
    left, from the right, an optional ``[CPU]``, an optional ``TID`` or
    ``PID/TID``, and the comm (which may contain spaces); to its right the event
    name and the payload.
    """
    m = _TIME.search(text)
    if m is None:
        return None
    ev = _EVENT.match(text, m.end())
    if ev is None:
        return None
    head = text[:m.start()].split()
    if head and _CPU.fullmatch(head[-1]):
        head.pop()
    tid = None
    if head and (t := _TID.fullmatch(head[-1])) is not None:
        tid = int(t.group(1))
    return tid, int(m.group(1)) * 1_000_000_000 + _frac_ns(m.group(2)), ev.group(1), text[ev.end():]


def _other_sample(text: str) -> bool:
    """A sample of a counting event: ``COMM TID [CPU] TIME: PERIOD EVENT: ...``."""
    m = _TIME.search(text)
    return m is not None and _PERIOD_EVENT.match(text, m.end()) is not None


def read_perf_trace(path: str | os.PathLike[str]) -> PerfTrace:
    """Read ``perf script`` output of kvm:kvm_page_fault / kvm:kvm_exit (see the module docstring)."""
    name = os.fspath(path)
    events: list[tuple] = []  # (kind, line, tid, vcpu, time_ns, values...)
    skipped = 0
    for lineno, text in _read_lines(name):
        if not text.strip() or text.lstrip().startswith("#"):
            skipped += 1
            continue
        sample = _split_sample(text)
        if sample is None or sample[2] not in (PAGE_FAULT, EXIT):
            if PAGE_FAULT + ":" in text or EXIT + ":" in text:
                raise _fail(name, lineno, "a perf script line 'COMM TID [CPU] SECONDS.FRACTION: EVENT: PAYLOAD'", text)
            if sample is None and not _other_sample(text) and _CALLCHAIN.match(text) is None:
                raise _fail(name, lineno, "a perf script sample line 'COMM TID [CPU] SECONDS.FRACTION: EVENT: ...'",
                            text)
            skipped += 1
            continue
        tid, t, event, payload = sample
        out = _pairs(name, lineno, payload, event)
        vcpu = _num(name, lineno, out, "vcpu") if "vcpu" in out else None
        if event == PAGE_FAULT:
            events.append((PAGE_FAULT, lineno, tid, vcpu, t, _num(name, lineno, out, "address"),
                           _num(name, lineno, out, "error_code")))
        else:
            info = [_num(name, lineno, out, "info", i) for i in range(2)] if "info" in out else \
                [_num(name, lineno, out, k) if k in out else 0 for k in ("info1", "info2")]
            events.append((EXIT, lineno, tid, vcpu, t, " ".join(out["reason"]), _num(name, lineno, out, "rip"), *info))
    if not events:
        raise DesimInputError(f"{name}: expected {PAGE_FAULT} or {EXIT} lines (perf record -e {PAGE_FAULT} "
                              f"-e {EXIT}; perf script), got none")
    return _build(name, events, skipped)


def _build(name: str, events: list[tuple], skipped: int) -> PerfTrace:
    thread_vcpu: dict[int, int] = {}
    for _, _, tid, vcpu, *_ in events:
        if vcpu is not None and tid is not None:
            thread_vcpu.setdefault(tid, vcpu)
    used = {e[3] for e in events if e[3] is not None} | set(thread_vcpu.values())
    start = min(e[4] for e in events)
    rows: dict[tuple[str, int], list[tuple]] = {}
    for kind, lineno, tid, vcpu, t, *values in events:
        if vcpu is None:
            if tid is None:
                raise DesimInputError(f"{name}:{lineno}: expected 'vcpu N' in the payload or a thread id "
                                      "before [CPU] (perf script -F +tid) to tell vCPUs apart, got neither")
            if tid not in thread_vcpu:
                thread_vcpu[tid] = min(set(range(len(used) + 1)) - used)
                used.add(thread_vcpu[tid])
            vcpu = thread_vcpu[tid]
        if t - start > INT64_MAX:
            raise DesimInputError(f"{name}:{lineno}: expected a timestamp within 292 years of the first, "
                                  f"got {t / 1e9:.6f} s")
        rows.setdefault((kind, vcpu), []).append((t - start, *values))
    faults: dict[int, VcpuFaults] = {}
    exits: dict[int, VcpuExits] = {}
    for (kind, vcpu), r in sorted(rows.items(), key=lambda kv: kv[0][1]):
        r.sort(key=lambda row: row[0])  # stable: equal timestamps keep file order
        cols = list(zip(*r))
        times = _readonly(np.array(cols[0], dtype=np.int64))
        if kind == PAGE_FAULT:
            faults[vcpu] = VcpuFaults(times, _readonly(np.array(cols[1], dtype=np.uint64)),
                                      _readonly(np.array([a >> PAGE_SHIFT for a in cols[1]], dtype=np.int64)),
                                      _readonly(np.array(cols[2], dtype=np.uint64)))
        else:
            exits[vcpu] = VcpuExits(times, _readonly(np.array(cols[1], dtype=str)),
                                    *(_readonly(np.array(c, dtype=np.uint64)) for c in cols[2:5]))
    return PerfTrace(name, faults, exits, start, thread_vcpu, skipped)
