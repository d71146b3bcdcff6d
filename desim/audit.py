"""Invariant checks run inside the model (``Vm(audit=True)``), for tests.

* No access through a zapped or obsolete SPTE without a fault: every access a
  vCPU executes in a guest run was mapped when the run began, and, if the
  run was not interrupted by a kick, is still mapped when it ends (a zap
  kicks every vCPU in guest mode before it completes).
* A flush (``kvm_make_all_cpus_request``) returns only after every vCPU that
  was in guest mode acknowledged.
* After a DELETE returns, nothing maps the deleted slot.

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

    def guest_run_start(self, vcpu: "Vcpu", gfns: np.ndarray) -> None:
        self.guest_runs += 1
        if len(gfns) and not self.vm.mmu.mapped_mask(gfns).all():
            raise InvariantViolation(f"vCPU {vcpu.index} would access an unmapped gfn without a fault "
                                     f"at t={self.vm.env.now}")

    def guest_run_end(self, vcpu: "Vcpu", gfns: np.ndarray) -> None:
        if len(gfns) and not self.vm.mmu.mapped_mask(gfns).all():
            raise InvariantViolation(f"vCPU {vcpu.index} finished a guest run through a zapped SPTE "
                                     f"without being kicked, t={self.vm.env.now}")

    def flush_completed(self, now: float, targets: list[int], ack_times: list[float]) -> None:
        self.flushes += 1
        if any(t is None or t > now for t in ack_times):
            raise InvariantViolation(f"flush completed at {now} before every target acked: {ack_times}")

    def slot_deleted(self, ss: "SlotSptes") -> None:
        self.deletes += 1
        if self.vm.mmu.slot_has_present_sptes(ss):
            raise InvariantViolation(f"memslot {ss.slot.id} deleted but SPTEs still map it")
