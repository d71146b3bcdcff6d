"""Real-KVM scenarios in the simulator's vocabulary, and their guest-physical layout.

A :class:`KvmScenario` says what one VM looks like (RAM, vCPUs, extra
memslots, guest page size, host backing), which memslot operation the VMM
performs (``KVM_SET_USER_MEMORY_REGION`` as classified by
``kvm_set_memory_region`` in ``virt/kvm/kvm_main.c``: DELETE, DELETE then
CREATE again, or MOVE) on which slot, where that slot lies relative to the
range the guest touches, and the zap policy (``fast`` = x86's default
``kvm_mmu_zap_all_fast``; ``targeted`` = ``KVM_X86_QUIRK_SLOT_ZAP_ALL``
disabled with ``KVM_CAP_DISABLE_QUIRKS2``, so only the slot's SPTEs go).

:func:`layout` turns it into memslots (slot id, gpa, size) and per-vCPU touch
regions::

    gpa 0            slot 0  "system": guest code page + page tables
    gpa 1 GiB        slot 1  "ram": ram_mib, touched by the vCPUs
    (right after ram) the target extra slot when position == "inside" (touched)
    next 1 GiB       slots 2.. the other extra slots (never touched)
    next 1 GiB       MOVE destination of the target slot
    next 1 GiB       the exit page: mapped by the guest, in no memslot (MMIO)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from desim.errors import DesimInputError
from desim.kvm.guest import PAGE_1G, PAGE_2M, PAGE_4K, table_pages_needed

MIB = 1 << 20
OPS = ("delete", "recreate", "move")
POSITIONS = ("outside", "inside")
POLICIES = ("fast", "targeted")
GUEST_PAGES = {"4k": PAGE_4K, "2m": PAGE_2M}

SYSTEM_SLOT, RAM_SLOT, FIRST_EXTRA_SLOT = 0, 1, 2
RAM_BASE = PAGE_1G


@dataclass(frozen=True)
class KvmScenario:
    """One VM and one memslot operation on it.

    ``op``: ``delete`` (KVM_MR_DELETE only), ``recreate`` (DELETE then CREATE
    of the same gpa and host memory: what QEMU does when it toggles a region),
    ``move`` (KVM_MR_MOVE of the slot to another gpa). ``position``: whether
    the target extra slot is ``inside`` the touched range (the guest had
    SPTEs on it) or ``outside``. ``passes``: touch passes in the populate and
    in the re-touch phase. ``accessed``: the guest PTEs carry their
    Accessed/Dirty bits when the operation happens (shadow paging then
    prefetches up to 8 neighbouring PTEs per re-fault); ``False`` builds the
    tables without them and clears them again after populate, as a guest's
    page aging would, which disables that prefetch for 4 KiB guest pages.
    ``stride_kib``: the guest touches one byte every ``stride_kib`` KiB (4:
    every page; 32: every 8th page, so no neighbour is ever host-resident and
    shadow paging can prefetch nothing). ``busy_cpus``: the memslot operation
    is timed with the host's other CPUs running busy loops
    (:mod:`desim.kvm.spin`), so ``synchronize_srcu_expedited`` does not pay
    for waking a halted CPU, as on a host whose CPUs run vCPUs; ``False``
    times it on an otherwise idle host.
    """

    name: str = "custom"
    ram_mib: int = 256
    vcpus: int = 1
    extra_slots: int = 1
    extra_slot_mib: int = 2
    op: str = "recreate"
    target: int = 0
    position: str = "outside"
    guest_page: str = "4k"
    accessed: bool = True
    passes: int = 1
    host_thp: bool = False
    policy: str = "fast"
    stride_kib: int = 4
    busy_cpus: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> DesimInputError:
            return DesimInputError(f"kvm scenario {self.name!r}: {field}: {why}")

        if self.ram_mib < 2 or self.ram_mib % 2:
            raise bad("ram_mib", f"must be an even number >= 2 (got {self.ram_mib})")
        if not 1 <= self.vcpus <= 256:
            raise bad("vcpus", f"must be 1..256 (got {self.vcpus})")
        if self.extra_slots < 1 or self.extra_slots > 500:
            raise bad("extra_slots", f"must be 1..500: the operation needs a target slot (got {self.extra_slots})")
        if self.extra_slot_mib < 2 or self.extra_slot_mib % 2:
            raise bad("extra_slot_mib", f"must be an even number >= 2 (got {self.extra_slot_mib})")
        if self.op not in OPS:
            raise bad("op", f"must be one of {', '.join(OPS)} (got {self.op!r})")
        if not 0 <= self.target < self.extra_slots:
            raise bad("target", f"must index an extra slot, 0..{self.extra_slots - 1} (got {self.target})")
        if self.position not in POSITIONS:
            raise bad("position", f"must be one of {', '.join(POSITIONS)} (got {self.position!r})")
        if self.position == "inside" and self.op != "recreate":
            raise bad("op", f"{self.op!r} of a slot inside the touched range leaves a hole the guest "
                            "would touch again; use op 'recreate' or position 'outside'")
        if self.guest_page not in GUEST_PAGES:
            raise bad("guest_page", f"must be 4k or 2m (got {self.guest_page!r})")
        if not 1 <= self.passes <= 1000:
            raise bad("passes", f"must be 1..1000 (got {self.passes})")
        if self.stride_kib < 4 or self.stride_kib % 4 or self.stride_kib > 2048:
            raise bad("stride_kib", f"must be a multiple of 4 in 4..2048 (got {self.stride_kib})")
        if self.policy not in POLICIES:
            raise bad("policy", f"must be fast or targeted (got {self.policy!r})")
        if self.ram_mib // self.vcpus < 2 and self.guest_page == "2m":
            raise bad("ram_mib", "each vCPU needs at least 2 MiB of RAM with 2 MiB guest pages")

    def with_policy(self, policy: str) -> KvmScenario:
        return replace(self, policy=policy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KvmScenario:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DesimInputError(f"kvm scenario: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**d)


SCENARIOS: dict[str, KvmScenario] = {
    s.name: s
    for s in (
        KvmScenario(name="tiny", ram_mib=64, vcpus=1),
        KvmScenario(name="outside", ram_mib=1024, vcpus=2),
        KvmScenario(name="inside", ram_mib=1024, vcpus=2, position="inside"),
        KvmScenario(name="move", ram_mib=1024, vcpus=2, op="move"),
        KvmScenario(name="delete", ram_mib=1024, vcpus=2, op="delete"),
        KvmScenario(name="many-slots", ram_mib=1024, vcpus=2, extra_slots=32, target=16),
        KvmScenario(name="guest-2m", ram_mib=1024, vcpus=2, guest_page="2m"),
        KvmScenario(name="thp", ram_mib=1024, vcpus=2, guest_page="2m", host_thp=True),
        KvmScenario(name="no-accessed", ram_mib=1024, vcpus=2, accessed=False),
        KvmScenario(name="big-slot", ram_mib=1024, vcpus=2, extra_slot_mib=8192),
        # the shadow MMU's per-gfn hash walk (kvm_mmu_zap_memslot_pages_and_flush): 4 GiB touched at 4 KiB
        # is ~2,060 shadow pages, so each of the 8 GiB slot's 2M gfns probes 1 + 2060/4096 hash entries
        KvmScenario(name="hash-walk", ram_mib=4096, vcpus=2, extra_slot_mib=8192, policy="targeted"),
    )
}


def named(name: str) -> KvmScenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise DesimInputError(f"unknown kvm scenario {name!r} (known: {', '.join(SCENARIOS)})") from None


@dataclass(frozen=True)
class SlotPlan:
    """One memslot of the layout."""

    slot: int
    role: str  # "system", "ram", "extra"
    gpa: int
    size: int
    touched: bool


@dataclass(frozen=True)
class Layout:
    """Guest-physical layout of a scenario."""

    slots: tuple[SlotPlan, ...]
    regions: tuple[tuple[int, int], ...]  # per vCPU (base gpa, size)
    target_slot: int
    move_gpa: int
    exit_gpa: int
    code_gpa: int
    tables_gpa: int

    def touched_pages(self, stride: int) -> int:
        """Pages the guest writes per pass with a stride of ``stride`` bytes."""
        return sum(-(-size // stride) for _, size in self.regions)

    @property
    def guest_bytes(self) -> int:
        return sum(s.size for s in self.slots)

    def slot(self, slot_id: int) -> SlotPlan:
        return next(s for s in self.slots if s.slot == slot_id)


def _up(x: int, a: int) -> int:
    return -(-x // a) * a


def layout(sc: KvmScenario) -> Layout:
    """Memslots, touch regions, move destination and exit page of ``sc``."""
    ram = sc.ram_mib * MIB
    xsz = sc.extra_slot_mib * MIB
    target_id = FIRST_EXTRA_SLOT + sc.target
    slots: list[SlotPlan] = [SlotPlan(RAM_SLOT, "ram", RAM_BASE, ram, True)]
    touched_end = RAM_BASE + ram
    if sc.position == "inside":
        slots.append(SlotPlan(target_id, "extra", touched_end, xsz, True))
        touched_end += xsz
    gpa = _up(touched_end, PAGE_1G)
    for i in range(sc.extra_slots):
        sid = FIRST_EXTRA_SLOT + i
        if sc.position == "inside" and sid == target_id:
            continue
        slots.append(SlotPlan(sid, "extra", gpa, xsz, False))
        gpa += xsz
    move_gpa = _up(gpa, PAGE_1G)
    exit_gpa = _up(move_gpa + xsz, PAGE_1G)
    mapped = sum(s.size for s in slots) + xsz + PAGE_2M
    leaf = GUEST_PAGES[sc.guest_page]
    tables = table_pages_needed(mapped, leaf) + 2 * (sc.extra_slots + 4)
    system = _up(PAGE_4K * (1 + tables), PAGE_2M)
    slots.insert(0, SlotPlan(SYSTEM_SLOT, "system", 0, system, False))
    # split the touched range between vCPUs, on guest-page boundaries
    touched = touched_end - RAM_BASE
    unit = leaf
    per = touched // unit // sc.vcpus * unit
    regions = []
    for i in range(sc.vcpus):
        base = RAM_BASE + i * per
        size = per if i < sc.vcpus - 1 else touched - per * (sc.vcpus - 1)
        regions.append((base, size))
    return Layout(tuple(slots), tuple(regions), target_id, move_gpa, exit_gpa, 0, PAGE_4K)
