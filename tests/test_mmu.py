"""SPTE state: fast zap is O(1) and obsoletes everything; targeted zap keeps non-leaf and other slots."""
from __future__ import annotations

import numpy as np
import pytest

from desim.memslot import Memslot
from desim.mmu import PG_LEVEL_2M, PG_LEVEL_4K, Mmu


def _mmu(backing="4k"):
    m = Mmu(backing=backing)
    ram = m.add_slot(Memslot(0, 0, 1024, 0, 0x7F0000000000))          # 4 MiB at gfn 0
    rom = m.add_slot(Memslot(1, 0x100000, 16, 2, 0x7F1000000000))      # 64 KiB ROM at 4 GiB
    return m, ram, rom


def test_install_allocates_page_tables_once():
    m, ram, _ = _mmu()
    assert m.install(ram, 5, PG_LEVEL_4K) == 3          # PDPT, PD, PT pages
    assert m.install(ram, 6, PG_LEVEL_4K) == 0          # same 2 MiB region
    assert m.install(ram, 512, PG_LEVEL_4K) == 1        # next PT page only
    assert m.is_mapped(5) and m.is_mapped(512) and not m.is_mapped(7)
    assert m.present_leaf == 3 and m.present_pt == 4


def test_fast_zap_obsoletes_every_spte_and_reports_the_work():
    m, ram, rom = _mmu()
    for g in range(100):
        m.install(ram, g, PG_LEVEL_4K)
    m.install(rom, 0x100000, PG_LEVEL_4K)
    work = m.zap_all_fast()
    assert (work.leaf_sptes, work.pt_pages) == (101, 3 + 2)
    assert not m.mapped_mask(np.arange(100)).any() and not m.is_mapped(0x100000)
    assert m.present_leaf == 0 and m.mmu_valid_gen == 1
    # a re-fault needs the page tables again: nothing of the old roots is reused
    assert m.install(ram, 0, PG_LEVEL_4K) == 3


def test_fast_zap_tag_wraparound_keeps_state_consistent():
    m, ram, _ = _mmu()
    for i in range(200):
        m.install(ram, i % 1024, PG_LEVEL_4K)
        m.zap_all_fast()
        assert not m.is_mapped(i % 1024)
    m.install(ram, 3, PG_LEVEL_4K)
    assert m.is_mapped(3) and m.mapped_mask(np.arange(1024)).sum() == 1


def test_targeted_zap_keeps_other_slots_and_upper_levels():
    m, ram, rom = _mmu()
    for g in range(64):
        m.install(ram, g, PG_LEVEL_4K)
    m.install(rom, 0x100000, PG_LEVEL_4K)
    pt_before = m.present_pt
    counts = m.zap_slot_leafs(rom)
    assert counts[PG_LEVEL_4K] == 1
    assert m.mapped_mask(np.arange(64)).all()             # RAM untouched
    assert not m.is_mapped(0x100000)
    assert m.present_pt == pt_before                      # non-leaf retained
    assert m.install(rom, 0x100000, PG_LEVEL_4K) == 0     # so a re-fault allocates nothing


def test_huge_mappings_and_host_residency_survive_a_slot_recreate():
    m = Mmu(backing="thp")
    ram = m.add_slot(Memslot(0, 0, 2048, 0, 0x7F0000000000))   # 8 MiB, 2 MiB-congruent
    assert m.host_level(ram, 700) == PG_LEVEL_2M
    m.make_resident(ram, 700, PG_LEVEL_2M)
    m.install(ram, 700, PG_LEVEL_2M)
    assert m.mapped_mask(np.arange(512, 1024)).all() and not m.is_mapped(511)
    m.zap_slot_leafs(ram)
    assert not m.is_mapped(700)
    m.remove_slot(0)
    again = m.add_slot(Memslot(0, 0, 2048, 0, 0x7F0000000000))  # QEMU re-creates over the same RAM
    assert m.host_resident(again, 700, PG_LEVEL_2M)              # host page still there: not a first touch


def test_misaligned_slot_maps_4k_only():
    m = Mmu(backing="thp")
    s = m.add_slot(Memslot(0, 0x10, 4096, 0, 0x7F0000000000))   # gpa and hva not congruent mod 2 MiB
    assert m.host_level(s, 0x400) == PG_LEVEL_4K


def test_prefetch_needs_resident_host_pages():
    m, ram, _ = _mmu()
    assert m.prefetch_candidates(ram, 9, need_accessed=False) == []      # nothing resident yet
    for g in range(8, 16):
        m.make_resident(ram, g, PG_LEVEL_4K)
    assert m.prefetch_candidates(ram, 9, need_accessed=False) == [8, 10, 11, 12, 13, 14, 15]
    assert m.prefetch_candidates(ram, 9, need_accessed=True) == []       # guest A bits never set


@pytest.mark.parametrize("need_accessed", [False, True])
def test_planned_prefetch_is_what_each_fault_would_prefetch(need_accessed):
    """Mmu.plan_prefetch_4k over faults in random order (gfns taken as present included) gives what installing
    each fault and its Mmu.prefetch_candidates one after the other does (Vcpu._fault_locked)."""
    rng = np.random.default_rng(3)
    m, ram, _ = _mmu()
    for g in rng.choice(64, 40, replace=False).tolist():
        m.make_resident(ram, g, PG_LEVEL_4K)
    for g in rng.choice(64, 12, replace=False).tolist():
        m.install(ram, g, PG_LEVEL_4K)
    m.zap_all_fast()  # everything obsolete, "ever mapped" kept
    present = np.array([5, 17, 40], dtype=np.int64)
    gfns = np.array([g for g in rng.permutation(64).tolist() if g not in present.tolist()][:30], dtype=np.int64)
    fault, members, take = m.plan_prefetch_4k(ram, gfns, need_accessed, present)
    for g in present.tolist():
        m.install(ram, g, PG_LEVEL_4K)
    expect_fault, expect_pf = [], []
    for g in gfns.tolist():  # the per-fault path: an access faults only where nothing maps its gfn yet
        expect_fault.append(not m.is_mapped(g))
        if expect_fault[-1]:
            m.install(ram, g, PG_LEVEL_4K)
            expect_pf.append(m.prefetch_candidates(ram, g, need_accessed))
            for n in expect_pf[-1]:
                m.install(ram, n, PG_LEVEL_4K)
    assert fault.tolist() == expect_fault and any(expect_pf)
    assert [members[i][take[i]].tolist() for i in range(len(members))] == expect_pf


def test_memory_is_about_one_byte_per_guest_page():
    m = Mmu(backing="thp")
    m.add_slot(Memslot(0, 0, 1 << 18, 0, 0x7F0000000000))   # 1 GiB
    assert m.memory_bytes() <= (1 << 18) * 1.01


def test_eager_split_turns_huge_leaves_into_4k_without_losing_the_mapping():
    m = Mmu(backing="thp")
    s = m.add_slot(Memslot(0, 0, 2048, 0, 0x7F0000000000))
    for u in range(4):
        m.install(s, u * 512, PG_LEVEL_2M)
    split, allocated = m.split_slot_huge_leafs(s)
    assert (split, allocated) == (4, 4)                  # one PT page per 2 MiB
    assert m.mapped_mask(np.arange(2048)).all()          # still mapped, now at 4K
    assert m.slot_leaf_counts(s) == {PG_LEVEL_4K: 2048, PG_LEVEL_2M: 0, 3: 0}
