"""Calibration fit, simulator bridge and validation (the simulator part needs no /dev/kvm)."""
from __future__ import annotations

import argparse
import os
from dataclasses import replace

import pytest

from desim.errors import DesimInputError
from desim.kvm import calibrate as cal
from desim.kvm import cli
from desim.kvm.scenario import named
from desim.kvm.simbridge import sim_metrics, to_sim
from desim.kvm.validate import validate, worst_error
from desim.profile import load_profile


def _runs(key: str, **m: float) -> list[dict[str, float]]:
    base = {"warm_ns": 0, "retouch_ns": 0, "refaults": 1, "populate_ns": 0, "populate_pf_fixed": 1,
            "create_ioctl_ns": 0, "zap_ioctl_ns": 0, "op_shadow_zapped": 0}
    base.update(m)
    return [dict(base) for _ in range(3)]


def synthetic() -> dict[str, list[dict[str, float]]]:
    """Metrics a host with known costs would give (R1 = 2000, prefetch 300, 4K alloc +1500, ...)."""
    pages_a = cal.MICRO["A"].ram_mib << 8
    return {
        "A": _runs("A", warm_ns=20 * pages_a, retouch_ns=20 * pages_a + 4100 * 1000, refaults=1000,
                   populate_ns=20 * pages_a + 5000 * pages_a, populate_pf_fixed=pages_a,
                   create_ioctl_ns=30000, zap_ioctl_ns=100000 + 69 * 20000, op_shadow_zapped=69),
        "B": _runs("B", create_ioctl_ns=30000, zap_ioctl_ns=100000 + 261 * 20000, op_shadow_zapped=261),
        "C": _runs("C", retouch_ns=2000 * 500, refaults=500, populate_ns=3500 * 500, populate_pf_fixed=500,
                   create_ioctl_ns=30000),
        "D": _runs("D", create_ioctl_ns=30000, zap_ioctl_ns=50000 + 512 * 12),
        "E": _runs("E", create_ioctl_ns=30000, zap_ioctl_ns=50000 + 65536 * 12),
        "T": _runs("T", populate_ns=102000 * 10, populate_pf_fixed=10),
    }


def test_fit_recovers_known_costs():
    base = load_profile("shadow-pvm")
    c = cal.fit(synthetic(), base)
    assert c.access_ns == pytest.approx(20)
    assert c.costs["prefetch_spte"] == pytest.approx(300)
    exit_path = sum(c.costs[k] for k in cal.EXIT_PATH)
    assert exit_path == pytest.approx(2000)
    assert c.costs["host_alloc_4k"] - c.costs["faultin_resident"] == pytest.approx(1500)
    assert c.costs["host_alloc_2m"] - c.costs["faultin_resident"] == pytest.approx(100000)
    assert c.costs["sp_free"] + 512 * c.costs["spte_zap"] == pytest.approx(20000)
    assert c.costs["rmap_probe"] * (1 + 1 / 512) + c.costs["hash_probe"] == pytest.approx(12)
    # CREATE = fixed + s = 30 us; DELETE fixed = fixed + 2 s = 50 us
    assert c.costs["srcu_sync"] == pytest.approx(20000) and c.costs["ioctl_fixed"] == pytest.approx(10000)


def test_profile_toml_loads(tmp_path):
    base = load_profile("shadow-pvm")
    c = cal.fit(synthetic(), base)
    path = tmp_path / "cal.toml"
    path.write_text(cal.profile_toml(c, base, "shadow-pvm-cal"))
    p = load_profile(str(path))
    assert p.name == "shadow-pvm-cal" and p.kernel == base.kernel
    assert p.costs["prefetch_spte"].value == pytest.approx(300)
    assert p.costs["prefetch_spte"].source.startswith("measured: desim kvm calibrate")
    assert p.costs["ipi_ack"] == base.costs["ipi_ack"]  # not measurable here: kept


def test_simulator_mirrors_the_structure():
    sc = named("tiny")
    pages = sc.ram_mib << 8
    fast = sim_metrics(sc.with_policy("fast"))
    targ = sim_metrics(sc.with_policy("targeted"))
    assert fast["refaults"] == pages // 8 and targ["refaults"] == 0
    assert fast["op_sptes_dropped"] == pages and fast["populate_pf_fixed"] == pages
    inside = sim_metrics(replace(sc, position="inside", policy="targeted"))
    assert inside["refaults"] == (sc.extra_slot_mib << 8) // 8


def test_to_sim_layout_and_refusals():
    s = to_sim(named("inside"))
    assert [p.name for p in s.phases] == ["populate:1", "populate:2", "warm:1", "warm:2", "op",
                                          "retouch:1", "retouch:2"]
    assert [o.op for o in s.phases[4].memslot_ops] == ["delete", "create"]
    assert to_sim(named("move")).phases[2].memslot_ops[0].op == "move"
    with pytest.raises(DesimInputError, match="accessed"):
        to_sim(named("no-accessed"))
    with pytest.raises(DesimInputError, match="stride"):
        to_sim(replace(named("tiny"), stride_kib=32))


def test_worst_error_allows_a_few_faults():
    rows = [{"metric": "refaults", "unit": "count", "real_median": 2049, "sim": 2048, "rel_error": -1 / 2049},
            {"metric": "retouch_ns", "unit": "ns", "real_median": 10, "sim": 30, "rel_error": 2.0}]
    assert worst_error({"rows": rows}) == 0.0
    rows[0].update(sim=1000, rel_error=(1000 - 2049) / 2049)
    assert worst_error({"rows": rows}) == pytest.approx(1049 / 2049)


def test_cli_has_calibrate_and_validate(tmp_path):
    p = argparse.ArgumentParser(prog="desim")
    cli.register(p.add_subparsers(dest="command"))
    a = p.parse_args(["kvm", "calibrate", "--out", str(tmp_path / "p.toml"), "--repeats", "2"])
    assert a.func is cli.cmd_calibrate and a.repeats == 2
    a = p.parse_args(["kvm", "validate", "--scenario", "tiny", "--scenario", "inside", "--max-error", "0.01"])
    assert a.func is cli.cmd_validate and a.scenario == ["tiny", "inside"]
    top = argparse.ArgumentParser(prog="desim")
    cli.register_top_level(top.add_subparsers(dest="command"))
    assert top.parse_args(["validate"]).func is cli.cmd_validate
    a = p.parse_args(["kvm", "validate", "--profile", "nope"])
    with pytest.raises(DesimInputError, match="nope"):
        a.func(a)


def _kvm_or_skip() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent")
    try:
        from desim.kvm.vm import Kvm

        with Kvm() as k, k.create_vm():
            pass
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"/dev/kvm is unusable: {e}")


@pytest.mark.kvm
def test_validate_tiny_on_real_kvm():
    _kvm_or_skip()
    res = validate([named("tiny")], "shadow-pvm", repeats=1)
    assert worst_error(res) <= 0.01
    assert {r["policy"] for r in res["rows"]} == {"fast", "targeted"}


@pytest.mark.kvm
def test_calibrate_on_real_kvm(tmp_path):
    _kvm_or_skip()
    c, base = cal.calibrate(repeats=1)
    assert all(v >= 0 for v in c.costs.values())
    path = tmp_path / "cal.toml"
    path.write_text(cal.profile_toml(c, base, "here"))
    assert load_profile(str(path)).name == "here"
