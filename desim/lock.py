"""``kvm->mmu_lock``: an exclusive spinlock or a queued rwlock, FIFO.

Think of a single-lane bridge with a queue at its entrance. With the
*spinlock* (every kernel before 5.12, and the legacy/shadow MMU's faults
since), one holder crosses at a time. With the *qrwlock* (``rwlock_t`` on x86,
``kernel/locking/qrwlock.c``), any number of readers cross together, a writer
crosses alone, and once a writer is waiting no new reader may start
(``_QW_WAITING`` makes the reader fast path fail), so a stream of TDP MMU
faults cannot starve a zap. The wait queue is FIFO (the qspinlock underneath
``qrwlock``'s ``wait_lock``); consecutive readers at its head are admitted
together.

The model differs from ``simpy.Resource`` on purpose: ``acquire`` returns
``None`` when the lock is granted at once (no event scheduled, no process
switch), and ``release`` hands the lock directly to the next waiter(s) by
succeeding their events, after ``handoff_ns`` for the cache-line transfer.

``needbreak`` models ``rwlock_needbreak`` / ``spin_needbreak``
(include/linux/spinlock.h): true only when the kernel breaks locks for waiters
(``preemption``: ``preempt_model_preemptible()`` since 6.11, ``CONFIG_PREEMPTION``
before; see :mod:`desim.sched`) and waiters are queued. Statistics of wait and hold time are kept per *role* (``fault``,
``zap``, ``teardown``, ...), as plain floats, not per-event objects.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import simpy

READ = "read"
WRITE = "write"
Mode = Literal["read", "write"]


@dataclass
class RoleStats:
    """Accumulated lock statistics of one role."""

    acquisitions: int = 0
    contended: int = 0
    wait_ns: float = 0.0
    hold_ns: float = 0.0
    max_wait_ns: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "acquisitions": self.acquisitions,
            "contended": self.contended,
            "wait_ns": self.wait_ns,
            "hold_ns": self.hold_ns,
            "max_wait_ns": self.max_wait_ns,
        }


@dataclass
class _Waiter:
    mode: str
    role: str
    since: float
    event: simpy.Event


@dataclass
class MmuLock:
    """FIFO spinlock (``kind='spinlock'``) or qrwlock (``kind='rwlock'``).

    With ``kind='spinlock'`` every acquisition is exclusive whatever mode is
    asked for, as ``spin_lock(&kvm->mmu_lock)`` was before 5.12.
    """

    env: simpy.Environment
    kind: Literal["spinlock", "rwlock"] = "rwlock"
    preemption: bool = True
    handoff_ns: float = 0.0
    readers: int = 0
    writer: bool = False
    waiters: deque = field(default_factory=deque)
    stats: dict[str, RoleStats] = field(default_factory=dict)
    # time-weighted counters for the operational laws: integral of holders and of waiters
    _last_t: float = 0.0
    _area_holders: float = 0.0
    _area_waiters: float = 0.0
    _hold_since: dict = field(default_factory=dict)
    # deferred releases (release_after with nobody waiting): a heap of (time, seq, token), applied
    # lazily by the next lock operation; a waiter that arrives meanwhile arms a timer at the first one
    _pending: list = field(default_factory=list)
    _seq: int = 0
    _timer_at: float = -1.0

    # -- bookkeeping -------------------------------------------------------
    def _role(self, role: str) -> RoleStats:
        st = self.stats.get(role)
        if st is None:
            st = self.stats[role] = RoleStats()
        return st

    def _advance(self, until: float | None = None) -> None:
        now = self.env.now if until is None else until
        dt = now - self._last_t
        if dt:
            self._area_holders += dt * (self.readers + (1 if self.writer else 0))
            self._area_waiters += dt * len(self.waiters)
            self._last_t = now

    def _drop(self, token: object, at: float) -> None:
        since, role = self._hold_since.pop(token)
        self._role(role).hold_ns += at - since
        if self.writer:
            self.writer = False
        else:
            self.readers -= 1

    def _catch_up(self) -> None:
        """Apply the deferred releases that are due, in time order (integrals stay exact)."""
        pend = self._pending
        now = self.env.now
        while pend and pend[0][0] <= now:
            t, _, token = heapq.heappop(pend)
            self._advance(t)
            self._drop(token, t)

    def _arm_timer(self) -> None:
        """A waiter is queued behind deferred releases: wake up when the first one is due."""
        t = self._pending[0][0]
        if self._timer_at >= self.env.now and self._timer_at <= t:
            return
        self._timer_at = t
        self.env.timeout(t - self.env.now).callbacks.append(self._timer_cb)

    def _timer_cb(self, _ev: simpy.Event) -> None:
        self._timer_at = -1.0
        self._catch_up()
        self._advance()
        self._wake()
        if self.waiters and self._pending:
            self._arm_timer()

    def _mode(self, mode: str) -> str:
        return WRITE if self.kind == "spinlock" else mode

    def _can_grant(self, mode: str) -> bool:
        if self.writer:
            return False
        if mode == WRITE:
            return self.readers == 0
        # qrwlock: a queued writer (or anyone queued, FIFO) blocks new readers
        return not self.waiters

    def _grant(self, mode: str, role: str, token: object, at: float | None = None) -> None:
        if mode == WRITE:
            self.writer = True
        else:
            self.readers += 1
        self._hold_since[token] = (self.env.now if at is None else at, role)
        self._role(role).acquisitions += 1

    def _admit(self, w: _Waiter, at: float) -> None:
        """Grant the lock to waiter ``w`` from time ``at`` (now or a scheduled hand-over)."""
        wait = at - w.since
        st = self._role(w.role)
        st.wait_ns += wait
        if wait > st.max_wait_ns:
            st.max_wait_ns = wait
        self._grant(w.mode, w.role, w.event.token, at)

    # -- API ---------------------------------------------------------------
    def acquire(self, mode: Mode, role: str, token: object) -> simpy.Event | None:
        """Take the lock for ``token`` (the holder's identity).

        Returns ``None`` if granted now; otherwise an event that succeeds when
        the lock has been handed over (the caller yields on it). The event's
        value is the hand-off cost (ns) the new holder must add to its hold.
        """
        mode = self._mode(mode)
        if self._pending:
            self._catch_up()
        self._advance()
        if self._can_grant(mode) and not self.waiters:
            self._grant(mode, role, token)
            return None
        ev = self.env.event()
        self.waiters.append(_Waiter(mode, role, self.env.now, ev))
        ev.token = token  # type: ignore[attr-defined]
        self._role(role).contended += 1
        if self._pending:
            self._arm_timer()
        return ev

    def take(self, mode: Mode, role: str, token: object):
        """Generator form of :meth:`acquire` for rare paths: wait, then pay the hand-off."""
        ev = self.acquire(mode, role, token)
        if ev is not None:
            handoff = yield ev
            if handoff:
                yield self.env.timeout(handoff)

    def release(self, token: object) -> None:
        """Release ``token``'s hold and hand the lock to the next waiter(s)."""
        if self._pending:
            self._catch_up()
        self._advance()
        self._drop(token, self.env.now)
        self._wake()

    def release_after(self, token: object, delay: float) -> None:
        """Release ``token``'s hold ``delay`` ns from now (a callback, no process switch).

        Nobody waiting: the release is deferred (no event at all) and applied by the next
        lock operation. When the release frees the lock and a *writer* heads the queue, the
        hand-over is decided now and the writer's event is scheduled for the release time:
        nobody can overtake an exclusive holder, so this is the same schedule with one event
        fewer. Otherwise a timed release.
        """
        if self._pending:
            self._catch_up()
        if not self.waiters:
            self._seq += 1
            heapq.heappush(self._pending, (self.env.now + delay, self._seq, token))
            return
        if self.waiters[0].mode == WRITE and (self.writer or self.readers == 1):
            self._advance()
            self._drop(token, self.env.now + delay)
            w = self.waiters.popleft()
            # the integrals see the writer as holding from now and the queue one shorter: the
            # same number of holders (the old one still holds until the release), one waiter less
            self._area_waiters += delay
            self._admit(w, self.env.now + delay)
            ev = w.event
            ev._ok = True
            ev._value = self.handoff_ns
            self.env.schedule(ev, delay=delay)
            return
        ev = self.env.timeout(delay, token)
        ev.callbacks.append(self._release_cb)

    def _release_cb(self, ev: simpy.Event) -> None:
        self.release(ev.value)

    def _wake(self) -> None:
        now = self.env.now
        while self.waiters:
            w = self.waiters[0]
            if w.mode == WRITE:
                if self.writer or self.readers:
                    return
            elif self.writer:
                return
            self.waiters.popleft()
            self._admit(w, now)
            # the hold starts at the hand-over; the event's value is the cache-line hand-off cost,
            # which the new holder pays inside its hold (no extra event)
            w.event.succeed(self.handoff_ns)
            if w.mode == WRITE:
                return

    def needbreak(self) -> bool:
        """``rwlock_needbreak``: contended, and the kernel breaks locks for waiters (``preemption``)."""
        return self.preemption and bool(self.waiters)

    @property
    def held(self) -> bool:
        self._catch_up()
        return self.writer or self.readers > 0

    def summary(self) -> dict[str, object]:
        """Per-role statistics and the time-averaged numbers of holders and waiters."""
        self._catch_up()
        self._advance()
        t = self.env.now or 1.0
        return {
            "roles": {r: s.to_dict() for r, s in sorted(self.stats.items())},
            "mean_holders": self._area_holders / t,
            "mean_waiters": self._area_waiters / t,
        }
