"""Shadow paging with guest processes (desim/guest_as.py): roots per guest CR3, prev_roots, write protection.

Kernel behaviour checked (arch/x86/kvm/mmu/mmu.c): a CR3 write to one of the vCPU's 3 cached roots is a
cache hit (fast_pgd_switch); a root dropped from the cache stays valid in mmu_page_hash and is found again,
not rebuilt (mmu_free_root_page only zaps invalid roots); a fast zap makes every process's root obsolete,
each vCPU drops its own and the processes' roots and private mappings are rebuilt by faults, while a
targeted zap keeps every root except those whose top-level guest table lies in the slot; guest writes to
shadowed guest page tables are write-protection faults (kvm_mmu_pte_write). TDP profiles ignore all of it.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from desim.errors import DesimInputError
from desim.scenario import validate_scenario
from desim.vm import Vm

MiB = 1 << 20


def _data(processes: int = 4, vcpus: int = 2, profile: str = "shadow-pvm", guest: dict | None = None,
          ops: list | None = None, accesses: int = 6000) -> dict:
    g = {"processes": processes, **({"context_switch_us": 10} if processes > 1 else {}),
         "process_pages": 64, "process_gpa": "8MiB", "user_share": 0.3, **(guest or {})}
    return {"name": "procs", "profile": profile, "profile_overrides": {"kernel": {"backing": "4k"}},
            "vm": {"vcpus": vcpus, "memslots": [{"id": 0, "gpa": 0, "size": "8MiB"},
                                                 {"id": 1, "gpa": "8MiB", "size": "4MiB"}]},
            "guest": g,
            "phases": [{"name": "populate", "pattern": "sequential", "slot": 0, "size": "2MiB"},
                       {"name": "work", "pattern": "uniform", "slot": 0, "size": "2MiB", "accesses": accesses,
                        "access_ns": 50, "sharing": "shared", "memslot_ops": ops or []}]}


def _run(data: dict, policy: str = "targeted", audit: bool = True) -> dict:
    return Vm(validate_scenario(data, "test"), policy, seed=3, audit=audit).run().metrics


TOGGLES = [{"at_us": 400, "op": "toggle", "slot": 5, "gpa": "1GiB", "size": "64KiB", "hold_us": 20,
            "repeat": 3, "every_us": 150}]


def test_defaults_are_the_model_without_processes_and_tdp_ignores_them():
    base = _data(1, guest={"process_pages": 0, "user_share": 0.0})
    base.pop("guest")
    for profile in ("shadow-pvm", "tdp-icelake"):
        base["profile"] = profile
        plain = _run(base, "fast", audit=False)
        explicit = _run({**base, "guest": {"processes": 1}}, "fast", audit=False)
        assert plain == explicit, profile
    # TDP: CR3 writes and page-table writes do not exit; the guest table changes nothing
    tdp = _data(4, profile="tdp-icelake", guest={"process_pages": 0, "user_share": 0.0, "pt_write_share": 0.05})
    m = _run(tdp, "fast", audit=False)
    assert m == plain and m["cr3_switches"] == 0 and m["faults_wp"] == 0


def test_a_cr3_write_to_a_cached_root_hits_and_evicted_roots_are_found_not_rebuilt():
    few = _run(_data(4, vcpus=1))
    # one vCPU, 4 processes: current + 3 prev_roots hold them all; only the first visit of each misses
    assert few["cr3_switches"] > 25 and few["prev_root_hits"] == few["cr3_switches"] - 3
    assert few["shadow_roots_created"] == 4
    many = _run(_data(8, vcpus=1))
    # 8 processes, 4 cached: a uniform draw among the 7 others hits about 3/7 of the time
    assert 0.2 < many["prev_root_hits"] / many["cr3_switches"] < 0.65
    # a root evicted from prev_roots stays valid in mmu_page_hash: found again, never rebuilt
    misses = many["cr3_switches"] - many["prev_root_hits"]
    assert many["shadow_roots_created"] <= 8 < misses and many["faults_root_link"] <= 8


def test_fast_zap_rebuilds_every_processes_root_and_mappings_targeted_keeps_them():
    """The contrast grows with the number of processes: each one's root and private pages are rebuilt."""
    out = {}
    for n in (1, 6):
        for policy in ("fast", "targeted"):
            # every access goes to the running process's 64 private pages
            out[n, policy] = _run(_data(n, ops=TOGGLES, accesses=12000, guest={"user_share": 1.0}), policy)
    for n in (1, 6):
        f, t = out[n, "fast"], out[n, "targeted"]
        assert f["zaps_fast"] == 3 and t["zaps_targeted"] == 3
        # targeted: no root is ever obsolete, nothing re-faults, each process's root is built once
        assert t["obsolete_root_flushes"] == 0 and t["faults_after_zap"] == 0
        assert t["shadow_roots_created"] == (n if n > 1 else 0)
        assert t["sptes_installed"] == 64 * n
    f6, t6 = out[6, "fast"], out[6, "targeted"]
    # fast: the roots are rebuilt after the zaps; each vCPU that was the last user of obsolete roots
    # flushed every TLB when it dropped them; fewer CR3 writes find a usable cached root
    assert f6["shadow_roots_created"] > 2 * 6
    assert f6["obsolete_root_flushes"] >= 3
    assert f6["prev_root_hits"] < t6["prev_root_hits"]
    # what the fast zap costs grows with the processes: their private mappings re-installed, the
    # root pages zapped, the time to completion
    rebuilt = {n: out[n, "fast"]["sptes_installed"] - out[n, "targeted"]["sptes_installed"] for n in (1, 6)}
    slower = {n: out[n, "fast"]["completion_ns"] - out[n, "targeted"]["completion_ns"] for n in (1, 6)}
    assert rebuilt[6] > 4 * rebuilt[1] and slower[6] > 5 * slower[1]
    assert f6["pt_pages_freed"] > out[1, "fast"]["pt_pages_freed"]


def test_targeted_zap_drops_only_the_roots_whose_page_directory_is_in_the_slot():
    move = [{"at_us": 200, "op": "move", "slot": 1, "gpa": "64MiB"}]
    # processes 0-1 have their top-level table at the end of slot 0, processes 2-3 at the start of slot 1
    data = _data(4, guest={"pgd_gpa": 8 * MiB - 2 * 4096, "process_pages": 0, "user_share": 0.0}, ops=move)
    data["phases"][1]["accesses"] = 8000
    m = _run(data, "targeted")
    assert m["gpte_sp_zapped"] == 2  # the two roots shadowing tables in slot 1
    assert m["shadow_roots_created"] in (5, 6)  # processes 2 and 3 rebuilt once each (if used again)
    outside = _run(_data(4, guest={"pgd_gpa": "4MiB", "process_pages": 0, "user_share": 0.0}, ops=move), "targeted")
    assert outside["gpte_sp_zapped"] == 0 and outside["shadow_roots_created"] == 4


def test_guest_page_table_writes_take_write_protection_faults():
    share = 0.01
    data = _data(1, guest={"process_pages": 0, "user_share": 0.0, "pt_write_share": share})
    m = _run(data, "targeted")
    # every write to a shadowed table exits; the tables of the touched 2 MiB are shadowed after the populate
    work = 2 * 6000
    assert 0.6 * share * work <= m["faults_wp"] <= 1.6 * share * (work + 2 * 256)
    # each emulated write zaps the written entry's SPTE: its page re-faults, a flush if it was present
    assert m["faults_after_zap"] > 0 and m["remote_flushes"] > 0.5 * m["faults_wp"]
    none = _run(_data(1, guest={"process_pages": 0, "user_share": 0.0}), "targeted")
    assert none["faults_wp"] == 0 and none["remote_flushes"] == 0
    # with 2 MiB host pages the shadow MMU maps huge: no last-level shadow page, nothing write-protected
    thp = _data(1, guest={"process_pages": 0, "user_share": 0.0, "pt_write_share": share})
    thp["profile_overrides"]["kernel"]["backing"] = "thp"
    assert _run(thp, "targeted")["faults_wp"] == 0


@pytest.mark.parametrize("guest,error", [
    ({"processes": 2}, "guest: .*context_switch_us >= 1"),
    ({"processes": 1, "context_switch_us": 10}, "context_switch_us needs processes >= 2"),
    ({"process_pages": 64, "user_share": 0.1}, "process_pages needs process_gpa"),
    ({"process_pages": 64}, "process_pages and user_share go together"),
    ({"process_pages": 4096, "process_gpa": "8MiB", "user_share": 0.1}, "guest.process_gpa: .*inside one of vm.memslots"),
])
def test_bad_guest_tables_are_refused_with_the_field(guest, error):
    data = _data(1)
    data["guest"] = guest
    with pytest.raises(DesimInputError, match=error):
        validate_scenario(data, "test")


def _inv():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_gas_inv", Path(__file__).with_name("test_invariants.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


INV = _inv()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phases=INV.scripts(), policy=st.sampled_from(["fast", "targeted"]), vcpus=st.integers(1, 3),
       processes=st.integers(2, 6), pt_write_share=st.sampled_from([0.0, 0.02]),
       pgd_gpa=st.sampled_from([7 * MiB, 16 * MiB, 24 * MiB]))
def test_no_vcpu_runs_on_an_obsolete_or_zapped_root_for_any_script(phases, policy, vcpus, processes,
                                                                    pt_write_share, pgd_gpa):
    """The audit (desim/audit.py) checks at every guest entry: a valid root of the running process,
    linked where the run accesses, root_count = the vCPUs holding it; it raises on a violation."""
    from conftest import scenario

    guest = {"processes": processes, "context_switch_us": 5, "pt_write_share": pt_write_share,
             "process_pages": 32, "process_gpa": 4 * MiB, "user_share": 0.2, "pgd_gpa": pgd_gpa}
    sc = scenario(vcpus=vcpus, ram_mib=8, phases=phases, profile="shadow-pvm", kernel={"backing": "4k"},
                  guest=guest)
    vm = Vm(sc, policy, seed=5, audit=True)
    m = vm.run().metrics
    assert m["accesses"] == vm.metrics.accesses_assigned > 0
    held = sum(len(v.gas.held()) for v in vm.vcpus)
    assert held == sum(r.root_count for r in vm.guest.roots.values()) + sum(
        r.root_count for r in vm.guest.zapped_in_use)


def test_the_audit_catches_a_vcpu_keeping_an_obsolete_root(monkeypatch):
    """Break kvm_mmu_free_obsolete_roots (drop nothing, take every root for usable): the next guest
    entry after a fast zap must be refused."""
    import desim.vcpu
    from desim.audit import InvariantViolation
    from desim.guest_as import VcpuAddressSpace

    def keep(v):
        return
        yield

    monkeypatch.setattr(desim.vcpu, "free_obsolete_roots", keep)
    monkeypatch.setattr(VcpuAddressSpace, "root_usable", lambda self: True)
    with pytest.raises(InvariantViolation, match="obsolete or zapped root"):
        _run(_data(4, ops=TOGGLES), "fast")
