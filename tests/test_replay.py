"""pattern = "recorded": a recording replayed per vCPU and interval, with its BAR changes as memslot ioctls.

Synthetic recordings make the counts exact: a page touched before and after a
BAR's memslot is deleted re-faults under the fast zap and not under the
targeted zap; a vCPU halts until its interval starts; recorded time maps to
simulated time as the scenario says.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from desim.errors import DesimInputError
from desim.record.format import Recording, load_recording
from desim.replay import timeline
from desim.scenario import validate_scenario
from desim.vm import Vm, run_scenario

ROOT = Path(__file__).resolve().parents[1]
MS = 1_000_000


def make_recording(path: Path, rows, bars=(), vcpus=2, interval_ns=10 * MS, kernel_entry=-1) -> Path:
    """rows: (vcpu, interval, insns, idle_ns, [gfns]); bars: (time_ns, vcpu, add, gpa, size)."""
    rows = sorted(rows, key=lambda r: (r[0], r[1]))
    gfns = np.concatenate([np.sort(np.asarray(r[4], dtype=np.int64)) for r in rows]) if rows else np.zeros(0, np.int64)
    a = {
        "row_vcpu": np.array([r[0] for r in rows], np.uint16), "row_interval": np.array([r[1] for r in rows], np.uint32),
        "row_insns": np.array([r[2] for r in rows], np.uint64), "row_idle_ns": np.array([r[3] for r in rows], np.uint64),
        "row_mmio": np.zeros(len(rows), np.uint64), "row_npages": np.array([len(r[4]) for r in rows], np.uint32),
        "page_gfn_delta": np.diff(gfns, prepend=0).astype(np.int32), "page_flags": np.ones(len(gfns), np.uint8),
        "bar_time_ns": np.array([b[0] for b in bars], np.int64), "bar_vcpu": np.array([b[1] for b in bars], np.int16),
        "bar_add": np.array([b[2] for b in bars], np.uint8), "bar_gpa": np.array([b[3] for b in bars], np.uint64),
        "bar_size": np.array([b[4] for b in bars], np.uint64), "bar_index": np.zeros(len(bars), np.uint8),
        "bar_device": np.zeros(len(bars), np.uint16), "bar_memslot": np.ones(len(bars), np.uint8),
        "bar_flags": np.zeros(len(bars), np.uint8)}
    header = {"format": "desim-recording", "version": 1, "vcpus": vcpus, "interval_ns": interval_ns,
              "devices": ["VGA 00:02.0"], "kernel_entry_interval": kernel_entry}
    return Recording(header, a).save(path)


def scenario(rec: Path, vcpus=2, **touch):
    return validate_scenario({
        "name": "replay", "profile": "tdp-icelake", "profile_overrides": {"kernel": {"backing": "4k"}},
        "vm": {"vcpus": vcpus, "memslots": [{"id": 0, "gpa": 0, "size": "64MiB"},
                                            {"id": 1, "gpa": 0x10000000, "size": "16MiB"}]},
        "phases": [{"name": "boot", "pattern": "recorded", "recording": str(rec), **touch}]}, "test")


def test_a_page_touched_again_after_a_bar_delete_refaults_only_under_the_fast_zap(tmp_path):
    a, b = list(range(100, 200)), list(range(300, 350))
    rec = make_recording(tmp_path / "r.npz", [       # busy 1 ms of every 10 ms interval: no overlap
        (0, 0, 1000, 9 * MS, a), (1, 0, 1000, 9 * MS, b),
        (1, 1, 1000, 9 * MS, [400]),                   # vCPU 1 unmaps and maps a RAM-backed BAR
        (0, 2, 1000, 9 * MS, a)],                      # vCPU 0 touches a again after the BAR churn
        bars=[(15 * MS, 1, 0, 0x10000000, 16 << 20), (15 * MS + 1, 1, 1, 0x10000000, 16 << 20)])
    sc = scenario(rec, time_map="recorded")
    fast = run_scenario(sc, "fast").metrics
    targeted = run_scenario(sc, "targeted").metrics
    assert fast["faults_first_touch"] == targeted["faults_first_touch"] == len(a) + len(b) + 1
    assert fast["faults_after_zap"] == len(a)           # vCPU 0's working set, after the fast zap
    assert targeted["faults_after_zap"] == 0
    assert fast["zaps_fast"] == 1 and targeted["zaps_targeted"] == 1
    assert fast["memslot_ioctls"] == targeted["memslot_ioctls"] == 2   # the DELETE and the CREATE


def test_without_bar_ops_nothing_is_zapped(tmp_path):
    rec = make_recording(tmp_path / "r.npz", [(0, 0, 10, 0, [1, 2]), (0, 3, 10, 0, [1, 2])],
                         bars=[(15 * MS, 0, 0, 0x10000000, 16 << 20)])
    m = run_scenario(scenario(rec, bar_ops=False), "fast").metrics
    assert m["faults"] == 2 and m["memslot_ioctls"] == 0


def test_a_vcpu_halts_until_its_next_interval_starts(tmp_path):
    rec = make_recording(tmp_path / "r.npz", [(0, 0, 1000, 0, [1]), (0, 5, 1000, 0, [2])], vcpus=1)
    sc = scenario(rec, vcpus=1, time_map="recorded", time_scale=0.5)
    vm = Vm(sc, "fast")
    res = vm.run()
    # interval 5 starts 5 x 10 ms x 0.5 after the phase; it takes (10 ms - 0 idle) x 0.5 of busy time
    assert res.metrics["completion_ns"] == pytest.approx(25 * MS + 5 * MS, rel=0.01)
    assert res.per_vcpu[0]["halted_ns"] >= 19 * MS


def test_instruction_time_keeps_only_the_time_every_vcpu_was_halted(tmp_path):
    rec = load_recording(make_recording(tmp_path / "r.npz", [
        (0, 0, 2_000_000, 0, [1]), (1, 0, 1_000_000, 4 * MS, [2]),   # interval 0: vCPU 0 busy throughout
        (0, 1, 100, 9 * MS, [1]), (1, 1, 100, 8 * MS, [2])]))         # interval 1: both mostly halted
    tl = timeline(rec, "all", "instructions", ns_per_insn=0.5, time_scale=1.0)
    assert tl.start_ns.tolist() == [0.0, 1 * MS]                     # 2e6 insns x 0.5 ns; nobody halted throughout
    assert tl.busy_ns.tolist() == [1 * MS, 50.0, 0.5 * MS, 50.0]   # rows: vCPU 0, then vCPU 1
    tl = timeline(rec, "all", "recorded", ns_per_insn=0.5, time_scale=2.0)
    assert tl.start_ns.tolist() == [0.0, 20 * MS]
    assert tl.busy_ns.tolist() == [20 * MS, 2 * MS, 12 * MS, 4 * MS]


def test_parts_split_at_the_kernel_entry(tmp_path):
    rec = make_recording(tmp_path / "r.npz", [(0, 0, 10, 0, [1]), (0, 1, 10, 0, [2]), (0, 2, 10, 0, [3, 4])],
                         vcpus=1, kernel_entry=2)
    fw = run_scenario(scenario(rec, vcpus=1, part="firmware"), "fast").metrics
    k = run_scenario(scenario(rec, vcpus=1, part="kernel"), "fast").metrics
    assert (fw["faults"], k["faults"]) == (2, 2)


def test_a_recording_with_more_vcpus_than_the_vm_is_refused(tmp_path):
    rec = make_recording(tmp_path / "r.npz", [(0, 0, 10, 0, [1]), (1, 0, 10, 0, [2])])
    with pytest.raises(DesimInputError, match="vm.vcpus"):
        run_scenario(scenario(rec, vcpus=1), "fast")


def test_a_missing_or_corrupt_recording_names_the_field(tmp_path):
    with pytest.raises(DesimInputError, match="phases.0.*recording"):
        scenario(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DesimInputError, match="corrupt|not a desim recording"):
        scenario(bad)


def test_replay_is_deterministic(tmp_path):
    rec = make_recording(tmp_path / "r.npz", [(0, 0, 1000, 0, list(range(50))), (1, 1, 1000, 0, list(range(50)))],
                         bars=[(5 * MS, 0, 0, 0x10000000, 16 << 20), (5 * MS, 0, 1, 0x10000000, 16 << 20)])
    sc = scenario(rec)
    assert run_scenario(sc, "fast").to_dict() == run_scenario(sc, "fast").to_dict()


def test_the_recorded_boot_6g_replays_and_the_targeted_zap_only_removes_refaults():
    """The committed recording of a real pc boot: same first touches, fewer re-faults, 7 VRAM deletes."""
    from desim.scenario import load_scenario

    sc = load_scenario(ROOT / "workloads" / "boot" / "boot-6g.toml")
    fast = run_scenario(sc, "fast").metrics
    targeted = run_scenario(sc, "targeted").metrics
    assert fast["faults_first_touch"] == targeted["faults_first_touch"]
    assert targeted["faults_after_zap"] < fast["faults_after_zap"]
    assert fast["faults"] - targeted["faults"] == sum(
        fast[f"faults_{c}"] - targeted[f"faults_{c}"] for c in ("after_zap", "retry", "spurious"))
    rec = load_recording(ROOT / "workloads" / "recordings" / "boot-6g-pc-1.npz")
    entry = rec.header["kernel_entry_interval"] * rec.interval_ns
    kernel_deletes = sum(1 for e in rec.bar_events() if e["memslot"] and not e["add"] and e["time_ns"] >= entry)
    assert kernel_deletes >= 3
    assert fast["zaps_fast"] == targeted["zaps_targeted"] == 14 + kernel_deletes  # SeaBIOS trace's 14, then PCI probe
