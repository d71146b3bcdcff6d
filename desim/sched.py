"""When a long ``mmu_lock`` holder yields: ``rwlock_needbreak`` and ``need_resched``.

A zap that holds ``mmu_lock`` checks, every iteration, whether it should drop
the lock and reschedule (``tdp_mmu_iter_cond_resched`` in
arch/x86/kvm/mmu/tdp_mmu.c, ``__walk_slot_rmaps`` and
``kvm_zap_obsolete_pages`` in arch/x86/kvm/mmu/mmu.c,
``__cond_resched_rwlock_write`` in kernel/sched/core.c). Two different
questions are asked:

* ``rwlock_needbreak(lock)`` / ``spin_needbreak(lock)`` (include/linux/spinlock.h,
  include/linux/sched.h before 6.10): is somebody *waiting for the lock*? Up to
  6.10 this was ``#ifdef CONFIG_PREEMPTION``, a build option that
  ``PREEMPT_DYNAMIC`` selects, so a distro kernel booted as ``none`` or
  ``voluntary`` still broke its locks for waiters. Commit c793a62823d1
  ("sched/core: Drop spinlocks on contention iff kernel is preemptible", 6.11,
  backported to 6.10.y stable) made it ``preempt_model_preemptible()``: only the
  ``full`` and ``lazy`` (6.13+) models (and RT) break a lock for a waiter.
  :func:`needbreak_on_contention` is that rule; a 6.10.y stable kernel that
  carries the backport is given as ``version = "6.11"``.
* ``need_resched()`` (``TIF_NEED_RESCHED``): does the *scheduler* want this CPU
  for another task? That is independent of the lock and of the preemption
  model, and it only happens when another runnable task shares the holder's
  CPU. The CFS/EEVDF scheduler (kernel/sched/fair.c, ``update_curr`` ->
  ``resched_curr`` from ``sched_tick``) sets it at the first scheduler tick
  (``1/HZ``) after the running task has used its slice
  (``sysctl_sched_base_slice``). With ``preempt=lazy`` the tick first sets
  ``TIF_NEED_RESCHED_LAZY``, which ``need_resched()`` does not see, and upgrades
  it to ``TIF_NEED_RESCHED`` at the next tick (``sched_tick``:
  ``if (dynamic_preempt_lazy() && tif_test_bit(TIF_NEED_RESCHED_LAZY))
  resched_curr(rq)``), so the holder runs one tick longer.

:class:`NeedResched` models the second question for the thread that holds
``mmu_lock`` (the VMM's ioctl thread). Simplifications: the competing task is
always runnable when ``kernel.competing_task`` is set and never otherwise
(no wake-up preemption, no load balancing); the holder's slice starts when it
takes the lock (or takes it back after a yield); ticks fall on multiples of
``1/HZ`` from time 0; after yielding for ``need_resched`` the holder is off the
CPU for one base slice (the competitor's turn) before it queues for the lock
again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .profile import Kernel

# c793a62823d1: needbreak follows preempt_model_preemptible() from this version on
NEEDBREAK_PREEMPTIBLE_SINCE = (6, 11)


def needbreak_on_contention(kernel: "Kernel") -> bool:
    """``rwlock_needbreak`` / ``spin_needbreak`` can be true (when the lock has waiters).

    6.11+ (c793a62823d1): ``preempt_model_preemptible()`` = ``full`` or ``lazy``.
    Before: ``CONFIG_PREEMPTION``, which ``PREEMPT_DYNAMIC`` and the static
    ``PREEMPT`` model select (kernel/Kconfig.preempt), whatever model was booted.
    """
    preemptible = kernel.preempt in ("full", "lazy")
    if kernel.version_tuple >= NEEDBREAK_PREEMPTIBLE_SINCE:
        return preemptible
    return preemptible or kernel.preempt_dynamic


@dataclass
class NeedResched:
    """``need_resched()`` as seen by a thread that runs from ``since`` on (see the module docstring)."""

    competing_task: bool
    tick_ns: float
    slice_ns: float
    lazy: bool

    @classmethod
    def from_kernel(cls, kernel: "Kernel") -> "NeedResched":
        return cls(kernel.competing_task, 1e9 / kernel.hz, kernel.sched_base_slice_ns, kernel.preempt == "lazy")

    def at(self, since: float) -> float:
        """Time at which ``TIF_NEED_RESCHED`` gets set for a thread on the CPU since ``since``."""
        if not self.competing_task:
            return math.inf
        # the first tick at or after the slice's end sees it exhausted
        t = math.ceil((since + self.slice_ns) / self.tick_ns) * self.tick_ns
        return t + self.tick_ns if self.lazy else t

    @property
    def off_cpu_ns(self) -> float:
        """How long a thread that yielded for ``need_resched`` waits for the CPU (the competitor's slice)."""
        return self.slice_ns
