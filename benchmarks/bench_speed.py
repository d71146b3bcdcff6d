"""Speed and scale of the simulator, both engines, in one table (run on demand, not a test).

    python benchmarks/bench_speed.py [--repeats 5] [--quick] [--set costs=mean] [--only drawn,...] [--boot]
        [--vcpu-scaling] [--largest] [--profile]

Rows (each a median of ``--repeats`` runs, interleaved: SimPy, reference, fast, SimPy, ...):

* ``simpy timeout``: bare SimPy, one process yielding ``env.timeout(1)`` in a loop, events per
  second, measured in the same run: on a machine shared with other work every rate below is
  also given as a ratio to it (the ratio is what survives the noise).
* ``uncontended``: 1 vCPU populating 512 MiB with 4 KiB pages on the TDP MMU (``tdp-icelake``),
  faults per second, per engine.
* ``contended``: 32 vCPUs populating 512 MiB on the legacy MMU (``legacy-2020``: every fault takes
  ``mmu_lock`` exclusively), guests faulting back to back (1 ns per access), per engine.
* ``drawn costs``: 1 vCPU populating 128 MiB on shadow paging (``shadow-pvm``, whose fault costs are
  distributions): the fast engine's scalar fault-run loop (``desim/faultrun.py``).
* ``concurrent``: 8 vCPUs populating 128 MiB each on the TDP MMU (read-locked faults, 4 KiB pages).
* The ``batched`` column: the share of the fast engine's faults taken in fault runs (in
  vectorised blocks); ``cohort``: the share taken as planned faults of cohort runs (many vCPUs in one
  loop, ``desim/cohort.py``).
* ``--set FIELD=VALUE`` (repeatable): override a field of every row's scenario, as ``desim run --set``
  does; ``--set costs=mean`` gives every cost its mean (no draws: the rates with constant costs).
* ``--only uncontended,drawn``: measure only these rows (``uncontended``, ``contended``, ``drawn``,
  ``concurrent``).
* ``--profile``: pyinstrument's call tree of the fast engine on each measured row
  (``pip install -e ".[bench]"``).
* ``peak RSS / GiB``: the run's peak resident set in a fresh subprocess above its resident set
  after importing desim (``benchmarks/bench_memory.py``'s measurement) per simulated GiB for a 1 GiB VM on 4 KiB host pages
  populated by 8 vCPUs (``benchmarks/bench_memory.py``'s ``1g-4k-8v``: on 4 KiB pages the state
  grows with RAM; on huge pages it follows the mappings, see that script), and the SPTE
  state's own bytes per 4 KiB guest page.
* ``--boot``: wall time of ``workloads/boot/boot-32g-churn.toml`` (one replication, fast zap)
  per engine.
* ``--vcpu-scaling``: wall time of ``experiments/vcpu_scaling.py`` at its default replications,
  1 worker (long: tens of minutes on an idle machine), per engine.
* ``--largest``: the largest VM this script simulates here (``--largest-tib``, 896 vCPUs on
  1 GiB host pages, populating sequentially), wall time and peak RSS.

Rates are per wall second and per CPU second of this process (``time.process_time``): with
other work on the machine the CPU-second rate is the steadier of the two. The engine is
selected as ``desim run --engine``; on a desim without engines the script measures the one
engine there is (``reference``).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import simpy  # noqa: E402

from desim.cli import _parse_set  # noqa: E402
from desim.scenario import load_scenario, validate_scenario  # noqa: E402
from desim.vm import Vm  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
HAS_ENGINES = "engine" in inspect.signature(Vm.__init__).parameters
ENGINES = ("reference", "fast") if HAS_ENGINES else ("reference",)


def sc(vcpus: int, ram: int, profile: str, backing: str, access_ns: float, name: str = "bench"):
    return validate_scenario({
        "name": name, "profile": profile, "profile_overrides": {"kernel": {"backing": backing}},
        "time_limit_ms": 1e9,
        "vm": {"vcpus": vcpus, "memslots": [{"id": 0, "gpa": 0, "size": ram}]},
        "phases": [{"name": "populate", "pattern": "sequential", "slot": 0, "access_ns": access_ns}],
    }, "benchmark")


def make_vm(scenario, engine: str, policy: str = "fast", seed: int = 1, replication: int = 0) -> Vm:
    if HAS_ENGINES:
        return Vm(scenario, policy, seed=seed, replication=replication, engine=engine)
    return Vm(scenario, policy, seed=seed, replication=replication)


def simpy_rate(n: int = 300_000) -> tuple[float, float]:
    """Bare SimPy: events per wall second and per CPU second of one process yielding timeouts."""
    env = simpy.Environment()

    def proc(env):
        timeout = env.timeout
        for _ in range(n):
            yield timeout(1.0)
    env.process(proc(env))
    w0, c0 = time.perf_counter(), time.process_time()
    env.run()
    return n / (time.perf_counter() - w0), n / max(time.process_time() - c0, 1e-9)


def fault_rate(scenario, engine: str) -> tuple[float, float, int, float, float, float]:
    """Faults per wall second and per CPU second of one run, the faults, and the shares of them taken in
    fault runs, in vectorised blocks and as planned faults of cohort runs (fast engine)."""
    vm = make_vm(scenario, engine)
    w0, c0 = time.perf_counter(), time.process_time()
    res = vm.run()
    w, c = time.perf_counter() - w0, time.process_time() - c0
    f = res.metrics["faults"]
    runs = [r for r in (getattr(v, "fault_run", None) for v in vm.vcpus) if r is not None]
    taken = sum(r.faults for r in runs) / max(f, 1)
    vector = sum(r.vector_faults for r in runs) / max(f, 1)
    cohort = getattr(vm, "cohort", None)
    planned = (cohort.planned if cohort is not None else 0) / max(f, 1)
    return f / w, f / max(c, 1e-9), f, taken, vector, planned


def profile(scenario, title: str) -> None:
    """pyinstrument's call tree of one fast-engine run (where the time goes)."""
    from pyinstrument import Profiler

    vm = make_vm(scenario, ENGINES[-1])
    prof = Profiler(interval=0.0005)
    prof.start()
    vm.run()
    prof.stop()
    print(f"\n--- profile: {title} ({ENGINES[-1]} engine) ---")
    print(prof.output_text(unicode=False, color=False, show_all=False))


def rss_child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter that prints a JSON dict; add its peak RSS (bytes)."""
    prog = (f"import sys, json, resource; sys.path.insert(0, {str(ROOT)!r})\n{code}\n"
            "out['maxrss'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            "print(json.dumps(out))")
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def memory(engine: str) -> tuple[float, float]:
    """(peak RSS above the imports, bytes per simulated GiB; SPTE bytes per 4 KiB page): the
    ``1g-4k-8v`` case of ``bench_memory.py``, on ``engine``."""
    from benchmarks.bench_memory import CASES, run_case

    r = run_case(CASES["1g-4k-8v"], root=ROOT, engine=engine if HAS_ENGINES else None)
    gib = r["ram"] / (1 << 30)
    return (r["peak"] - r["base"]) / gib, r["spte"] / (r["ram"] >> 12)


def boot_wall(engine: str) -> tuple[float, float]:
    scen = load_scenario(str(ROOT / "workloads/boot/boot-32g-churn.toml"))
    vm = make_vm(scen, engine)
    w0, c0 = time.perf_counter(), time.process_time()
    vm.run()
    return time.perf_counter() - w0, time.process_time() - c0


def vcpu_scaling_wall(engine: str) -> float:
    env = dict(os.environ, DESIM_ENGINE=engine, PYTHONPATH=str(ROOT))
    w0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "experiments/vcpu_scaling.py"), "--workers", "1",
                    "--out", f"/tmp/desim-bench-vcpu-scaling-{engine}"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - w0


def largest(tib: float, vcpus: int, engine: str) -> dict:
    eng = f", engine={engine!r}" if HAS_ENGINES else ""
    return rss_child(
        "import time, benchmarks.bench_speed as B\nfrom desim.vm import Vm\n"
        f"vm = Vm(B.sc({vcpus}, int({tib} * (1 << 40)), 'tdp-icelake', 'hugetlbfs-1g', 200.0), 'fast', seed=1{eng})\n"
        "t = time.perf_counter(); r = vm.run()\n"
        "out = {'wall': time.perf_counter() - t, 'faults': r.metrics['faults'], 'spte_bytes': vm.mmu.memory_bytes()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller scenarios (64 MiB) for a first look")
    ap.add_argument("--boot", action="store_true", help="also time boot-32g-churn per engine")
    ap.add_argument("--vcpu-scaling", action="store_true", help="also time experiments/vcpu_scaling.py (long)")
    ap.add_argument("--largest", action="store_true", help="also run the largest VM (--largest-tib)")
    ap.add_argument("--largest-tib", type=float, default=32.0)
    ap.add_argument("--largest-vcpus", type=int, default=896)
    ap.add_argument("--profile", action="store_true", help="print pyinstrument call trees (needs .[bench])")
    ap.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="override a scenario field of every row, e.g. --set costs=mean (repeatable)")
    ap.add_argument("--only", default=None, help="comma-separated rows: uncontended,contended,drawn,concurrent")
    args = ap.parse_args()
    overrides = _parse_set(args.set)
    ram = (64 if args.quick else 512) * MiB
    un_sc = sc(1, ram, "tdp-icelake", "4k", 50.0)
    co_sc = sc(32, ram, "legacy-2020", "4k", 1.0)
    dr_sc = sc(1, ram // 4, "shadow-pvm", "4k", 50.0)
    cc_sc = sc(8, ram // 4 * 8, "tdp-icelake", "4k", 50.0)
    cases = (("uncontended", un_sc), ("contended", co_sc), ("drawn", dr_sc), ("concurrent", cc_sc))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _ in cases}
        if unknown:
            ap.error(f"--only {','.join(sorted(unknown))}: choose among uncontended, contended, drawn, concurrent")
        cases = tuple((name, scen) for name, scen in cases if name in wanted)
    if overrides:
        cases = tuple((name, scen.with_overrides(overrides)) for name, scen in cases)
    if args.profile:
        for name, scen in cases:
            profile(scen, name)
    samples: dict[str, list] = {}
    for _ in range(args.repeats):
        for eng in ENGINES:
            sw, sc_ = simpy_rate()
            samples.setdefault("simpy", []).append((sw, sc_))
            for name, scen in cases:
                w, c, f, taken, vector, planned = fault_rate(scen, eng)
                samples.setdefault(f"{name}/{eng}", []).append((w, c, w / sw, c / sc_, f, taken, vector, planned))
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    shown = "; " + ", ".join(f"{k}={v}" for k, v in overrides.items()) if overrides else ""
    print(f"desim speed and scale ({'engines: ' + ', '.join(ENGINES)}; medians of {args.repeats} interleaved "
          f"runs; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs{shown})")
    print(f"{'row':<34} {'engine':<10} {'per wall s':>14} {'per CPU s':>14} {'x SimPy (wall)':>15} "
          f"{'x SimPy (CPU)':>14} {'batched (vector)':>17} {'cohort':>7}")
    s = samples["simpy"]
    print(f"{'simpy timeout events':<34} {'-':<10} {med(s, 0):>14,.0f} {med(s, 1):>14,.0f} {1:>15.3f} {1:>14.3f}")
    for name, label in (("uncontended", "uncontended faults (1 vCPU, TDP)"),
                        ("contended", "contended faults (32 vCPU, excl.)"),
                        ("drawn", "drawn costs (1 vCPU, shadow-pvm)"),
                        ("concurrent", "concurrent (8 vCPU, TDP read lock)")):
        if f"{name}/{ENGINES[0]}" not in samples:
            continue
        for eng in ENGINES:
            x = samples[f"{name}/{eng}"]
            share = f"{med(x, 5):>8.0%} ({med(x, 6):.0%})" if eng == "fast" else ""
            co = f"{med(x, 7):.0%}" if eng == "fast" else ""
            print(f"{label:<34} {eng:<10} {med(x, 0):>14,.0f} {med(x, 1):>14,.0f} {med(x, 2):>15.3f} "
                  f"{med(x, 3):>14.3f} {share:>17} {co:>7}")
    for eng in ENGINES:
        per_gib, per_page = memory(eng)
        print(f"{'peak RSS per simulated GiB':<34} {eng:<10} {per_gib / (1 << 20):>12,.2f} MiB  "
              f"(SPTE state {per_page:.4f} bytes per 4 KiB page; 1 GiB VM on 4 KiB pages, 8 vCPUs)")
    if args.boot:
        for eng in ENGINES:
            w, c = boot_wall(eng)
            print(f"{'boot-32g-churn, 1 replication':<34} {eng:<10} {w:>12.1f} s wall {c:>10.1f} s CPU")
    if args.vcpu_scaling:
        for eng in ENGINES:
            print(f"{'vcpu_scaling.py default, 1 worker':<34} {eng:<10} {vcpu_scaling_wall(eng):>12.1f} s wall")
    if args.largest:
        for eng in ENGINES[-1:]:
            r = largest(args.largest_tib, args.largest_vcpus, eng)
            print(f"{'largest VM':<34} {eng:<10} {args.largest_tib:g} TiB, {args.largest_vcpus} vCPUs, 1 GiB pages: "
                  f"{r['faults']:,} faults in {r['wall']:.1f} s wall, peak RSS {r['maxrss'] / GiB:.2f} GiB, "
                  f"SPTE state {r['spte_bytes'] / MiB:.1f} MiB")


if __name__ == "__main__":
    main()
