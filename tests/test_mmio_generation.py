"""MMIO SPTEs and the memslot generation (desim/mmu.py swap_memslots / mmio_spte, desim/vcpu.py _mmio_begin).

check_mmio_spte: an MMIO SPTE is valid only for the memslot generation it was made in; every
kvm_swap_active_memslots advances the generation by 2; a wrap of MMIO_SPTE_GEN_MASK forces
kvm_mmu_zap_all_fast whatever the policy; kvm_arch_memslots_updated kicks every vCPU.
Checked against Linux 6.1.176 (mmu.c kvm_mmu_invalidate_mmio_sptes, spte.h MMIO_SPTE_GEN_MASK,
x86.c kvm_arch_memslots_updated, kvm_main.c kvm_swap_active_memslots): see desim/vmm.py.
"""
from __future__ import annotations

from desim.mmu import MMIO_SPTE_GEN_MASK
from desim.scenario import validate_scenario
from desim.vm import Vm

MMIO = 0x10000000  # 256 MiB: no memslot there


def _scenario(profile: str = "tdp-icelake", **kernel):
    return validate_scenario({
        "name": "mmio", "profile": profile, "profile_overrides": {"kernel": {"backing": "4k", **kernel}},
        "vm": {"vcpus": 1, "memslots": [{"id": 0, "gpa": 0, "size": "4MiB"}]},
        "phases": [
            {"name": "probe", "pattern": "sequential", "gpa": MMIO, "size": "4KiB", "passes": 5},
            {"name": "hotplug", "pattern": "none",
             "memslot_ops": [{"at_us": 0, "op": "create", "slot": 1, "gpa": "8MiB", "size": "2MiB"},
                             {"at_us": 100, "op": "delete", "slot": 1}]},
            {"name": "probe-again", "pattern": "sequential", "gpa": MMIO, "size": "4KiB", "passes": 5}]}, "test")


def test_mmio_spte_first_access_is_a_violation_then_misconfigs_stale_after_a_memslot_update():
    m = Vm(_scenario(), "targeted").run().metrics
    assert m["mmio_exits"] == 10
    assert m["faults_mmio"] == 1  # only the first access found no MMIO SPTE: an EPT violation
    assert m["ept_violations"] == m["faults"]
    # 4 hits of a valid SPTE, then after 3 swaps (create; delete = 2) one stale hit refreshed, 4 valid
    assert m["ept_misconfigs"] == 9 and m["mmio_spte_refreshes"] == 1
    assert m["memslot_swaps"] == 3


def test_without_mmio_caching_every_mmio_access_is_a_fault():
    m = Vm(_scenario(mmio_caching=False), "targeted").run().metrics
    assert m["faults_mmio"] == 10 and m["ept_misconfigs"] == 0


def test_generation_wrap_forces_a_fast_zap_under_the_targeted_policy():
    vm = Vm(_scenario(), "targeted")
    vm.mmu.memslots_generation = MMIO_SPTE_GEN_MASK + 1 - 4  # the hot-plug's second swap wraps
    m = vm.run().metrics
    assert m["mmio_gen_wraps"] == 1
    assert m["zaps_fast"] == 1 and m["zaps_targeted"] == 1
    # the fast zap dropped the MMIO SPTE too: the next probe is an EPT violation again
    assert m["faults_mmio"] == 2


def test_every_memslot_swap_kicks_the_vcpus_in_guest_mode():
    data = {"name": "kicks", "profile": "tdp-icelake", "profile_overrides": {"kernel": {"backing": "4k"}},
            "vm": {"vcpus": 4, "memslots": [{"id": 0, "gpa": 0, "size": "64MiB"}]},
            "phases": [{"name": "spin", "pattern": "uniform", "slot": 0, "accesses": 200000, "access_ns": 100,
                        "memslot_ops": [{"at_us": 2000, "op": "toggle", "slot": 1, "gpa": "1GiB", "size": "2MiB",
                                         "hold_us": 200, "repeat": 5, "every_us": 1000}]}]}
    res = Vm(validate_scenario(data, "test"), "targeted").run()
    m = res.metrics
    assert m["memslot_swaps"] == 5 * 3  # a create swaps once, a delete twice
    # nothing to zap in the untouched slot, no flush: every IPI is a swap's kick of a guest-mode vCPU
    # (a vCPU in the host at the swap gets no IPI: it sees the new memslots before re-entry)
    assert m["remote_flushes"] == 0 and 0 < m["ipis_sent"] <= 4 * m["memslot_swaps"]
    assert sum(r["kicks"] for r in res.per_vcpu) == m["ipis_sent"]


def test_the_mmio_generation_wraps_once_every_2_pow_18_swaps():
    """kvm_mmu_invalidate_mmio_sptes: 19 generation bits, the address-space bit stripped, +2 per swap."""
    from desim.mmu import Mmu

    mmu = Mmu()
    wraps = [i for i in range(1, 2 * (1 << 18) + 1) if mmu.swap_memslots()]
    assert wraps == [1 << 18, 2 * (1 << 18)]
