"""A busybox initramfs for recorded boots: print a marker, run a workload, print another, wait.

The guest's ``/init`` is a busybox shell script. It mounts ``/proc`` and
``/sys``, prints ``desim-record: init`` on the console (the kernel reached
user space), runs the workload commands you give it (``--workload``, busybox
applets such as ``dd``, ``sha256sum``, ``find /sys``), prints
``desim-record: done`` and then sleeps: the recorder stops the VM when it
sees the marker, reads QEMU's memory map through the monitor, and quits.

The archive is written in the "newc" cpio format the kernel unpacks
(``Documentation/driver-api/early-userspace/buffer-format.rst``), with the
static busybox from Debian's ``busybox-static`` package and one symlink per
applet the script uses. Pure Python: no ``cpio`` or ``mkinitramfs`` needed.
"""
from __future__ import annotations

import gzip
import shlex
from pathlib import Path

INIT_MARKER = "desim-record: init"
DONE_MARKER = "desim-record: done"
BUSYBOX = "/bin/busybox"
_APPLETS = ("sh", "mount", "echo", "sleep", "cat", "poweroff", "dd", "sha256sum", "find", "ls", "seq",
            "true", "md5sum", "gzip", "sort", "wc", "uname", "sync")


def init_script(workload: list[str]) -> str:
    """The ``/init`` shell script: markers around the workload commands."""
    lines = ["#!/bin/sh",
             "mount -t proc proc /proc",
             "mount -t sysfs sysfs /sys",
             "mount -t devtmpfs devtmpfs /dev 2>/dev/null",
             f"echo '{INIT_MARKER}'"]
    for cmd in workload:
        lines.append(f"sh -c {shlex.quote(cmd)} > /dev/null 2>&1")
    lines += [f"echo '{DONE_MARKER}'", "while true; do sleep 3600; done", ""]
    return "\n".join(lines)


def _entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    name_b = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08X}" for v in (
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
    out = hdr.encode() + name_b
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def build_initramfs(path: str | Path, workload: list[str], busybox: str = BUSYBOX) -> Path:
    """Write a gzip-compressed newc cpio archive with busybox and ``/init`` to ``path``."""
    bb = Path(busybox).read_bytes()
    parts = []
    ino = 1
    for d in ("bin", "proc", "sys", "dev", "tmp"):
        parts.append(_entry(d, 0o040755, b"", ino))
        ino += 1
    parts.append(_entry("bin/busybox", 0o100755, bb, ino))
    ino += 1
    for applet in _APPLETS:
        parts.append(_entry(f"bin/{applet}", 0o120777, b"busybox", ino))
        ino += 1
    parts.append(_entry("init", 0o100755, init_script(workload).replace("#!/bin/sh", "#!/bin/busybox sh", 1)
                        .replace("\n", "\nexport PATH=/bin\n", 1).encode(), ino))
    parts.append(_entry("TRAILER!!!", 0, b"", 0))
    raw = b"".join(parts)
    p = Path(path)
    p.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
    return p
