"""Zap costs as the kernel's walks incur them (desim/zap.py, desim/mmu.py tdp_walk_visits).

tdp_mmu_zap_leafs visits every entry of the range in each present table, not only what it zaps;
tdp_mmu_zap_root walks every present table once per zap level (4K, 2M, 1G, root) and handle_removed_pt
writes all 512 entries of each removed table.
"""
from __future__ import annotations

from desim.memslot import Memslot
from desim.mmu import PG_LEVEL_4K, Mmu
from desim.profile import load_profile
from desim.scenario import validate_scenario
from desim.vm import run_scenario
from desim.zap import tdp_zap_root_visits


def test_walk_visits_count_the_whole_page_table_not_the_leaf():
    m = Mmu(backing="4k")
    ss = m.add_slot(Memslot(1, 0x40000, 0x40000, 0, 0x7F0000000000))  # 1 GiB at 1 GiB
    assert m.tdp_walk_visits(0x40000, 0x80000) == 1  # nothing mapped: one root entry
    m.install(ss, 0x40000, PG_LEVEL_4K)
    # root entry + 1 PDPT entry (the 1 GiB) + 512 PD entries + 512 PT entries
    assert m.tdp_walk_visits(0x40000, 0x80000) == 1 + 1 + 512 + 512
    m.install(ss, 0x40000 + 511, PG_LEVEL_4K)
    assert m.tdp_walk_visits(0x40000, 0x80000) == 1 + 1 + 512 + 512  # same table: no more visits
    m.install(ss, 0x40000 + 512, PG_LEVEL_4K)
    assert m.tdp_walk_visits(0x40000, 0x80000) == 1 + 1 + 512 + 2 * 512
    # a range inside one PT page visits only its own entries there
    assert m.tdp_walk_visits(0x40000 + 8, 0x40000 + 16) == 1 + 1 + 1 + 8


def test_zap_root_walks_each_table_once_per_pass_at_or_below_its_level():
    # 1 PDPT, 2 PDs, 10 PTs, 4-level root: passes 4K (all), 2M (no PTs), 1G (PDPT+root), root (root)
    assert tdp_zap_root_visits({1: 10, 2: 2, 3: 1}, 4, 1) == 512 * ((1 + 1 + 2 + 10) + (1 + 1 + 2) + (1 + 1) + 1)
    assert tdp_zap_root_visits({1: 10, 2: 2, 3: 1}, 4, 0) == 0


def _sparse_delete(profile: str, policy: str) -> dict:
    """A 1 GiB slot with one 4 KiB page touched in every 2 MiB region, deleted."""
    data = {"name": "sparse", "profile": profile, "profile_overrides": {"kernel": {"backing": "4k"}},
            "vm": {"vcpus": 1, "memslots": [{"id": 0, "gpa": 0, "size": "4MiB"},
                                            {"id": 1, "gpa": "1GiB", "size": "1GiB"}]},
            "phases": [{"name": "touch", "pattern": "none",
                        "touches": [{"gpa": f"{1024 + 2 * i}MiB", "size": "4KiB"} for i in range(512)]},
                       {"name": "delete", "pattern": "none",
                        "memslot_ops": [{"at_us": 0, "op": "delete", "slot": 1}]}]}
    return run_scenario(validate_scenario(data, "test"), policy).metrics


def test_targeted_zap_of_a_sparse_slot_pays_for_the_walk():
    P = load_profile("tdp-icelake")
    m = _sparse_delete("tdp-icelake", "targeted")
    assert m["sptes_zapped"] == 512
    visits = 1 + 1 + 512 + 512 * 512
    assert m["zap_spte_visits"] == visits
    walk = visits * P.ns("spte_visit") + 512 * P.ns("spte_zap")
    # the former model charged (root_level + PT pages + zapped) x spte_zap = 1,028 x 30 ns = 31 us
    assert m["zap_duration_total_ns"] >= walk > 500_000


def test_fast_zap_teardown_pays_512_atomic_writes_per_table():
    P = load_profile("tdp-icelake")
    assert P.ns("sp_free") >= 4000  # handle_removed_pt: 512 locked xchg (was 150 ns)
    m = _sparse_delete("tdp-icelake", "fast")
    # 512 PT pages + 1 PD + 1 PDPT for slot 1, and the 4 MiB slot 0 was never touched
    tables = 512 + 1 + 1
    assert m["pt_pages_freed"] == tables + 1  # + the root
    assert m["lock_hold_teardown_ns"] >= tables * P.ns("sp_free")


def test_hash_walk_costs_one_probe_plus_a_chain_per_gfn():
    from desim.zap import hash_walk_probes
    assert hash_walk_probes(1000, 0) == 0  # list_empty(&kvm->arch.active_mmu_pages): no walk
    assert hash_walk_probes(1000, 1) == 1000
    assert hash_walk_probes(1000, 4096) == 2000  # one shadow page per bucket on average
    assert hash_walk_probes(1 << 18, 40960) == (1 << 18) * 11


def _shadow_delete(version: str, touch_mib: int) -> dict:
    data = {"name": "hash", "profile": "shadow-pvm", "profile_overrides": {"kernel": {"version": version}},
            "vm": {"vcpus": 1, "memslots": [{"id": 0, "gpa": 0, "size": "64MiB"},
                                            {"id": 1, "gpa": "1GiB", "size": "256MiB"}]},
            "phases": [{"name": "touch", "slot": 0, "size": f"{touch_mib}MiB"},
                       {"name": "delete", "pattern": "none",
                        "memslot_ops": [{"at_us": 0, "op": "delete", "slot": 1}]}]}
    return run_scenario(validate_scenario(data, "test"), "targeted").metrics


def test_shadow_targeted_zap_hash_walk_grows_with_shadow_pages():
    small, big = _shadow_delete("6.18", 2), _shadow_delete("6.18", 64)
    npages = 256 << 8
    # the shadow pages of slot 0 (PT pages, PD, PDPT, root) lengthen every bucket chain
    assert small["hash_probes"] == npages + npages * (1 + 1 + 1 + 1) // 4096
    assert big["hash_probes"] == npages + npages * (32 + 1 + 1 + 1) // 4096
    assert big["zap_duration_total_ns"] > small["zap_duration_total_ns"]
    # before 6.12 (the seed's targeted zap) there is no hash walk
    assert _shadow_delete("6.11", 64)["hash_probes"] == 0


def test_targeted_zap_of_a_slot_holding_guest_page_tables_zaps_their_shadow_pages_and_children():
    """kvm_mmu_zap_memslot_pages_and_flush zaps the shadow pages shadowing guest page tables in the slot;
    their children map *other* slots, which then re-fault although the targeted zap spared those slots."""
    data = {"name": "gpt", "profile": "shadow-pvm",
            "vm": {"vcpus": 1, "guest_page_tables": "64MiB",
                   "memslots": [{"id": 0, "gpa": 0, "size": "16MiB"}, {"id": 1, "gpa": "64MiB", "size": "2MiB"}]},
            "phases": [{"name": "touch", "slot": 0},
                       {"name": "delete", "pattern": "none",
                        "memslot_ops": [{"at_us": 0, "op": "delete", "slot": 1}]},
                       {"name": "again", "slot": 0}]}
    m = run_scenario(validate_scenario(data, "test"), "targeted").metrics
    # slot 1 holds the guest's tables for gpa 0..1 GiB: slot 0's 8 PT shadow pages go with their 4,096 SPTEs
    # (re-faulted 8 at a time: FNAME(pte_prefetch) maps the accessed neighbours)
    assert m["gpte_sp_zapped"] == 8 and m["sptes_zapped"] == 4096 and m["faults_after_zap"] == 4096 // 8
    data["vm"].pop("guest_page_tables")
    assert run_scenario(validate_scenario(data, "test"), "targeted").metrics["faults_after_zap"] == 0
