"""Ground truth on this host's real KVM: skipped where /dev/kvm is absent or unusable."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from desim.kvm import uapi as u
from desim.kvm.measure import measure, run_once
from desim.kvm.scenario import named
from desim.kvm.vm import Kvm, KvmError

from conftest import kvm_unusable

pytestmark = pytest.mark.kvm


_REASON = kvm_unusable(targeted=False)


@pytest.fixture(scope="module")
def kvm():
    if _REASON:
        pytest.skip(_REASON)
    with Kvm() as k:
        yield k


def _needs_targeted(kvm: Kvm) -> None:
    if not kvm.check_extension(u.KVM_CAP_DISABLE_QUIRKS2) & u.KVM_X86_QUIRK_SLOT_ZAP_ALL:
        pytest.skip("this KVM cannot disable KVM_X86_QUIRK_SLOT_ZAP_ALL (Linux < 6.12)")


# MMIO exits cost one fault per vCPU per pass (subtracted as the warm baseline);
# allow a few more for the code page or a spurious fault
SLACK = 4


def test_slot_outside_touched_range_fast_vs_targeted(kvm):
    _needs_targeted(kvm)
    sc = named("tiny")  # 64 MiB, 1 vCPU, recreate a 2 MiB slot outside the touched range
    fast = run_once(kvm, sc.with_policy("fast"))["metrics"]
    targ = run_once(kvm, sc.with_policy("targeted"))["metrics"]
    pages = sc.ram_mib << 8
    assert fast["populate_pf_fixed"] >= pages  # first touch: one fault per page
    assert fast["refaults"] > 0
    # shadow paging prefetches up to 8 neighbours per fault: about pages / 8
    assert pages // 8 <= fast["refaults"] <= pages + SLACK
    assert fast["op_shadow_zapped"] > 0
    assert targ["refaults"] <= SLACK
    assert targ["op_shadow_zapped"] == 0


def test_slot_inside_touched_range_targeted_zaps_only_it(kvm):
    _needs_targeted(kvm)
    sc = replace(named("tiny"), position="inside", policy="targeted")
    m = run_once(kvm, sc)["metrics"]
    slot_pages = sc.extra_slot_mib << 8
    assert slot_pages // 8 <= m["refaults"] <= slot_pages + SLACK
    assert m["op_sptes_4k_dropped"] >= slot_pages


def test_move_two_vcpus_mmio_exit(kvm):
    _needs_targeted(kvm)
    sc = replace(named("tiny"), op="move", vcpus=2)
    m = measure(sc, vms=1, repeats=1, exit="mmio")
    s = m.summary()
    assert s["fast"]["refaults"]["median"] > SLACK
    assert s["targeted"]["refaults"]["median"] <= SLACK
    assert s["fast"]["warm_pf_taken"]["median"] == 2  # one MMIO fault per vCPU per pass


def test_pio_exit_takes_no_fault(kvm):
    m = run_once(kvm, named("tiny"))["metrics"]
    assert m["warm_pf_taken"] == 0


def test_cleared_accessed_bits_defeat_prefetch(kvm):
    # 4 KiB guest pages: re-faults after a global zap are ~pages/8 with the guest's
    # Accessed bits set, ~pages once they are cleared (no PTE prefetch)
    sc = replace(named("tiny"), accessed=False, policy="fast")
    m = run_once(kvm, sc)["metrics"]
    pages = sc.ram_mib << 8
    assert m["refaults"] >= pages


def test_watchdog_stops_a_guest_that_never_exits(kvm, monkeypatch):
    import desim.kvm.machine as machine
    from desim.kvm import guest

    # stride 0: the loop never reaches the end of its region
    monkeypatch.setattr(machine, "touch_regs", lambda b, s, e, stride=4096: guest.touch_regs(b, s, e, 0))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KvmError, match="did not finish"):
        with machine.TouchVm(kvm, named("tiny"), timeout_s=0.5) as tv:
            tv.touch(1)
    assert len(os.listdir("/proc/self/fd")) == before


def test_teardown_does_not_leak(kvm):
    sc = named("tiny")
    run_once(kvm, sc)  # warm up lazily-opened things

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    before = (fds(), maps())
    for _ in range(3):
        run_once(kvm, sc)
    assert (fds(), maps()) == before


def test_cli_measure_writes_json(tmp_path, capsys):
    if _REASON:
        pytest.skip(_REASON)
    from desim.kvm.cli import main

    out = tmp_path / "m.json"
    assert main(["measure", "--scenario", "tiny", "--vms", "2", "--repeats", "1", "--quiet",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["vms"] == 2 and len(data["runs"]) == 4
    assert {"fast", "targeted"} <= set(data["summary"])
    assert "refaults" in capsys.readouterr().out


def test_probe(kvm, capsys):
    from desim.kvm.cli import main
    from desim.kvm.probe import probe

    p = probe()
    assert p["api_version"] == 12
    names = {s["name"] for s in p["vm_stats"]} | {s["name"] for s in p["vcpu_stats"]}
    assert {"pf_fixed", "pf_taken", "exits", "mmu_shadow_zapped", "pages_4k"} <= names
    assert main(["probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mmu"] == p["mmu"]


def test_interleaved_measurement_keeps_runs_apart(kvm):
    """measure_interleaved: one Measurement per scenario, every repeat of both policies, THP last."""
    from desim.kvm.measure import measure_interleaved

    _needs_targeted(kvm)
    a = named("tiny")
    b = replace(a, name="tiny-inside", position="inside")
    ma, mb = measure_interleaved([a, b], repeats=2)
    for m, sc in ((ma, a), (mb, b)):
        assert m.scenario is sc
        assert sorted((r["repeat"], r["policy"]) for r in m.runs) == [
            (0, "fast"), (0, "targeted"), (1, "fast"), (1, "targeted")]
    # the structure survives: a slot inside the touched range is re-faulted under both policies
    assert min(mb.samples("targeted", "refaults")) > 0 and max(ma.samples("targeted", "refaults")) <= SLACK
