"""Fit host-profile costs (``desim/profiles/*.toml``) from microscenarios on the real KVM.

Each microscenario is a :class:`KvmScenario` run with one vCPU (no
``mmu_lock`` contention), 4 KiB guest and host pages, ``repeats`` times; the
medians of its metrics (:mod:`desim.kvm.measure`) are combined as follows,
in the simulator's cost model (``desim/vcpu.py``, ``desim/zap.py``,
``desim/vmm.py``)::

    A  128 MiB, fast              R8 = (retouch - warm) / refaults   (8 SPTEs per fault)
                                  F  = (populate - warm) / first-touch faults
                                  C  = the re-CREATE ioctl
    B  512 MiB, fast              fast-zap slope per shadow page, from A and B
    C  512 MiB, fast, every 8th   R1 = (retouch - warm) / refaults   (1 SPTE per fault: no
       page touched               neighbour is resident, so nothing to prefetch)
                                  F1 = (populate - warm) / first-touch faults
    D  64 MiB, targeted, 2 MiB    Zt(2 MiB)   ioctl of an untouched slot
    E  64 MiB, targeted, 256 MiB  Zt(256 MiB)
    T  512 MiB, fast, host THP,   F2M = (populate - warm) / first-touch faults (one per 2 MiB)
       2 MiB guest pages

    access_ns           = warm / pages
    prefetch_spte       = (R8 - R1) / 7          (R8 and R1 are per fault)
    exit path           = R1 = vm_exit + vm_entry + fault_handle + faultin_resident + spte_install,
                          split in the base profile's proportions (one sum is all one can see)
    host_alloc_4k       = faultin_resident + (F1 - R1)
    host_alloc_2m       = faultin_resident + (F2M - R1)
    per shadow page     = sp_free + 512 spte_zap = slope of Zfast over shadow pages zapped;
                          sp_free kept from the base profile, spte_zap gets the rest
    per gfn             = rmap_probe + hash_probe = (Zt(256M) - Zt(2M)) / gfns,
                          split in the base profile's proportions
    ioctl_fixed + srcu  = C;   ioctl_fixed + 2 srcu_sync = Zt(2M) fixed part
                          -> srcu_sync = fixed - C, ioctl_fixed = C - srcu_sync; if that is
                          negative (DELETE has fixed costs the model lacks): ioctl_fixed = 0
                          and srcu_sync the least-squares fit of s = C, 2 s = fixed

Costs not identifiable here (``ipi_*``, ``invept``, ``root_alloc``, 2 MiB
and 1 GiB host allocation, ``lock_handoff``, ``mmio_emulation``) keep the base
profile's value and source. Every fitted cost's ``source`` says
``measured: desim kvm calibrate`` with the kernel, date and the numbers used.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from desim.errors import DesimInputError
from desim.kvm.measure import run_once
from desim.kvm.scenario import KvmScenario
from desim.kvm.vm import Kvm

MICRO: dict[str, KvmScenario] = {
    "A": KvmScenario(name="cal-A", ram_mib=128, policy="fast"),
    "B": KvmScenario(name="cal-B", ram_mib=512, policy="fast"),
    "C": KvmScenario(name="cal-C", ram_mib=512, policy="fast", stride_kib=32),
    "D": KvmScenario(name="cal-D", ram_mib=64, policy="targeted", extra_slot_mib=2),
    "E": KvmScenario(name="cal-E", ram_mib=64, policy="targeted", extra_slot_mib=256),
    "T": KvmScenario(name="cal-T", ram_mib=512, policy="fast", guest_page="2m", host_thp=True),
}
EXIT_PATH = ("vm_exit", "vm_entry", "fault_handle", "faultin_resident", "spte_install")
PROBES = ("rmap_probe", "hash_probe")


@dataclass
class Calibration:
    """Fitted costs (ns), the numbers they came from, and the guest access time."""

    costs: dict[str, float]
    access_ns: float
    observations: dict[str, float]
    sources: dict[str, str] = field(default_factory=dict)
    raw: dict[str, list[dict[str, int]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"costs": self.costs, "access_ns": self.access_ns, "observations": self.observations,
                "sources": self.sources, "runs": self.raw}


def collect(repeats: int = 5, progress: Callable[[str], None] | None = None,
            kvm_path: str = "/dev/kvm") -> dict[str, list[dict[str, int]]]:
    """Metrics of every microscenario, ``repeats`` runs each (interleaved)."""
    if repeats < 1:
        raise DesimInputError(f"--repeats must be >= 1 (got {repeats})")
    out: dict[str, list[dict[str, int]]] = {k: [] for k in MICRO}
    with Kvm(kvm_path) as kvm:
        for rep in range(repeats):
            for key, sc in MICRO.items():
                if key != "T":
                    out[key].append(run_once(kvm, sc)["metrics"])
            if progress:
                progress(f"calibrate: round {rep + 1}/{repeats} done")
        # Host THP: the first THP VM after 4 KiB-heavy runs pays for compaction (first touch of a
        # 2 MiB page measured at 2.7 ms, against 0.19 ms with free huge pages). The model has no
        # compaction, so the THP runs come back to back after one discarded warm-up run.
        run_once(kvm, MICRO["T"])
        for _ in range(repeats):
            out["T"].append(run_once(kvm, MICRO["T"])["metrics"])
    return out


def _med(runs: list[dict[str, int]], metric: str) -> float:
    return float(statistics.median(r[metric] for r in runs))


def _per_fault(runs: list[dict[str, int]], span: str, count: str) -> float:
    return float(statistics.median((r[span] - r["warm_ns"]) / max(r[count], 1) for r in runs))


def fit(raw: dict[str, list[dict[str, int]]], base: Any) -> Calibration:
    """Costs from the microscenario metrics; ``base`` is the HostProfile supplying splits and the rest."""
    A, B, C, D, E, T = (raw[k] for k in "ABCDET")
    pages_a = MICRO["A"].ram_mib << 8
    obs: dict[str, float] = {
        "access_ns": _med(A, "warm_ns") / pages_a,
        "R8_refault_ns": _per_fault(A, "retouch_ns", "refaults"),
        "R1_refault_ns": _per_fault(C, "retouch_ns", "refaults"),
        "F_first_touch_ns": float(statistics.median(
            (r["populate_ns"] - r["warm_ns"]) / max(r["populate_pf_fixed"], 1) for r in A)),
        "F1_first_touch_ns": float(statistics.median(
            (r["populate_ns"] - r["warm_ns"]) / max(r["populate_pf_fixed"], 1) for r in C)),
        "F2M_first_touch_ns": float(statistics.median(
            (r["populate_ns"] - r["warm_ns"]) / max(r["populate_pf_fixed"], 1) for r in T)),
        "create_ioctl_ns": _med(A + B + C + D + E, "create_ioctl_ns"),
        "zap_fast_A_ns": _med(A, "zap_ioctl_ns"), "zap_fast_B_ns": _med(B, "zap_ioctl_ns"),
        "shadow_pages_A": _med(A, "op_shadow_zapped"), "shadow_pages_B": _med(B, "op_shadow_zapped"),
        "zap_targeted_2M_ns": _med(D, "zap_ioctl_ns"), "zap_targeted_256M_ns": _med(E, "zap_ioctl_ns"),
    }
    P = {k: c.value for k, c in base.costs.items()}
    costs: dict[str, float] = {}
    src: dict[str, str] = {}
    # exit path and prefetch
    r1, r8 = obs["R1_refault_ns"], obs["R8_refault_ns"]
    costs["prefetch_spte"] = max(0.0, (r8 - r1) / 7)
    src["prefetch_spte"] = f"(R8 {r8:.0f} - R1 {r1:.0f}) / 7 ns: re-fault with 8 vs 1 SPTE per fault"
    share = sum(P[k] for k in EXIT_PATH)
    for k in EXIT_PATH:
        costs[k] = r1 * P[k] / share if share else r1 / len(EXIT_PATH)
        src[k] = f"R1 = {r1:.0f} ns per re-fault without prefetch, split in {base.name}'s proportions"
    f1 = obs["F1_first_touch_ns"]
    costs["host_alloc_4k"] = max(0.0, costs["faultin_resident"] + f1 - r1)
    src["host_alloc_4k"] = f"faultin_resident + (first-touch fault {f1:.0f} ns - re-fault {r1:.0f} ns), no prefetch"
    f2m = obs["F2M_first_touch_ns"]
    costs["host_alloc_2m"] = max(0.0, costs["faultin_resident"] + f2m - r1)
    src["host_alloc_2m"] = f"faultin_resident + (first-touch fault on a THP {f2m:.0f} ns - re-fault {r1:.0f} ns)"
    # fast zap: slope per shadow page between 64 and 256 MiB
    dpages = obs["shadow_pages_B"] - obs["shadow_pages_A"]
    slope = (obs["zap_fast_B_ns"] - obs["zap_fast_A_ns"]) / dpages if dpages > 0 else 0.0
    costs["sp_free"] = P["sp_free"]
    costs["spte_zap"] = max(0.0, (slope - P["sp_free"]) / 512)
    src["spte_zap"] = (f"fast zap {slope:.0f} ns per shadow page ({MICRO['A'].ram_mib} vs "
                       f"{MICRO['B'].ram_mib} MiB), minus sp_free "
                       f"{P['sp_free']:.0f}, over 512 SPTEs")
    # targeted zap of an untouched slot: per-gfn probes, then the fixed part
    gfns = (MICRO["E"].extra_slot_mib - MICRO["D"].extra_slot_mib) << 8
    per_gfn = max(0.0, (obs["zap_targeted_256M_ns"] - obs["zap_targeted_2M_ns"]) / gfns)
    pshare = sum(P[k] for k in PROBES)
    probes_per_gfn = {"rmap_probe": 1 + 1 / 512, "hash_probe": 1.0}
    for k in PROBES:
        costs[k] = per_gfn * (P[k] / pshare if pshare else 0.5) / probes_per_gfn[k]
        src[k] = f"targeted zap {per_gfn:.2f} ns per gfn (2 vs 256 MiB slot), split in {base.name}'s proportions"
    fixed2 = obs["zap_targeted_2M_ns"] - per_gfn * (MICRO["D"].extra_slot_mib << 8)
    create = obs["create_ioctl_ns"]
    srcu, fixed = fixed2 - create, 2 * create - fixed2
    how = f"DELETE fixed part {fixed2:.0f} ns (ioctl_fixed + 2 syncs), CREATE {create:.0f} ns (ioctl_fixed + 1 sync)"
    if fixed < 0 or srcu < 0:
        srcu, fixed = max(0.0, (create + 2 * fixed2) / 5), 0.0
        how += "; inconsistent (DELETE costs more than the model has), so least squares with ioctl_fixed = 0"
    costs["srcu_sync"], costs["ioctl_fixed"] = srcu, fixed
    src["srcu_sync"] = src["ioctl_fixed"] = how
    return Calibration(costs, obs["access_ns"], obs, src, raw)


def calibrate(base: str = "shadow-pvm", repeats: int = 5, progress: Callable[[str], None] | None = None,
              kvm_path: str = "/dev/kvm") -> tuple[Calibration, Any]:
    """Measure and fit; returns the calibration and the base HostProfile."""
    from desim.profile import load_profile

    prof = load_profile(base)
    return fit(collect(repeats, progress, kvm_path), prof), prof


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def profile_toml(cal: Calibration, base: Any, name: str) -> str:
    """A complete profile TOML: the base's kernel and costs, fitted costs replaced."""
    stamp = f"measured: desim kvm calibrate, {os.uname().release}, {time.strftime('%Y-%m-%d')}"
    lines = [f"# Calibrated by `desim kvm calibrate` from {base.name} on {os.uname().nodename} "
             f"({os.uname().release}). Values in ns.",
             f"# Guest access time per 4 KiB page touch (a scenario's access_ns): {cal.access_ns:.1f} ns.",
             f"name = {_toml_str(name)}",
             f"description = {_toml_str(base.description + ' (calibrated on the real KVM)')}",
             "", "[kernel]"]
    for k, v in base.kernel.model_dump().items():
        lines.append(f"{k} = {_toml_str(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}")
    lines += ["", "[costs]"]
    for k, c in base.costs.items():
        if k in cal.costs and k in cal.sources:
            value, source = cal.costs[k], f"{stamp}: {cal.sources[k]}"
        else:
            value, source = c.value, c.source
        lines.append(f"{k} = {{ value = {round(value, 2)}, source = {_toml_str(source)} }}")
    return "\n".join(lines) + "\n"

