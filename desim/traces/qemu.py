"""Reader for QEMU trace-event logs of memslot updates (``kvm_set_user_memory``).

QEMU logs one ``kvm_set_user_memory`` trace event per ``KVM_SET_USER_MEMORY_REGION``
ioctl when run with ``-trace kvm_set_user_memory -D FILE``. The event is defined
in QEMU's ``accel/kvm/trace-events``; its text form differs by version:

* QEMU 7.2 (the traces in ``workloads/traces/qemu-7.2/``) and older releases::

    kvm_set_user_memory Slot#%d flags=0x%x gpa=0x%"PRIx64 " size=0x%"PRIx64 " ua=0x%"PRIx64 " ret=%d"

  where ``Slot#`` is the ioctl's slot field, ``id | as_id << 16``.
* Current QEMU (with guest_memfd support) prints the address space separately
  and adds guest_memfd fields, which are ignored here::

    kvm_set_user_memory AddrSpace#%d Slot#%d flags=0x%x gpa=0x%"PRIx64 " size=0x%"PRIx64 "
        ua=0x%"PRIx64 " guest_memfd=%d guest_memfd_offset=0x%"PRIx64 " ret=%d"

QEMU's ``log`` trace backend prefixes every line with ``THREADID@SECONDS.USECS:``
when run with ``-msg timestamp=on``, and prints no prefix otherwise; both are
read. Lines of other events (``kvm_slots_grow``, ``kvm_vm_ioctl``, ...) and blank
lines are skipped; a line that is not ``[PREFIX]event_name [args]`` at all is an
error. Fields of a ``kvm_set_user_memory`` line may come in any order; unknown
``key=value`` fields are ignored, missing or malformed ones are errors.

:func:`read_qemu_trace` returns a :class:`QemuTrace`: the raw records and the
kernel's view of them, classified as ``kvm_set_memory_region``
(virt/kvm/kvm_main.c) does. ``size=0`` is a DELETE, described by the deleted
slot's previous gpa/size/flags/ua (the line's own gpa may be stale); an absent
slot id is a CREATE; a live one with another gpa is a MOVE, with other flags a
FLAGS_ONLY; a line identical to the live slot is a no-op (counted, no op).
Records with ``ret != 0`` are failed ioctls and are skipped (counted in
``failed``). A successful line the kernel could not have accepted (deleting a
slot that does not exist, overlapping a live slot, changing a live slot's size,
ua or READONLY flag, unaligned addresses) is an error: the trace is inconsistent.

Timing (:meth:`QemuTrace.to_memslot_ops`): ``"scaled"`` keeps the recorded
timestamps relative to the first update (optionally multiplied by ``scale``);
``"ordered"`` keeps only the order, update ``i`` at ``i * gap_ns``.

Thread ids: QEMU's main thread is the thread of the first prefixed line of the
file, whatever its event. The main thread creates the VM and lays out guest RAM
before it starts any vCPU thread, so it always comes first; the majority rule
would be wrong (in a SeaBIOS boot a vCPU thread makes 28 of the 38 updates).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from desim.errors import DesimInputError
from desim.inputfiles import MAX_TRACE_BYTES, open_input
from desim.limits import KVM_ADDRESS_SPACE_NUM, KVM_MEM_MAX_NR_PAGES
from desim.memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, PAGE_SIZE, MrChange, MemslotOp

EVENT = "kvm_set_user_memory"
KVM_MEM_GUEST_MEMFD = 1 << 2  # include/uapi/linux/kvm.h
KVM_VALID_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

Timing = Literal["scaled", "ordered"]

_PREFIX = re.compile(r"(\d{1,10})@(\d{1,12})\.(\d{1,9}):", re.ASCII)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEX = {True: re.compile(r"0x([0-9a-fA-F]{1,32})"), False: re.compile(r"(?:0x)?([0-9a-fA-F]{1,32})")}
_DEC = re.compile(r"-?[0-9]{1,20}")


# ---- helpers shared with perf.py -------------------------------------------------------------

def _shown(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _fail(path: str, lineno: int, what: str, got: str) -> DesimInputError:
    return DesimInputError(f"{path}:{lineno}: expected {what}, got {_shown(got)}")


def _read_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each line of a UTF-8 text file, line ends removed."""
    name = os.fspath(path)
    try:
        with open_input(name, "trace file", MAX_TRACE_BYTES) as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DesimInputError(
                        f"{name}:{lineno}: expected UTF-8 text, got byte 0x{raw[e.start]:02x} "
                        f"at column {e.start + 1}") from None
                yield lineno, text.rstrip("\r\n")
    except OSError as e:
        raise DesimInputError(f"{name}: cannot read trace file: {e.strerror or e}") from None


def _hex(path: str, lineno: int, text: str, what: str, *, prefix: bool = True, limit: int = U64_MAX,
         got: str | None = None) -> int:
    """``text`` as a hex number (``0x`` required if ``prefix``) up to ``limit``; errors show ``got``."""
    m = _HEX[prefix].fullmatch(text)
    if m is None or int(m.group(1), 16) > limit:
        raise _fail(path, lineno, what, text if got is None else got)
    return int(m.group(1), 16)


def _dec(path: str, lineno: int, text: str, what: str, *, lo: int, hi: int, got: str | None = None) -> int:
    """``text`` as a decimal integer in ``[lo, hi]``; errors show ``got``."""
    if _DEC.fullmatch(text) is None or not lo <= int(text) <= hi:
        raise _fail(path, lineno, what, text if got is None else got)
    return int(text)


def _frac_ns(frac: str) -> int:
    return int(frac[:9].ljust(9, "0"))


# ---- records ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class QemuMemRecord:
    """One ``kvm_set_user_memory`` line, as printed (``time_ns`` is absolute epoch time)."""

    line: int
    thread: int | None
    time_ns: int | None
    as_id: int
    slot: int  # the id within the address space (low 16 bits of the ioctl's slot)
    flags: int
    gpa: int
    size: int
    ua: int
    ret: int

    @property
    def slot_id(self) -> int:
        """The ioctl's slot field, ``as_id << 16 | slot`` (what :class:`MemslotOp` carries)."""
        return self.as_id << 16 | self.slot

    @property
    def time_s(self) -> float | None:
        return None if self.time_ns is None else self.time_ns / 1e9


@dataclass(frozen=True, slots=True)
class QemuUpdate:
    """A successful record as the kernel sees it; for DELETE, gpa..ua describe the deleted slot."""

    record: QemuMemRecord
    op: MrChange
    gpa: int
    size: int
    flags: int
    ua: int


@dataclass(frozen=True, slots=True)
class QemuTraceSummary:
    updates: int
    creates: int
    deletes: int
    moves: int
    flags_only: int
    failed: int  # records with ret != 0, skipped
    noops: int  # successful records that changed nothing
    per_as: dict[int, dict[MrChange, int]]
    span_s: float | None  # first to last update; None without timestamps
    main_thread: int | None
    main_thread_updates: int | None
    vcpu_thread_updates: int | None


@dataclass(frozen=True)
class QemuTrace:
    path: str
    records: tuple[QemuMemRecord, ...]  # every kvm_set_user_memory line, failed ones included
    updates: tuple[QemuUpdate, ...]  # successful, state-changing, in file order
    noops: int
    main_thread: int | None

    @property
    def failed(self) -> int:
        return sum(1 for r in self.records if r.ret != 0)

    def to_memslot_ops(self, timing: Timing = "scaled", *, gap_ns: float = 1e6,
                       scale: float = 1.0) -> list[MemslotOp]:
        """The updates as :class:`MemslotOp`, the first one at ``time_ns=0``.

        ``timing="scaled"``: the trace's own timestamps, ``scale * (t - t_first)``
        (``scale=0.5`` replays twice as fast); needs the ``THREADID@SECONDS:``
        prefix. A timestamp earlier than the previous update's (a host clock
        step) is clamped to it, so ops stay in trace order.
        ``timing="ordered"``: only the order is kept, op ``i`` at ``i * gap_ns``.
        """
        if timing not in ("scaled", "ordered"):
            raise DesimInputError(f"timing: expected 'scaled' or 'ordered', got {timing!r}")
        for name, value, lo_ok in (("gap_ns", gap_ns, True), ("scale", scale, False)):
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < 0 or (value == 0 and not lo_ok)):
                raise DesimInputError(f"{name}: expected a finite number {'>=' if lo_ok else '>'} 0, got {value!r}")
        if timing == "scaled" and self.updates and self.updates[0].record.time_ns is None:
            raise DesimInputError(f"{self.path}: expected THREADID@SECONDS: timestamps for timing='scaled' "
                                  "(record with -msg timestamp=on), got none; use timing='ordered'")
        ops: list[MemslotOp] = []
        last = 0.0
        for i, u in enumerate(self.updates):
            if timing == "ordered":
                t = i * float(gap_ns)
            else:
                t = last = max(last, (u.record.time_ns - self.updates[0].record.time_ns) * float(scale))
            ops.append(MemslotOp(t, u.op, u.record.slot_id, u.gpa, u.size, u.flags, u.ua))
        return ops

    def summary(self) -> QemuTraceSummary:
        per_as: dict[int, dict[MrChange, int]] = {}
        for u in self.updates:
            per_as.setdefault(u.record.as_id, dict.fromkeys(MrChange, 0))[u.op] += 1
        count = {op: sum(d[op] for d in per_as.values()) for op in MrChange}
        times = [u.record.time_ns for u in self.updates if u.record.time_ns is not None]
        main = vcpu = None
        if self.main_thread is not None:
            main = sum(1 for u in self.updates if u.record.thread == self.main_thread)
            vcpu = len(self.updates) - main
        return QemuTraceSummary(
            updates=len(self.updates), creates=count[MrChange.CREATE], deletes=count[MrChange.DELETE],
            moves=count[MrChange.MOVE], flags_only=count[MrChange.FLAGS_ONLY], failed=self.failed,
            noops=self.noops, per_as=per_as,
            span_s=(times[-1] - times[0]) / 1e9 if len(times) == len(self.updates) and times else None,
            main_thread=self.main_thread, main_thread_updates=main, vcpu_thread_updates=vcpu)


# ---- parsing ---------------------------------------------------------------------------------

def _parse_record(path: str, lineno: int, thread: int | None, time_ns: int | None,
                  payload: str) -> QemuMemRecord:
    toks = payload.split()
    i, as_id = 0, None
    if toks and toks[0].startswith("AddrSpace#"):
        as_id = _dec(path, lineno, toks[0][10:], "'AddrSpace#<n>' in kvm_set_user_memory line", lo=0, hi=0xFFFF)
        i = 1
    tok = toks[i] if i < len(toks) else ""
    if not tok.startswith("Slot#"):
        raise _fail(path, lineno, "'Slot#<n>' in kvm_set_user_memory line", tok or payload.strip())
    raw_slot = _dec(path, lineno, tok[5:], "'Slot#<n>' in kvm_set_user_memory line",
                    lo=0, hi=U32_MAX if as_id is None else 0xFFFF)
    fields: dict[str, str] = {}
    for tok in toks[i + 1:]:
        key, sep, value = tok.partition("=")
        if not sep or not key or key in fields:
            raise _fail(path, lineno, "'key=value' fields, each once, after Slot# in kvm_set_user_memory line", tok)
        fields[key] = value
    for key in ("flags", "gpa", "size", "ua", "ret"):
        if key not in fields:
            raise _fail(path, lineno, f"a '{key}=' field in kvm_set_user_memory line", payload.strip())

    ret = _dec(path, lineno, fields["ret"], "'ret=<decimal>' in kvm_set_user_memory line",
               lo=-(1 << 31), hi=U32_MAX, got="ret=" + fields["ret"])
    values = {key: _hex(path, lineno, fields[key], f"'{key}=0x<hex>' in kvm_set_user_memory line",
                        limit=U32_MAX if key == "flags" else U64_MAX, got=f"{key}={fields[key]}")
              for key in ("flags", "gpa", "size", "ua")}
    if as_id is None:
        as_id, slot = raw_slot >> 16, raw_slot & 0xFFFF
    else:
        slot = raw_slot
    return QemuMemRecord(lineno, thread, time_ns, as_id, slot, ret=ret, **values)


def _classify(path: str, records: list[QemuMemRecord]) -> tuple[list[QemuUpdate], int]:
    """Replay the records through ``kvm_set_memory_region``'s checks and classification."""
    live: dict[int, QemuMemRecord] = {}
    updates: list[QemuUpdate] = []
    noops = 0
    for r in records:
        if r.ret != 0:
            continue
        where = f"{path}:{r.line}"
        got = f"Slot#{r.slot_id} flags=0x{r.flags:x} gpa=0x{r.gpa:x} size=0x{r.size:x} ua=0x{r.ua:x} ret=0"
        if ((r.gpa | r.size | r.ua) % PAGE_SIZE or r.gpa + r.size > U64_MAX
                or r.size // PAGE_SIZE > KVM_MEM_MAX_NR_PAGES or r.flags & ~KVM_VALID_FLAGS
                or r.as_id >= KVM_ADDRESS_SPACE_NUM):
            raise DesimInputError(
                f"{where}: expected a region KVM accepts since ret=0 (page-aligned gpa/size/ua, at most "
                f"2^31-1 pages, flags within 0x{KVM_VALID_FLAGS:x}, address space < {KVM_ADDRESS_SPACE_NUM}), "
                f"got {_shown(got)}")
        old = live.get(r.slot_id)
        if r.size == 0:
            if old is None:
                raise DesimInputError(f"{where}: expected size=0x0 to delete a live slot, but slot "
                                      f"{r.slot_id} was never created or is already deleted, got {_shown(got)}")
            del live[r.slot_id]
            updates.append(QemuUpdate(r, MrChange.DELETE, old.gpa, old.size, old.flags, old.ua))
            continue
        if old is not None:
            if r.size != old.size or r.ua != old.ua or (r.flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD):
                raise DesimInputError(
                    f"{where}: expected a MOVE or FLAGS_ONLY of live slot {r.slot_id} (same size, ua and READONLY "
                    f"flag as on line {old.line}; a change needs a delete first), got {_shown(got)}")
            if r.gpa == old.gpa:
                live[r.slot_id] = r
                if r.flags == old.flags:
                    noops += 1
                else:
                    updates.append(QemuUpdate(r, MrChange.FLAGS_ONLY, r.gpa, r.size, r.flags, r.ua))
                continue
        for o in live.values():
            if o.as_id == r.as_id and o.slot_id != r.slot_id and r.gpa < o.gpa + o.size and o.gpa < r.gpa + r.size:
                raise DesimInputError(
                    f"{where}: expected slot {r.slot_id} not to overlap live slot {o.slot_id} "
                    f"(gpa=0x{o.gpa:x} size=0x{o.size:x}, line {o.line}), got {_shown(got)}")
        live[r.slot_id] = r
        updates.append(QemuUpdate(r, MrChange.CREATE if old is None else MrChange.MOVE, r.gpa, r.size, r.flags, r.ua))
    return updates, noops


def read_qemu_trace(path: str | os.PathLike[str]) -> QemuTrace:
    """Read a QEMU ``-trace kvm_set_user_memory`` log (see the module docstring)."""
    name = os.fspath(path)
    records: list[QemuMemRecord] = []
    main_thread: int | None = None
    prefixed: bool | None = None  # whether kvm_set_user_memory lines carry the prefix
    for lineno, text in _read_lines(name):
        line = text.strip()
        if not line:
            continue
        m = _PREFIX.match(line)
        thread = time_ns = None
        if m:
            thread, time_ns = int(m.group(1)), int(m.group(2)) * 1_000_000_000 + _frac_ns(m.group(3))
            line = line[m.end():]
            if main_thread is None:
                main_thread = thread
        ev = _NAME.match(line)
        if ev is None or (ev.end() < len(line) and not line[ev.end()].isspace()):
            raise _fail(name, lineno, "a trace-event line 'THREADID@SECONDS:event args' or 'event args'", text)
        if ev.group() != EVENT:
            continue
        if prefixed is None:
            prefixed = m is not None
        elif prefixed != (m is not None):
            raise _fail(name, lineno, "the THREADID@SECONDS: prefix on all kvm_set_user_memory lines or none", text)
        records.append(_parse_record(name, lineno, thread, time_ns, line[ev.end():]))
    if not records:
        raise DesimInputError(f"{name}: expected kvm_set_user_memory lines (record with "
                              "-trace kvm_set_user_memory -msg timestamp=on -D FILE), got none")
    updates, noops = _classify(name, records)
    return QemuTrace(name, tuple(records), tuple(updates), noops, main_thread)
