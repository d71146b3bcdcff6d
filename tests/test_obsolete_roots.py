"""Shadow / legacy MMU: the last vCPU that drops an obsolete root after a fast zap frees it for real,
and kvm_mmu_commit_zap_page flushes every vCPU's TLB (mmu_free_root_page in arch/x86/kvm/mmu/mmu.c).
The TDP MMU puts its roots without a flush (kvm_tdp_mmu_put_root)."""
from __future__ import annotations

from desim.scenario import validate_scenario
from desim.vm import run_scenario


def _toggle(profile: str, policy: str) -> dict:
    data = {"name": "roots", "profile": profile, "profile_overrides": {"kernel": {"backing": "4k"}},
            "vm": {"vcpus": 4, "memslots": [{"id": 0, "gpa": 0, "size": "16MiB"}]},
            "phases": [{"name": "work", "pattern": "uniform", "slot": 0, "accesses": 50000, "access_ns": 100,
                        "memslot_ops": [{"at_us": 500, "op": "toggle", "slot": 5, "gpa": "1GiB",
                                         "size": "64KiB", "hold_us": 100, "repeat": 3, "every_us": 1000}]}]}
    return run_scenario(validate_scenario(data, "test"), policy).metrics


def test_last_vcpu_dropping_an_obsolete_shadow_root_flushes():
    m = _toggle("shadow-pvm", "fast")
    assert m["zaps_fast"] == 3
    assert m["obsolete_root_flushes"] == 3  # one root shared by the vCPUs: one flush per fast zap
    assert m["remote_flushes"] >= m["obsolete_root_flushes"] + 3  # plus each zap's commit flush


def test_no_such_flush_with_the_tdp_mmu_or_the_targeted_zap():
    assert _toggle("tdp-icelake", "fast")["obsolete_root_flushes"] == 0
    assert _toggle("shadow-pvm", "targeted")["obsolete_root_flushes"] == 0
