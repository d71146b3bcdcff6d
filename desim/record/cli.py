"""``desim record``: boot a real Linux guest under QEMU TCG and write a recording.

    desim record --kernel /boot/vmlinuz-6.1.0-56-cloud-amd64 --machine pc --ram 6G --vcpus 4 \\
        --plugin-header /tmp/qemu-7.2.0/include/qemu/qemu-plugin.h --out boot-6g-pc.npz
    desim record --info boot-6g-pc.npz

Set-up (Debian bookworm): ``apt-get install qemu-system-x86 linux-image-cloud-amd64 busybox-static
gcc pkg-config libglib2.0-dev``, plus QEMU's plugin header (see :mod:`desim.record.build`).
Without ``--initramfs`` a busybox initramfs is built (:mod:`desim.record.initramfs`); ``--workload
CMD`` adds commands the guest runs after boot. Missing inputs, a guest that does not print its
marker within ``--timeout`` seconds, or a failed QEMU give one line and exit status 2, and leave no
recording behind.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import DesimInputError


def _size_mib(v: str) -> int:
    from ..scenario import parse_size

    try:
        n = parse_size(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < (128 << 20) or n % (1 << 20):
        raise argparse.ArgumentTypeError(f"{v}: give at least 128MiB, in whole MiB (e.g. 6G)")
    return n >> 20


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _positive_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {v!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return x


def register(sub) -> None:
    r = sub.add_parser("record", help="record a real Linux boot under QEMU TCG (pages touched, BAR changes)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--info", metavar="FILE", help="print a recording's header and summary, and exit")
    r.add_argument("--kernel", help="the guest kernel (e.g. /boot/vmlinuz-*-cloud-amd64)")
    r.add_argument("--initramfs", help="the guest initramfs (default: a busybox one built now)")
    r.add_argument("--workload", action="append", default=[], metavar="CMD",
                   help="a shell command the guest runs after boot (repeatable; with the built initramfs)")
    r.add_argument("--machine", choices=["pc", "q35"], default="pc", help="QEMU machine type (default pc)")
    r.add_argument("--ram", type=_size_mib, default=6144, metavar="SIZE", help="guest RAM (default 6G)")
    r.add_argument("--vcpus", type=_positive_int, default=4, help="guest vCPUs (default 4)")
    r.add_argument("--device", action="append", default=[], metavar="DEV",
                   help="an extra QEMU -device (repeatable), e.g. secondary-vga or ivshmem-plain,memdev=m0")
    r.add_argument("--object", action="append", default=[], metavar="OBJ",
                   help="an extra QEMU -object (repeatable), e.g. memory-backend-ram,id=m0,size=64M")
    r.add_argument("--append", default="console=ttyS0 quiet", help="kernel command line")
    r.add_argument("--interval-ms", type=_positive_float, default=10.0,
                   help="recording interval of wall-clock time (default 10 ms)")
    r.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds to wait for the guest's marker")
    r.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU binary (default qemu-system-x86_64)")
    r.add_argument("--plugin-header", default=None, help="QEMU's include/qemu/qemu-plugin.h (see desim.record.build)")
    r.add_argument("--name", default=None, help="the recording's name (default: from --out)")
    r.add_argument("--out", help="the recording file to write (.npz)")
    r.add_argument("--keep-raw", metavar="DIR", help="also keep QEMU's raw outputs (plugin file, trace, monitor text)")
    r.set_defaults(func=cmd_record)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _kernel_package(kernel: str) -> str:
    try:
        p = subprocess.run(["dpkg", "-S", str(Path(kernel).resolve())], capture_output=True, text=True, timeout=30)
        pkg = p.stdout.split(":")[0].strip() if p.returncode == 0 else ""
        if pkg:
            v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, timeout=30)
            return f"{pkg} {v.stdout.strip()}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


def cmd_info(path: str) -> int:
    from .format import dumps_toml, load_recording

    rec = load_recording(path)
    print(dumps_toml(rec.header), end="")
    print("\n[summary]")
    for k, v in rec.summary().items():
        print(f"{k} = {v}")
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    if args.info:
        return cmd_info(args.info)
    from .build import build_plugin, find_header, plugin_api_version
    from .convert import PageMap, build_recording, classify_bars, parse_bar_trace, read_plugin_output
    from .initramfs import build_initramfs
    from .qemu import qemu_command, qemu_version, run_boot

    if not args.kernel:
        raise DesimInputError("record: --kernel is required (e.g. /boot/vmlinuz-6.1.0-*-cloud-amd64 from "
                              "apt-get install linux-image-cloud-amd64)")
    if not args.out:
        raise DesimInputError("record: --out FILE.npz is required")
    if not Path(args.kernel).is_file():
        raise DesimInputError(f"--kernel {args.kernel}: file not found")
    if args.initramfs and not Path(args.initramfs).is_file():
        raise DesimInputError(f"--initramfs {args.initramfs}: file not found")
    if args.initramfs and args.workload:
        raise DesimInputError("--workload needs the built initramfs: drop --initramfs, or put the commands in yours")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise DesimInputError(f"--out {out}: directory {out.parent} does not exist")
    if shutil.which(args.qemu) is None:
        raise DesimInputError(f"--qemu {args.qemu}: not found (apt-get install qemu-system-x86)")
    version = qemu_version(args.qemu)
    header_file = find_header(args.plugin_header)
    plugin = build_plugin(header_file)
    log = lambda msg: print(f"desim record: {msg}", file=sys.stderr)  # noqa: E731

    work = Path(tempfile.mkdtemp(prefix="desim-record-"))
    ram_file = Path("/dev/shm") / f"desim-record-{os.getpid()}-{work.name}"
    try:
        initramfs = args.initramfs
        if initramfs is None:
            if not Path("/bin/busybox").is_file():
                raise DesimInputError("no --initramfs and no /bin/busybox to build one (apt-get install busybox-static)")
            initramfs = str(build_initramfs(work / "initramfs.cpio.gz", args.workload))
        files = dict(plugin_out=work / "pages.bin", trace_log=work / "trace.log", serial_log=work / "serial.log")
        cmd = qemu_command(args.qemu, kernel=args.kernel, initramfs=initramfs, machine=args.machine, ram_mib=args.ram,
                           vcpus=args.vcpus, devices=args.device, objects=args.object, append=args.append,
                           plugin=plugin, interval_us=max(1, int(args.interval_ms * 1000)), ram_file=ram_file,
                           monitor=work / "monitor.sock", **files)
        log(f"booting {Path(args.kernel).name} on {args.machine}, {args.ram} MiB, {args.vcpus} vCPUs under TCG ...")
        run = run_boot(cmd, monitor=work / "monitor.sock", ram_file=ram_file, timeout_s=args.timeout, log=log, **files)
        log(f"marker after {run.t_done - run.t_start:.1f} s; converting")
        plugin_out = read_plugin_output(files["plugin_out"])
        pagemap = PageMap(run.ramblock, run.mtree_flat, run.mtree, "ram0", run.ram_file_hva)
        bars = parse_bar_trace(files["trace_log"])
        counts = classify_bars(bars, pagemap.regions)
        t0 = plugin_out.t0_ns
        header = {
            "name": args.name or out.stem,
            "vcpus": args.vcpus,
            "machine": args.machine,
            "ram_bytes": args.ram << 20,
            "devices_extra": list(args.device),
            "workload": list(args.workload),
            "qemu": version,
            "qemu_plugin_api": plugin_api_version(header_file),
            "kernel": str(args.kernel),
            "kernel_package": _kernel_package(args.kernel),
            "kernel_sha256": _sha256(args.kernel),
            "initramfs": "built: busybox " + ("+ workload" if args.workload else "(markers only)")
            if args.initramfs is None else str(args.initramfs),
            "initramfs_sha256": _sha256(initramfs),
            "command": " ".join(cmd),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": f"{platform.node()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs",
            "clock": "CLOCK_REALTIME of the host (wall clock under TCG); interval = wall-clock time",
            "init_marker_ns": int(run.t_init * 1e9 - t0) if run.t_init else -1,
            "done_marker_ns": int(run.t_done * 1e9 - t0),
            "bar_classification": "info mtree at the done marker: ram/rom/romd region of the BAR's address and size "
                                  "-> memslot; ROM BAR (6) -> read-only memslot; vga.vram -> dirty logging",
            "bar_counts": counts,
        }
        rec = build_recording(plugin_out, pagemap, bars, header, run.resident_offsets.get(str(ram_file)))
        if args.keep_raw:
            keep = Path(args.keep_raw)
            keep.mkdir(parents=True, exist_ok=True)
            for f in work.iterdir():
                if f.is_file():
                    shutil.copy2(f, keep / f.name)
            for name, text in (("ramblock.txt", run.ramblock), ("mtree_flat.txt", run.mtree_flat),
                               ("mtree.txt", run.mtree)):
                (keep / name).write_text(text)
        rec.save(out)
        s = rec.summary()
        print(f"wrote {out}: {s['rows']} (vCPU, interval) rows, {s['page_entries']:,} page entries "
              f"({s['distinct_pages']:,} distinct pages), {s['bar_events']} BAR changes "
              f"({s['memslot_bar_events']} memslot ops, {s['memslot_deletes']} deletes)")
        cc = rec.header.get("crosscheck")
        if cc:
            print(f"cross-check: plugin saw {cc['plugin_pages']:,} guest-RAM pages, the RAM file has "
                  f"{cc['resident_pages']:,} resident; {cc['plugin_only']:,} only in the plugin, "
                  f"{cc['resident_only']:,} only resident (written by QEMU itself: firmware tables, DMA)")
        return 0
    finally:
        ram_file.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
