"""desim.traces.qemu: the shipped QEMU 7.2 traces, the kernel's classification, malformed input."""
from __future__ import annotations

from pathlib import Path

import pytest

from desim.errors import DesimInputError
from desim.memslot import MemslotOp, MrChange
from desim.traces import read_qemu_trace

TRACES = Path(__file__).resolve().parents[1] / "workloads" / "traces" / "qemu-7.2"

# Counted from the files, independently of the reader:
#   updates  = grep -c kvm_set_user_memory FILE           (no line has ret != 0: grep -v 'ret=0$')
#   deletes  = grep kvm_set_user_memory FILE | grep -c 'size=0x0 '
#   creates  = updates - deletes: an awk replay of Slot# ids found no size != 0 line for a slot
#              id that was still live, so there are no MOVE / FLAGS_ONLY updates
#   main/vcpu = grep kvm_set_user_memory FILE | cut -d@ -f1 | sort | uniq -c, where the main
#              thread is the thread of line 1 (kvm_slots_grow)
#   span_us  = last minus first kvm_set_user_memory timestamp (awk -F'[@:]')
# file: (updates, creates, deletes, main-thread updates, vCPU-thread updates, span_us)
EXPECTED = {
    "seabios-pc-6G.memslots.log": (38, 24, 14, 10, 28, 3_377_233),
    "seabios-pc-6G.full.log": (38, 24, 14, 10, 28, 3_377_233),
    "seabios-pc-32G.memslots.log": (38, 24, 14, 10, 28, 3_361_577),
    "seabios-q35-6G.memslots.log": (40, 25, 15, 12, 28, 4_343_829),
    "seabios-q35-32G.memslots.log": (40, 25, 15, 12, 28, 3_227_737),
    "ovmf-pc-6G.memslots.log": (11, 9, 2, 11, 0, 44_977),
    "ovmf-q35-6G.memslots.log": (13, 10, 3, 13, 0, 133_025),
    "ovmf-q35-32G.memslots.log": (13, 10, 3, 13, 0, 97_566),
}


def test_every_shipped_trace_is_tested():
    assert sorted(p.name for p in TRACES.glob("*.log")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_trace_counts(name):
    updates, creates, deletes, main, vcpu, span_us = EXPECTED[name]
    trace = read_qemu_trace(TRACES / name)
    s = trace.summary()
    assert (s.updates, s.creates, s.deletes, s.moves, s.flags_only) == (updates, creates, deletes, 0, 0)
    assert (s.failed, s.noops) == (0, 0)
    assert s.per_as == {0: {MrChange.CREATE: creates, MrChange.DELETE: deletes, MrChange.MOVE: 0,
                            MrChange.FLAGS_ONLY: 0}}
    assert (s.main_thread_updates, s.vcpu_thread_updates) == (main, vcpu)
    assert s.span_s == pytest.approx(span_us / 1e6, abs=1e-9)
    assert len(trace.records) == updates
    ops = trace.to_memslot_ops()
    assert len(ops) == updates
    assert ops[0].time_ns == 0
    assert ops[-1].time_ns == pytest.approx(span_us * 1000)
    assert all(a.time_ns <= b.time_ns for a, b in zip(ops, ops[1:]))


def test_seabios_pc_6g_matches_its_readme():
    # qemu-7.2/README.md: "a SeaBIOS boot (pc machine, 6G): 38 updates, 14 of them deletions"
    ops = read_qemu_trace(TRACES / "seabios-pc-6G.memslots.log").to_memslot_ops()
    assert len(ops) == 38
    assert sum(op.op is MrChange.DELETE for op in ops) == 14


def test_full_log_gives_the_same_ops_as_the_filtered_log():
    full = read_qemu_trace(TRACES / "seabios-pc-6G.full.log")
    filtered = read_qemu_trace(TRACES / "seabios-pc-6G.memslots.log")
    for timing in ("scaled", "ordered"):
        assert full.to_memslot_ops(timing) == filtered.to_memslot_ops(timing)
    assert full.main_thread == filtered.main_thread == 8194


def test_seabios_pc_6g_first_ops():
    ops = read_qemu_trace(TRACES / "seabios-pc-6G.memslots.log").to_memslot_ops()
    # lines 2-6: RAM below/above 4G, the BIOS ROM, then low RAM is deleted and re-created smaller
    assert ops[0] == MemslotOp(0.0, MrChange.CREATE, 0, 0x0, 0xC0000000, 0x0, 0x7F4F47E00000)
    assert ops[2] == MemslotOp(9_705_000.0, MrChange.CREATE, 2, 0xFFFC0000, 0x40000, 0x2, 0x7F50E4400000)
    assert ops[3] == MemslotOp(13_166_000.0, MrChange.DELETE, 0, 0x0, 0xC0000000, 0x0, 0x7F4F47E00000)
    assert ops[4] == MemslotOp(13_238_000.0, MrChange.CREATE, 0, 0x0, 0xC0000, 0x0, 0x7F4F47E00000)


def test_ordered_and_scaled_timing():
    trace = read_qemu_trace(TRACES / "ovmf-pc-6G.memslots.log")
    assert [op.time_ns for op in trace.to_memslot_ops("ordered", gap_ns=500)] == [i * 500.0 for i in range(11)]
    real = trace.to_memslot_ops()
    half = trace.to_memslot_ops(scale=0.5)
    assert [h.time_ns for h in half] == pytest.approx([r.time_ns / 2 for r in real])
    assert [(h.op, h.slot, h.gpa) for h in half] == [(r.op, r.slot, r.gpa) for r in real]


@pytest.mark.parametrize("kwargs", [dict(timing="fast"), dict(gap_ns=-1), dict(scale=0), dict(scale=float("nan")),
                                    dict(gap_ns="1")])
def test_bad_timing_arguments(kwargs):
    with pytest.raises(DesimInputError, match="expected"):
        read_qemu_trace(TRACES / "ovmf-pc-6G.memslots.log").to_memslot_ops(**kwargs)


# ---- synthetic traces -------------------------------------------------------------------------

def write(tmp_path: Path, *lines: str | bytes) -> Path:
    p = tmp_path / "t.log"
    p.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return p


def mem(slot: str, flags: int, gpa: int, size: int, ua: int, ret: int = 0, t: str = "1.000000", tid: int = 7) -> str:
    return f"{tid}@{t}:kvm_set_user_memory Slot#{slot} flags=0x{flags:x} gpa=0x{gpa:x} size=0x{size:x} ua=0x{ua:x} ret={ret}"


def test_move_flags_only_noop_and_stale_delete_gpa(tmp_path):
    p = write(tmp_path,
              "7@1.000000:kvm_slots_grow 0 -> 16",
              mem("3", 0, 0xC0000, 0x10000, 0x7000000, t="1.000000"),
              mem("3", 0, 0xD0000, 0x10000, 0x7000000, t="1.000010"),   # MOVE
              mem("3", 1, 0xD0000, 0x10000, 0x7000000, t="1.000020", tid=9),   # FLAGS_ONLY (dirty logging on)
              mem("3", 1, 0xD0000, 0x10000, 0x7000000, t="1.000030"),   # no-op
              mem("3", 0, 0x0, 0x0, 0x7000000, t="1.000040"))           # DELETE, stale gpa in the line
    trace = read_qemu_trace(p)
    assert trace.to_memslot_ops() == [
        MemslotOp(0.0, MrChange.CREATE, 3, 0xC0000, 0x10000, 0, 0x7000000),
        MemslotOp(10_000.0, MrChange.MOVE, 3, 0xD0000, 0x10000, 0, 0x7000000),
        MemslotOp(20_000.0, MrChange.FLAGS_ONLY, 3, 0xD0000, 0x10000, 1, 0x7000000),
        MemslotOp(40_000.0, MrChange.DELETE, 3, 0xD0000, 0x10000, 1, 0x7000000),
    ]
    s = trace.summary()
    assert (s.creates, s.moves, s.flags_only, s.deletes, s.noops) == (1, 1, 1, 1, 1)
    assert (s.main_thread, s.main_thread_updates, s.vcpu_thread_updates) == (7, 3, 1)


def test_failed_ioctls_are_skipped_and_counted(tmp_path):
    p = write(tmp_path,
              mem("0", 0, 0x0, 0xA0000, 0x7000000),
              mem("1", 0, 0x0, 0x1000, 0x8000000, ret=-17),   # -EEXIST: overlaps slot 0
              mem("5", 0, 0x0, 0x0, 0x8000000, ret=-22))      # -EINVAL: deletes a slot that does not exist
    trace = read_qemu_trace(p)
    assert trace.failed == 2
    assert [r.ret for r in trace.records] == [0, -17, -22]
    assert trace.to_memslot_ops() == [MemslotOp(0.0, MrChange.CREATE, 0, 0x0, 0xA0000, 0, 0x7000000)]


def test_address_spaces_and_newer_qemu_format(tmp_path):
    p = write(tmp_path,
              mem("65537", 0, 0x0, 0x1000, 0x7000000),    # QEMU 7.2: as_id 1 (SMM), slot 1
              "8@1.5:kvm_set_user_memory AddrSpace#0 Slot#1 flags=0x0 gpa=0x0 size=0x2000 ua=0x7001000 "
              "guest_memfd=-1 guest_memfd_offset=0x0 ret=0")
    trace = read_qemu_trace(p)
    assert [(r.as_id, r.slot, r.slot_id) for r in trace.records] == [(1, 1, 65537), (0, 1, 1)]
    assert trace.summary().per_as == {1: {MrChange.CREATE: 1, MrChange.DELETE: 0, MrChange.MOVE: 0,
                                          MrChange.FLAGS_ONLY: 0},
                                      0: {MrChange.CREATE: 1, MrChange.DELETE: 0, MrChange.MOVE: 0,
                                          MrChange.FLAGS_ONLY: 0}}
    assert trace.to_memslot_ops()[1].time_ns == 500_000_000.0


def test_lines_without_timestamps(tmp_path):
    p = write(tmp_path, "kvm_slots_grow 0 -> 16",
              "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 ua=0x7000000 ret=0",
              "kvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x0 ua=0x7000000 ret=0")
    trace = read_qemu_trace(p)
    assert [op.time_ns for op in trace.to_memslot_ops("ordered", gap_ns=10)] == [0.0, 10.0]
    assert trace.summary().main_thread is None and trace.summary().span_s is None
    with pytest.raises(DesimInputError, match=r"t\.log: expected THREADID@SECONDS: timestamps"):
        trace.to_memslot_ops("scaled")


GOOD = mem("0", 0, 0x0, 0x1000, 0x7000000)


@pytest.mark.parametrize("bad, lineno, message", [
    (GOOD.replace("size=0x1000", "size=0xzz"), 2, r"expected 'size=0x<hex>' in kvm_set_user_memory line, got 'size=0xzz'"),
    (GOOD.replace("gpa=0x0", "gpa=12"), 2, r"expected 'gpa=0x<hex>'.*got 'gpa=12'"),
    (GOOD.replace(" ua=0x7000000", ""), 2, r"expected a 'ua=' field"),
    (GOOD[:60], 2, r"expected 'key=value' fields.*got 'size'"),       # truncated line
    (GOOD[:GOOD.index("ua=") + 3], 2, r"expected a 'ret=' field.*got 'Slot#0 "),   # truncated after 'ua='
    (GOOD.replace("ua=0x7000000", "ua="), 2, r"expected 'ua=0x<hex>'.*got 'ua='"),
    (GOOD[:GOOD.index(" ua=")], 2, r"expected a 'ua=' field"),
    (GOOD.replace("ret=0", "ret="), 2, r"expected 'ret=<decimal>'"),
    (GOOD.replace("Slot#0", "Slot#x"), 2, r"expected 'Slot#<n>'"),
    (GOOD.replace("Slot#0 ", ""), 2, r"expected 'Slot#<n>'"),
    (GOOD + " ret=0", 2, r"expected 'key=value' fields, each once"),
    (GOOD.replace("flags=0x0", "flags"), 2, r"expected 'key=value' fields.*got 'flags'"),
    (b"\xff\xfe\x00garbage", 2, r"expected UTF-8 text, got byte 0xff at column 1"),
    ("\x00\x01\x02 binary", 2, r"expected a trace-event line"),
    ("7@1.0 kvm_set_user_memory", 2, r"expected a trace-event line"),
    ("kvm_set_user_memory Slot#1 flags=0x0 gpa=0x0 size=0x0 ua=0x0 ret=0", 2, r"expected the THREADID@SECONDS: prefix"),
    (mem("4", 0, 0x0, 0x0, 0x0), 2, r"expected size=0x0 to delete a live slot, but slot 4 was never created"),
    (mem("1", 0, 0x0, 0x1000, 0x8000000), 2, r"expected slot 1 not to overlap live slot 0"),
    (mem("0", 0, 0x0, 0x2000, 0x7000000), 2, r"expected a MOVE or FLAGS_ONLY of live slot 0 \(same size"),
    (mem("0", 2, 0x0, 0x1000, 0x7000000), 2, r"expected a MOVE or FLAGS_ONLY"),   # READONLY toggled in place
    (mem("1", 0, 0x100800, 0x1000, 0x7000000), 2, r"expected a region KVM accepts.*page-aligned"),
    (mem("1", 0x8, 0x100000, 0x1000, 0x7000000), 2, r"expected a region KVM accepts.*flags within 0x7"),
    (mem("131073", 0, 0x100000, 0x1000, 0x7000000), 2, r"expected a region KVM accepts.*address space < 2"),
    (GOOD.replace("gpa=0x0", "gpa=0x1" + "0" * 17), 2, r"expected 'gpa=0x<hex>'"),   # > 64 bits
])
def test_malformed_lines(tmp_path, bad, lineno, message):
    p = write(tmp_path, GOOD, bad, mem("9", 0, 0x200000, 0x1000, 0x9000000))
    with pytest.raises(DesimInputError, match=rf"^{p}:{lineno}: " + message):
        read_qemu_trace(p)


def test_no_memslot_lines(tmp_path):
    p = write(tmp_path, "7@1.000000:kvm_slots_grow 0 -> 16", "7@1.000000:kvm_vm_ioctl type 0xae03, arg 0x9")
    with pytest.raises(DesimInputError, match=rf"^{p}: expected kvm_set_user_memory lines"):
        read_qemu_trace(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.log"
    p.write_bytes(b"")
    with pytest.raises(DesimInputError, match=rf"^{p}: expected kvm_set_user_memory lines"):
        read_qemu_trace(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DesimInputError, match=rf"^{tmp_path}/nope\.log: cannot read trace file"):
        read_qemu_trace(tmp_path / "nope.log")
    with pytest.raises(DesimInputError, match=rf"^{tmp_path}: cannot read trace file"):
        read_qemu_trace(tmp_path)
