"""The CPU spinners that keep idle-CPU wake-ups out of timed memslot ioctls (no /dev/kvm needed)."""
from __future__ import annotations

import os

import pytest

from desim.kvm.spin import BusyCpus

needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs")


@needs_two_cpus
def test_spinners_run_pinned_and_are_reaped():
    before = os.sched_getaffinity(0)
    with BusyCpus() as busy:
        assert len(busy.procs) == len(before) - 1
        assert all(p.poll() is None for p in busy.procs)  # running, not exited
        assert os.sched_getaffinity(0) == {min(before)}  # the VMM thread has its own CPU
        pinned = {frozenset(os.sched_getaffinity(p.pid)) for p in busy.procs}
        assert pinned == {frozenset({c}) for c in sorted(before)[1:]}
        procs = list(busy.procs)
    assert all(p.returncode is not None for p in procs)  # killed and reaped
    assert os.sched_getaffinity(0) == before


@needs_two_cpus
def test_spinners_are_reaped_when_the_body_raises():
    before = os.sched_getaffinity(0)
    with pytest.raises(RuntimeError, match="boom"):
        with BusyCpus() as busy:
            procs = list(busy.procs)
            raise RuntimeError("boom")
    assert procs and all(p.returncode is not None for p in procs)
    assert os.sched_getaffinity(0) == before


def test_disabled_does_nothing():
    before = os.sched_getaffinity(0)
    with BusyCpus(enabled=False) as busy:
        assert busy.procs == [] and os.sched_getaffinity(0) == before


@needs_two_cpus
def test_spinners_die_with_their_parent(tmp_path):
    """A VMM killed with SIGKILL (no clean-up runs) leaves no spinner behind."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys\nfrom desim.kvm.spin import BusyCpus\nb = BusyCpus().__enter__()\n"
            "print(' '.join(str(p.pid) for p in b.procs), flush=True)\nimport time\ntime.sleep(60)\n")
    vmm = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in vmm.stdout.readline().split()]
    assert pids and all(os.path.exists(f"/proc/{p}") for p in pids)
    vmm.send_signal(signal.SIGKILL)
    vmm.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
