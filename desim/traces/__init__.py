"""Readers for real traces: QEMU memslot updates and perf kvm page-fault/exit samples.

* :mod:`desim.traces.qemu` reads QEMU ``-trace kvm_set_user_memory`` logs into
  :class:`~desim.memslot.MemslotOp` lists (format: QEMU's ``accel/kvm/trace-events``).
* :mod:`desim.traces.perf` reads ``perf script`` output of ``kvm:kvm_page_fault`` and
  ``kvm:kvm_exit`` (format: the kernel's ``arch/x86/kvm/trace.h``) into per-vCPU
  numpy arrays and guest access streams.

Both raise :class:`~desim.errors.DesimInputError` naming the file and line for
any malformed input. Shipped traces and fixtures are in ``workloads/traces/``.
"""
from __future__ import annotations

from desim.traces.perf import PerfTrace, VcpuExits, VcpuFaults, read_perf_trace
from desim.traces.qemu import QemuMemRecord, QemuTrace, QemuTraceSummary, QemuUpdate, read_qemu_trace

__all__ = [
    "PerfTrace",
    "QemuMemRecord",
    "QemuTrace",
    "QemuTraceSummary",
    "QemuUpdate",
    "VcpuExits",
    "VcpuFaults",
    "read_perf_trace",
    "read_qemu_trace",
]
