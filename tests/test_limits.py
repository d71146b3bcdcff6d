"""desim.limits: KVM's memslot limits, the memory and work estimates, and the metric catalogue."""
from __future__ import annotations

import pytest

from desim import limits
from desim.errors import DesimInputError
from desim.metrics import metric_names
from desim.scenario import load_scenario
from desim.vm import Vm, run_scenario


def test_kvm_memslot_limits():
    limits.check_memslot(0, (limits.KVM_MEM_MAX_NR_PAGES) << 12, 52, "ok")
    with pytest.raises(DesimInputError, match="KVM_MEM_MAX_NR_PAGES"):
        limits.check_memslot(0, (limits.KVM_MEM_MAX_NR_PAGES + 1) << 12, 52, "s")
    limits.check_memslot((1 << 46) - 4096, 4096, 46, "last page")
    with pytest.raises(DesimInputError, match="beyond the 46-bit guest physical address space"):
        limits.check_memslot(1 << 46, 4096, 46, "s")
    assert limits.guest_phys_bits("shadow", 46) == 52 and limits.guest_phys_bits("tdp", 46) == 46


def test_gpa_width_follows_the_profile():
    sc = load_scenario()
    high = {"vm.memslots.0.gpa": "64TiB"}  # 2^46: beyond a 46-bit host, inside 52-bit shadow paging
    with pytest.raises(DesimInputError, match="46-bit"):
        sc.with_overrides(high)
    assert sc.with_overrides({**high, "profile": "shadow-pvm"}).vm.memslots[0].gpa == 1 << 46
    assert sc.with_overrides({**high, "profile_overrides.kernel.phys_bits": 52}).vm.memslots[0].gpa == 1 << 46


def test_memory_estimate_refuses_with_the_amount(monkeypatch):
    sc = load_scenario().with_overrides({"vm.memslots.0.gpa": "8TiB", "vm.memslots.0.size": "4TiB",
                                         "phases.0.pattern": "none"})
    est = limits.estimate(sc)
    # 1 byte per 4 KiB page (4 KiB host pages), plus 33 bytes of samples per access (400,000)
    assert 1 << 30 <= est.memory_bytes - 33 * 400_000 < (1 << 30) * 1.01
    monkeypatch.setattr(limits, "available_memory", lambda: 512 << 20)
    with pytest.raises(DesimInputError, match=r"would need ~1\.0 GiB of memory .* has 512\.0 MiB available"):
        limits.check_memory(sc)
    with pytest.raises(DesimInputError, match="would need"):
        Vm(sc, "fast")  # the model checks before it allocates
    with pytest.raises(DesimInputError, match=r"~4\.0 GiB .* x 4 runs at once"):
        limits.check_work(sc, concurrent_runs=4)


SMALL = {"vm.memslots.0.size": "16MiB", "phases.1.accesses": 3000}


def test_work_estimate():
    sc = load_scenario().with_overrides(SMALL)  # 4 vCPUs: populate 4,096 pages, then 3,000 accesses each
    est = limits.estimate(sc)
    assert est.accesses == 4096 + 4 * 3000 and est.memslot_ioctls == 8
    assert run_scenario(sc, "fast").metrics["accesses"] == est.accesses
    big = sc.with_overrides({"phases.1.accesses": 10**9})
    with pytest.raises(DesimInputError, match=r"~4e\+09 guest accesses, over the limit .* --allow-large"):
        limits.check_work(big)
    assert limits.check_work(big, allow_large=True).accesses > limits.MAX_ACCESSES_PER_RUN


@pytest.mark.parametrize("scenario,overrides", [
    (None, SMALL),
    (None, {**SMALL, "profile": "legacy-2020", "vm.vcpus": 2}),
])
def test_metric_catalogue_is_what_runs_report(scenario, overrides):
    """--metrics is checked against metric_names(): it must list every metric a run reports."""
    from pathlib import Path

    path = None if scenario is None else Path(__file__).resolve().parents[1] / scenario
    sc = load_scenario(path)
    sc = sc.with_overrides(overrides) if overrides else sc
    known = set(metric_names([p.name for p in sc.phases]))
    for policy in ("fast", "targeted"):
        reported = set(run_scenario(sc, policy).metrics)
        assert reported <= known, reported - known


def test_memory_estimate_follows_the_host_page_size():
    """SPTE state is a byte per mapping: 4 TiB on 1 GiB pages is kilobytes, on 4 KiB pages a GiB."""
    sc = load_scenario().with_overrides({"vm.memslots.0.gpa": "8TiB", "vm.memslots.0.size": "4TiB",
                                         "phases.0.pattern": "none", "phases.1.accesses": 1})
    small = limits.estimate(sc)
    huge = limits.estimate(sc.with_overrides({"profile_overrides.kernel.backing": "hugetlbfs-1g"}))
    thp = limits.estimate(sc.with_overrides({"profile_overrides.kernel.backing": "thp"}))
    logged = limits.estimate(sc.with_overrides({"profile_overrides.kernel.backing": "hugetlbfs-1g",
                                                "vm.memslots.0.flags": ["log_dirty"]}))
    assert small.memory_bytes >= 1 << 30 and logged.memory_bytes >= 1 << 30
    assert huge.memory_bytes < 1 << 20 and (1 << 21) <= thp.memory_bytes < (1 << 21) + (1 << 20)
