"""Requests and remote TLB flushes: ``kvm_make_all_cpus_request`` and ``kvm_flush_remote_tlbs``.

A request is a bit set in every vCPU's ``vcpu->requests`` that the vCPU
services in ``vcpu_enter_guest`` before it re-enters the guest. To make a vCPU
that is *in guest mode* notice it now, the sender IPIs it
(``kvm_kick_many_cpus``) and waits until every IPI was acknowledged — the ack
is the target's VM exit (the IPI handler ``ack_kick`` runs on the target's
host CPU), not the flush itself, which the target does (INVEPT) before
re-entry. vCPUs outside guest mode get no IPI: they check requests before
entering (``kvm_request_needs_ipi`` / ``kvm_vcpu_exiting_guest_mode``).
Halted vCPUs are not woken (no ``KVM_REQUEST_WAKEUP`` on these requests).

Simplification: the sender's IPIs go out back to back (``ipi_send`` each);
all targets start their exit at the time of the request.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Generator

if TYPE_CHECKING:  # pragma: no cover
    from .vm import Vm

# arch/x86/include/asm/kvm_host.h (bit numbers are irrelevant here: distinct bits)
KVM_REQ_TLB_FLUSH = 1 << 0
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = 1 << 1
REQUEST_NAMES = {KVM_REQ_TLB_FLUSH: "KVM_REQ_TLB_FLUSH",
                 KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: "KVM_REQ_MMU_FREE_OBSOLETE_ROOTS"}


def kvm_make_all_cpus_request(vm: "Vm", req: int) -> Generator:
    """Set ``req`` on every vCPU; IPI those in guest mode and wait for every ack."""
    env = vm.env
    name = REQUEST_NAMES[req]
    vm.metrics.requests[name] = vm.metrics.requests.get(name, 0) + 1
    acks = []
    targets = []
    for vcpu in vm.vcpus:
        vcpu.requests |= req
        ack = vcpu.kick()
        if ack is not None:
            acks.append(ack)
            targets.append(vcpu.index)
    if not acks:
        return
    vm.metrics.ipis_sent += len(acks)
    yield env.timeout(len(acks) * vm.P.ipi_send)
    yield env.all_of(acks)
    if vm.audit is not None:
        vm.audit.flush_completed(env.now, targets, [a.value for a in acks])


def kvm_flush_remote_tlbs(vm: "Vm") -> Generator:
    """``kvm_flush_remote_tlbs``: a ``KVM_REQ_TLB_FLUSH`` to all vCPUs, waiting for the acks."""
    vm.metrics.remote_flushes += 1
    yield from kvm_make_all_cpus_request(vm, KVM_REQ_TLB_FLUSH)
