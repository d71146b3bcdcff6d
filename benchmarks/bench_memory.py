"""Memory of the simulator: peak RSS per simulated GiB, and the largest VMs it simulates here (on demand).

    python benchmarks/bench_memory.py [--largest] [--populate-4t] [--only NAME,...] [--root CHECKOUT]

Each case runs in a fresh subprocess (``desim.vm.Vm`` on the fast engine, one replication) and reports
its peak resident set during the run (``VmHWM``, reset after the imports through ``/proc/self/clear_refs``;
``ru_maxrss`` where that is refused) minus its resident set after importing desim and loading the compiled
cohort kernel (a tiny 2-vCPU run first: numba's runtime is not per-GiB state), per GiB
of guest RAM, next to the model's own accounting: the leaf SPTE state (``Mmu.memory_bytes``) per 4 KiB
guest page (at most 1 byte, and proportional to the mappings where huge pages back the memory) and the
per-sample arrays and sketches of the metrics (``Metrics.samples_nbytes``). One table.

Cases (``tdp-icelake``; every one but ``1g-thp-448v-uniform`` populates its RAM sequentially,
``sharing = "private"``):

* ``1g-4k-8v``: 1 GiB, 4 KiB host pages, 8 vCPUs (262,144 faults: 1 byte of SPTE state per page);
* ``64g-thp-4v``: 64 GiB on THP, 4 vCPUs (32,768 2 MiB mappings);
* ``4t-1g-448v``: 4 TiB on 1 GiB pages, 448 vCPUs (4,096 mappings; the issue's slow case);
* ``1g-thp-448v-uniform``: 1 GiB on THP, 448 vCPUs each making 4,096 uniform random accesses (one
  chunk of the access stream each, all held at once: the per-vCPU state of a wide VM whose accesses
  mostly hit);
* ``--largest``: ``workloads/scale/boot-32t-churn.toml`` under both policies (32 TiB, 896 vCPUs on 1 GiB
  pages, booting through the 32G-churn memslot script scaled up): the largest VM simulated here;
* ``--populate-4t``: ``workloads/scale/populate-4t-4k.toml`` (4 TiB on 4 KiB pages, 448 vCPUs: a billion
  faults; hours at today's fault rate, see workloads/scale/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the desim measured (--root: another checkout, e.g. before)
GiB = 1 << 30

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from desim.scenario import load_scenario, validate_scenario
from desim.vm import Vm
try:  # the compiled cohort kernel's runtime (numba, LLVM: ~100-130 MiB, loaded once per process) before the
    # baseline: a tiny 2-vCPU run loads it from its cache, so the row measures the per-GiB state
    Vm(validate_scenario({{"name": "warm", "profile": "legacy-2020",
                          "profile_overrides": {{"kernel": {{"backing": "4k"}}}},
                          "vm": {{"vcpus": 2, "memslots": [{{"id": 0, "gpa": 0, "size": 16 << 20}}]}},
                          "phases": [{{"name": "populate", "pattern": "sequential", "slot": 0,
                                      "access_ns": 1.0}}]}}, "warm-up"), "fast", seed=1).run()
except Exception:  # a desim without the kernel (--root an older checkout): nothing to load
    pass
def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None
try:  # reset the peak (VmHWM) to the resident set after the imports: the run's own peak, not the imports'
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kib("VmRSS") * 1024
    hwm = True
except OSError:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm = False
spec = {spec!r}
if spec.get("file"):
    sc = load_scenario(spec["file"])
else:
    sc = validate_scenario({{
        "name": spec["name"], "profile": "tdp-icelake", "time_limit_ms": 1e9,
        "profile_overrides": {{"kernel": {{"backing": spec["backing"]}}}},
        "vm": {{"vcpus": spec["vcpus"], "memslots": [{{"id": 0, "gpa": 0, "size": spec["ram"]}}]}},
        "phases": [{{"name": "populate", "slot": 0, "access_ns": 200,
                     **spec.get("phase", {{"pattern": "sequential", "sharing": "private"}})}}]}}, "bench_memory")
t = time.perf_counter()
vm = Vm(sc, spec["policy"], seed=1)
res = vm.run()
wall = time.perf_counter() - t
ram = sum(b.npages for b in vm.mmu.blocks) << 12
m = vm.metrics
samples = getattr(m, "samples_nbytes", None)  # a desim before the streaming samples: count the arrays
if samples is None:
    samples = sum(len(getattr(m, k)) * getattr(m, k).itemsize for k in
                  ("fault_latency", "fault_time", "fault_is_refault", "access_stall", "access_stall_time"))
print(json.dumps({{"wall": wall, "faults": res.metrics["faults"], "ram": ram,
                   "completion_ns": res.metrics["completion_ns"], "spte": vm.mmu.memory_bytes(),
                   "samples": samples, "exact": getattr(m, "exact", True), "base": base,
                   "peak": status_kib("VmHWM") * 1024 if hwm else
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""

CASES = {
    "1g-4k-8v": {"name": "1g-4k-8v", "ram": GiB, "backing": "4k", "vcpus": 8, "policy": "fast"},
    "64g-thp-4v": {"name": "64g-thp-4v", "ram": 64 * GiB, "backing": "thp", "vcpus": 4, "policy": "fast"},
    "4t-1g-448v": {"name": "4t-1g-448v", "ram": 4096 * GiB, "backing": "hugetlbfs-1g", "vcpus": 448,
                   "policy": "fast"},
    "1g-thp-448v-uniform": {"name": "1g-thp-448v-uniform", "ram": GiB, "backing": "thp", "vcpus": 448,
                            "policy": "fast", "phase": {"pattern": "uniform", "sharing": "shared", "accesses": 4096}},
}
LARGEST = {f"32t-churn-{p}": {"name": f"boot-32t-churn {p}", "file": str(ROOT / "workloads/scale/boot-32t-churn.toml"),
                              "policy": p} for p in ("fast", "targeted")}
POPULATE_4T = {"4t-4k-448v": {"name": "populate-4t-4k", "file": str(ROOT / "workloads/scale/populate-4t-4k.toml"),
                              "policy": "fast"}}


def run_case(spec: dict, root: Path | None = None, engine: str | None = None) -> dict:
    """Run one case in a fresh interpreter on the desim at ``root`` (default: ``ROOT``) and ``engine``
    (``DESIM_ENGINE``; default: that desim's default engine)."""
    t = time.perf_counter()
    env = dict(os.environ, DESIM_ENGINE=engine) if engine else None
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(root or ROOT), spec=spec)],
                         capture_output=True, text=True, check=False, env=env)
    if out.returncode:
        raise SystemExit(f"desim: error: case {spec['name']} failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["total_wall"] = time.perf_counter() - t
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--largest", action="store_true", help="also the 32 TiB / 896-vCPU boot, both policies")
    ap.add_argument("--populate-4t", action="store_true", help="also the 4 TiB 4 KiB-page populate (hours)")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--root", default=None, help="measure the desim of another checkout (a directory)")
    a = ap.parse_args(argv)
    if a.root:
        global ROOT
        ROOT = Path(a.root).resolve()
    cases = dict(CASES)
    if a.largest:
        cases.update(LARGEST)
    if a.populate_4t:
        cases.update(POPULATE_4T)
    if a.only:
        wanted = a.only.split(",")
        unknown = [w for w in wanted if w not in {**CASES, **LARGEST, **POPULATE_4T}]
        if unknown:
            print(f"desim: error: --only: unknown case {unknown[0]}; choose from "
                  f"{', '.join({**CASES, **LARGEST, **POPULATE_4T})}", file=sys.stderr)
            return 2
        cases = {k: v for k, v in {**CASES, **LARGEST, **POPULATE_4T}.items() if k in wanted}
    print("| case | guest RAM | faults | wall s | peak RSS MiB (above import) | RSS MiB per GiB | "
          "SPTE bytes per 4 KiB page | sample MiB | percentiles |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, spec in cases.items():
        r = run_case(spec)
        gib = r["ram"] / GiB
        rss = (r["peak"] - r["base"]) / (1 << 20)
        print(f"| {name} | {gib:,.0f} GiB | {r['faults']:,} | {r['wall']:.1f} | {r['peak'] / (1 << 20):,.0f} "
              f"({rss:,.0f}) | {rss / gib:.3f} | {r['spte'] / (r['ram'] >> 12):.6f} | "
              f"{r['samples'] / (1 << 20):.1f} | {'exact' if r['exact'] else 'sketch'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
