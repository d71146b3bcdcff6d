"""Keep the host's other CPUs busy while a memslot ioctl is timed.

Every ``KVM_SET_USER_MEMORY_REGION`` ends in ``synchronize_srcu_expedited``
(``kvm_swap_active_memslots``, virt/kvm/kvm_main.c), whose grace-period work
runs from a workqueue (``srcu_funnel_gp_start``, kernel/rcu/srcutree.c), and
some ioctls send IPIs (TLB flushes). When the CPU such work or an IPI lands on
is idle, the ioctl also pays for waking that CPU. On these machines (a guest
itself: ``cpuidle`` driver ``haltpoll``, so an idle CPU halts in the outer
hypervisor) that costs tens of microseconds per ioctl, and varies from run to
run. ``python benchmarks/bench_kvm_ioctls.py`` measures it: with the other
CPU idle the harness's targeted DELETE took 169 us and the re-CREATE 71 us,
with it busy 87 us and 20 us (medians of 5, interleaved).

The simulator models a host whose CPUs are busy running vCPUs, and has no
C-states. So the harness times memslot operations with one busy-looping child
process per other CPU, the userspace equivalent of booting with
``idle=poll`` for the duration of the operation. The spinners are separate
processes (a spinning Python thread would hold the GIL the VMM thread needs
back after its ioctl) and are always killed and reaped on exit.
"""
from __future__ import annotations

import os
import subprocess
import sys
from types import TracebackType

# the child spins until killed, or until its parent is gone (checked every few ms: a VMM killed with
# SIGKILL must not leave spinners behind)
SPIN_CODE = ("import os, sys\nppid = os.getppid()\nos.sched_setaffinity(0, {int(sys.argv[1])})\n"
             "sys.stdout.write('r')\nsys.stdout.flush()\n"
             "while os.getppid() == ppid:\n    for _ in range(100000):\n        pass\n")


def _allowed() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return []


class BusyCpus:
    """Context manager: the calling (VMM) thread pinned to one CPU and a busy-looping child
    process pinned to each other CPU it may use; ``enabled=False`` does nothing.

    Pinning matters: a spinner sharing the VMM thread's CPU would take half of a
    millisecond-long zap's time slices (``cond_resched`` in ``kvm_zap_obsolete_pages``).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.cpus = _allowed() if enabled else []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.saved: set[int] | None = None

    def __enter__(self) -> BusyCpus:
        if len(self.cpus) < 2:
            return self
        try:
            self.saved = set(self.cpus)
            os.sched_setaffinity(0, {self.cpus[0]})  # this thread only (Linux: pid 0 = caller)
            for cpu in self.cpus[1:]:
                p = subprocess.Popen([sys.executable, "-c", SPIN_CODE, str(cpu)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                self.procs.append(p)
            for p in self.procs:
                assert p.stdout is not None
                if p.stdout.read(1) != b"r":  # the child is in its loop once it has written
                    raise RuntimeError("a CPU spinner died before it started")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        self.procs.clear()
        if self.saved is not None:
            os.sched_setaffinity(0, self.saved)
            self.saved = None

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
