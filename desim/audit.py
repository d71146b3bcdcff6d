"""Invariant checks run inside the model (``Vm(audit=True)``), for tests.

* No access through a zapped or obsolete SPTE without a fault: every access a
  vCPU executes in a guest run was mapped when the run began, and no SPTE was
  zapped while the vCPU was in that run's guest window without the vCPU being
  kicked out of it (a zap requests a flush or a root reload of every vCPU in
  guest mode in the same instant).
* A flush (``kvm_make_all_cpus_request``) returns only after every vCPU that
  was in guest mode acknowledged.
* After a DELETE returns, nothing maps the deleted slot.
* Shadow paging with guest processes (desim/guest_as.py): a vCPU enters the
  guest only on a valid root (not obsolete, not zapped, still the one in the
  hash) of the process it runs, linked where it accesses; each root's
  ``root_count`` equals the vCPUs that hold it (:meth:`Audit.check_roots`).

A violation raises :class:`InvariantViolation` at once, inside the simulation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .mmu import SlotSptes
    from .vcpu import Vcpu
    from .vm import Vm


class InvariantViolation(AssertionError):
    """The model broke one of its invariants."""


class Audit:
    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.guest_runs = 0
        self.flushes = 0
        self.deletes = 0
        self.zap_times: list[float] = []

    def guest_run_start(self, vcpu: "Vcpu", gfns: np.ndarray) -> None:
        self.guest_runs += 1
        gas = vcpu.gas
        if gas is not None and gas.guest.per_root:
            root = gas.root
            if root is None or root.invalid or gas.guest.roots.get(root.pgd) is not root:
                raise InvariantViolation(f"vCPU {vcpu.index} enters the guest on an obsolete or zapped root "
                                         f"at t={self.vm.env.now}")
            if root.pgd != gas.process:
                raise InvariantViolation(f"vCPU {vcpu.index} runs process {gas.process} on the root of "
                                         f"process {root.pgd}")
            if len(gfns) and not set(np.unique(gfns >> gas.guest.shift).tolist()) <= root.linked:
                raise InvariantViolation(f"vCPU {vcpu.index} would access through an unlinked root entry "
                                         f"at t={self.vm.env.now}")
            self.check_roots()
        if len(gfns) and not self.vm.mmu.mapped_mask(gfns).all():
            raise InvariantViolation(f"vCPU {vcpu.index} would access an unmapped gfn without a fault "
                                     f"at t={self.vm.env.now}")

    def check_roots(self) -> None:
        """Every root's ``root_count`` is the number of vCPUs holding it (current, previous, being dropped);
        the hash holds only valid roots and every invalid root still held is awaiting its last user."""
        guest = self.vm.guest
        held: dict[int, int] = {}
        roots = {}
        for v in self.vm.vcpus:
            for r in v.gas.held():
                held[id(r)] = held.get(id(r), 0) + 1
                roots[id(r)] = r
        for r in list(guest.roots.values()) + guest.zapped_in_use:
            roots.setdefault(id(r), r)
        for k, r in roots.items():
            if r.root_count != held.get(k, 0):
                raise InvariantViolation(f"root of process {r.pgd}: root_count {r.root_count} but held by "
                                         f"{held.get(k, 0)} vCPUs")
            if r.invalid and r.root_count and r not in guest.zapped_in_use:
                raise InvariantViolation(f"invalid root of process {r.pgd} held but not awaiting its last user")
        if any(r.invalid for r in guest.roots.values()):
            raise InvariantViolation("an invalid root is still in the hash")

    def sptes_zapped(self, now: float) -> None:
        self.zap_times.append(now)

    def guest_run_end(self, vcpu: "Vcpu", gfns: np.ndarray, g0: float, g1: float) -> None:
        """A guest run [g0, g1) ended normally (not kicked): no zap may fall inside it."""
        for t in reversed(self.zap_times):
            if t < g0:
                break
            if t < g1:
                raise InvariantViolation(f"vCPU {vcpu.index} kept running in the guest through a zap at t={t} "
                                         f"(guest window {g0}..{g1}) without being kicked")

    def flush_completed(self, now: float, targets: list[int], ack_times: list[float]) -> None:
        self.flushes += 1
        if any(t is None or t > now for t in ack_times):
            raise InvariantViolation(f"flush completed at {now} before every target acked: {ack_times}")

    def slot_deleted(self, ss: "SlotSptes") -> None:
        self.deletes += 1
        if self.vm.mmu.slot_has_present_sptes(ss):
            raise InvariantViolation(f"memslot {ss.slot.id} deleted but SPTEs still map it")
