"""Scenario: HostProfile + VM shape + workload (phases and memslot script) + zap policy.

A scenario is a TOML file, validated on load; every error names the field
(``phases.1.memslot_ops.0.slot: ...``) and says what to change. Sizes accept
integers (bytes) or strings with units (``"64KiB"``, ``"6GiB"``, ``"0x40000"``).

Example (the built-in default, ``desim/scenarios/default.toml``)::

    name = "rom-toggle"
    profile = "tdp-icelake"
    [vm]
    vcpus = 4
    [[vm.memslots]]
    id = 0
    gpa = 0
    size = "1GiB"
    [[phases]]
    name = "populate"
    pattern = "sequential"
    slot = 0
    ...
    [[phases.memslot_ops]]
    at_us = 200
    op = "delete"
    slot = 5

``policy`` may be fixed in the file or chosen on the command line; the seed's
capability can be given instead as ``zap_control = 1``
(``KVM_ZAP_ONLY_MEMSLOT_SPTES``); any other bit is rejected like ``-EINVAL``.
"""
from __future__ import annotations

import re

import numpy as np
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator

from .errors import DesimInputError
from .inputfiles import MAX_TOML_BYTES, parse_toml, read_text
from .limits import KVM_ADDRESS_SPACE_NUM, KVM_MEM_MAX_NR_PAGES, check_memslot, guest_phys_bits
from .memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, MemslotOp, MrChange, PAGE_SIZE
from .profile import Dist, HostProfile, load_profile, with_overrides_cached
from .validation import INPUT_MODEL_CONFIG, format_validation_error
from .zap import ZAP_POLICIES, policy_from_zap_control

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(v: Any) -> int:
    """``4096``, ``"0x1000"``, ``"64KiB"``, ``"6 GiB"`` -> bytes (binary units)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        s = v.strip().lower().replace("_", "")
        if s.startswith("0x"):
            try:
                return int(s, 16)
            except ValueError:
                pass
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*([a-z]*)", s)
        if m and m.group(2) in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2)])
    shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."
    raise ValueError(f"cannot read {shown} as a size (use an integer number of bytes, hex '0x...', "
                     "or units like '64KiB', '6GiB')")


Size = Annotated[int, BeforeValidator(parse_size)]
_FLAG_NAMES = {"readonly": KVM_MEM_READONLY, "log_dirty": KVM_MEM_LOG_DIRTY_PAGES}


def parse_flags(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        if v & ~(KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES) or v < 0:
            raise ValueError(f"flags {v:#x}: only KVM_MEM_LOG_DIRTY_PAGES (1) and KVM_MEM_READONLY (2) exist")
        return v
    if isinstance(v, list):
        out = 0
        for name in v:
            if name not in _FLAG_NAMES:
                raise ValueError(f"unknown flag {name!r} (use 'readonly', 'log_dirty')")
            out |= _FLAG_NAMES[name]
        return out
    raise ValueError("flags must be an integer or a list like ['readonly']")


Flags = Annotated[int, BeforeValidator(parse_flags)]


def _max_pages(size: int) -> None:
    if size // PAGE_SIZE > KVM_MEM_MAX_NR_PAGES:
        raise ValueError(f"size {size:#x} is {size // PAGE_SIZE:,} pages; KVM allows at most "
                         "KVM_MEM_MAX_NR_PAGES = 2^31 - 1 pages (8 TiB) per memslot (-EINVAL)")


class _Model(BaseModel):
    # strict types, no NaN/inf, no unknown fields (desim.validation); a field's docstring (the string
    # under it) is its description: docs/scenario-reference.md is generated from them (python -m desim.docs)
    model_config = INPUT_MODEL_CONFIG


class MemslotSpec(_Model):
    """One memslot at VM creation.

    ``backing`` overrides the profile's host page size for this slot's host
    memory (QEMU gives each memory backend its own: ``memory-backend-ram``
    with or without THP, ``memory-backend-file`` on hugetlbfs). ``prealloc``:
    every host page is present before the guest runs (QEMU ``-mem-prealloc``,
    or a firmware/ROM image the VMM copied in), so no fault pays a host
    allocation.
    """

    id: int = Field(ge=0, lt=1 << 32)
    """Slot id (``kvm_userspace_memory_region.slot``; bits 16+ are the address space, e.g. SMM)."""
    gpa: Size = Field(ge=0)
    """Guest-physical start address (4 KiB aligned)."""
    size: Size = Field(gt=0)
    """Size of the slot (4 KiB aligned)."""
    flags: Flags = 0
    """``KVM_MEM_*`` flags: an integer or a list of ``"readonly"``, ``"log_dirty"``."""
    ua: Size | None = Field(default=None, ge=0)
    """Host virtual address of the slot's memory (default: a fresh 1 GiB-aligned range per slot id)."""
    backing: Literal["4k", "thp", "hugetlbfs-1g"] | None = None
    """Host page size backing this slot (default: the profile's ``kernel.backing``)."""
    prealloc: bool = False
    """Every host page present before the guest runs (``-mem-prealloc``, a copied ROM image): no first-touch host allocation."""

    @model_validator(mode="after")
    def _aligned(self) -> "MemslotSpec":
        for name in ("gpa", "size") + (("ua",) if self.ua is not None else ()):
            if getattr(self, name) % PAGE_SIZE:
                raise ValueError(f"{name} must be a multiple of 4 KiB (KVM returns -EINVAL)")
        _max_pages(self.size)
        return self


class MemslotOpSpec(_Model):
    """One memslot ioctl (or a series of them) in a phase's VMM script.

    ``op = "toggle"`` is a create at ``at_us`` and a delete ``hold_us`` later
    (a device mapping a ROM or BAR and unmapping it again). ``repeat`` runs the
    op again every ``every_us`` (periodic) or, with ``poisson = true``, after
    exponentially distributed gaps of mean ``every_us`` drawn from the VMM's
    own random stream (a toggle's next create never starts before its delete).
    """

    at_us: float = Field(ge=0)
    """Time of the (first) ioctl, from the start of the phase."""
    op: Literal["create", "delete", "move", "flags", "toggle"]
    """``KVM_MR_CREATE``/``DELETE``/``MOVE``/``FLAGS_ONLY``; ``toggle`` = create, then delete ``hold_us`` later."""
    slot: int = Field(ge=0, lt=1 << 32)
    """The slot id operated on."""
    gpa: Size | None = Field(default=None, ge=0)
    """New guest-physical address (create, move, toggle)."""
    size: Size | None = Field(default=None, gt=0)
    """Size of a created slot (create, toggle)."""
    flags: Flags = 0
    """``KVM_MEM_*`` flags of a created slot, or the new flags (``flags`` op)."""
    ua: Size | None = Field(default=None, ge=0)
    """Host virtual address of a created slot (default: the slot id's usual range)."""
    hold_us: float = Field(default=0.0, ge=0)
    """``toggle`` only: how long the slot stays mapped before its delete."""
    repeat: int = Field(default=1, ge=1, le=1_000_000)
    """How many times the op runs."""
    every_us: float = Field(default=0.0, ge=0)
    """Period of the repeats (with ``poisson``: the mean gap)."""
    poisson: bool = False
    """Exponentially distributed gaps of mean ``every_us``, drawn from the VMM's own random stream."""

    @model_validator(mode="after")
    def _fields(self) -> "MemslotOpSpec":
        if self.op in ("create", "move", "toggle") and self.gpa is None:
            raise ValueError(f"op '{self.op}' needs gpa")
        if self.op in ("create", "toggle") and self.size is None:
            raise ValueError(f"op '{self.op}' needs size")
        if self.op == "toggle" and self.hold_us <= 0:
            raise ValueError("op 'toggle' needs hold_us > 0 (how long the slot stays mapped)")
        if self.repeat > 1 and self.every_us <= 0:
            raise ValueError("repeat > 1 needs every_us > 0")
        if self.op == "toggle" and self.repeat > 1 and not self.poisson and self.every_us <= self.hold_us:
            raise ValueError("a repeated toggle needs every_us > hold_us (the slot must be deleted first)")
        for name in ("gpa", "size"):
            v = getattr(self, name)
            if v is not None and v % PAGE_SIZE:
                raise ValueError(f"{name} must be a multiple of 4 KiB")
        if self.size is not None:
            _max_pages(self.size)
        return self


class TraceSpec(_Model):
    """A real memslot trace replayed by the VMM during a phase.

    ``timing = "scaled"`` replays at the trace's own timestamps times
    ``scale``; ``"ordered"`` keeps only the order, one op every ``gap_us``.
    """

    path: str
    """The trace file (relative to the scenario file or the working directory)."""
    format: Literal["qemu"] = "qemu"
    """``qemu``: QEMU trace-events ``kvm_set_user_memory`` (see workloads/traces/README.md)."""
    timing: Literal["scaled", "ordered"] = "scaled"
    """``scaled``: the trace's timestamps times ``scale``; ``ordered``: only the order, one op every ``gap_us``."""
    scale: float = Field(default=1.0, gt=0)
    """Factor applied to the trace's timestamps (``scaled``)."""
    gap_us: float = Field(default=100.0, ge=0)
    """Time between two ops (``ordered``)."""
    address_space: int | None = Field(default=0, ge=0, lt=KVM_ADDRESS_SPACE_NUM)
    """Keep only the ops of this address space (slot >> 16; 0 = normal memory, 1 = SMM); empty: all."""


class TouchSpec(_Model):
    """What a set of vCPUs touches: a pattern over a memory region.

    The region is a memslot's range (``slot``, ``offset``, ``size``) or a
    guest-physical range (``gpa``, ``size``) resolved to whatever memslots map
    it when the vCPU gets there (an unmapped gpa is an MMIO exit).
    ``pattern = "trace"`` replays the pages of a ``perf script`` trace of
    ``kvm:kvm_page_fault`` events, vCPU i taking the trace's vCPU i.
    ``exec_fraction`` is the share of the region's pages that hold code (the
    guest executes from them; what NX huge pages act on, see desim/nx.py).
    ``until = "vmm"`` repeats the pattern (more passes, more draws) until the
    phase's VMM script has finished, like the selftests' vCPU loops; the vCPU
    stops at the end of the chunk it is in (at most 4096 accesses later).
    ``pattern = "recorded"`` replays a recorded real guest boot (``recording``,
    a file written by ``desim record``, or a list of recordings of the same
    configuration: replication r replays recording r modulo their number, so
    confidence intervals cover boot-to-boot variation; see
    :mod:`desim.replay`): vCPU i takes
    the recording's vCPU i, ``part`` picks the firmware, the kernel (from its
    entry on) or all of it, ``time_map`` and ``ns_per_insn`` / ``time_scale``
    say how recorded time becomes simulated time, and ``bar_ops`` replays the
    recorded BAR changes as memslot ioctls made by the vCPU that caused them.
    """

    vcpus: Annotated[int, Field(ge=1, le=4096)] | Literal["all", "bsp", "aps"] = "all"
    """Which vCPUs touch: all, the boot processor (vCPU 0), the others, or the first N."""
    pattern: Literal["sequential", "uniform", "zipf", "hotcold", "trace", "recorded"] = "sequential"
    """How pages are picked: in order, uniformly, Zipf-popular, hot/cold, replayed from ``perf_trace``,
    or replayed from a recorded real boot (``recording``)."""
    slot: int | None = None
    """The memslot whose range is touched (or give ``gpa``)."""
    gpa: Size | None = Field(default=None, ge=0)
    """Start of a guest-physical range touched (with ``size``), resolved to memslots when touched."""
    offset: Size = Field(default=0, ge=0)
    """Start of the touched range inside ``slot``."""
    size: Size | None = Field(default=None, gt=0)
    """Size of the touched range (default: the rest of the slot)."""
    sharing: Literal["private", "shared"] = "private"
    """``private``: each vCPU touches its own share of the range; ``shared``: all vCPUs the whole range."""
    passes: int = Field(default=1, ge=1)
    """``sequential``: how many times each page is touched, in order."""
    accesses: int = Field(default=0, ge=0)
    """``uniform``/``zipf``/``hotcold``: accesses per vCPU."""
    access_ns: float = Field(default=100.0, gt=0)
    """Guest time per access between faults."""
    zipf_s: float = Field(default=1.1, gt=0)
    """``zipf``: the exponent of page popularity."""
    hot_fraction: float = Field(default=0.1, gt=0, le=1)
    """``hotcold``: the share of the range's pages that is hot."""
    hot_probability: float = Field(default=0.9, ge=0, le=1)
    """``hotcold``: the share of accesses that go to the hot pages."""
    perf_trace: str | None = None
    """``trace``: a ``perf script`` file of ``kvm:kvm_page_fault`` events (vCPU i replays the trace's vCPU i)."""
    until: Literal["done", "vmm"] = "done"
    """``vmm``: repeat the pattern until the phase's VMM script has finished (like the selftests' vCPU loops)."""
    recording: str | list[str] | None = None
    """``recorded``: a file written by ``desim record``, or a list of them (replication r replays file r mod n)."""
    part: Literal["all", "firmware", "kernel"] = "all"
    """``recorded``: the intervals before the kernel's entry, from it on, or all."""
    time_map: Literal["instructions", "recorded"] = "instructions"
    """``recorded``: busy time = instructions x ``ns_per_insn`` (halted-by-all time kept), or the TCG timeline x ``time_scale``."""
    ns_per_insn: float = Field(default=0.5, gt=0, le=1000)  # estimate: ~1 instruction per cycle at 2 GHz
    """``recorded``, ``time_map = "instructions"``: simulated ns per recorded guest instruction."""
    time_scale: float = Field(default=1.0, gt=0, le=1000)
    """``recorded``, ``time_map = "recorded"``: simulated ns per recorded (TCG wall-clock) ns."""
    bar_ops: bool = True
    """``recorded``: replay the recorded BAR changes as memslot ioctls made by the vCPU that caused them."""
    exec_fraction: float = Field(default=0.0, ge=0, le=1)
    """The share of the range's pages that hold code the guest executes (what NX huge pages act on; a fixed hash of the gfn picks them)."""

    @model_validator(mode="after")
    def _region(self) -> "TouchSpec":
        if self.pattern == "trace":
            if not self.perf_trace:
                raise ValueError("pattern 'trace' needs perf_trace (a perf script file of kvm:kvm_page_fault)")
            return self
        if self.pattern == "recorded":
            if not self.recording:
                raise ValueError("pattern 'recorded' needs recording (a file written by `desim record`)")
            from .record.format import load_recording_cached

            files = [self.recording] if isinstance(self.recording, str) else self.recording
            for f in files:
                try:
                    load_recording_cached(f)
                except DesimInputError as e:
                    raise ValueError(f"recording: {e}") from None
            return self
        if (self.slot is None) == (self.gpa is None):
            raise ValueError(f"pattern '{self.pattern}' needs exactly one of slot or gpa (the region touched)")
        if self.gpa is not None and self.size is None:
            raise ValueError("a gpa region needs size")
        if self.gpa is not None and (self.gpa % PAGE_SIZE or self.size % PAGE_SIZE):
            raise ValueError("gpa and size must be multiples of 4 KiB")
        if self.pattern in ("uniform", "zipf", "hotcold") and self.accesses <= 0:
            raise ValueError(f"pattern '{self.pattern}' needs accesses > 0")
        return self


class PhaseSpec(TouchSpec):
    """A phase: what the vCPUs touch and what the VMM does meanwhile.

    The phase's own pattern fields describe one touch (``pattern = "none"``:
    none); ``touches`` adds more, run one after another by each vCPU they
    name. The phase ends when every vCPU has finished its touches and the VMM
    its script.
    """

    name: str = Field(min_length=1, max_length=200)
    """Name of the phase (metrics ``phase_<name>_ns``; names the random streams)."""
    pattern: Literal["sequential", "uniform", "zipf", "hotcold", "trace", "recorded", "none"] = "sequential"  # type: ignore[assignment]
    """The phase's own touch (as in ``[[phases.touches]]``); ``none``: the phase has no touch of its own."""
    touches: list[TouchSpec] = Field(default_factory=list)
    """More touches, run one after another by each vCPU they name (``[[phases.touches]]``)."""
    memslot_ops: list[MemslotOpSpec] = Field(default_factory=list)
    """The VMM's memslot ioctls during the phase (``[[phases.memslot_ops]]``)."""
    memslot_trace: TraceSpec | None = None
    """A real memslot trace the VMM replays during the phase (``[phases.memslot_trace]``)."""

    @model_validator(mode="after")
    def _region(self) -> "PhaseSpec":  # type: ignore[override]
        if self.pattern != "none":
            TouchSpec._region(self)  # type: ignore[arg-type]
        if (any(t.until == "vmm" for t in self.touch_list())
                and not self.memslot_ops and self.memslot_trace is None):
            raise ValueError("until = 'vmm' needs a VMM script in the phase (memslot_ops or memslot_trace)")
        return self

    def touch_list(self) -> list[TouchSpec]:
        own = [] if self.pattern == "none" else [TouchSpec.model_validate(
            self.model_dump(include=set(TouchSpec.model_fields)))]
        return own + list(self.touches)


class VmSpec(_Model):
    """The VM's shape at creation."""

    vcpus: int = Field(ge=1, le=4096)
    """Number of vCPUs."""
    memslots: list[MemslotSpec] = Field(default_factory=list)
    """The memslots at VM creation (``[[vm.memslots]]``); ids unique, ranges disjoint."""
    guest_page_tables: Size | None = Field(default=None, ge=0)
    """Shadow paging: gpa of the guest's last-level page tables for its linear map, one 4 KiB table per 2 MiB of guest-physical memory in gpa order; a targeted zap of a slot holding some of them zaps their shadow pages and children. Unset: not modelled."""

    @field_validator("memslots")
    @classmethod
    def _no_overlap(cls, v: list[MemslotSpec]) -> list[MemslotSpec]:
        ids = set()
        for s in v:
            if s.id in ids:
                raise ValueError(f"memslot id {s.id} appears twice")
            ids.add(s.id)
        spans = sorted((s.gpa, s.gpa + s.size, s.id) for s in v)
        for (a0, a1, ai), (b0, b1, bi) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ValueError(f"memslots {ai} and {bi} overlap (gpa {a0:#x}-{a1:#x} and {b0:#x}-{b1:#x}); "
                                 "KVM returns -EEXIST")
        return v


class GuestSpec(_Model):
    """The guest's address spaces (processes) and its page-table writes: shadow paging only.

    With ``kernel.mmu = "shadow"`` every process has its own root shadow page
    (one per guest CR3) and each vCPU caches 3 previous roots (``prev_roots``);
    guest page tables are write-protected, so the guest's writes to them take
    write-protection faults (desim/guest_as.py). TDP profiles (``tdp``,
    ``legacy``) ignore this table: their guest CR3 writes and page-table
    writes do not exit. The defaults (one process, no page-table writes) are
    the model without any of it.
    """

    processes: int = Field(default=1, ge=1, le=4096)
    """Guest processes (address spaces, each with its own CR3 and root shadow page); 1: one shared root, no CR3 writes."""
    context_switch_us: float = Field(default=0.0, ge=0)
    """With ``processes`` >= 2: each vCPU writes CR3 (switches to another process, drawn uniformly from its own stream) after every ``context_switch_us`` of its guest time."""
    pt_write_share: float = Field(default=0.0, ge=0, le=1)
    """The share of guest accesses that write the guest page-table entry mapping the accessed page: a write-protection fault (emulated) while that table is shadowed."""
    process_pages: int = Field(default=0, ge=0, le=1 << 31)
    """Private (user-space) pages of each process, mapped only through its own page tables: process p's are at ``process_gpa`` + p x ``process_pages`` x 4 KiB."""
    process_gpa: Size | None = Field(default=None, ge=0)
    """gpa of process 0's private pages (with ``process_pages``; all processes' pages must lie in one of ``vm.memslots``)."""
    user_share: float = Field(default=0.0, ge=0, le=1)
    """The share of guest accesses that go to the running process's private pages (uniformly; the rest are the phases' accesses)."""
    pgd_gpa: Size | None = Field(default=None, ge=0)
    """gpa of process 0's top-level guest page table (process p's at ``pgd_gpa`` + p x 4 KiB): a targeted zap of the slot holding it zaps that process's root. Unset: not placed in any slot."""

    @model_validator(mode="after")
    def _consistent(self) -> "GuestSpec":
        if self.processes > 1 and self.context_switch_us < 1:
            raise ValueError(f"processes = {self.processes} needs context_switch_us >= 1 (the guest time each vCPU "
                             "runs a process before it writes CR3)")
        if self.processes == 1 and self.context_switch_us > 0:
            raise ValueError("context_switch_us needs processes >= 2 (a CR3 write switches to another process)")
        if (self.process_pages > 0) != (self.user_share > 0):
            raise ValueError("process_pages and user_share go together (private pages, and the share of accesses "
                             "that touch them)")
        if self.process_pages > 0 and self.process_gpa is None:
            raise ValueError("process_pages needs process_gpa (where process 0's private pages are)")
        if self.process_gpa is not None and self.process_gpa % PAGE_SIZE:
            raise ValueError("process_gpa must be a multiple of 4 KiB")
        if self.pgd_gpa is not None and self.pgd_gpa % PAGE_SIZE:
            raise ValueError("pgd_gpa must be a multiple of 4 KiB (a page table is a page)")
        return self


class ProfileOverrides(_Model):
    """Changes to the named host profile for this scenario."""

    kernel: dict[str, Any] = Field(default_factory=dict)
    """Kernel configuration fields to replace (see "Host profile: kernel" below)."""
    costs: dict[str, float] = Field(default_factory=dict)
    """Cost values to replace, in ns (see "Host profile: costs" below); their source becomes "override"."""


class Scenario(_Model):
    """A complete, validated scenario."""

    name: str = "scenario"
    """Name shown in tables and results."""
    description: str = ""
    """One line on what the scenario models."""
    profile: str = "tdp-icelake"
    """Host profile: a shipped name (``desim profiles``) or a path to a profile TOML."""
    profile_overrides: ProfileOverrides = Field(default_factory=ProfileOverrides)
    """Changes to the profile (``[profile_overrides.kernel]``, ``[profile_overrides.costs]``)."""
    policy: Literal["fast", "targeted"] | None = None
    """Zap policy when the command line gives none (default: fast, x86's default)."""
    zap_control: int | None = None
    """The seed's ``KVM_CAP_MEMSLOT_ZAP_CONTROL`` flags instead of ``policy``: 1 = ``KVM_ZAP_ONLY_MEMSLOT_SPTES``; other bits are refused (``-EINVAL``)."""
    vm: VmSpec
    """The VM (``[vm]``)."""
    guest: GuestSpec = Field(default_factory=GuestSpec)
    """The guest's address spaces and page-table writes (``[guest]``; shadow paging only)."""
    phases: list[PhaseSpec] = Field(min_length=1)
    """The phases, run one after another (``[[phases]]``)."""
    time_limit_ms: float = Field(default=600_000.0, gt=0)
    """Simulated time after which the run is refused as unfinished."""
    costs: Literal["sampled", "mean"] = "sampled"
    """Costs with a distribution (``dist`` in the profile) are drawn per event (``sampled``, from named streams: ``desim/costs.py``), or every cost is its mean (``mean``: the constant-cost model)."""
    access_dist: Dist | None = None
    """The shape of a hit's latency (an access that neither faults nor stalls: the guest's own TLB and cache misses, host interrupts), as a profile cost's ``dist``: ``kind = "quantiles"`` with ``p`` and ``ns``, or ``"lognormal"`` with ``sigma``; scaled so that its mean is each touch's ``access_ns``. Only the per-access latency statistics read it (``desim/hitdist.py``); every time and count is as without it. Unset, or ``costs = "mean"``: every hit takes ``access_ns``."""

    @field_validator("zap_control")
    @classmethod
    def _zap_control(cls, v: int | None) -> int | None:
        if v is not None:
            try:
                policy_from_zap_control(v)
            except DesimInputError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("phases")
    @classmethod
    def _unique_names(cls, v: list[PhaseSpec]) -> list[PhaseSpec]:
        seen: set[str] = set()
        for p in v:
            if p.name in seen:
                raise ValueError(f"phase name {p.name!r} appears twice (each phase needs its own name: it names "
                                 "the phase's random streams and its phase_<name>_ns metric)")
            seen.add(p.name)
        return v

    @model_validator(mode="after")
    def _guest_layout(self) -> "Scenario":
        g = self.guest
        if g.process_pages > 0:
            lo = g.process_gpa
            hi = lo + g.processes * g.process_pages * PAGE_SIZE
            if not any(m.gpa <= lo and hi <= m.gpa + m.size for m in self.vm.memslots):
                raise ValueError(f"guest.process_gpa: the private pages of {g.processes} process(es) "
                                 f"(gpa {lo:#x}-{hi:#x}) must lie inside one of vm.memslots")
        return self

    @model_validator(mode="after")
    def _policy(self) -> "Scenario":
        if self.policy is not None and self.zap_control is not None:
            if policy_from_zap_control(self.zap_control) != self.policy:
                raise ValueError("policy and zap_control disagree; give one of them")
        return self

    # -- derived -------------------------------------------------------------
    def resolved_policy(self, override: str | None = None) -> str:
        if override is not None:
            if override not in ZAP_POLICIES:
                raise DesimInputError(f"--policy {override}: unknown (choose one of: {', '.join(ZAP_POLICIES)})")
            return override
        if self.policy is not None:
            return self.policy
        if self.zap_control is not None:
            return policy_from_zap_control(self.zap_control)
        return "fast"  # x86's default, as the seed keeps it

    def host_profile(self) -> HostProfile:
        p = load_profile(self.profile)
        o = self.profile_overrides
        if o.kernel or o.costs:
            p = with_overrides_cached(p, o.kernel, o.costs)
        return p

    def with_overrides(self, overrides: dict[str, Any]) -> "Scenario":
        """A copy with dotted-path fields replaced (``vm.vcpus``, ``phases.0.passes``, ...)."""
        data = self.model_dump()
        for path, value in overrides.items():
            _set_path(data, path, _python_value(value))
        return validate_scenario(data, f"scenario {self.name} with overrides")


def _python_value(v: Any) -> Any:
    """numpy scalars (from a grid built with numpy) as the Python numbers they are; nothing else converted."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list):
        return [_python_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _python_value(x) for k, x in v.items()}
    return v


def _set_path(data: Any, path: str, value: Any) -> None:
    """Set a dotted path (``phases.0.vcpus``) in scenario data; list indices must be 0 .. len-1."""
    parts = path.split(".")
    cur = data
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if p == "":
            raise DesimInputError(f"override {path}: empty field name (write FIELD.SUBFIELD=VALUE)")
        if isinstance(cur, list):
            if not p.isdecimal() or int(p) >= len(cur):
                raise DesimInputError(f"override {path}: '{p}' is not an index of this list "
                                      f"(0 to {len(cur) - 1}; negative indices are not accepted)")
            if last:
                cur[int(p)] = value
            else:
                cur = cur[int(p)]
        elif isinstance(cur, dict):
            if last:
                cur[p] = value
            else:
                if p not in cur or cur[p] is None:
                    cur[p] = {}
                cur = cur[p]
        else:
            raise DesimInputError(f"override {path}: '{p}' does not name a field")


def validate_scenario(data: dict, where: str) -> Scenario:
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as e:
        raise DesimInputError(format_validation_error(e, where)) from None
    try:
        sc.host_profile()  # profile name and overrides must resolve
    except DesimInputError as e:
        raise DesimInputError(f"{where}: {e}") from None
    check_script(sc, where)
    return sc


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Load a scenario TOML file, or the built-in default when ``path`` is None."""
    if path is None:
        text = resources.files("desim.scenarios").joinpath("default.toml").read_text()
        where = "built-in default scenario"
        base = None
    else:
        text = read_text(path, "scenario file", MAX_TOML_BYTES)
        where = str(path)
        base = Path(path).parent
    data = parse_toml(text, where)
    if base is not None:
        _resolve_paths(data, base)
    return validate_scenario(data, where)


def _resolve_paths(data: dict, base: Path) -> None:
    """Trace paths in a scenario file are relative to the file (or to the working directory)."""
    def fix(d: Any, key: str) -> None:
        if isinstance(d, dict) and isinstance(d.get(key), str) and d[key] and not Path(d[key]).is_absolute():
            cand = base / d[key]
            try:
                if cand.exists():
                    d[key] = str(cand)
            except (OSError, ValueError):
                pass  # a name the OS refuses: reported when the file is opened
        if isinstance(d, dict) and isinstance(d.get(key), list):
            def near(f: Any) -> Any:
                try:
                    if isinstance(f, str) and f and not Path(f).is_absolute() and (base / f).exists():
                        return str(base / f)
                except (OSError, ValueError):
                    pass
                return f
            d[key] = [near(f) for f in d[key]]

    phases = data.get("phases")
    for ph in phases if isinstance(phases, list) else []:
        if not isinstance(ph, dict):
            continue
        fix(ph.get("memslot_trace"), "path")
        fix(ph, "perf_trace")
        fix(ph, "recording")
        for t in ph.get("touches", []) if isinstance(ph.get("touches"), list) else []:
            fix(t, "perf_trace")
            fix(t, "recording")


def phase_ops(phase: PhaseSpec, rng: np.random.Generator | None = None) -> list[MemslotOp]:
    """The phase's VMM script as kernel-level ops, sorted by time (stable).

    ``rng`` draws the gaps of ``poisson`` series (the VMM's named stream);
    without it (validation) the mean gap is used.
    """
    ops: list[MemslotOp] = []
    for spec in phase.memslot_ops:
        t = spec.at_us
        for _ in range(spec.repeat):
            kw = dict(slot=spec.slot, gpa=spec.gpa or 0, size=spec.size or 0, flags=spec.flags, ua=spec.ua or 0)
            if spec.op == "toggle":
                ops.append(MemslotOp(time_ns=t * 1e3, op=MrChange.CREATE, **kw))
                ops.append(MemslotOp(time_ns=(t + spec.hold_us) * 1e3, op=MrChange.DELETE, **kw))
            else:
                ops.append(MemslotOp(time_ns=t * 1e3, op=MrChange(spec.op), **kw))
            if spec.poisson:
                gap = float(rng.exponential(spec.every_us)) if rng is not None else spec.every_us
                t += (spec.hold_us if spec.op == "toggle" else 0.0) + gap
            else:
                t += spec.every_us
    if phase.memslot_trace is not None:
        ops.extend(trace_ops(phase.memslot_trace))
    ops.sort(key=lambda o: o.time_ns)
    return ops


def trace_ops(spec: TraceSpec) -> list[MemslotOp]:
    """Read a real memslot trace into ops (see :mod:`desim.traces`)."""
    from .traces import read_qemu_trace  # the trace reader module

    trace = read_qemu_trace(spec.path)
    ops = trace.to_memslot_ops(spec.timing, gap_ns=spec.gap_us * 1e3, scale=spec.scale)
    if spec.address_space is not None:
        ops = [o for o in ops if (o.slot >> 16) == spec.address_space]
    return ops


def check_script(sc: Scenario, where: str) -> None:
    """Replay every phase's memslot ops on the slot set and reject what KVM would refuse.

    Also checks what needs the whole scenario: every memslot and every
    CREATE/MOVE against KVM's limits (:func:`desim.limits.check_memslot`, with
    the guest physical address width of the scenario's profile), touches
    naming more vCPUs than the VM has, and perf traces (read now, so that a bad
    trace fails before any run).
    """
    kernel = sc.host_profile().kernel
    bits = guest_phys_bits(kernel.mmu, kernel.phys_bits)
    for i, m in enumerate(sc.vm.memslots):
        check_memslot(m.gpa, m.size, bits, f"{where}: vm.memslots.{i}")
    slots = {s.id: (s.gpa, s.size) for s in sc.vm.memslots}
    for pi, phase in enumerate(sc.phases):
        for ti, touch in enumerate(phase.touch_list()):
            field = f"phases.{pi}" + ("" if ti == 0 and phase.pattern != "none" else f".touches.{ti}")
            if isinstance(touch.vcpus, int) and touch.vcpus > sc.vm.vcpus:
                raise DesimInputError(f"{where}: {field}.vcpus: {touch.vcpus} but the VM has {sc.vm.vcpus} "
                                      "(vm.vcpus)")
            if touch.gpa is not None and touch.size is not None:
                check_memslot(touch.gpa, touch.size, bits, f"{where}: {field} (gpa region)")
            if touch.pattern == "trace" and touch.perf_trace:
                from .traces import read_perf_trace

                read_perf_trace(touch.perf_trace)
        for op in phase_ops(phase):
            tag = f"{where}: phases.{pi} ({phase.name}): memslot op at {op.time_ns / 1e3:.1f} us, {op.op.value} slot {op.slot}"
            if op.op in (MrChange.CREATE, MrChange.MOVE):
                check_memslot(op.gpa, op.size if op.op == MrChange.CREATE else slots.get(op.slot, (0, 0))[1],
                              bits, tag)
            if op.op == MrChange.CREATE:
                if op.slot in slots:
                    raise DesimInputError(f"{tag}: slot already exists (delete it first)")
                _check_free(slots, op.slot, op.gpa, op.size, tag)
                slots[op.slot] = (op.gpa, op.size)
            elif op.op == MrChange.DELETE:
                if op.slot not in slots:
                    raise DesimInputError(f"{tag}: no such slot at that time")
                del slots[op.slot]
            elif op.op == MrChange.MOVE:
                if op.slot not in slots:
                    raise DesimInputError(f"{tag}: no such slot at that time")
                size = slots.pop(op.slot)[1]
                _check_free(slots, op.slot, op.gpa, size, tag)
                slots[op.slot] = (op.gpa, size)
            elif op.slot not in slots:
                raise DesimInputError(f"{tag}: no such slot at that time")
        created = {o.slot for o in phase_ops(phase) if o.op == MrChange.CREATE}
        for ti, touch in enumerate(phase.touch_list()):
            if touch.slot is None:
                continue
            field = f"phases.{pi}" + ("" if ti == 0 and phase.pattern != "none" else f".touches.{ti}")
            if touch.slot not in slots and touch.slot not in created and not _existed_before(sc, pi, touch.slot):
                raise DesimInputError(f"{where}: {field}.slot: memslot {touch.slot} does not exist in this phase")
            gs = slots.get(touch.slot)
            if gs is not None and touch.size is not None and touch.offset + touch.size > gs[1]:
                raise DesimInputError(f"{where}: {field}.size: offset + size exceed memslot {touch.slot}'s "
                                      f"{gs[1]} bytes")


def _existed_before(sc: Scenario, pi: int, slot: int) -> bool:
    return any(s.id == slot for s in sc.vm.memslots) or any(
        o.slot == slot for p in sc.phases[:pi] for o in phase_ops(p) if o.op == MrChange.CREATE)


def _check_free(slots: dict[int, tuple[int, int]], sid: int, gpa: int, size: int, tag: str) -> None:
    for other, (g, s) in slots.items():
        if gpa < g + s and g < gpa + size:
            raise DesimInputError(f"{tag}: gpa {gpa:#x}+{size:#x} overlaps slot {other} (KVM returns -EEXIST)")
