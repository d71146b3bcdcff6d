"""Per-memslot host backing and preallocated host memory (MemslotSpec.backing / prealloc)."""
from __future__ import annotations

import pytest

from desim.errors import DesimInputError
from desim.profile import load_profile
from desim.vm import run_scenario

from conftest import MiB, scenario

PAGES = 16 * MiB >> 12


def _two_slots(slot1: dict) -> dict:
    """RAM slot 0 (the profile's backing) and slot 1 with the given overrides, both touched once."""
    phases = [{"name": "a", "pattern": "sequential", "slot": 0}, {"name": "b", "pattern": "sequential", "slot": 1}]
    sc = scenario(vcpus=1, ram_mib=16, phases=phases, profile="tdp-icelake",
                  extra_slots=[{"id": 1, "gpa": 1 << 30, "size": 16 * MiB, **slot1}])
    return run_scenario(sc, "fast", seed=1)


def test_a_slot_can_use_4k_pages_under_a_thp_profile():
    assert load_profile("tdp-icelake").kernel.backing == "thp"
    r = _two_slots({"backing": "4k"})
    # slot 0: one 2 MiB mapping per fault; slot 1: one 4 KiB mapping per fault
    assert r.metrics["faults"] == PAGES // 512 + PAGES
    assert _two_slots({}).metrics["faults"] == 2 * PAGES // 512


def test_prealloc_saves_exactly_the_host_allocations():
    P = load_profile("tdp-icelake").costs
    cold = _two_slots({"backing": "4k"})
    warm = _two_slots({"backing": "4k", "prealloc": True})
    assert warm.metrics["faults"] == cold.metrics["faults"]  # still one fault per page: SPTEs are absent
    saved = cold.metrics["completion_ns"] - warm.metrics["completion_ns"]
    per_page = P["host_alloc_4k"].value - P["faultin_resident"].value
    assert saved == pytest.approx(PAGES * per_page, rel=1e-9)


def test_bad_backing_names_the_field():
    with pytest.raises(DesimInputError, match=r"vm\.memslots\.1\.backing"):
        _two_slots({"backing": "2m"})
