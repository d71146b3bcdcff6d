"""Speed and memory of the simulator core (run on demand, not a test).

    python benchmarks/bench_core.py [--repeats 3]

Prints simulated faults per wall-clock second for
  * an uncontended scenario (1 vCPU populating 512 MiB with 4 KiB pages, TDP MMU), and
  * a fully contended one (32 vCPUs, legacy MMU: every fault takes mmu_lock exclusively,
    guests fault back to back so the lock is never idle),
and the peak memory of the SPTE state per simulated GiB (tracemalloc peak during a 16 GiB populate,
and the arrays' own size). Medians of --repeats runs. Targets: >= 250k faults/s contended,
<= 1 byte per 4 KiB guest page.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from desim.scenario import validate_scenario  # noqa: E402
from desim.vm import Vm  # noqa: E402

MiB = 1 << 20


def sc(vcpus: int, ram: int, profile: str, backing: str, access_ns: float):
    return validate_scenario({
        "name": "bench", "profile": profile, "profile_overrides": {"kernel": {"backing": backing}},
        "vm": {"vcpus": vcpus, "memslots": [{"id": 0, "gpa": 0, "size": ram}]},
        "phases": [{"name": "populate", "pattern": "sequential", "slot": 0, "access_ns": access_ns}],
    }, "benchmark")


def faults_per_second(scenario, repeats: int) -> tuple[float, int, float]:
    rates = []
    for r in range(repeats):
        vm = Vm(scenario, "fast", seed=1, replication=r)
        t0 = time.perf_counter()
        res = vm.run()
        dt = time.perf_counter() - t0
        rates.append(res.metrics["faults"] / dt)
    return statistics.median(rates), res.metrics["faults"], res.metrics["lock_mean_waiters"]


def memory_per_gib(gib: int) -> tuple[float, float]:
    scen = sc(4, gib << 30, "tdp-icelake", "thp", 50.0)
    tracemalloc.start()
    vm = Vm(scen, "fast", seed=1)
    vm.run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / gib, vm.mmu.memory_bytes() / gib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    un = faults_per_second(sc(1, 512 * MiB, "tdp-icelake", "4k", 50.0), args.repeats)
    print(f"uncontended (1 vCPU, TDP MMU, 512 MiB 4K):   {un[0]:>10,.0f} faults/s  ({un[1]:,} faults, "
          f"mean lock waiters {un[2]:.2f})")
    co = faults_per_second(sc(32, 512 * MiB, "legacy-2020", "4k", 1.0), args.repeats)
    print(f"contended (32 vCPUs, exclusive mmu_lock):    {co[0]:>10,.0f} faults/s  ({co[1]:,} faults, "
          f"mean lock waiters {co[2]:.2f})")
    peak, arrays = memory_per_gib(16)
    per_page = arrays / (1 << 18)
    print(f"memory per simulated GiB (16 GiB VM, THP):   peak {peak / MiB:.3f} MiB traced, "
          f"SPTE arrays {arrays / MiB:.3f} MiB = {per_page:.3f} bytes per 4 KiB page")


if __name__ == "__main__":
    main()
