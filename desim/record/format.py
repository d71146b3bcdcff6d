"""The recording format: what a real guest boot touched, per vCPU and interval, and its BAR changes.

A recording is one ``.npz`` file (numpy's zip of arrays, LZMA-compressed)
holding a TOML header with the provenance (QEMU version, kernel, command
line, date, host, interval length, how BARs were classified, the
cross-check against the RAM file's residency) and these arrays:

* rows, one per (vCPU, interval) in which the vCPU ran, sorted by vCPU then
  interval: ``row_vcpu``, ``row_interval``, ``row_insns`` (instructions
  executed), ``row_idle_ns`` (time halted in the interval), ``row_mmio``
  (accesses to MMIO), ``row_npages`` (distinct guest pages touched);
* pages, ``row_npages[i]`` consecutive entries per row, ascending gfn within
  a row: ``page_gfn_delta`` (gfn minus the previous entry's gfn, across
  rows: small numbers that compress well) and ``page_flags`` (1 read,
  2 write, 4 execute). A page touched in several intervals appears in each:
  first touches *and* re-touches;
* BAR events, in recorded order: ``bar_time_ns`` (since the recording
  started), ``bar_vcpu`` (the vCPU whose thread made the change, -1 for
  QEMU's main thread), ``bar_add`` (1 map, 0 unmap), ``bar_gpa``,
  ``bar_size``, ``bar_index`` (0-5, 6 = ROM), ``bar_device`` (index into
  the header's ``devices``), ``bar_memslot`` (1 when KVM would see the change
  as a memslot operation: RAM-backed BARs and ROMs), ``bar_flags`` (the
  memslot's KVM flags: 1 ``KVM_MEM_LOG_DIRTY_PAGES``, 2 ``KVM_MEM_READONLY``).

Loading checks the arrays against each other; a corrupt or truncated file
gives one :class:`~desim.errors.DesimInputError` line naming the file.
Saving writes a temporary file next to the target and renames it, so a
failed recording leaves nothing behind.
"""
from __future__ import annotations

import functools
import io
import os
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DesimInputError

FORMAT_VERSION = 1
F_READ, F_WRITE, F_EXEC = 1, 2, 4
ROW_ARRAYS = ("row_vcpu", "row_interval", "row_insns", "row_idle_ns", "row_mmio", "row_npages")
PAGE_ARRAYS = ("page_gfn_delta", "page_flags")
BAR_ARRAYS = ("bar_time_ns", "bar_vcpu", "bar_add", "bar_gpa", "bar_size", "bar_index", "bar_device",
              "bar_memslot", "bar_flags")


@dataclass
class Recording:
    """A recorded guest boot, in memory."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    path: str = ""

    # -- derived views ------------------------------------------------------------------
    @property
    def interval_ns(self) -> int:
        return int(self.header["interval_ns"])

    @property
    def vcpus(self) -> int:
        return int(self.header["vcpus"])

    def gfns(self) -> np.ndarray:
        return np.cumsum(self.arrays["page_gfn_delta"].astype(np.int64))

    def row_slices(self) -> np.ndarray:
        """Start offset of each row's pages (plus the end), for ``gfns()[s[i]:s[i+1]]``."""
        return np.concatenate([[0], np.cumsum(self.arrays["row_npages"].astype(np.int64))])

    def bar_events(self) -> list[dict[str, Any]]:
        a = self.arrays
        devs = self.header.get("devices", [])
        return [{"time_ns": int(a["bar_time_ns"][i]), "vcpu": int(a["bar_vcpu"][i]), "add": bool(a["bar_add"][i]),
                 "gpa": int(a["bar_gpa"][i]), "size": int(a["bar_size"][i]), "bar": int(a["bar_index"][i]),
                 "device": devs[int(a["bar_device"][i])], "memslot": bool(a["bar_memslot"][i]),
                 "flags": int(a["bar_flags"][i])} for i in range(len(a["bar_time_ns"]))]

    def summary(self) -> dict[str, Any]:
        a = self.arrays
        g = self.gfns()
        return {"rows": int(len(a["row_vcpu"])), "page_entries": int(len(g)), "distinct_pages": int(len(np.unique(g))),
                "instructions": int(a["row_insns"].sum()), "bar_events": int(len(a["bar_time_ns"])),
                "memslot_bar_events": int(a["bar_memslot"].sum()),
                "memslot_deletes": int(((a["bar_add"] == 0) & (a["bar_memslot"] == 1)).sum())}

    # -- file ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        p = Path(path)
        validate(self.header, self.arrays, str(p))
        buf = {k: v for k, v in self.arrays.items()}
        buf["header"] = np.frombuffer(dumps_toml(self.header).encode(), dtype=np.uint8)
        fd, tmp = tempfile.mkstemp(prefix=".rec-", suffix=".npz", dir=p.parent if str(p.parent) else ".")
        try:
            # an npz (a zip of .npy files) compressed with LZMA: np.load reads it like any npz, and
            # page sets compress ~40% better than with numpy's default deflate
            with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_LZMA) as zf:
                for name, arr in buf.items():
                    b = io.BytesIO()
                    np.save(b, np.ascontiguousarray(arr), allow_pickle=False)
                    zf.writestr(name + ".npy", b.getvalue())
            os.chmod(tmp, 0o644)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.path = str(p)
        return p


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> Recording:
    return load_recording(path)


def load_recording_cached(path: str | Path) -> Recording:
    """:func:`load_recording`, once per process for an unchanged file (recordings are read-only)."""
    try:
        st = os.stat(path)
    except OSError:
        return load_recording(path)  # raises the one-line error
    return _load_cached(str(path), st.st_mtime_ns, st.st_size)


def load_recording(path: str | Path) -> Recording:
    """Read and check a recording; any problem is one ``DesimInputError`` line."""
    p = Path(path)
    if not p.is_file():
        raise DesimInputError(f"{p}: recording not found (record one with `desim record`)")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise DesimInputError(f"{p}: not a desim recording (corrupt or truncated npz: {e})") from None
    if "header" not in data:
        raise DesimInputError(f"{p}: not a desim recording (no header)")
    try:
        header = tomllib.loads(data.pop("header").tobytes().decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise DesimInputError(f"{p}: recording header is not valid TOML: {e}") from None
    validate(header, data, str(p))
    return Recording(header, data, str(p))


def validate(header: dict[str, Any], a: dict[str, np.ndarray], where: str) -> None:
    """The arrays agree with each other and with the header."""
    def bad(msg: str) -> DesimInputError:
        return DesimInputError(f"{where}: corrupt recording: {msg}")

    if header.get("format") != "desim-recording" or header.get("version") != FORMAT_VERSION:
        raise bad(f"header format/version must be 'desim-recording' {FORMAT_VERSION}")
    for key in ("vcpus", "interval_ns"):
        if not isinstance(header.get(key), int) or header[key] <= 0:
            raise bad(f"header field {key} must be a positive integer")
    missing = [k for k in ROW_ARRAYS + PAGE_ARRAYS + BAR_ARRAYS if k not in a]
    if missing:
        raise bad(f"missing arrays {', '.join(missing)}")
    for group in (ROW_ARRAYS, PAGE_ARRAYS, BAR_ARRAYS):
        n = {len(a[k]) for k in group}
        if len(n) != 1 or any(a[k].ndim != 1 for k in group):
            raise bad(f"arrays {', '.join(group)} differ in length")
    if int(a["row_npages"].sum()) != len(a["page_gfn_delta"]):
        raise bad("row_npages does not add up to the number of page entries")
    if len(a["row_vcpu"]) and (a["row_vcpu"].max() >= header["vcpus"] or a["row_vcpu"].min() < 0):
        raise bad("a row names a vCPU the header does not have")
    order = np.lexsort((a["row_interval"], a["row_vcpu"]))
    if not np.array_equal(order, np.arange(len(order))):
        raise bad("rows are not sorted by vCPU and interval")
    g = np.cumsum(a["page_gfn_delta"].astype(np.int64))
    if len(g) and g.min() < 0:
        raise bad("negative gfn")
    if len(a["page_flags"]) and ((a["page_flags"] == 0) | (a["page_flags"] > 7)).any():
        raise bad("page flags must be 1-7 (read, write, execute)")
    devs = header.get("devices", [])
    if len(a["bar_device"]) and (a["bar_device"].max() >= len(devs)):
        raise bad("a BAR event names a device the header does not list")
    if len(a["bar_time_ns"]) and np.any(np.diff(a["bar_time_ns"]) < 0):
        raise bad("BAR events are not in time order")
    if ((a["bar_gpa"] % 4096) | (a["bar_size"] % 4096))[a["bar_memslot"] == 1].any():
        raise bad("a memslot BAR is not 4 KiB aligned")


# -- a small TOML writer for the header (strings, numbers, booleans, lists, one level of tables) --------
def _val(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(d: dict[str, Any]) -> str:
    out = io.StringIO()
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    for k, v in d.items():
        if not isinstance(v, dict):
            out.write(f"{k} = {_val(v)}\n")
    for k, t in tables.items():
        out.write(f"\n[{k}]\n")
        for kk, vv in t.items():
            out.write(f"{kk} = {_val(vv)}\n")
    return out.getvalue()
