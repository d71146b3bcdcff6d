"""Guest code, page tables, ioctl numbers and scenario layouts (no /dev/kvm needed)."""
from __future__ import annotations

import ctypes
import struct

import pytest

from desim.errors import DesimInputError
from desim.kvm import guest as g
from desim.kvm import uapi as u
from desim.kvm.scenario import KvmScenario, SCENARIOS, layout, named


def test_ioctl_numbers_match_the_c_headers():
    # values printed by a C program including <linux/kvm.h> on x86-64
    assert u.KVM_GET_API_VERSION == 0xAE00
    assert u.KVM_CREATE_VM == 0xAE01
    assert u.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert u.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert u.KVM_RUN == 0xAE80
    assert u.KVM_GET_REGS == 0x8090AE81
    assert u.KVM_SET_SREGS == 0x4138AE84
    assert u.KVM_SET_MSRS == 0x4008AE89
    assert u.KVM_SET_CPUID2 == 0x4008AE90
    assert u.KVM_ENABLE_CAP == 0x4068AEA3
    assert u.KVM_GET_STATS_FD == 0xAECE


def test_struct_layouts():
    assert ctypes.sizeof(u.KvmRegs) == 0x90
    assert ctypes.sizeof(u.KvmSregs) == 0x138
    assert u.KvmSregs.gdt.offset == 0xC0 and u.KvmSregs.cr0.offset == 0xE0 and u.KvmSregs.efer.offset == 0x108
    assert ctypes.sizeof(u.KvmSegment) == 0x18
    assert ctypes.sizeof(u.KvmCpuidEntry2) == 0x28
    assert u.KvmRunHeader.exit_reason.offset == 8 and u.KvmRunHeader.mmio_phys_addr.offset == 32
    assert u.KVM_X86_QUIRK_SLOT_ZAP_ALL == 1 << 7 and u.KVM_CAP_DISABLE_QUIRKS2 == 213


@pytest.mark.parametrize("exit", ["pio", "mmio"])
def test_touch_loop_branches_land_on_instructions(exit):
    code = g.EXITS[exit]
    assert len(code) == 0x1E
    # rel8 jumps: (offset of opcode, expected target)
    for at, target in ((0x0D, 0x17), (0x15, 0x0A), (0x1C, 0x00)):
        (rel,) = struct.unpack_from("<b", code, at + 1)
        assert at + 2 + rel == target
    if exit == "mmio":
        assert code[0x17:0x1A] == bytes([0x44, 0x88, 0x09])  # mov [rcx], r9b
    else:
        assert code[0x1A:0x1C] == bytes([0xE6, g.EXIT_PORT])  # out 0x80, al
    assert g.touch_regs(0, 1, 2).rflags & 0x3000 == 0x3000  # IOPL 3: out is legal at CPL 3


@pytest.mark.parametrize("exit", ["pio", "mmio"])
def test_timed_loop_branches_and_result_offsets(exit):
    code = g.TIMED_EXITS[exit]
    assert len(code) == 0x62
    for at, target in ((0x25, 0x5B), (0x59, 0x22), (0x60, 0x00)):
        (rel,) = struct.unpack_from("<b", code, at + 1)
        assert at + 2 + rel == target
    assert code[0x27:0x2C] == bytes([0x0F, 0xAE, 0xE8, 0x0F, 0x31])  # lfence; rdtsc before the touch
    assert code[0x36:0x39] == bytes([0x45, 0x88, 0x0A])  # the touch: mov [r10], r9b
    assert code[0x39:0x3E] == bytes([0x0F, 0xAE, 0xE8, 0x0F, 0x31])  # lfence; rdtsc after it
    assert code[0x11] == g.RESULT_SLOTS - 1 and code[0x16] == g.RESULT_BASE // 2  # and 63; (x*8+8)*2
    assert code[0x4C:0x51] == bytes([0x47, 0x89, 0x4C, 0x22, g.PASS_OFFSET])  # mov [r10+r12+4], r9d
    assert code[0x5B:0x60] == g.EXITS[exit][0x17:0x1C]  # the untimed loop's exit
    assert g.touch_regs(0, 1, 2, stride=8192).r11 == 8192  # the timed loop's stride register
    assert g.result_offset(1) == 32 and g.result_offset(64) == 16 and g.result_offset(63) + 16 <= 4096


def test_kvm_get_tsc_khz_number():
    assert u.KVM_GET_TSC_KHZ == 0xAEA3  # _IO(KVMIO, 0xa3), include/uapi/linux/kvm.h


def test_page_tables_identity_map_4k():
    pt = g.PageTables(base=0x1000, leaf_size=g.PAGE_4K, accessed=True)
    pt.map(1 << 30, 8 << 20)
    pt.map(0xC000_0000, 4096)
    assert pt.cr3 == 0x1000
    for va in (1 << 30, (1 << 30) + 12345, (1 << 30) + (8 << 20) - 1, 0xC000_0ABC):
        assert pt.translate(va) == va
    assert pt.translate((1 << 30) + (8 << 20)) is None
    assert pt.translate(0x2000) is None
    # one PML4 + one PDPT + two PDs + 4 PTs for 8 MiB + 1 PT for the exit page
    assert len(pt.pages) == 1 + 1 + 2 + 4 + 1
    (pml4e,) = struct.unpack_from("<Q", pt.pages[0], 0)
    assert pml4e & (g.PTE_P | g.PTE_RW | g.PTE_US | g.PTE_A) == g.PTE_P | g.PTE_RW | g.PTE_US | g.PTE_A


def test_page_tables_2m_and_accessed_bits():
    pt = g.PageTables(base=0x1000, leaf_size=g.PAGE_2M, accessed=False)
    pt.map(1 << 30, 4 << 20)
    assert pt.translate((1 << 30) + (3 << 20) + 5) == (1 << 30) + (3 << 20) + 5
    assert len(pt.pages) == 3  # PML4, PDPT, PD
    (pde,) = struct.unpack_from("<Q", pt.pages[2], 0)
    assert pde & g.PTE_PS and pde & g.PTE_US and not pde & (g.PTE_A | g.PTE_D)
    img = pt.image()
    assert len(img) == 3 * 4096


def test_user_mode_sregs():
    s = u.KvmSregs()
    g.set_user_mode(s, 0x1000)
    assert s.cs.selector == 0x33 and s.cs.dpl == 3 and s.cs.l == 1
    assert s.ss.selector == 0x2B and s.ss.dpl == 3
    assert s.efer & (u.EFER_LME | u.EFER_LMA) == u.EFER_LME | u.EFER_LMA
    assert s.cr0 & u.X86_CR0_PG and s.cr4 & u.X86_CR4_PAE and not s.cr4 & u.X86_CR4_PCIDE
    assert s.cr3 == 0x1000


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_layouts_are_consistent(name):
    for policy in ("fast", "targeted"):
        sc = named(name).with_policy(policy)
        lay = layout(sc)
        spans = sorted((s.gpa, s.gpa + s.size) for s in lay.slots)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "slots overlap"
        def in_slot(gpa: int) -> bool:
            return any(lo <= gpa < hi for lo, hi in spans)
        assert not in_slot(lay.exit_gpa)
        target = lay.slot(lay.target_slot)
        assert not any(lo < lay.move_gpa + target.size and lay.move_gpa < hi for lo, hi in spans)
        touched = sum(size for _, size in lay.regions)
        assert touched == sum(s.size for s in lay.slots if s.touched)
        assert len(lay.regions) == sc.vcpus
        assert target.touched == (sc.position == "inside")
        for base, size in lay.regions:
            assert all(in_slot(a) for a in (base, base + size - 1))


def test_scenario_validation_messages():
    with pytest.raises(DesimInputError, match="ram_mib"):
        KvmScenario(ram_mib=3)
    with pytest.raises(DesimInputError, match="target"):
        KvmScenario(extra_slots=2, target=2)
    with pytest.raises(DesimInputError, match="hole"):
        KvmScenario(op="move", position="inside")
    with pytest.raises(DesimInputError, match="policy"):
        KvmScenario(policy="lazy")
    with pytest.raises(DesimInputError, match="unknown kvm scenario"):
        named("nope")
    with pytest.raises(DesimInputError, match="unknown field"):
        KvmScenario.from_dict({"ram": 1})
    assert KvmScenario.from_dict(named("tiny").to_dict()) == named("tiny")
