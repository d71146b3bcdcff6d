"""desim: a discrete-event simulator of multi-vCPU KVM virtual machines on x86.

It answers one question: when the VMM deletes or moves a memslot, what does it
cost the guest to zap every SPTE of the VM (fast global zap,
``kvm_mmu_zap_all_fast``) versus only the SPTEs of that memslot (targeted zap,
the seed's ``KVM_ZAP_ONLY_MEMSLOT_SPTES`` / 6.12's ``KVM_X86_QUIRK_SLOT_ZAP_ALL``
disabled)?
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__version__ = "0.1.0"
MODEL_VERSION = "1"


@functools.lru_cache(maxsize=1)
def model_fingerprint() -> str:
    """``MODEL_VERSION`` plus a hash of the package's source and data files.

    Results are labelled with it and stored results keyed by it, so any change
    to the model's code or shipped profiles invalidates them, even if nobody
    bumped ``MODEL_VERSION``.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(MODEL_VERSION.encode())
    for f in sorted(root.rglob("*")):
        if f.suffix in (".py", ".toml") and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return f"{MODEL_VERSION}-{h.hexdigest()[:16]}"
