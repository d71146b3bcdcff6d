"""desim record: the plugin's output format, page translation, BAR classification, the initramfs,
the recording file, and the command's errors. The live boot runs only where QEMU, a kernel and the
plugin header are present and DESIM_TEST_RECORD=1 (a TCG boot takes about a minute)."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from desim.errors import DesimInputError
from desim.record.convert import (NS_HVA, PageMap, build_recording, classify_bars, parse_bar_trace, parse_flat_memory,
                                  parse_mtree, parse_ramblock, read_plugin_output)
from desim.record.format import load_recording
from desim.record.initramfs import DONE_MARKER, INIT_MARKER, build_initramfs

ROOT = Path(__file__).resolve().parents[1]
RECORDINGS = ROOT / "workloads" / "recordings"

RAMBLOCK = """\
              Block Name    PSize              Offset               Used              Total
                    ram0    4 KiB  0x0000000000000000 0x0000000180000000 0x0000000180000000
   0000:00:02.0/vga.vram    4 KiB  0x0000000180080000 0x0000000001000000 0x0000000001000000
                 pc.bios    4 KiB  0x0000000180000000 0x0000000000040000 0x0000000000040000
"""
FLAT = """\
FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): ram0
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  0000000000100000-00000000bfffffff (prio 0, ram): ram0 @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000febf0000-00000000febf017f (prio 0, i/o): edid
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-00000001bfffffff (prio 0, ram): ram0 @00000000c0000000
"""
MTREE = """\
address-space: memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000000000-00000000bfffffff (prio 0, ram): alias ram-below-4g @ram0 0000000000000000-00000000bfffffff
    0000000000000000-ffffffffffffffff (prio -1, i/o): pci
      00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
      00000000febf0000-00000000febf0fff (prio 1, i/o): vga.mmio
      00000000febc0000-00000000febdffff (prio 1, i/o): e1000-mmio
      00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
"""
TRACE = """\
100@1795854379.302225:pci_update_mappings_add VGA 00:02.0 0,0xfd000000+0x1000000
100@1795854379.302517:pci_update_mappings_add VGA 00:02.0 2,0xfebf0000+0x1000
100@1795854379.303155:pci_update_mappings_add e1000 00:03.0 0,0xfebc0000+0x20000
100@1795854379.371092:pci_update_mappings_add VGA 00:02.0 6,0xfebe0000+0x10000
100@1795854379.374731:pci_update_mappings_del VGA 00:02.0 6,0xfebe0000+0x10000
101@1795854400.945622:pci_update_mappings_del VGA 00:02.0 0,0xfd000000+0x1000000
101@1795854400.946023:pci_update_mappings_del VGA 00:02.0 2,0xfebf0000+0x1000
101@1795854400.946631:pci_update_mappings_add VGA 00:02.0 0,0xfd000000+0x1000000
101@1795854400.948328:pci_update_mappings_add piix3-ide 00:01.1 4,0xc040+0x10
"""
T0 = 1795854379_000_000_000
HVA = 0x7F0000000000


def plugin_file(path: Path, rows, threads=(), end=True) -> Path:
    """The plugin's binary format (desim/record/plugin.c)."""
    b = bytearray(b"DSMREC01" + struct.pack("<QQ", T0, 10_000_000) + struct.pack("<IIII", 4, 0, 0, 0))
    for vcpu, tid in threads:
        b += struct.pack("<IIII", 2, vcpu, tid, 0)
    for vcpu, k, insns, idle, entries in rows:
        b += struct.pack("<IIIIQQQ", 1, vcpu, k, len(entries), insns, idle, 0)
        b += np.asarray(entries, dtype="<u8").tobytes()
    if end:
        b += struct.pack("<IIIIQ", 3, 0, 0, 0, T0 + 30 * 10**9)
    path.write_bytes(bytes(b))
    return path


def e(page: int, flags: int, hva: bool = False) -> int:
    return ((page | (NS_HVA if hva else 0)) << 3) | flags


def test_the_monitor_text_parses():
    blocks = parse_ramblock(RAMBLOCK)
    assert blocks[0] == ("ram0", 0, 0x180000000) and blocks[1][0] == "0000:00:02.0/vga.vram"
    flat = parse_flat_memory(FLAT)
    assert (0x100000000, 0x1C0000000, "ram", "ram0", 0xC0000000) in flat


def test_pages_translate_to_guest_physical_pages():
    pm = PageMap(RAMBLOCK, FLAT, MTREE, "ram0", HVA)
    entries = np.array([
        e(0x5, 1),                                  # low RAM: ram_addr == gpa
        e(0xC0000, 2),                              # RAM offset 3 GiB: above 4 GiB in the guest
        e((0x180080000 + 0xFD000000) >> 12, 2),     # VRAM page 0 (ram_addr + the region's address)
        e((HVA >> 12) + 0x1000, 4, hva=True),       # an instruction in guest RAM at 16 MiB
        e(0x12345678, 4, hva=True),                 # an instruction outside guest RAM (BIOS ROM)
        e(0x7FFFFFFF, 1),                           # a page of no block
    ], dtype=np.uint64)
    assert pm.to_gfn(entries).tolist() == [0x5, 0x100000, 0xFD000, 0x1000, -1, -1]
    assert pm.dropped["hva_outside_ram"] == 1 and pm.dropped["no_block"] == 1


def test_bar_changes_are_classified_into_memslot_operations(tmp_path):
    (tmp_path / "t.log").write_text(TRACE + "garbage line\n")
    bars = parse_bar_trace(tmp_path / "t.log")
    assert len(bars) == 9 and bars[0]["time_ns"] == T0 + 302_225_000
    counts = classify_bars(bars, parse_mtree(MTREE))
    kinds = [(b["device"].split()[0], b["bar"], b["memslot"], b["flags"]) for b in bars]
    assert kinds[0] == ("VGA", 0, True, 1)          # VRAM: RAM-backed, dirty-logged
    assert kinds[1] == ("VGA", 2, False, 0)         # MMIO
    assert kinds[2] == ("e1000", 0, False, 0)       # MMIO
    assert kinds[3] == ("VGA", 6, True, 2)          # ROM: read-only memslot, though not mapped at the end
    assert kinds[8] == ("piix3-ide", 4, False, 0)   # an I/O BAR this sample's mtree lacks: never a memslot
    assert counts == {"memslot": 5, "mmio_or_io": 3, "unclassified": 1}


def test_plugin_output_becomes_a_recording_and_round_trips(tmp_path):
    pf = plugin_file(tmp_path / "p.bin", threads=[(0, 100), (1, 101)], rows=[
        (0, 0, 5000, 0, [e(0x5, 1), e(0x6, 2), e(0x5, 2)]),
        (1, 3, 100, 9_000_000, [e((HVA >> 12) + 0x100, 4, hva=True)]),   # executes at 1 MiB: kernel entry
        (0, 3, 7000, 0, [e(0x5, 1)])])
    po = read_plugin_output(pf)
    assert po.threads == {100: 0, 101: 1} and len(po.rows) == 3
    (tmp_path / "t.log").write_text(TRACE)
    pm = PageMap(RAMBLOCK, FLAT, MTREE, "ram0", HVA)
    bars = parse_bar_trace(tmp_path / "t.log")
    classify_bars(bars, pm.regions)
    rec = build_recording(po, pm, bars, {"vcpus": 2, "name": "t"}, resident_offsets=[0x5, 0x6, 0x100, 0x999])
    assert rec.header["kernel_entry_interval"] == 3
    assert rec.header["crosscheck"]["plugin_only"] == 0 and rec.header["crosscheck"]["resident_only"] == 1
    path = rec.save(tmp_path / "r.npz")
    back = load_recording(path)
    assert back.arrays["row_vcpu"].tolist() == [0, 0, 1] and back.arrays["row_interval"].tolist() == [0, 3, 3]
    assert back.gfns().tolist() == [0x5, 0x6, 0x5, 0x100]             # re-touch of 0x5 kept; duplicates merged
    assert back.arrays["page_flags"].tolist() == [3, 2, 1, 4]
    ev = back.bar_events()
    assert [x["vcpu"] for x in ev][-4:] == [1, 1, 1, 1]                # thread 101 is vCPU 1
    assert back.summary()["memslot_deletes"] == 2


def test_a_truncated_plugin_output_is_refused(tmp_path):
    pf = plugin_file(tmp_path / "p.bin", rows=[(0, 0, 1, 0, [e(5, 1)])], end=False)
    with pytest.raises(DesimInputError, match="no end record"):
        read_plugin_output(pf)
    (tmp_path / "x.bin").write_bytes(b"nope")
    with pytest.raises(DesimInputError, match="not the recording plugin"):
        read_plugin_output(tmp_path / "x.bin")


@pytest.mark.parametrize("name", sorted(p.name for p in RECORDINGS.glob("*.npz")))
def test_committed_recordings_load_with_provenance(name):
    rec = load_recording(RECORDINGS / name)
    h = rec.header
    for key in ("qemu", "kernel_package", "kernel_sha256", "command", "date", "host", "machine"):
        assert h[key], key
    assert h["qemu"].startswith("7.2")
    assert h["kernel_entry_interval"] > 0
    cc = h["crosscheck"]                                    # the plugin saw every page the guest made resident
    assert cc["plugin_only"] == 0 and cc["resident_only"] < 100 and cc["both"] > 70_000
    s = rec.summary()
    assert s["memslot_deletes"] >= 9 and s["distinct_pages"] > 70_000
    assert (RECORDINGS / name).stat().st_size < 2_000_000


def test_committed_recordings_stay_small():
    assert sum(p.stat().st_size for p in RECORDINGS.glob("*.npz")) < 6_000_000


def test_a_corrupt_recording_is_one_line_and_exit_2(tmp_path):
    src = (RECORDINGS / "boot-6g-pc-1.npz").read_bytes()
    bad = tmp_path / "cut.npz"
    bad.write_bytes(src[: len(src) // 2])
    p = subprocess.run([sys.executable, "-m", "desim", "record", "--info", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "corrupt" in p.stderr
    ok = subprocess.run([sys.executable, "-m", "desim", "record", "--info", str(RECORDINGS / "boot-6g-pc-1.npz")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "kernel_package" in ok.stdout and "memslot_deletes" in ok.stdout


def test_the_initramfs_is_a_newc_archive_with_markers(tmp_path):
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF fake busybox")
    path = build_initramfs(tmp_path / "i.cpio.gz", ["sha256sum /bin/busybox"], busybox=str(bb))
    raw = gzip.decompress(path.read_bytes())
    names, pos, init = [], 0, b""
    while True:
        assert raw[pos:pos + 6] == b"070701"
        f = [int(raw[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = raw[pos + 110: pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        data = raw[pos: pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        names.append(name)
        if name == "init":
            init = data
    assert {"init", "bin/busybox", "bin/sh"} <= set(names)
    text = init.decode()
    assert text.startswith("#!/bin/busybox sh") and INIT_MARKER in text and DONE_MARKER in text
    assert text.index(INIT_MARKER) < text.index("sha256sum") < text.index(DONE_MARKER)


def _record(*args, tmp_path):
    out = tmp_path / "rec.npz"
    p = subprocess.run([sys.executable, "-m", "desim", "record", *args, "--out", str(out)], capture_output=True,
                       text=True, timeout=900)
    return p, out


@pytest.mark.parametrize("args,msg", [
    (["--kernel", "/nonexistent/vmlinuz"], "--kernel"),
    (["--kernel", __file__, "--initramfs", "/nonexistent.cpio"], "--initramfs"),
    (["--kernel", __file__, "--qemu", "/nonexistent/qemu-system-x86_64"], "--qemu"),
    (["--kernel", __file__, "--ram", "12"], "--ram"),
])
def test_missing_inputs_are_one_line_and_exit_2_and_write_nothing(tmp_path, args, msg):
    p, out = _record(*args, tmp_path=tmp_path)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]   # argparse's own type errors print the usage line first
    assert last.startswith("desim") and "error:" in last and msg in last
    assert not out.exists()


def _live_ready() -> str | None:
    if os.environ.get("DESIM_TEST_RECORD") != "1":
        return "set DESIM_TEST_RECORD=1 to boot a real guest (about a minute of TCG)"
    if shutil.which("qemu-system-x86_64") is None or not Path("/bin/busybox").exists():
        return "needs qemu-system-x86 and busybox-static"
    if not any(Path("/boot").glob("vmlinuz-*")) or not os.environ.get("DESIM_QEMU_PLUGIN_H"):
        return "needs a kernel in /boot and DESIM_QEMU_PLUGIN_H (QEMU's qemu-plugin.h)"
    return None


@pytest.mark.skipif(_live_ready() is not None, reason=str(_live_ready()))
def test_live_boot_records_and_a_short_timeout_leaves_nothing(tmp_path):
    kernel = str(sorted(Path("/boot").glob("vmlinuz-*"))[-1])
    p, out = _record("--kernel", kernel, "--ram", "512M", "--vcpus", "1", "--timeout", "2", tmp_path=tmp_path)
    assert p.returncode == 2 and "--timeout" in p.stderr and not out.exists()
    assert not list(Path("/dev/shm").glob("desim-record-*"))
    p, out = _record("--kernel", kernel, "--ram", "512M", "--vcpus", "1", "--interval-ms", "50", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    rec = load_recording(out)
    assert rec.header["crosscheck"]["plugin_only"] == 0 and rec.header["kernel_entry_interval"] > 0
