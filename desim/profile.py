"""HostProfile: what the host costs, in nanoseconds, and how its kernel is configured.

A profile is a TOML file. Every cost is a table ``{ value = <ns>, source = "..." }``
whose ``source`` cites a measurement, a document or says ``estimate: <reasoning>``;
a cost without a source is rejected on load. The ``[kernel]`` table holds the
configuration that changes *which* code runs, not how long it takes: the MMU
(``tdp`` = ``arch/x86/kvm/mmu/tdp_mmu.c``; ``legacy`` = the shadow-page MMU used
for TDP before 5.12; ``shadow`` = shadow paging of guest page tables), the lock
(``rwlock`` or ``spinlock``), whether faults take ``mmu_lock`` for read or
write, the preemption model and kernel version (which decide when a zap breaks
the lock, see :mod:`desim.sched`), host backing and NX huge pages.

Named profiles ship in ``desim/profiles/*.toml``; a path to a TOML file works
wherever a name does.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .costs import check_dist_allowed
from .errors import DesimInputError
from .sched import needbreak_on_contention
from .validation import INPUT_MODEL_CONFIG, format_validation_error
from .inputfiles import MAX_TOML_BYTES, parse_toml, read_text


def _list_as_tuple(v: Any) -> Any:
    """TOML has arrays, not tuples: ``ci95 = [lo, hi]`` is read as a pair (strict mode wants a tuple)."""
    return tuple(v) if isinstance(v, list) else v


class Dist(BaseModel):
    """The shape of a cost's distribution; the cost's ``value`` stays its mean.

    * ``kind = "lognormal"``, ``sigma``: the log of a draw is normal with
      standard deviation ``sigma``; the median is ``value * exp(-sigma**2 / 2)``
      so that the mean is ``value``.
    * ``kind = "quantiles"``, ``p`` (increasing, from 0 to 1) and ``ns`` (the
      matching quantiles, non-decreasing): an empirical quantile table, drawn by
      inverse transform with linear interpolation, then scaled by
      ``value / table_mean`` so that the mean is ``value`` (an override of
      ``value`` scales the whole table). ``desim calibrate`` writes ``value`` =
      the table's mean.

    ``ci95_sigma`` / ``ci95_ns`` are the 95% intervals of a fitted ``sigma`` or of
    each quantile (bootstrap); ``source`` says where the shape comes from.
    """

    model_config = ConfigDict(**INPUT_MODEL_CONFIG, frozen=True)
    kind: Literal["lognormal", "quantiles"]
    sigma: float | None = Field(default=None, ge=0, le=5)
    ci95_sigma: Annotated[tuple[float, float], BeforeValidator(_list_as_tuple)] | None = None
    p: list[float] | None = None
    ns: list[float] | None = None
    ci95_ns: list[Annotated[tuple[float, float], BeforeValidator(_list_as_tuple)]] | None = None
    source: str = ""

    @model_validator(mode="after")
    def _complete(self) -> "Dist":
        if self.kind == "lognormal":
            if self.sigma is None:
                raise ValueError("kind = 'lognormal' needs sigma (the standard deviation of log(cost))")
            if self.p is not None or self.ns is not None:
                raise ValueError("p and ns belong to kind = 'quantiles', not 'lognormal'")
        else:
            if self.p is None or self.ns is None:
                raise ValueError("kind = 'quantiles' needs p (probabilities 0..1) and ns (their quantiles)")
            if len(self.p) != len(self.ns) or len(self.p) < 2:
                raise ValueError(f"p and ns must have the same length >= 2 (got {len(self.p)} and {len(self.ns)})")
            if self.p[0] != 0.0 or self.p[-1] != 1.0 or any(b <= a for a, b in zip(self.p, self.p[1:])):
                raise ValueError("p must increase strictly from 0 to 1")
            if any(x < 0 for x in self.ns) or any(b < a for a, b in zip(self.ns, self.ns[1:])):
                raise ValueError("ns must be >= 0 and non-decreasing")
            if self.table_mean() <= 0:
                raise ValueError("ns: the table's mean must be > 0")
        return self

    def table_mean(self) -> float:
        """Mean of the piecewise-linear quantile function (trapezoids over p)."""
        p, x = self.p or [], self.ns or []
        return sum((p[i + 1] - p[i]) * (x[i] + x[i + 1]) / 2 for i in range(len(p) - 1))


class Cost(BaseModel):
    """One cost in ns with its source and, when it was measured, its 95% confidence interval.

    ``value`` is the mean; ``dist`` (optional) gives the shape of the
    distribution that a stochastic run draws from (see :mod:`desim.costs`).
    """

    model_config = ConfigDict(**INPUT_MODEL_CONFIG, frozen=True)
    value: float = Field(ge=0)
    source: str = Field(min_length=3)
    ci95: Annotated[tuple[float, float], BeforeValidator(_list_as_tuple)] | None = None
    dist: Dist | None = None

    @model_validator(mode="after")
    def _ci_ordered(self) -> "Cost":
        if self.ci95 is not None and self.ci95[0] > self.ci95[1]:
            raise ValueError(f"ci95 [{self.ci95[0]}, {self.ci95[1]}]: the low end must not exceed the high end")
        return self


COST_NAMES: dict[str, str] = {
    "vm_exit": "VM exit to the host's exit handler (vmx_vcpu_run return path)",
    "vm_entry": "VM entry from vcpu_enter_guest (incl. request checks)",
    "fault_handle": "kvm_mmu_page_fault software path outside the lock (gfn->slot, checks)",
    "faultin_resident": "kvm_faultin_pfn on a host-resident page (hva_to_pfn fast GUP)",
    "host_alloc_4k": "host page fault on first touch: allocate and zero a 4 KiB page",
    "host_alloc_2m": "host THP fault on first touch: allocate and zero a 2 MiB page",
    "host_alloc_1g": "hugetlbfs 1 GiB page first touch: zero 1 GiB",
    "zone_lock_page": "move one page under zone->lock (rmqueue_bulk refill of a per-CPU list, desim/hostmm.py)",
    "lru_lock_page": "add one folio to the LRU under lruvec->lru_lock (folio_batch_move_lru)",
    "clear_page_4k": "zero 4 KiB at one core's speed (clear_page; part of host_alloc_*)",
    "membw_4k": "write 4 KiB at the host's whole memory bandwidth (the floor of concurrent zeroing)",
    "spte_install": "install one leaf SPTE under mmu_lock (tdp_mmu_map_handle_target_level)",
    "pt_page_alloc": "allocate and link one page-table page (kvm_mmu_memory_cache, per level)",
    "prefetch_spte": "install one prefetched neighbour SPTE (direct_pte_prefetch_many)",
    "root_alloc": "load a fresh root on entry after KVM_REQ_MMU_FREE_OBSOLETE_ROOTS",
    "cr3_switch": "shadow paging: handle a guest CR3 write exit (handle_cr, kvm_set_cr3, kvm_mmu_new_pgd's fast_pgd_switch), VM exit and entry apart",
    "pt_write_emulate": "shadow paging: emulate a guest write to a write-protected page table (x86_emulate_instruction up to kvm_mmu_pte_write's mmu_lock)",
    "ipi_send": "send one IPI (x2APIC ICR write) in kvm_make_all_cpus_request",
    "ipi_ack": "IPI delivery until the target's VM exit acks it",
    "invept": "TLB flush of one vCPU before re-entry (INVEPT / INVVPID)",
    "spte_zap": "zap one present SPTE (clear, handle_changed_spte)",
    "spte_visit": "visit one SPTE in a TDP MMU walk without zapping it (tdp_iter_next, READ_ONCE, checks)",
    "rmap_probe": "probe one gfn's rmap at one level in a memslot walk (slot_handle_level)",
    "hash_probe": "probe one gfn's shadow-page hash bucket (for_each_gfn_valid_sp_with_gptes)",
    "sp_free": "remove one shadow / page-table page: handle its 512 entries and free it (handle_removed_pt, kvm_mmu_prepare_zap_page)",
    "srcu_sync": "synchronize_srcu_expedited with no reader left",
    "lock_handoff": "mmu_lock cache-line hand-off to a waiter on another core",
    "mmio_emulation": "emulate one MMIO access to a gpa without a memslot (userspace exit)",
    "ioctl_fixed": "KVM_SET_USER_MEMORY_REGION bookkeeping (kvm_set_memslot minus zap and SRCU)",
    "memslot_invalidate": "DELETE/MOVE only: kvm_invalidate_memslot and the final swap's bookkeeping, outside the zap and SRCU",
    "memslot_alloc_page": "per 4 KiB page of a created or moved slot: kvm_alloc_memslot_metadata (rmaps, lpage_info)",
    "memslot_free_page": "per 4 KiB page of a deleted or moved slot: kvm_free_memslot / kvm_arch_free_memslot",
}


class Kernel(BaseModel):
    """Kernel configuration that selects code paths."""

    model_config = ConfigDict(**INPUT_MODEL_CONFIG, frozen=True)
    mmu: Literal["tdp", "legacy", "shadow"]
    """``tdp`` = the TDP MMU (``mmu/tdp_mmu.c``, 5.12+); ``legacy`` = shadow pages for TDP (before 5.12); ``shadow`` = shadow paging of guest page tables."""
    lock: Literal["rwlock", "spinlock"]
    """``mmu_lock``: a qrwlock (5.12+) or a spinlock."""
    fault_lock: Literal["read", "write"]
    """How faults take ``mmu_lock`` (``read`` only on the TDP MMU with an rwlock)."""
    preempt: Literal["none", "voluntary", "full", "lazy"]
    """The preemption model booted (``PREEMPT_DYNAMIC``: the ``preempt=`` boot option; dmesg "Dynamic Preempt: ..."). Since 6.11 only ``full`` and ``lazy`` break ``mmu_lock`` for waiters (desim/sched.py)."""
    preempt_dynamic: bool = True
    """Built with ``CONFIG_PREEMPT_DYNAMIC``, which selects ``CONFIG_PREEMPTION``: before 6.11 every model then breaks locks for waiters."""
    version: str = Field(default="6.12", pattern=r"^\d+\.\d+(\.\d+)?$")
    """Kernel version, ``major.minor[.patch]`` (a 6.10.y stable kernel with the c793a62823d1 backport: give ``6.11``)."""
    hz: int = Field(default=250, ge=100, le=1000)
    """``CONFIG_HZ``: the scheduler tick, when ``need_resched`` can be set."""
    sched_base_slice_ns: float = Field(default=3_000_000.0, gt=0)
    """``sysctl_sched_base_slice`` as scaled by the CPU count: how long the ``mmu_lock`` holder runs before a competing task gets the CPU."""
    competing_task: bool = False
    """Another runnable task shares the CPU of the thread holding ``mmu_lock`` (overcommit): ``need_resched`` yields once per slice."""
    pte_prefetch: bool
    """The legacy/shadow MMU installs neighbouring SPTEs on a fault (``direct_pte_prefetch``)."""
    mmio_caching: bool = True
    """``kvm.mmio_caching``: MMIO SPTEs make repeated MMIO accesses EPT misconfigurations (fast path); off, each is a fault."""
    backing: Literal["4k", "thp", "hugetlbfs-1g"] = "thp"
    """Host page size backing guest memory (per slot: ``vm.memslots.N.backing``)."""
    thp_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    """With ``thp``: the share of 2 MiB regions the host actually backs with a huge page."""
    nx_huge_pages: bool = False
    """``kvm.nx_huge_pages`` (default on only for CPUs with iTLB multihit): code is mapped at 4 KiB and fetches split huge pages (desim/nx.py)."""
    nx_recovery_ratio: int = Field(default=60, ge=1)
    """``kvm.nx_huge_pages_recovery_ratio``: each recovery run zaps 1/ratio of the NX splits."""
    nx_recovery_period_ms: float = Field(default=0.0, ge=0)
    """``kvm.nx_huge_pages_recovery_period_ms`` (0: one hour / ratio, 60 s by default)."""
    eager_page_split: bool = False
    """Enabling dirty logging splits huge SPTEs in place (``eager_page_split``) instead of zapping them."""
    root_level: int = Field(default=4, ge=4, le=5)
    """Paging levels of the root (4, or 5 with LA57)."""
    phys_bits: int = Field(default=46, ge=32, le=52)
    """Host MAXPHYADDR in bits (CPUID 0x80000008 EAX[7:0], "address sizes" in /proc/cpuinfo): with TDP, the
    guest physical address width memslots must fit in (``kvm_mmu_max_gfn``, arch/x86/kvm/mmu.h; see
    desim.limits). Default 46: Intel Xeon Scalable servers (Skylake-SP to Sapphire Rapids) report 46."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        if isinstance(data, dict) and "preemption" in data:
            raise ValueError("preemption: replaced by preempt = 'none' | 'voluntary' | 'full' | 'lazy' and version "
                             "(lock breaks for waiters depend on both since 6.11); e.g. preempt = 'full' for the "
                             "old preemption = true")
        return data

    @property
    def version_tuple(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    @property
    def needbreak_on_contention(self) -> bool:
        """``rwlock_needbreak`` honours waiters (:func:`desim.sched.needbreak_on_contention`)."""
        return needbreak_on_contention(self)

    @model_validator(mode="after")
    def _consistent(self) -> "Kernel":
        if self.preempt == "lazy" and self.version_tuple < (6, 13):
            raise ValueError(f"preempt='lazy' needs version >= 6.13 (PREEMPT_LAZY was added in 6.13; "
                             f"version is {self.version})")
        if self.preempt_dynamic and self.version_tuple < (5, 12):
            raise ValueError(f"preempt_dynamic=true needs version >= 5.12 (PREEMPT_DYNAMIC was added in 5.12; "
                             f"version is {self.version}); set preempt_dynamic = false")
        if self.fault_lock == "read" and self.lock == "spinlock":
            raise ValueError("fault_lock='read' needs lock='rwlock' (a spinlock has no read side)")
        if self.fault_lock == "read" and self.mmu != "tdp":
            raise ValueError("only the TDP MMU takes mmu_lock for read on faults; use fault_lock='write'")
        return self


class Harness(BaseModel):
    """What ``desim calibrate`` measured of the ``desim kvm`` harness's own guest on this host (``[harness]``).

    Not a host cost and never read by the simulator's model: a workload
    property of the harness (its timed guest touches a new 4 KiB page at
    every access), kept with the profile it was calibrated with so that
    ``desim validate`` (:mod:`desim.kvm.simbridge`) can give it to the
    validation scenarios."""

    model_config = ConfigDict(**INPUT_MODEL_CONFIG, frozen=True)
    access_dist: Dist | None = None
    """The shape of the harness guest's hits (rdtsc in the guest) on 4 KiB host pages, the validation scenarios' ``access_dist`` (desim/hitdist.py)."""
    access_dist_thp: Dist | None = None
    """The same with 2 MiB guest pages on host THP (fewer TLB misses), for the scenarios with ``host_thp``."""


class HostProfile(BaseModel):
    """Costs (ns) and kernel configuration of one host."""

    model_config = ConfigDict(**INPUT_MODEL_CONFIG, frozen=True)
    name: str
    description: str = ""
    kernel: Kernel
    costs: dict[str, Cost]
    harness: Harness = Field(default_factory=Harness)

    @field_validator("costs")
    @classmethod
    def _all_costs(cls, v: dict[str, Cost]) -> dict[str, Cost]:
        missing = sorted(set(COST_NAMES) - set(v))
        unknown = sorted(set(v) - set(COST_NAMES))
        if missing:
            raise ValueError(f"missing costs: {', '.join(missing)}")
        if unknown:
            raise ValueError(f"unknown costs: {', '.join(unknown)} (known: {', '.join(COST_NAMES)})")
        for name, c in v.items():
            if c.dist is not None:
                check_dist_allowed(name)
        return v

    def ns(self, name: str) -> float:
        return self.costs[name].value

    def with_overrides(self, kernel: dict | None = None, costs: dict[str, float] | None = None) -> "HostProfile":
        """A copy with kernel fields and cost values replaced (sources marked as overrides)."""
        data = self.model_dump()
        if kernel:
            data["kernel"].update(kernel)
        for k, v in (costs or {}).items():
            if k not in COST_NAMES:
                raise DesimInputError(f"profile_overrides.costs.{k}: unknown cost (known: {', '.join(COST_NAMES)})")
            # the distribution's shape stays; its mean becomes the new value
            data["costs"][k] = {"value": v, "source": "override", "dist": data["costs"][k].get("dist")}
        try:
            return HostProfile.model_validate(data)
        except ValidationError as e:
            raise DesimInputError(format_validation_error(e, f"profile {self.name} with profile_overrides")) from None


def profile_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("desim.profiles").iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> HostProfile:
    """Load a named profile (``tdp-icelake``) or a TOML file path."""
    text: str
    where: str
    if not isinstance(name_or_path, (str, Path)):
        raise DesimInputError(f"profile {name_or_path!r}: must be a profile name or a .toml path (a string)")
    name = str(name_or_path)
    if name in profile_names():
        where = f"profile {name}"
        text = resources.files("desim.profiles").joinpath(f"{name}.toml").read_text()
    elif name.endswith(".toml") or _exists(name):
        where = name
        text = read_text(name, "profile file", MAX_TOML_BYTES)
    else:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise DesimInputError(
            f"profile '{shown}': unknown (named profiles: {', '.join(profile_names())}; or give a .toml path)")
    return _profile_from_text(text, where)


@functools.lru_cache(maxsize=64)
def _profile_from_text(text: str, where: str) -> HostProfile:
    """Parse and validate a profile's TOML text. The same text gives the same (frozen) profile: a sweep's task
    resolves its profile about four times (validation, the memory check, the VM), each a TOML parse and a
    validation otherwise; a file changed on disk is new text, so it is read again."""
    data = parse_toml(text, where)
    try:
        return HostProfile.model_validate(data)
    except ValidationError as e:
        raise DesimInputError(format_validation_error(e, where)) from None


_OVERRIDDEN: dict[tuple[int, str], tuple[HostProfile, HostProfile]] = {}


def with_overrides_cached(profile: HostProfile, kernel: dict | None, costs: dict[str, float] | None) -> HostProfile:
    """:meth:`HostProfile.with_overrides`, remembered per (profile object, overrides): the profiles of
    :func:`load_profile` are shared, and so is each overridden copy (both frozen)."""
    key = (id(profile), repr((sorted((kernel or {}).items()), sorted((costs or {}).items()))))
    hit = _OVERRIDDEN.get(key)
    if hit is not None and hit[0] is profile:
        return hit[1]
    out = profile.with_overrides(kernel, costs)
    if len(_OVERRIDDEN) >= 256:
        _OVERRIDDEN.clear()
    _OVERRIDDEN[key] = (profile, out)  # holding the profile keeps its id from being reused
    return out


def _exists(name: str) -> bool:
    try:
        return Path(name).exists()
    except (OSError, ValueError):  # a name too long for the OS, or with a NUL byte
        return False
