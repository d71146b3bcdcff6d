"""Cohort runs: several vCPUs' guest runs and faults taken in one loop, in SimPy's event order (fast engine).

A fault run (:mod:`desim.faultrun`) advances one vCPU while its next step is due
before anything else; among many busy vCPUs that is almost never the case, and
every guest run and every fault wait goes through SimPy: an event, the
``Environment.step`` round trip and a resumption of the vCPU's generator. A
lock storm (every fault takes ``mmu_lock`` exclusively: the legacy MMU, shadow
paging, every kernel before 5.12) and many TDP vCPUs faulting at once are made
of nothing else.

:meth:`Cohort.run` processes the head of the event queue itself for as long as
it is a step of a vCPU in one of the three states of the fault cycle:

* the end of a guest run that ends in a fault on a valid memslot
  (:meth:`~desim.vcpu.Vcpu._run_end`: the accounting, ``kvm_faultin_pfn`` and
  the acquisition of ``mmu_lock``), after which the vCPU may wait;
* the end of a host allocation's wait (:mod:`desim.hostmm`), then ``mmu_lock``;
* the hand-over of ``mmu_lock`` to a waiting vCPU (the fault under the lock:
  :meth:`~desim.vcpu.Vcpu._fault_locked`);

and after each the vCPU's next guest run (:meth:`~desim.vcpu.Vcpu._begin_run`),
plus the lock's own timers (:meth:`desim.lock.MmuLock._timer_cb`). Every other
event (the VMM, a kick, a request, an SRCU sync, a memslot update, a progress
checkpoint, a vCPU halting or starting a new chunk) ends the loop where it is
due: the vCPUs are handed back to their processes in the state they are in,
each waiting on the event it waits on, and the process goes on from there
(:meth:`~desim.vcpu.Vcpu._handed_back`).

Why it is exact: the loop takes the events in SimPy's own queue, in its own
order (time, priority, id), and schedules the events it creates in that queue
with SimPy's own ids, in the order the per-event path would create them; it
processes only the head of the queue, as :meth:`simpy.Environment.step` would,
and runs the same model code for each step (:mod:`desim.vcpu`,
:mod:`desim.lock`, :mod:`desim.hostmm`, :mod:`desim.mmu`). What it leaves out is
the generator resumption and the loop of :meth:`desim.vcpu.Vcpu.run` around the
steps, which the steps taken here do not need (nothing is pending: no request,
no obsolete root, no SRCU writer waiting for the vCPU, the chunk not at its end;
each checked before the step is taken). ``tests/test_engines_differential.py``
compares both engines bit for bit on lock storms, read-locked TDP faults of many
vCPUs, ties at equal times and runs split by memslot updates, kicks and
checkpoints.
"""
from __future__ import annotations

from heapq import heappop, heappush
from typing import TYPE_CHECKING

from simpy.events import NORMAL, Event

from .lock import MmuLock

if TYPE_CHECKING:  # pragma: no cover
    from .vcpu import Vcpu
    from .vm import Vm

_BACKOFF_MAX = 64  # loop tops to skip after attempts that took (almost) nothing
_LOCK_CALLBACKS = (MmuLock._timer_cb, MmuLock._release_cb)


class Cohort:
    """The fast engine's loop over the steps of many vCPUs (see the module docstring)."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.env = vm.env
        self.backoff = 0  # loop tops to leave to the per-event path before trying again
        self._misses = 0
        self._procs: dict | None = None  # id of a process -> its vCPU
        self.steps = 0  # vCPU steps taken here (for benchmarks and tests)
        self.runs = 0  # loops that took at least one step

    def _missed(self) -> None:
        self._misses = min(2 * self._misses + 1, _BACKOFF_MAX)
        self.backoff = self._misses

    @staticmethod
    def _state(x: "Vcpu", ev: Event) -> tuple | None:
        """The state of a vCPU whose process waits on ``ev``: ``(kind, t0, ctx)`` with kind ``run`` (the
        guest run in ``_run`` ends), ``host`` (a host allocation's wait since ``t0``) or ``lock``
        (``mmu_lock`` waited for since ``t0``); None where the process waits on anything else."""
        if x._wait is not ev or x.proc._target is not ev:
            return None
        if x._handback is not None:
            return x._handback
        wc = x._wait_ctx
        if wc is None:
            return ("run", None, None)
        t0, ctx = wc
        return ("host" if ctx[0] == "host" else "lock", t0, ctx)

    def run(self, x0: "Vcpu") -> Event | None:
        """Called by ``x0`` at the top of its loop, before it begins a guest run. None when the head of the
        queue is not a vCPU's step (``x0`` goes on by itself); else the loop has begun ``x0``'s guest run,
        taken every vCPU step at the head of the queue, and returns the event ``x0`` must wait on."""
        env = self.env
        queue = env._queue
        vm = self.vm
        if not env._last_callback or not queue:
            self._missed()
            return None
        procs = self._procs
        if procs is None:
            procs = self._procs = {id(v.proc): v for v in vm.vcpus}
        # worth it only if the next event is another vCPU's step
        head = queue[0][3]
        cbs = head.callbacks
        if not cbs or len(cbs) != 1:
            self._missed()
            return None
        x = procs.get(id(getattr(cbs[0], "__self__", None)))
        if x is None or x is x0 or self._state(x, head) is None:
            self._missed()
            return None
        mmu = vm.mmu
        lock = vm.lock
        eid = env._eid
        # x0's guest run begins now, as its own loop would begin it
        ev = Event(env)
        ev._ok, ev._value = True, None
        delay = x0._begin_run()
        heappush(queue, (env._now + delay, NORMAL, next(eid), ev))
        owned = {ev: x0}  # pending event -> the vCPU that waits on it
        state = {x0: ("run", None, None, ev)}  # vCPU -> (kind, t0, ctx, pending event)
        steps = 0
        while queue:
            t, _, _, ev = queue[0]
            x = owned.get(ev)
            if x is None:
                cbs = ev.callbacks
                if not cbs or len(cbs) != 1:
                    break
                cb = cbs[0]
                owner = getattr(cb, "__self__", None)
                if owner is lock and cb.__func__ in _LOCK_CALLBACKS:
                    heappop(queue)
                    env._now = t
                    ev.callbacks = None
                    cb(ev)
                    continue
                x = procs.get(id(owner))
                if x is None:
                    break
                st = self._state(x, ev)
                if st is None:
                    break
                kind, t0, ctx = st
                fresh = True
            else:
                kind, t0, ctx, _ = state[x]
                fresh = False
            # the step and the guest run after it must be plain: nothing pending for the vCPU
            if x.requests or x.root_tag != mmu.root_tag or x._srcu_waiters:
                break
            if kind == "run":
                r = x._run
                if not r[7] or r[8] != "fault":
                    break  # the run ends without a fault (its chunk's end), or at a CR3 / page-table write
                ss = mmu.slot_of(r[9])
                if ss is None or ss.slot.invalid:
                    break  # MMIO, or RET_PF_RETRY on an INVALID slot
            # take it, as Environment.step would: the clock, the event processed, the vCPU's code
            heappop(queue)
            env._now = t
            if fresh:
                ev.callbacks = None
                x._handback = None
            else:
                ev.callbacks = None
                del owned[ev]
            if kind == "run":
                res = x._run_end()
            else:
                x.m.stall_ns += t - t0
                x.m.time["host"] += t - t0
                if kind == "host":
                    res = x._fault_acquire(ctx[1])
                else:
                    x._fault_locked(ctx, ev._value)
                    res = None
            steps += 1
            if res is None:
                # the top of Vcpu.run's loop: nothing pending (checked above), the next guest run begins
                nev = Event(env)
                nev._ok, nev._value = True, None
                delay = x._begin_run()
                heappush(queue, (env._now + delay, NORMAL, next(eid), nev))
                owned[nev] = x
                state[x] = ("run", None, None, nev)
            else:
                nev, nctx = res
                owned[nev] = x
                state[x] = ("host" if nctx[0] == "host" else "lock", env._now, nctx, nev)
        # hand every vCPU back to its process, waiting on its pending event in the state it is in
        for x, (kind, t0, ctx, ev) in state.items():
            x._handback = (kind, t0, ctx)
            x._wait, x._wait_ctx = ev, None
            if x is not x0:
                ev.callbacks.append(x.proc._resume)
                x.proc._target = ev
        self.steps += steps
        if steps > len(state):
            self._misses = 0
            self.runs += 1
        else:
            self._missed()
        return state[x0][3]


__all__ = ["Cohort"]
