"""Engines: how the SimPy clock is driven. ``reference`` and ``fast`` give identical results.

Both engines run the *same* model code (vCPUs, VMM, ``mmu_lock``, zap policies); the
fault path's semantics live in one place (:mod:`desim.vcpu`, :mod:`desim.lock`,
:mod:`desim.mmu`). They differ only in how the event loop gets from one event to
the next:

* ``reference`` is plain :class:`simpy.Environment`: every ``yield`` of an event
  goes through SimPy's queue and ``Process._resume``.
* ``fast`` (:class:`FastEnvironment`) notices when the event a process has just
  yielded is the event SimPy would process next anyway, and processes it at
  once, inside the same ``_resume`` call: the process keeps running without the
  round trip through ``Environment.step``. A vCPU populating its memory alone,
  a run of read-locked TDP faults while nothing else is scheduled before the
  vCPU's next step, the holder of a lock storm whose hand-over is due next, a
  zap slicing its hold while the vCPUs wait: each is advanced in one Python
  loop. The moment another process has an event due first (a writer arriving,
  a kick, a request, a memslot update, a progress checkpoint), the run is
  split there: the process waits on its event in the queue like in the
  reference engine, so another process can intervene exactly as before.

Why it is exact: SimPy processes events in the order of the key (time,
priority, id). The inlined event is the head of that queue, so the reference
engine would pop it next and call the same callback (the process's
``_resume``) with the same clock value. Inlining is only done when (a) the
event that resumed the process has no further callbacks waiting in the
current step (they would otherwise run at the wrong time), and (b) the yielded
event has no other callback registered. Both conditions are checked on every
step, so the engines agree bit for bit on every run (``tests/test_engines_differential.py``).

On top of the event loop, the fast engine takes a vCPU's faults that nothing
can interact with in one Python loop, or one vectorised step, inside the
vCPU's own process (:mod:`desim.faultrun`): the same rule (only while the
vCPU's next step is due strictly before the head of the queue) applied to
whole guest runs and faults instead of single events.

``DESIM_ENGINE`` (``fast`` or ``reference``) sets the default engine of
:func:`make_environment`, so sweeps and experiments started from the command
line run on the engine asked for; ``desim run``/``compare`` take ``--engine``.
"""
from __future__ import annotations

import os
from heapq import heappop

import simpy
from simpy.core import EmptySchedule, StopSimulation
from simpy.events import Process

ENGINES = ("fast", "reference")
DEFAULT_ENGINE = "fast"


class FastProcess(Process):
    """A :class:`simpy.Process` that processes the event it yields at once when it is next in the queue."""

    def _resume(self, event: simpy.Event) -> None:
        env: FastEnvironment = self.env  # type: ignore[assignment]
        env._active_proc = self
        gen = self._generator
        while True:
            try:
                if event._ok:
                    event = gen.send(event._value)
                else:
                    event._defused = True
                    exc = type(event._value)(*event._value.args)
                    exc.__cause__ = event._value
                    event = gen.throw(exc)
            except StopIteration as e:
                event = None  # type: ignore[assignment]
                self._ok = True
                self._value = e.args[0] if len(e.args) else None
                env.schedule(self)
                break
            except BaseException as e:
                event = None  # type: ignore[assignment]
                self._ok = False
                e.__traceback__ = e.__traceback__.tb_next  # type: ignore[union-attr]
                self._value = e
                env.schedule(self)
                break
            try:
                callbacks = event.callbacks
            except AttributeError:
                raise RuntimeError(f'Invalid yield value "{event}"') from None
            if callbacks is None:
                continue  # already processed: SimPy resumes at once too
            if not callbacks and env._last_callback and env._is_next(event):
                # the event is the head of the queue and only this process waits for it: process it
                # now, as Environment.step would do next (same clock, same callback, same order)
                env._now = heappop(env._queue)[0]
                event.callbacks = None
                env.inlined += 1
                continue
            callbacks.append(self._resume)
            break
        self._target = event
        env._active_proc = None


class FastEnvironment(simpy.Environment):
    """:class:`simpy.Environment` whose processes run on while their own event is next (see module doc)."""

    def __init__(self, initial_time: float = 0) -> None:
        super().__init__(initial_time)
        self._last_callback = True
        self.inlined = 0  # events processed inside a process's _resume (for benchmarks)

    def _is_next(self, event: simpy.Event) -> bool:
        """Is ``event`` the head of the queue, the event :meth:`step` would process next?"""
        queue = self._queue
        return bool(queue) and queue[0][3] is event

    def process(self, generator) -> Process:  # type: ignore[override]
        return FastProcess(self, generator)

    def step(self) -> None:
        """:meth:`simpy.Environment.step`, telling callbacks whether another one follows in this step."""
        try:
            self._now, _, _, event = heappop(self._queue)
        except IndexError:
            raise EmptySchedule from None
        callbacks, event.callbacks = event.callbacks, None
        if len(callbacks) == 1:  # the common case: one waiting process, nothing runs after it
            try:
                callbacks[0](event)
            except StopSimulation:
                event.callbacks = []
                self.schedule(event, simpy.core.EventPriority(-1))
                raise
        else:
            last = len(callbacks) - 1
            try:
                for i, callback in enumerate(callbacks):
                    self._last_callback = i == last
                    callback(event)
            except StopSimulation:
                event.callbacks = callbacks[callbacks.index(callback) + 1:]
                self.schedule(event, simpy.core.EventPriority(-1))
                raise
            finally:
                self._last_callback = True
        if not event._ok and not hasattr(event, "_defused"):
            exc = type(event._value)(*event._value.args)
            exc.__cause__ = event._value
            raise exc


def default_engine() -> str:
    """The engine used when none is named: ``$DESIM_ENGINE`` if set, else :data:`DEFAULT_ENGINE`."""
    from .errors import DesimInputError

    name = os.environ.get("DESIM_ENGINE", "").strip() or DEFAULT_ENGINE
    if name not in ENGINES:
        raise DesimInputError(f"DESIM_ENGINE = {name!r}: unknown engine (choose one of: {', '.join(ENGINES)})")
    return name


def make_environment(engine: str | None = None) -> simpy.Environment:
    """A SimPy environment for ``engine`` (``fast`` | ``reference``; None: :func:`default_engine`)."""
    from .errors import DesimInputError

    name = engine or default_engine()
    if name == "fast":
        return FastEnvironment()
    if name == "reference":
        return simpy.Environment()
    raise DesimInputError(f"engine {name!r}: unknown (choose one of: {', '.join(ENGINES)})")


__all__ = ["ENGINES", "DEFAULT_ENGINE", "FastEnvironment", "FastProcess", "default_engine", "make_environment"]
