"""What this host's KVM offers: API version, MMU kind, capabilities, quirks, stats names.

Sources:

* ``KVM_GET_API_VERSION``, ``KVM_GET_VCPU_MMAP_SIZE`` and
  ``KVM_CHECK_EXTENSION`` on ``/dev/kvm`` (``Documentation/virt/kvm/api.rst``
  sections 4.1, 4.4, 4.5); for ``KVM_CAP_DISABLE_QUIRKS2`` the returned
  value is the mask of quirks that ``KVM_ENABLE_CAP`` may disable
  (api.rst 7.31); bit 7 is ``KVM_X86_QUIRK_SLOT_ZAP_ALL`` (Linux 6.12+), the
  switch between the fast global zap and the targeted zap;
* the stats names of a throwaway VM and vCPU (``KVM_GET_STATS_FD``);
* module parameters under ``/sys/module/kvm*/parameters`` (``tdp_mmu`` of
  ``kvm``, ``ept`` of ``kvm_intel``, ``npt`` of ``kvm_amd``; ``kvm_pvm`` has
  no two-dimensional paging at all), giving the MMU kind in the profiles'
  vocabulary: ``tdp`` (TDP MMU), ``legacy`` (shadow-page MMU over EPT/NPT) or
  ``shadow`` (shadow paging of the guest's page tables);
* ``/proc/meminfo`` (``MemAvailable``) and the THP mode in
  ``/sys/kernel/mm/transparent_hugepage/enabled``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from desim.kvm import uapi as u
from desim.kvm.vm import KVM_DEV, Kvm

VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")


def mem_available() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (0 if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def thp_mode() -> str:
    """The bracketed THP mode (``always``, ``madvise``, ``never``) or ``unknown``."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()


def module_params(sys_module: Path = Path("/sys/module")) -> dict[str, dict[str, str]]:
    """Parameters of ``kvm`` and the vendor modules that are loaded."""
    out: dict[str, dict[str, str]] = {}
    for mod in ("kvm", *VENDOR_MODULES):
        d = sys_module / mod / "parameters"
        if not (sys_module / mod).exists():
            continue
        params: dict[str, str] = {}
        if d.is_dir():
            for p in sorted(d.iterdir()):
                try:
                    params[p.name] = p.read_text().strip()
                except OSError:
                    params[p.name] = "?"
        out[mod] = params
    return out


def _yes(v: str | None) -> bool:
    return v is not None and v.strip().upper() in ("Y", "1")


def mmu_kind(params: dict[str, dict[str, str]]) -> str:
    """``tdp``, ``legacy`` or ``shadow`` from module parameters (``unknown`` without kvm)."""
    if "kvm" not in params:
        return "unknown"
    tdp = _yes(params.get("kvm_intel", {}).get("ept")) or _yes(params.get("kvm_amd", {}).get("npt"))
    if "kvm_pvm" in params and not tdp:
        return "shadow"
    if not tdp:
        return "shadow"
    return "tdp" if _yes(params["kvm"].get("tdp_mmu")) else "legacy"


def decode_quirks(mask: int) -> list[str]:
    names = [n for n, bit in u.QUIRKS.items() if mask & bit]
    unknown = mask & ~sum(u.QUIRKS.values())
    if unknown:
        names.append(f"unknown:{unknown:#x}")
    return names


def probe(path: str = KVM_DEV) -> dict[str, Any]:
    """Everything ``desim kvm probe`` prints, as a JSON-able dict."""
    params = module_params()
    with Kvm(path) as kvm:
        caps = {name: kvm.check_extension(cap) for name, cap in u.CAPS.items()}
        quirks = caps["KVM_CAP_DISABLE_QUIRKS2"]
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu()
            vm_stats = [{"name": d.name, "type": d.type, "unit": d.unit, "size": d.size} for d in vm.stats.descs]
            vcpu_stats = [{"name": d.name, "type": d.type, "unit": d.unit, "size": d.size} for d in vcpu.stats.descs]
        return {
            "device": path,
            "kernel": os.uname().release,
            "api_version": kvm.api_version,
            "vcpu_mmap_size": kvm.vcpu_mmap_size,
            "modules": sorted(params),
            "mmu": mmu_kind(params),
            "module_params": params,
            "capabilities": caps,
            "disable_quirks2_mask": quirks,
            "disable_quirks2": decode_quirks(quirks),
            "policies": ["fast", "targeted"] if quirks & u.KVM_X86_QUIRK_SLOT_ZAP_ALL else ["fast"],
            "vm_stats": vm_stats,
            "vcpu_stats": vcpu_stats,
            "host": {"cpus": os.cpu_count(), "mem_available": mem_available(), "thp": thp_mode()},
        }


def format_probe(p: dict[str, Any]) -> str:
    """Human-readable text of :func:`probe`'s dict."""
    caps = p["capabilities"]
    kp = p["module_params"].get("kvm", {})
    lines = [
        f"device        {p['device']}  (API {p['api_version']}, kvm_run mmap {p['vcpu_mmap_size']} bytes)",
        f"kernel        {p['kernel']}  modules: {', '.join(p['modules'])}",
        f"mmu           {p['mmu']}  (kvm.tdp_mmu={kp.get('tdp_mmu', '?')}, eager_page_split={kp.get('eager_page_split', '?')}, "
        f"nx_huge_pages={kp.get('nx_huge_pages', '?')}, mmio_caching={kp.get('mmio_caching', '?')})",
        f"zap policies  {', '.join(p['policies'])}  (KVM_CAP_DISABLE_QUIRKS2 mask {p['disable_quirks2_mask']:#x}: "
        f"{', '.join(p['disable_quirks2']) or 'none'})",
        f"limits        vcpus {caps['KVM_CAP_NR_VCPUS']} recommended / {caps['KVM_CAP_MAX_VCPUS']} max, "
        f"memslots {caps['KVM_CAP_NR_MEMSLOTS']}, address spaces {caps['KVM_CAP_MULTI_ADDRESS_SPACE']}",
        f"host          {p['host']['cpus']} CPUs, MemAvailable {p['host']['mem_available'] >> 20} MiB, THP {p['host']['thp']}",
        *(f"{m:13s} " + ", ".join(f"{k}={v}" for k, v in p["module_params"][m].items())
          for m in p["modules"] if m in VENDOR_MODULES),
        "capabilities  " + ", ".join(f"{k.removeprefix('KVM_CAP_')}={v}" for k, v in caps.items()),
        "vm stats      " + ", ".join(s["name"] for s in p["vm_stats"]),
        "vcpu stats    " + ", ".join(s["name"] for s in p["vcpu_stats"]),
    ]
    return "\n".join(lines)
