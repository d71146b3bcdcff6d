"""desim.traces.perf: the perf script fixtures, vCPU attribution, malformed input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from desim.errors import DesimInputError
from desim.traces import read_perf_trace

FIXTURES = Path(__file__).resolve().parents[1] / "workloads" / "traces" / "perf"

# Counted from the files, independently of the reader:
#   faults / exits per vCPU: grep 'kvm:kvm_page_fault: vcpu N ' / grep 'kvm:kvm_exit: vcpu N ' (payload
#     vcpu), or for lines without it: grep the event | awk '{print $2}' | uniq -c (thread ids)
#   exit reasons: grep kvm:kvm_exit: | grep -o 'reason [A-Z_]*' | sort | uniq -c, per vCPU
#   skipped: grep -vc -e 'kvm:kvm_page_fault:' -e 'kvm:kvm_exit:' (kvm_entry and '#' lines)
# file: (faults per vCPU, exit reasons per vCPU, thread -> vCPU, skipped lines)
EXPECTED = {
    "kvm-6.x.perf.txt": (
        {0: 6, 1: 4},
        {0: {"EPT_VIOLATION": 6, "EXTERNAL_INTERRUPT": 2, "HLT": 1}, 1: {"EPT_VIOLATION": 4, "MSR_WRITE": 1}},
        {12350: 0, 12351: 1}, 14),
    "kvm-6.x-shadow.perf.txt": (
        {0: 3, 1: 3}, {0: {"EXCEPTION_NMI": 3}, 1: {"EXCEPTION_NMI": 3}}, {9031: 0, 9032: 1}, 0),
    "kvm-5.x.perf.txt": (
        {0: 1, 5: 4},
        {0: {"EPT_VIOLATION": 1, "EXTERNAL_INTERRUPT": 1, "IO_INSTRUCTION": 1}, 5: {"EPT_VIOLATION": 4}},
        {4136: 0, 4145: 5}, 5),
    "kvm-old.perf.txt": (
        {0: 2, 1: 2, 2: 1},
        {0: {"EPT_VIOLATION": 2, "HLT": 1}, 1: {"EPT_VIOLATION": 2}, 2: {"EPT_VIOLATION": 1}},
        {2714: 0, 2712: 1, 2713: 2}, 0),
}


def test_every_fixture_is_tested():
    assert sorted(p.name for p in FIXTURES.glob("*.txt")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_counts(name):
    faults, exits, threads, skipped = EXPECTED[name]
    trace = read_perf_trace(FIXTURES / name)
    assert trace.fault_counts() == faults
    assert trace.exit_counts() == exits
    assert trace.thread_vcpu == threads
    assert trace.skipped == skipped
    streams = trace.to_access_streams()
    assert {v: len(s) for v, s in streams.items()} == faults
    first = min(int(a.times_ns[0]) for a in [*trace.faults.values(), *trace.exits.values()])
    assert first == 0
    for f in trace.faults.values():
        assert f.times_ns.dtype == np.int64 and f.gfn.dtype == np.int64
        assert f.address.dtype == np.uint64 and f.error_code.dtype == np.uint64
        assert np.all(np.diff(f.times_ns) >= 0)
        assert np.array_equal(f.gfn, (f.address >> np.uint64(12)).astype(np.int64))


def test_recent_format_values():
    trace = read_perf_trace(FIXTURES / "kvm-6.x.perf.txt")
    assert trace.start_ns == 812_345_678_000  # line 1: 812.345678
    s = trace.to_access_streams()
    # kvm_page_fault 'address' of vcpu 0, >> 12, in file order
    assert s[0].tolist() == [0x100A3C, 0x100A3D, 0xFEE00, 0x100A3C, 0x1000000, 0x100A3E]
    assert s[1].tolist() == [0x113674, 0x113600, 0x113810, 0x111400]
    f0 = trace.faults[0]
    assert f0.times_ns.tolist() == [3_000, 145_000, 355_000, 494_000, 636_000, 914_000]
    assert f0.error_code.tolist() == [0x181, 0x181, 0x182, 0x181, 0x184, 0x183]
    assert f0.address[0] == 0x100A3C040
    e0 = trace.exits[0]
    assert e0.reason[0] == "EPT_VIOLATION" and e0.info1[0] == 0x181 and e0.rip[0] == 0xFFFFFFFF81E0A8F5
    s[0][0] = -1  # the streams are copies; the trace's arrays are read-only
    assert trace.faults[0].gfn[0] == 0x100A3C
    with pytest.raises(ValueError):
        trace.faults[0].gfn[0] = 0


def test_shadow_paging_addresses_above_2_63():
    f0 = read_perf_trace(FIXTURES / "kvm-6.x-shadow.perf.txt").faults[0]
    assert f0.address.tolist() == [0xFFFFFFFF81000000, 0xFFFF888000100000, 0xFFFFFFFF81000000]
    assert f0.gfn.tolist() == [0xFFFFFFFF81000, 0xFFFF888000100, 0xFFFFFFFF81000]
    assert f0.error_code.tolist() == [0x10, 0x2, 0x10]


def test_old_formats():
    old = read_perf_trace(FIXTURES / "kvm-old.perf.txt")
    assert old.to_access_streams()[0].tolist() == [0x7FFDF, 0x7FFDF]   # tid 2714, first to appear
    assert old.exits[0].info1.tolist() == [0x181, 0, 0x182]            # 'info 181 0'
    mid = read_perf_trace(FIXTURES / "kvm-5.x.perf.txt")
    assert mid.to_access_streams()[5].tolist() == [0x113600, 0xFEE00, 0x113810, 0x113A00]
    assert mid.faults[5].error_code.tolist() == [0x181, 0x182, 0x181, 0x181]


# ---- synthetic --------------------------------------------------------------------------------

def write(tmp_path: Path, *lines: str | bytes) -> Path:
    p = tmp_path / "t.perf.txt"
    p.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return p


PF = (" qemu-system-x86   12345/12350   [003]   100.000001: kvm:kvm_page_fault: "
      "vcpu 0 rip 0xffffffff81000000 address 0x0000000012345000 error_code 0x181")
EXIT = (" qemu-system-x86   12345/12350   [003]   100.000000:       kvm:kvm_exit: "
        "vcpu 0 reason EPT_VIOLATION rip 0xffffffff81000000 info1 0x0000000000000181 info2 0x0000000000000000 "
        "intr_info 0x00000000 error_code 0x00000000")


def test_out_of_order_lines_are_sorted_per_vcpu(tmp_path):
    p = write(tmp_path,
              PF.replace("100.000001", "100.000009").replace("12345000", "00002000"),
              PF, EXIT,
              PF.replace("100.000001", "100.000001").replace("12345000", "00003000"))  # same time: file order
    f = read_perf_trace(p).faults[0]
    assert f.times_ns.tolist() == [1_000, 1_000, 9_000]
    assert f.gfn.tolist() == [0x12345, 0x3, 0x2]


def test_multiword_and_svm_exit_reasons(tmp_path):
    p = write(tmp_path,
              EXIT.replace("EPT_VIOLATION", "INVALID_STATE FAILED_VMENTRY"),
              EXIT.replace("EPT_VIOLATION", "npf").replace("info2 0x0000000000000000", "info2 0x00000000fee000b0"),
              "             perf 12345/12345 [000]   100.000100: sched:sched_switch: prev_comm=perf prev_pid=1",
              "\t    ffffffff8106a1c5 native_write_msr+0x5 ([kernel.kallsyms])",
              "  qemu 123 [001] 100.000200:    1315219 cycles:P:  ffffffff9c797b2e audit_filter_syscall+0x9e",
              "")
    trace = read_perf_trace(p)
    assert trace.exits[0].reason.tolist() == ["INVALID_STATE FAILED_VMENTRY", "npf"]
    assert trace.exits[0].info2.tolist() == [0, 0xFEE000B0]
    assert trace.faults == {} and trace.to_access_streams() == {}
    assert trace.skipped == 4


def test_tid_only_and_no_comm(tmp_path):
    p = write(tmp_path, "   4145 [002]    86.581904: kvm:kvm_page_fault: address 113600002 error_code 181",
              "       CPU 5/KVM    4146 [002]    86.581905: kvm:kvm_page_fault: address 2000 error_code 181")
    trace = read_perf_trace(p)
    assert trace.thread_vcpu == {4145: 0, 4146: 1}
    assert trace.fault_counts() == {0: 1, 1: 1}


@pytest.mark.parametrize("bad, message", [
    (PF.replace("0x0000000012345000", "0x00000000123zz000"), r"expected 'address <hex>', got '0x00000000123zz000'"),
    (PF.replace(" error_code 0x181", ""), r"expected 'error_code' in kvm_page_fault fields"),
    (PF[:PF.index("address") + 7], r"expected one value after 'address' in kvm_page_fault line, got 'address'"),
    (PF[:40], r"expected a perf script sample line"),                                    # truncated
    (PF[:PF.index("kvm:kvm_page_fault") + 10], r"expected a perf script sample line"),   # truncated in the name
    (PF.replace("vcpu 0", "vcpu x"), r"expected 'vcpu <decimal>', got 'x'"),
    (PF.replace("vcpu 0", "cpu 0"), r"expected kvm_page_fault fields .*got 'cpu'"),
    (PF.replace("address", "address address"), r"expected one value after 'address'"),
    (PF.replace("   100.000001:", "   100.000001"), r"expected a perf script line 'COMM TID \[CPU\]"),
    (EXIT.replace(" rip 0xffffffff81000000", ""), r"expected 'rip' in kvm_exit fields"),
    (EXIT.replace("info1 0x0000000000000181", "info1"), r"expected one value after 'info1'"),
    (EXIT.replace("reason EPT_VIOLATION ", "reason "), r"expected a name after 'reason'"),
    (EXIT.replace("info1 0x0000000000000181 info2 0x0000000000000000", "info 181"), r"expected two values after 'info'"),
    (EXIT.replace("info1 0x0000000000000181 info2 0x0000000000000000", "info 181 info2"), r"expected 'info <hex>', got 'info2'"),
    (b"\x7fELF\x02\x01\x01\x00\xff", r"expected UTF-8 text, got byte 0xff at column 9"),
    ("\x00\x01garbage without a timestamp", r"expected a perf script sample line"),
    ("[003] 1.000000: kvm:kvm_page_fault: address 1000 error_code 2", r"expected 'vcpu N' in the payload or a thread id"),
])
def test_malformed_lines(tmp_path, bad, message):
    p = write(tmp_path, EXIT, bad, PF)
    with pytest.raises(DesimInputError, match=rf"^{p}:2: " + message):
        read_perf_trace(p)


def test_no_kvm_lines(tmp_path):
    p = write(tmp_path, "             perf 12345/12345 [000]   100.000100: sched:sched_switch: prev_comm=perf")
    with pytest.raises(DesimInputError, match=rf"^{p}: expected kvm:kvm_page_fault or kvm:kvm_exit lines"):
        read_perf_trace(p)


def test_very_long_lines_are_rejected_quickly(tmp_path):
    # the header is split around its timestamp, no backtracking regex: 200k-character lines are cheap
    for junk in (" " * 200_000 + "x", "a " * 100_000, "1/2 " * 50_000, PF[:60] + " 1" * 100_000):
        p = write(tmp_path, EXIT, junk)
        with pytest.raises(DesimInputError, match=rf"^{p}:2: expected"):
            read_perf_trace(p)


def test_missing_file(tmp_path):
    with pytest.raises(DesimInputError, match=rf"^{tmp_path}/nope\.txt: cannot read trace file"):
        read_perf_trace(tmp_path / "nope.txt")
