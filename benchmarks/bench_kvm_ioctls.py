"""What a memslot ioctl costs on this host's real KVM, and what its timing depends on (run on demand).

    python benchmarks/bench_kvm_ioctls.py [--repeats 9]

The numbers behind two choices of the real-KVM harness (``desim/kvm/spin.py``,
``desim/kvm/calibrate.py``), printed as medians of ``--repeats`` runs:

1. *Idle vs busy host CPUs.* The harness's memslot operation (DELETE and
   re-CREATE of a 2 MiB slot in a VM whose vCPU touched 64 MiB), timed with
   the other CPUs idle and with one busy-looping process pinned to each of
   them (``KvmScenario.busy_cpus``). With the other CPU idle, ioctls also pay
   for waking it (SRCU grace-period work, IPIs), which on these nested
   machines, where an idle CPU halts in the outer hypervisor, costs tens of
   us per ioctl, and more or less from one run to the next.
2. *Cache warmth.* In a VM whose 1 vCPU touched 1 GiB, after the DELETE of an
   untouched 2 MiB slot (fast or targeted zap), the CREATE of that slot
   directly, after 5 ms of busy userspace work, or after streaming 64 MiB
   through the cache; and the first four FLAGS_ONLY ioctls after the DELETE.
   A ~20 us ioctl runs up to 2.5x slower with cold caches, and the first
   ioctl after a multi-millisecond fast zap runs cold.

Needs ``/dev/kvm`` (Linux 6.12+ for the targeted zap); exits 2 with one line otherwise.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from desim.errors import DesimInputError  # noqa: E402
from desim.kvm import uapi as u  # noqa: E402
from desim.kvm.machine import TouchVm  # noqa: E402
from desim.kvm.measure import run_once  # noqa: E402
from desim.kvm.scenario import KvmScenario  # noqa: E402
from desim.kvm.spin import BusyCpus  # noqa: E402
from desim.kvm.vm import Kvm, KvmError  # noqa: E402

MiB = 1 << 20
LOG_DIRTY = 1  # KVM_MEM_LOG_DIRTY_PAGES


def med_us(xs: list[int]) -> str:
    return f"{statistics.median(xs) / 1e3:7.1f} us"


def idle_vs_busy(kvm: Kvm, repeats: int) -> None:
    print("1. the harness's memslot operation (DELETE + re-CREATE of a 2 MiB slot, 64 MiB touched by 1 vCPU),")
    print("   other CPUs idle or busy (KvmScenario.busy_cpus), runs interleaved, medians:")
    res: dict[tuple[bool, str, str], list[int]] = {}
    for _ in range(repeats):
        for busy in (False, True):
            for policy in ("targeted", "fast"):
                m = run_once(kvm, KvmScenario(name="bench", ram_mib=64, policy=policy, busy_cpus=busy))["metrics"]
                for k in ("zap_ioctl_ns", "create_ioctl_ns"):
                    res.setdefault((busy, policy, k), []).append(m[k])
    for busy in (False, True):
        print(f"   other CPUs {'busy' if busy else 'idle'}: " + "; ".join(
            f"{p} DELETE {med_us(res[(busy, p, 'zap_ioctl_ns')])}, CREATE {med_us(res[(busy, p, 'create_ioctl_ns')])}"
            for p in ("targeted", "fast")))


def cache_warmth(kvm: Kvm, repeats: int) -> None:
    print("2. after the DELETE of an untouched 2 MiB slot, in a VM whose vCPU touched 1 GiB (other CPUs busy):")
    buf = mmap.mmap(-1, 64 * MiB)
    arr = (ctypes.c_char * (64 * MiB)).from_buffer(buf)
    ctypes.memset(arr, 1, 64 * MiB)

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    between = {"directly": lambda: None, "after 5 ms of userspace work": lambda: spin(0.005),
               "after streaming 64 MiB": lambda: ctypes.memset(arr, 2, 64 * MiB)}
    for policy in ("targeted", "fast"):
        deletes: list[int] = []
        creates: dict[str, list[int]] = {k: [] for k in between}
        flags: list[list[int]] = [[] for _ in range(4)]
        for _ in range(repeats):
            for what, do in list(between.items()) + [("flags", None)]:
                with TouchVm(kvm, KvmScenario(name="bench", ram_mib=1024, policy=policy)) as tv:
                    tv.touch(1)
                    tv.touch(1)
                    target, vm = tv.layout.target_slot, tv.vm
                    with BusyCpus():
                        deletes.append(vm.delete_slot(target))
                        if do is None:
                            for i in range(4):
                                flags[i].append(vm.set_slot_flags(0, LOG_DIRTY if i % 2 == 0 else 0))
                        else:
                            do()
                            creates[what].append(vm.create_slot(target, tv.layout.slot(target).gpa, tv.mem[target]))
        print(f"   {policy} zap: DELETE {med_us(deletes)}; then CREATE " +
              ", ".join(f"{k} {med_us(v)}" for k, v in creates.items()))
        print(f"   {policy} zap: DELETE, then FLAGS_ONLY x4: " + ", ".join(med_us(v) for v in flags))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    try:
        if args.repeats < 1:
            raise DesimInputError(f"--repeats must be >= 1 (got {args.repeats})")
        with Kvm() as kvm:
            if not kvm.check_extension(u.KVM_CAP_DISABLE_QUIRKS2) & u.KVM_X86_QUIRK_SLOT_ZAP_ALL:
                raise DesimInputError("this KVM cannot disable KVM_X86_QUIRK_SLOT_ZAP_ALL (needs Linux 6.12+)")
            idle_vs_busy(kvm, args.repeats)
            cache_warmth(kvm, args.repeats)
    except (DesimInputError, KvmError) as e:
        print(f"bench_kvm_ioctls: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
