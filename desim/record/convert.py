"""From what QEMU and the plugin wrote to a :class:`~desim.record.format.Recording`.

Three translations, each from QEMU's own account of its memory map, read
through the monitor when the guest printed its done marker:

* **Pages to guest-physical pages.** The plugin's data pages are QEMU 7.2's
  ``qemu_plugin_hwaddr_phys_addr`` values, ``ram_addr + mr->addr``
  (plugins/api.c); ``info ramblock`` gives each RAM block's ``ram_addr``
  offset and size, ``info mtree`` the address of each block's memory region.
  Guest RAM (the ``ram0`` memory backend) is reached through aliases
  (``ram-below-4g``, ``ram-above-4g``, PAM): the flat view of the system
  address space (``info mtree -f``, lines ``ram0 @offset``) maps a RAM offset
  to its guest-physical address. Instruction pages are host addresses; the
  guest RAM file's mapping in ``/proc/PID/maps`` turns them into RAM offsets.
  Pages of other RAM blocks (VRAM, ROMs) take their region's address; pages
  that fit no block (or, for instructions, lie outside guest RAM: the BIOS ROM
  executed in place) are dropped and counted in the header.
* **BAR changes to memslot operations.** Every ``pci_update_mappings_del/add``
  line is one BAR unmapped or mapped by QEMU (hw/pci/pci.c
  ``pci_update_mappings``). Under KVM, a RAM-backed region becomes a memslot
  (``kvm_region_add``, accel/kvm/kvm-all.c) and MMIO does not. A BAR is
  RAM-backed when ``info mtree`` shows a ``ram``, ``rom`` or ``romd`` region of
  exactly the BAR's address and size (I/O BARs and MMIO BARs show ``i/o``);
  a ROM BAR (index 6) is a ROM, mapped read-only (``KVM_MEM_READONLY``), even
  when it is not mapped at the end. ``vga.vram`` regions carry dirty
  logging (hw/display/vga.c ``vga_common_init`` ->
  ``memory_region_set_log(..., DIRTY_MEMORY_VGA)``), hence
  ``KVM_MEM_LOG_DIRTY_PAGES``. A BAR never seen mapped at the end is
  classified like another mapping of the same device and BAR; otherwise it is
  counted as unclassified and not replayed.
* **Threads to vCPUs.** Trace lines start with the thread id of the thread
  that changed the mapping; the plugin records each vCPU's thread id.

The kernel's entry is the first interval in which a vCPU executes a page in
[1 MiB, 16 MiB): where ``-kernel`` loads the protected-mode kernel
(``code32_start``) and where it decompresses itself (``CONFIG_PHYSICAL_START``);
SeaBIOS and the option ROMs run below 1 MiB and at the top of low RAM.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DesimInputError
from .format import F_EXEC, FORMAT_VERSION, Recording

NS_HVA = 1 << 57
KERNEL_ENTRY_GPA = (0x100000, 0x1000000)
_ROW = struct.Struct("<IIIIQQQ")


@dataclass
class PluginOutput:
    t0_ns: int
    interval_ns: int
    max_vcpus: int
    t_end_ns: int | None
    rows: list[tuple[int, int, int, int, int, np.ndarray]]  # vcpu, interval, insns, idle, mmio, entries
    threads: dict[int, int]  # thread id -> vcpu


def read_plugin_output(path: Path) -> PluginOutput:
    raw = path.read_bytes()
    if len(raw) < 40 or raw[:8] != b"DSMREC01":
        raise DesimInputError(f"{path}: not the recording plugin's output (QEMU did not load the plugin?)")
    t0, interval = struct.unpack_from("<QQ", raw, 8)
    (max_vcpus,) = struct.unpack_from("<I", raw, 24)
    pos = 40
    rows = []
    threads: dict[int, int] = {}
    t_end = None
    while pos + 16 <= len(raw):
        kind, a, b, c = struct.unpack_from("<IIII", raw, pos)
        if kind == 1:
            if pos + _ROW.size > len(raw):
                break
            _, vcpu, interval_k, n, insns, idle, mmio = _ROW.unpack_from(raw, pos)
            pos += _ROW.size
            if pos + 8 * n > len(raw):
                break
            entries = np.frombuffer(raw, dtype="<u8", count=n, offset=pos).copy()
            pos += 8 * n
            rows.append((vcpu, interval_k, insns, idle, mmio, entries))
        elif kind == 2:
            threads[b] = a
            pos += 16
        elif kind == 3:
            (t_end,) = struct.unpack_from("<Q", raw, pos + 16)
            pos += 24
            break
        else:
            raise DesimInputError(f"{path}: unknown record type {kind} at byte {pos} (corrupt plugin output)")
    if t_end is None:
        raise DesimInputError(f"{path}: the plugin's output has no end record (QEMU did not exit cleanly)")
    return PluginOutput(t0, interval, max_vcpus, t_end, rows, threads)


# -- QEMU's monitor text ---------------------------------------------------------------------------------
_RANGE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([a-z/]+)\): (.+?)\s*$")


def parse_ramblock(text: str) -> list[tuple[str, int, int]]:
    """``info ramblock`` -> [(block name, ram_addr offset, used bytes)]."""
    out = []
    for line in text.splitlines():
        parts = line.split()  # name, page size (2 words), offset, used, total
        if len(parts) >= 6 and all(p.startswith("0x") for p in parts[-3:]):
            out.append((parts[0], int(parts[-3], 16), int(parts[-2], 16)))
    return out


def parse_flat_memory(text: str) -> list[tuple[int, int, str, str, int]]:
    """The flat view of the ``memory`` address space: [(start, end+1, kind, region, offset)]."""
    out = []
    in_view = False
    for line in text.splitlines():
        if line.startswith("FlatView"):
            in_view = False
        if line.strip() == 'AS "memory", root: system':
            in_view = True
        if not in_view:
            continue
        m = _RANGE.match(line)
        if m:
            name = m.group(4)
            off = 0
            if " @" in name:
                name, o = name.split(" @", 1)
                off = int(o.split()[0], 16)
            out.append((int(m.group(1), 16), int(m.group(2), 16) + 1, m.group(3), name.strip(), off))
    return out


def parse_mtree(text: str) -> list[tuple[int, int, str, str]]:
    """Every non-alias region of ``info mtree`` (address space ``memory`` first): [(start, end+1, kind, name)]."""
    out = []
    for line in text.splitlines():
        m = _RANGE.match(line)
        if m and not m.group(4).startswith("alias "):
            out.append((int(m.group(1), 16), int(m.group(2), 16) + 1, m.group(3), m.group(4).split()[0]))
    return out


# -- page translation ----------------------------------------------------------------------------------------
class PageMap:
    """Plugin page -> gfn (or -1), built from the monitor's view of memory."""

    def __init__(self, ramblock: str, mtree_flat: str, mtree: str, ram_block: str, ram_file_hva: int | None) -> None:
        self.blocks = parse_ramblock(ramblock)
        self.flat = parse_flat_memory(mtree_flat)
        self.regions = parse_mtree(mtree)
        names = {b[0] for b in self.blocks}
        if ram_block not in names:
            raise DesimInputError(f"info ramblock shows no block {ram_block!r} (blocks: {', '.join(sorted(names))})")
        self.ram = next(b for b in self.blocks if b[0] == ram_block)
        self.ram_file_hva = ram_file_hva
        ram_ranges = sorted((off, off + (e - s), s) for s, e, _k, n, off in self.flat if n == ram_block)
        self._r_off = np.array([r[0] for r in ram_ranges], dtype=np.int64)
        self._r_end = np.array([r[1] for r in ram_ranges], dtype=np.int64)
        self._r_gpa = np.array([r[2] for r in ram_ranges], dtype=np.int64)
        # other blocks: (ram_addr offset + region address, size, region address)
        self.others = []
        for name, off, used in self.blocks:
            if name == ram_block:
                continue
            short = name.rsplit("/", 1)[-1]
            for s, e, _k, n in self.regions:
                if n == short and e - s == used:
                    self.others.append((off + s, used, s))
        self.dropped = {"hva_outside_ram": 0, "no_block": 0, "ram_offset_unmapped": 0}

    def _ram_offsets_to_gfn(self, off_pages: np.ndarray) -> np.ndarray:
        off = off_pages * 4096
        i = np.searchsorted(self._r_off, off, side="right") - 1
        ok = (i >= 0) & (off < self._r_end[np.maximum(i, 0)])
        g = np.where(ok, (self._r_gpa[np.maximum(i, 0)] + off - self._r_off[np.maximum(i, 0)]) // 4096, -1)
        self.dropped["ram_offset_unmapped"] += int((~ok).sum())
        return g

    def ram_offset_pages(self, entries: np.ndarray) -> np.ndarray:
        """RAM-block page offsets of entries that are in guest RAM (-1 otherwise)."""
        page = (entries >> 3).astype(np.int64)
        is_hva = (page & NS_HVA) != 0
        page = page & (NS_HVA - 1)
        ram_off, ram_used = self.ram[1], self.ram[2]
        out = np.full(len(page), -1, dtype=np.int64)
        q = page * 4096
        in_ram = ~is_hva & (q >= ram_off) & (q < ram_off + ram_used)
        out[in_ram] = (q[in_ram] - ram_off) // 4096
        if self.ram_file_hva is not None:
            h = q - self.ram_file_hva
            hv = is_hva & (h >= 0) & (h < ram_used)
            out[hv] = h[hv] // 4096
        return out

    def to_gfn(self, entries: np.ndarray) -> np.ndarray:
        page = (entries >> 3).astype(np.int64)
        is_hva = (page & NS_HVA) != 0
        gfn = np.full(len(page), -1, dtype=np.int64)
        ro = self.ram_offset_pages(entries)
        in_ram = ro >= 0
        gfn[in_ram] = self._ram_offsets_to_gfn(ro[in_ram])
        self.dropped["hva_outside_ram"] += int((is_hva & ~in_ram).sum())
        rest = ~is_hva & ~in_ram
        if rest.any():
            q = (page[rest] & (NS_HVA - 1)) * 4096
            g = np.full(len(q), -1, dtype=np.int64)
            for base, size, addr in self.others:
                hit = (g < 0) & (q >= base) & (q < base + size)
                g[hit] = (addr + q[hit] - base) // 4096
            self.dropped["no_block"] += int((g < 0).sum())
            gfn[rest] = g
        return gfn


# -- BAR events --------------------------------------------------------------------------------------------
_BAR = re.compile(r"^(\d+)@(\d+)\.(\d+):pci_update_mappings_(del|add) (\S+) ([0-9a-f]{2}:[0-9a-f]{2}\.[0-9a-f]) "
                  r"(\d+),0x([0-9a-f]+)\+0x([0-9a-f]+)")


def parse_bar_trace(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = _BAR.match(line)
        if m:
            out.append({"tid": int(m.group(1)), "time_ns": int(m.group(2)) * 1_000_000_000 + int(m.group(3).ljust(9, "0")[:9]),
                        "add": m.group(4) == "add", "device": f"{m.group(5)} {m.group(6)}", "bar": int(m.group(7)),
                        "gpa": int(m.group(8), 16), "size": int(m.group(9), 16)})
    return out


def classify_bars(events: list[dict[str, Any]], regions: list[tuple[int, int, str, str]]) -> dict[str, int]:
    """Set ``memslot`` and ``flags`` on each event (see the module docstring); returns counts."""
    by_range = {(s, e - s): (k, n) for s, e, k, n in regions}
    known: dict[tuple[str, int], tuple[bool, int]] = {}
    for ev in events:
        hit = by_range.get((ev["gpa"], ev["size"]))
        if ev["bar"] == 6:
            known[(ev["device"], 6)] = (True, 2)
        elif hit is not None:
            kind, name = hit
            ram = kind in ("ram", "rom", "romd")
            flags = (1 if name == "vga.vram" else 0) | (2 if kind == "rom" else 0)
            known[(ev["device"], ev["bar"])] = (ram, flags)
    counts = {"memslot": 0, "mmio_or_io": 0, "unclassified": 0}
    for ev in events:
        k = known.get((ev["device"], ev["bar"]))
        if k is None:
            ev["memslot"], ev["flags"] = False, 0
            counts["unclassified"] += 1
        else:
            ev["memslot"], ev["flags"] = k
            if ev["memslot"] and (ev["gpa"] % 4096 or ev["size"] % 4096):
                ev["memslot"] = False  # KVM needs page-aligned slots; QEMU would not register it
            counts["memslot" if ev["memslot"] else "mmio_or_io"] += 1
    return counts


# -- assembly --------------------------------------------------------------------------------------------
def build_recording(plugin: PluginOutput, pagemap: PageMap, bars: list[dict[str, Any]], header: dict[str, Any],
                    resident_offsets: list[int] | None) -> Recording:
    rows = sorted(plugin.rows, key=lambda r: (r[0], r[1]))
    rv, ri, rins, ridle, rmmio, rn = [], [], [], [], [], []
    gfn_parts, flag_parts = [], []
    touched_ram = []
    kernel_entry = None
    nv = 0
    for vcpu, k, insns, idle, mmio, entries in rows:
        touched_ram.append(pagemap.ram_offset_pages(entries))
        g = pagemap.to_gfn(entries)
        f = (entries & 7).astype(np.uint8)
        keep = g >= 0
        g, f = g[keep], f[keep]
        if len(g):
            order = np.argsort(g, kind="stable")
            g, f = g[order], f[order]
            uniq, start = np.unique(g, return_index=True)
            f = np.bitwise_or.reduceat(f, start).astype(np.uint8)
            g = uniq
        ex = g[(f & F_EXEC) != 0]
        if len(ex) and ((ex >= KERNEL_ENTRY_GPA[0] >> 12) & (ex < KERNEL_ENTRY_GPA[1] >> 12)).any():
            kernel_entry = k if kernel_entry is None else min(kernel_entry, k)
        rv.append(vcpu)
        ri.append(k)
        rins.append(insns)
        ridle.append(min(idle, plugin.interval_ns))
        rmmio.append(mmio)
        rn.append(len(g))
        gfn_parts.append(g)
        flag_parts.append(f)
        nv = max(nv, vcpu + 1)
    gfns = np.concatenate(gfn_parts) if gfn_parts else np.zeros(0, np.int64)
    flags = np.concatenate(flag_parts) if flag_parts else np.zeros(0, np.uint8)
    delta = np.diff(gfns, prepend=0)
    devices = sorted({b["device"] for b in bars})
    bars = [b for b in bars if b["time_ns"] >= plugin.t0_ns]
    arrays = {
        "row_vcpu": np.array(rv, dtype=np.uint16), "row_interval": np.array(ri, dtype=np.uint32),
        "row_insns": np.array(rins, dtype=np.uint64), "row_idle_ns": np.array(ridle, dtype=np.uint64),
        "row_mmio": np.array(rmmio, dtype=np.uint64), "row_npages": np.array(rn, dtype=np.uint32),
        "page_gfn_delta": delta.astype(np.int32 if np.abs(delta).max(initial=0) < 2**31 else np.int64),
        "page_flags": flags,
        "bar_time_ns": np.array([b["time_ns"] - plugin.t0_ns for b in bars], dtype=np.int64),
        "bar_vcpu": np.array([plugin.threads.get(b["tid"], -1) for b in bars], dtype=np.int16),
        "bar_add": np.array([b["add"] for b in bars], dtype=np.uint8),
        "bar_gpa": np.array([b["gpa"] for b in bars], dtype=np.uint64),
        "bar_size": np.array([b["size"] for b in bars], dtype=np.uint64),
        "bar_index": np.array([b["bar"] for b in bars], dtype=np.uint8),
        "bar_device": np.array([devices.index(b["device"]) for b in bars], dtype=np.uint16),
        "bar_memslot": np.array([b["memslot"] for b in bars], dtype=np.uint8),
        "bar_flags": np.array([b["flags"] for b in bars], dtype=np.uint8),
    }
    h = {"format": "desim-recording", "version": FORMAT_VERSION}
    h.update(header)
    h["vcpus"] = int(header.get("vcpus", nv))
    h["interval_ns"] = int(plugin.interval_ns)
    h["duration_ns"] = int(plugin.t_end_ns - plugin.t0_ns)
    h["devices"] = devices
    h["kernel_entry_interval"] = -1 if kernel_entry is None else int(kernel_entry)
    h["dropped_page_entries"] = dict(pagemap.dropped)
    # first touches seen by the plugin vs the RAM file's resident pages (mincore)
    if resident_offsets is not None:
        t = np.unique(np.concatenate(touched_ram)) if touched_ram else np.zeros(0, np.int64)
        t = t[t >= 0]
        r = np.asarray(resident_offsets, dtype=np.int64)
        both = np.intersect1d(t, r, assume_unique=True)
        h["crosscheck"] = {"method": "mincore(2) on the guest RAM file vs the plugin's RAM pages",
                           "plugin_pages": int(len(t)), "resident_pages": int(len(r)), "both": int(len(both)),
                           "plugin_only": int(len(t) - len(both)), "resident_only": int(len(r) - len(both))}
    return Recording(h, arrays)
