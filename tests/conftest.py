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
    if profile in ("tdp-icelake", "legacy-2020"):
        # these tests were written against these profiles' constant costs (they had no distributions
        # until their fault path took shadow-pvm's measured shape); a test about distributions asks
        # for costs="sampled"
        top.setdefault("costs", "mean")
    data.update(top)
    return validate_scenario(data, "test scenario")


def kvm_unusable(targeted: bool = True) -> str | None:
    """Why the real-KVM tests must skip here (``None``: /dev/kvm works and, with ``targeted``,
    can disable ``KVM_X86_QUIRK_SLOT_ZAP_ALL``, so both policies run)."""
    import os

    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent"
    from desim.kvm import uapi as u
    from desim.kvm.vm import Kvm

    try:
        with Kvm() as kvm, kvm.create_vm():
            if targeted and not kvm.check_extension(u.KVM_CAP_DISABLE_QUIRKS2) & u.KVM_X86_QUIRK_SLOT_ZAP_ALL:
                return "this KVM cannot disable KVM_X86_QUIRK_SLOT_ZAP_ALL (Linux < 6.12)"
    except Exception as e:  # noqa: BLE001 - any failure means: skip
        return f"/dev/kvm is unusable: {e}"
    return None


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_compare(tmp_path_factory):
    """``desim compare -n 2 --out DIR`` on the built-in scenario through the console script, run once per
    session: the README's table is its stdout (tests/test_readme.py), and the end-to-end test checks
    the files it writes (tests/test_cli_e2e.py). (stdout, stderr, return code, DIR)."""
    import shutil
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("compare") / "cmp"
    exe = shutil.which("desim")
    cmd = [exe] if exe else [sys.executable, "-m", "desim.cli"]
    p = subprocess.run(cmd + ["compare", "-n", "2", "--out", str(out)], capture_output=True, text=True, timeout=900)
    return p.stdout, p.stderr, p.returncode, out
