"""`desim kvm` argument handling and guard rails that need no /dev/kvm."""
from __future__ import annotations

import argparse
import errno

import pytest

from desim.errors import DesimInputError
from desim.kvm import cli, measure, probe, vm
from desim.kvm.scenario import named


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="desim")
    cli.register(p.add_subparsers(dest="command"))
    return p


def test_register_adds_probe_and_measure():
    p = parser()
    a = p.parse_args(["kvm", "probe", "--json"])
    assert a.func is cli.cmd_probe and a.json
    a = p.parse_args(["kvm", "measure", "--scenario", "tiny", "--vms", "2", "--repeats", "5",
                      "--out", "x.json", "--ram-mib", "128", "--no-accessed", "--thp", "--op", "move"])
    assert a.func is cli.cmd_measure and (a.vms, a.repeats) == (2, 5)
    sc = cli.scenario_from_args(a)
    assert (sc.ram_mib, sc.accessed, sc.host_thp, sc.op, sc.vcpus) == (128, False, True, "move", 1)
    assert sc.name == "tiny+custom"
    a = p.parse_args(["kvm", "measure"])
    assert cli.scenario_from_args(a) == named(cli.DEFAULT_SCENARIO)


def test_measure_list(capsys):
    p = parser()
    a = p.parse_args(["kvm", "measure", "--list"])
    assert a.func(a) == 0
    assert "tiny" in capsys.readouterr().out


def test_bad_override_is_an_input_error():
    p = parser()
    a = p.parse_args(["kvm", "measure", "--ram-mib", "3"])
    with pytest.raises(DesimInputError, match="ram_mib"):
        cli.scenario_from_args(a)


def test_missing_device_is_refused(tmp_path):
    with pytest.raises(DesimInputError, match="is missing"):
        vm.open_kvm(str(tmp_path / "kvm"))
    p = parser()
    a = p.parse_args(["kvm", "probe", "--device", str(tmp_path / "kvm")])
    with pytest.raises(DesimInputError, match="is missing"):
        a.func(a)
    assert cli.main(["probe", "--device", str(tmp_path / "kvm")]) == 2


def test_unpermitted_device_is_refused(monkeypatch):
    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(vm.os, "open", denied)
    with pytest.raises(DesimInputError, match="not permitted"):
        vm.open_kvm("/dev/kvm")


def test_out_directory_must_exist(tmp_path):
    p = parser()
    a = p.parse_args(["kvm", "measure", "--out", str(tmp_path / "no" / "x.json")])
    with pytest.raises(DesimInputError, match="does not exist"):
        a.func(a)


class _FakeKvm:
    def __init__(self, caps: dict[int, int]) -> None:
        self.caps = caps

    def check_extension(self, cap: int) -> int:
        return self.caps.get(cap, 0)


def test_memory_bound_by_mem_available(monkeypatch):
    monkeypatch.setattr(measure, "mem_available", lambda: 1 << 30)
    fake = _FakeKvm({213: 0x80, 66: 8, 10: 100})
    measure.check_resources(fake, named("tiny"), 1)  # 66 MiB fits in 1 GiB
    with pytest.raises(DesimInputError, match="MemAvailable"):
        measure.check_resources(fake, named("outside"), 1)
    with pytest.raises(DesimInputError, match="MemAvailable"):
        measure.check_resources(fake, named("tiny"), 16)


def test_limits_and_quirk_support(monkeypatch):
    monkeypatch.setattr(measure, "mem_available", lambda: 1 << 40)
    with pytest.raises(DesimInputError, match="MAX_VCPUS"):
        measure.check_resources(_FakeKvm({213: 0x80, 66: 1}), named("outside"), 1)
    with pytest.raises(DesimInputError, match="SLOT_ZAP_ALL"):
        measure.check_resources(_FakeKvm({213: 0x7F, 66: 8}), named("tiny"), 1)
    with pytest.raises(DesimInputError, match="--vms"):
        measure.check_resources(_FakeKvm({}), named("tiny"), 0)


def test_mmu_kind_from_module_params():
    assert probe.mmu_kind({"kvm": {"tdp_mmu": "N"}, "kvm_pvm": {}}) == "shadow"
    assert probe.mmu_kind({"kvm": {"tdp_mmu": "Y"}, "kvm_intel": {"ept": "Y"}}) == "tdp"
    assert probe.mmu_kind({"kvm": {"tdp_mmu": "N"}, "kvm_amd": {"npt": "1"}}) == "legacy"
    assert probe.mmu_kind({"kvm": {"tdp_mmu": "Y"}, "kvm_intel": {"ept": "N"}}) == "shadow"
    assert probe.mmu_kind({}) == "unknown"
    assert probe.decode_quirks(0x80) == ["SLOT_ZAP_ALL"]
    assert probe.decode_quirks(1 << 30) == [f"unknown:{1 << 30:#x}"]


def test_derived_metrics_subtract_the_baseline():
    from desim.kvm.machine import PhaseResult

    sc = named("tiny")
    ph = {
        "populate": PhaseResult("populate", 100, {"pf_fixed": 16385}, {"pages_4k": 16392}),
        "warm": PhaseResult("warm", 10, {"pf_taken": 1}),
        "op": PhaseResult("op", 5, {"mmu_shadow_zapped": 37, "pages_4k": -16392}, ioctls=[("delete", 4), ("create", 1)]),
        "retouch": PhaseResult("retouch", 50, {"pf_fixed": 2049, "pf_taken": 2050}),
    }
    m = measure.derive(sc, ph)
    assert m["refaults"] == 2049 and m["refault_pf_taken"] == 2049
    assert m["retouch_extra_ns"] == 40 and m["zap_ioctl_ns"] == 4 and m["op_ns"] == 5
    assert m["op_sptes_4k_dropped"] == 16392 and m["sptes_4k"] == 16392
    assert set(m) == set(measure.METRICS)
