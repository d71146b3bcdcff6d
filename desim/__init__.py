"""desim: a discrete-event simulator of multi-vCPU KVM virtual machines on x86.

It answers one question: when the VMM deletes or moves a memslot, what does it
cost the guest to zap every SPTE of the VM (fast global zap,
``kvm_mmu_zap_all_fast``) versus only the SPTEs of that memslot (targeted zap,
the seed's ``KVM_ZAP_ONLY_MEMSLOT_SPTES`` / 6.12's ``KVM_X86_QUIRK_SLOT_ZAP_ALL``
disabled)?
"""
from __future__ import annotations

__version__ = "0.1.0"
MODEL_VERSION = "1"
