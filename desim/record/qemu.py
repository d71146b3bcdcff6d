"""Run one guest boot under QEMU TCG with the recording plugin, and collect what QEMU says.

The command line (``qemu_command``) boots the kernel and initramfs with
``-accel tcg`` (multi-threaded TCG: one host thread per vCPU), guest RAM on a
shared file in ``/dev/shm`` (``memory-backend-file,share=on``: its resident
pages are the guest's first touches, the cross-check of the plugin), the
plugin, and the two QEMU trace events that show every PCI BAR mapping change
(``pci_update_mappings_del`` / ``_add``, hw/pci/pci.c ``pci_update_mappings``)
with the thread that made it (``-msg timestamp=on``: ``TID@SECONDS:`` prefixes).

``run_boot`` watches the serial console for the markers of the initramfs
(:mod:`desim.record.initramfs`); at ``desim-record: done`` it stops the VM
through the human monitor, reads ``info ramblock``, ``info mtree -f`` and
``info mtree``, measures the residency of the RAM file with ``mincore(2)``,
and quits QEMU so that the plugin writes its last intervals.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DesimInputError
from .initramfs import DONE_MARKER, INIT_MARKER


@dataclass
class BootRun:
    """What one boot produced (files in ``workdir``) and what the monitor said."""

    command: list[str]
    plugin_out: Path
    trace_log: Path
    serial_log: Path
    t_start: float
    t_init: float | None = None
    t_done: float | None = None
    ramblock: str = ""
    mtree_flat: str = ""
    mtree: str = ""
    resident_pages: dict[str, int] = field(default_factory=dict)   # RAM file -> resident 4 KiB pages
    resident_offsets: dict[str, list[int]] = field(default_factory=dict)
    ram_file_hva: int | None = None    # where QEMU mapped the guest RAM file (/proc/PID/maps)


def qemu_version(qemu: str) -> str:
    try:
        p = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise DesimInputError(f"--qemu {qemu}: not found (install it: apt-get install qemu-system-x86)") from None
    m = re.search(r"version (\S+)(?: \(([^)]*)\))?", p.stdout)
    if p.returncode != 0 or not m:
        raise DesimInputError(f"--qemu {qemu}: does not print a QEMU version ({p.stdout.strip()[:80]!r})")
    return m.group(1) + (f" ({m.group(2)})" if m.group(2) else "")


def qemu_command(qemu: str, *, kernel: str, initramfs: str, machine: str, ram_mib: int, vcpus: int,
                 devices: list[str], objects: list[str], append: str, plugin: Path, plugin_out: Path,
                 interval_us: int, ram_file: Path, trace_log: Path, serial_log: Path, monitor: Path) -> list[str]:
    """The QEMU command line of a recorded boot."""
    cmd = [qemu, "-accel", "tcg,thread=multi", "-machine", f"{machine},memory-backend=ram0",
           "-object", f"memory-backend-file,id=ram0,size={ram_mib}M,mem-path={ram_file},share=on",
           "-m", f"{ram_mib}M", "-smp", str(vcpus),
           "-kernel", kernel, "-initrd", initramfs, "-append", append,
           "-display", "none", "-no-reboot",
           "-serial", f"file:{serial_log}", "-monitor", f"unix:{monitor},server=on,wait=off",
           "-msg", "timestamp=on", "-trace", "pci_update_mappings_del", "-trace", "pci_update_mappings_add",
           "-D", str(trace_log),
           "-plugin", f"{plugin},out={plugin_out},interval_us={interval_us}"]
    for o in objects:
        cmd += ["-object", o]
    for d in devices:
        cmd += ["-device", d]
    return cmd


class Monitor:
    """QEMU's human monitor on a unix socket: one command, its text answer."""

    PROMPT = b"(qemu) "

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._read_prompt()

    def _read_prompt(self) -> bytes:
        buf = b""
        while not buf.endswith(self.PROMPT):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        return buf

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        text = self._read_prompt().decode(errors="replace")
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", text)
        # the monitor echoes the command line first
        lines = text.split("\n")
        if lines and line in lines[0]:
            lines = lines[1:]
        return "\n".join(lines).removesuffix("(qemu) ").rstrip() + "\n"

    def close(self) -> None:
        self.sock.close()


def _mincore(path: Path) -> tuple[int, list[int]]:
    """Resident 4 KiB pages of a file (``mincore(2)`` on a shared read-only mapping), and their offsets."""
    size = path.stat().st_size
    if size == 0:
        return 0, []
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = ctypes.create_string_buffer((size + 4095) // 4096)
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            raw = vec.raw
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    offs = [i for i, b in enumerate(raw) if b & 1]
    return len(offs), offs


def _mapping_base(pid: int, path: Path) -> int | None:
    """The lowest address at which process ``pid`` maps file ``path`` (offset 0)."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path) and int(parts[2], 16) == 0:
            return int(parts[0].split("-")[0], 16)
    return None


def run_boot(cmd: list[str], *, plugin_out: Path, trace_log: Path, serial_log: Path, monitor: Path,
             ram_file: Path, timeout_s: float, log) -> BootRun:
    """Boot, wait for the done marker (or fail), read the monitor, quit; the caller cleans up."""
    run = BootRun(command=cmd, plugin_out=plugin_out, trace_log=trace_log, serial_log=serial_log,
                  t_start=time.time())
    serial_log.write_bytes(b"")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise DesimInputError(f"QEMU exited with status {proc.returncode} before the guest printed "
                                      f"'{DONE_MARKER}': {err[-1] if err else 'no message'}")
            text = serial_log.read_bytes().decode(errors="replace")
            if run.t_init is None and INIT_MARKER in text:
                run.t_init = time.time()
                log(f"guest reached /init after {run.t_init - run.t_start:.1f} s")
            if DONE_MARKER in text:
                run.t_done = time.time()
                break
            if time.monotonic() > deadline:
                raise DesimInputError(f"--timeout {timeout_s:g}: the guest did not print '{DONE_MARKER}' in time "
                                      "(raise --timeout, or check the kernel and initramfs with the serial log)")
            time.sleep(0.02)
        mon = Monitor(monitor)
        try:
            mon.cmd("stop")
            run.ramblock = mon.cmd("info ramblock")
            run.mtree_flat = mon.cmd("info mtree -f")
            run.mtree = mon.cmd("info mtree")
            run.ram_file_hva = _mapping_base(proc.pid, ram_file)
            n, offs = _mincore(ram_file)
            run.resident_pages[str(ram_file)] = n
            run.resident_offsets[str(ram_file)] = offs
            try:
                mon.sock.sendall(b"quit\n")
                while mon.sock.recv(65536):  # QEMU closes the monitor when it exits
                    pass
            except OSError:
                pass
        finally:
            mon.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise DesimInputError("QEMU did not quit after the monitor's 'quit' (the recording is incomplete)")
        return run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
