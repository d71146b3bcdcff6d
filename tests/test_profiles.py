"""Host profiles: every shipped profile loads, every cost has a source, bad profiles are refused."""
from __future__ import annotations

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
    text = (load_profile.__globals__["resources"].files("desim.profiles") / "tdp-icelake.toml").read_text()
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
