"""The scale workloads (workloads/scale/): they load, their memory estimate follows the mappings
(1 GiB pages: megabytes for 32 TiB; 4 KiB pages: a byte per page), and shrunk copies run under both
policies with the structure of the full ones (the memmap initialisation on every vCPU, the recorded
boot's BAR churn on vCPUs 0-3). The full runs are on demand: benchmarks/bench_memory.py."""
from __future__ import annotations

from pathlib import Path

from desim import limits
from desim.scenario import load_scenario
from desim.vm import Vm

ROOT = Path(__file__).resolve().parents[1]
SCALE = ROOT / "workloads" / "scale"
# shrunk for tests (also used by tests/test_engines_differential.py): 8 vCPUs, 4 MiB of memmap per node
SHRINK = {
    "boot-32t-churn": {"vm.vcpus": 8, **{f"phases.2.touches.{n}.size": "4MiB" for n in range(8)},
                       **{f"phases.2.touches.{n}.gpa": f"{(4 << 40) + (1 << 30) + n * (4 << 40) - (4 << 20):#x}"
                          for n in range(8)}},
    "populate-4t-4k": {"vm.vcpus": 4, "vm.memslots.0.size": "16MiB"},
}


def test_every_scale_workload_has_a_shrink():
    assert {p.stem for p in SCALE.glob("*.toml")} == set(SHRINK)


def test_the_32t_boot_is_32_tib_on_896_vcpus_and_its_state_follows_the_mappings():
    sc = load_scenario(SCALE / "boot-32t-churn.toml")
    est = limits.estimate(sc)
    assert sc.vm.vcpus == 896 and est.memslot_ioctls > 100
    ram = sum(s.size for s in sc.vm.memslots) + (4 << 40) - (3 << 30) + (3 << 30)  # + the trace's RAM slots
    assert ram == 32 << 40
    # SPTE state of 32 TiB on 1 GiB pages: a few MiB (a 4 KiB-level chunk per misaligned slot edge); the rest
    # of the estimate is the bound on the samples
    assert est.memory_bytes - limits.SAMPLE_BYTES_PER_ACCESS * min(est.accesses, limits.EXACT_SAMPLE_LIMIT) < 4 << 20
    full = limits.estimate(load_scenario(SCALE / "populate-4t-4k.toml"))
    assert full.memory_bytes >= 1 << 30 and full.accesses == 1 << 30


def test_shrunk_scale_workloads_run_under_both_policies():
    for name, shrink in SHRINK.items():
        sc = load_scenario(SCALE / f"{name}.toml").with_overrides(shrink)
        res = {p: Vm(sc, p, seed=1).run().metrics for p in ("fast", "targeted")}
        assert res["fast"]["faults"] > 0 and res["fast"]["accesses"] == res["targeted"]["accesses"]
        if name == "boot-32t-churn":
            assert res["fast"]["zaps_fast"] > 50 and res["targeted"]["zaps_targeted"] > 50
            assert res["fast"]["faults_after_zap"] > res["targeted"]["faults_after_zap"]
