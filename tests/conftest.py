"""Shared helpers for the tests."""
from __future__ import annotations

from typing import Any

from desim.scenario import Scenario, validate_scenario

MiB = 1 << 20


def scenario(vcpus: int = 2, ram_mib: int = 8, phases: list[dict[str, Any]] | None = None,
             profile: str = "tdp-icelake", extra_slots: list[dict[str, Any]] | None = None,
             kernel: dict[str, Any] | None = None, **top: Any) -> Scenario:
    """A small scenario built in code (validated like a file)."""
    data: dict[str, Any] = {
        "name": top.pop("name", "test"),
        "profile": profile,
        "vm": {"vcpus": vcpus, "memslots": [{"id": 0, "gpa": 0, "size": ram_mib * MiB}] + (extra_slots or [])},
        "phases": phases or [{"name": "populate", "pattern": "sequential", "slot": 0}],
    }
    if kernel:
        data["profile_overrides"] = {"kernel": kernel}
    data.update(top)
    return validate_scenario(data, "test scenario")
