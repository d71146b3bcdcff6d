"""Host profiles: every shipped profile loads, every cost has a source, bad profiles are refused."""
from __future__ import annotations

from importlib import resources

import pytest

from desim.errors import DesimInputError
from desim.profile import COST_NAMES, load_profile, profile_names


def test_shipped_profiles():
    assert {"tdp-icelake", "legacy-2020", "shadow-pvm"} <= set(profile_names())
    for name in profile_names():
        p = load_profile(name)
        assert set(p.costs) == set(COST_NAMES)
        assert all(c.source.strip() for c in p.costs.values())
    assert load_profile("tdp-icelake").kernel.fault_lock == "read"
    assert load_profile("legacy-2020").kernel.lock == "spinlock"
    assert load_profile("shadow-pvm").kernel.pte_prefetch


def test_cost_without_source_is_refused(tmp_path):
    text = (resources.files("desim.profiles") / "tdp-icelake.toml").read_text()
    bad = text.replace('vm_exit = { value = 250, source = "', 'vm_exit = { value = 250, sourcex = "')
    f = tmp_path / "p.toml"
    f.write_text(bad)
    with pytest.raises(DesimInputError, match=r"costs\.vm_exit"):
        load_profile(f)


def test_read_locked_faults_need_the_tdp_mmu(tmp_path):
    text = (load_profile.__globals__["resources"].files("desim.profiles") / "legacy-2020.toml").read_text()
    f = tmp_path / "p.toml"
    f.write_text(text.replace('fault_lock = "write"', 'fault_lock = "read"'))
    with pytest.raises(DesimInputError, match="kernel"):
        load_profile(f)


def test_unknown_profile_name():
    with pytest.raises(DesimInputError, match="named profiles"):
        load_profile("no-such-host")


def test_profiles_are_resolved_once_per_text(tmp_path):
    """A sweep's task resolves its profile several times: the same text gives the same frozen profile, a file
    changed on disk is read again, and a scenario's overrides are applied once per distinct overrides."""
    from desim.scenario import load_scenario, validate_scenario

    assert load_profile("tdp-icelake") is load_profile("tdp-icelake")
    text = (resources.files("desim.profiles") / "tdp-icelake.toml").read_text()
    f = tmp_path / "p.toml"
    f.write_text(text)
    first = load_profile(f)
    f.write_text(text.replace("vm_exit = { value = 250,", "vm_exit = { value = 251,"))
    assert load_profile(f).ns("vm_exit") == 251.0 and first.ns("vm_exit") == 250.0
    base = {**load_scenario().model_dump(), "profile": "tdp-icelake",
            "profile_overrides": {"kernel": {"backing": "thp"}, "costs": {"vm_exit": 300}}}
    a = validate_scenario(base, "t").host_profile()
    assert validate_scenario(base, "t").host_profile() is a
    assert a.kernel.backing == "thp" and a.ns("vm_exit") == 300.0 and a.costs["vm_exit"].source == "override"
    other = validate_scenario({**base, "profile_overrides": {"costs": {"vm_exit": 301}}}, "t").host_profile()
    assert other.ns("vm_exit") == 301.0 and other.kernel.backing == load_profile("tdp-icelake").kernel.backing
    with pytest.raises(DesimInputError, match="unknown"):
        validate_scenario({**base, "profile_overrides": {"costs": {"no_such_cost": 1}}}, "t")
