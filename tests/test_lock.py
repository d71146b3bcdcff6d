"""mmu_lock semantics: reader sharing, writer exclusion, writer-blocks-new-readers, FIFO, needbreak."""
from __future__ import annotations

import simpy

from desim.lock import READ, WRITE, MmuLock


def _holder(env, lock, log, name, mode, at, hold):
    yield env.timeout(at)
    yield from lock.take(mode, name, name)
    log.append((env.now, name, "in"))
    yield env.timeout(hold)
    log.append((env.now, name, "out"))
    lock.release(name)


def _run(kind, specs):
    env = simpy.Environment()
    lock = MmuLock(env, kind=kind)
    log = []
    for name, mode, at, hold in specs:
        env.process(_holder(env, lock, log, name, mode, at, hold))
    env.run()
    return log, lock


def _enter(log, name):
    return next(t for t, n, e in log if n == name and e == "in")


def test_readers_share_the_lock():
    log, _ = _run("rwlock", [("r1", READ, 0, 10), ("r2", READ, 1, 10), ("r3", READ, 2, 10)])
    assert [_enter(log, n) for n in ("r1", "r2", "r3")] == [0, 1, 2]


def test_free_lock_costs_no_event():
    env = simpy.Environment()
    lock = MmuLock(env)
    assert lock.acquire(READ, "fault", "a") is None
    assert lock.acquire(READ, "fault", "b") is None
    assert lock.acquire(WRITE, "zap", "w") is not None  # readers hold it


def test_writer_excludes_readers_and_writers():
    log, _ = _run("rwlock", [("w", WRITE, 0, 10), ("r", READ, 1, 5), ("w2", WRITE, 2, 5)])
    assert _enter(log, "r") == 10
    assert _enter(log, "w2") == 15


def test_waiting_writer_blocks_new_readers():
    # r1 holds for read; w queues at 1; r2 arriving at 2 must wait behind w (qrwlock _QW_WAITING)
    log, _ = _run("rwlock", [("r1", READ, 0, 10), ("w", WRITE, 1, 5), ("r2", READ, 2, 1)])
    assert _enter(log, "w") == 10
    assert _enter(log, "r2") == 15


def test_fifo_order_and_consecutive_readers_admitted_together():
    log, _ = _run("rwlock", [("w0", WRITE, 0, 10), ("r1", READ, 1, 5), ("r2", READ, 2, 5),
                             ("w3", WRITE, 3, 5), ("r4", READ, 4, 5)])
    assert _enter(log, "r1") == _enter(log, "r2") == 10
    assert _enter(log, "w3") == 15
    assert _enter(log, "r4") == 20


def test_spinlock_is_exclusive_even_for_read():
    log, _ = _run("spinlock", [("a", READ, 0, 10), ("b", READ, 1, 10), ("c", READ, 2, 10)])
    assert [_enter(log, n) for n in ("a", "b", "c")] == [0, 10, 20]


def test_needbreak_needs_preemption_and_waiters():
    env = simpy.Environment()
    for preemption, expect in ((True, True), (False, False)):
        lock = MmuLock(env, kind="rwlock", preemption=preemption)
        assert lock.acquire(WRITE, "zap", "w") is None
        assert not lock.needbreak()
        assert lock.acquire(READ, "fault", "r") is not None
        assert lock.needbreak() is expect


def test_handoff_cost_delays_the_next_holder():
    env = simpy.Environment()
    lock = MmuLock(env, kind="spinlock", handoff_ns=3)
    log = []
    env.process(_holder(env, lock, log, "a", WRITE, 0, 10))
    env.process(_holder(env, lock, log, "b", WRITE, 1, 10))
    env.run()
    assert _enter(log, "b") == 13


def test_role_statistics():
    log, lock = _run("rwlock", [("w", WRITE, 0, 10), ("r", READ, 4, 5)])
    s = lock.summary()["roles"]
    assert s["w"]["hold_ns"] == 10 and s["w"]["wait_ns"] == 0
    assert s["r"]["wait_ns"] == 6 and s["r"]["hold_ns"] == 5 and s["r"]["contended"] == 1


def test_release_after_hands_over_to_a_waiting_writer_at_the_release_time():
    env = simpy.Environment()
    lock = MmuLock(env, kind="spinlock")
    log = []

    def holder():
        assert lock.acquire(WRITE, "fault", "a") is None
        yield env.timeout(1)
        lock.release_after("a", 9)          # a holds until t = 10

    def waiter(name, at):
        yield env.timeout(at)
        yield from lock.take(WRITE, "fault", name)
        log.append((env.now, name))
        yield env.timeout(5)
        lock.release(name)

    env.process(holder())
    env.process(waiter("b", 0.5))
    env.process(waiter("c", 2))          # arrives after the hand-over was decided: must queue behind b
    env.run()
    assert log == [(10, "b"), (15, "c")]
    s = lock.summary()
    assert s["roles"]["fault"]["hold_ns"] == 10 + 5 + 5
    assert s["roles"]["fault"]["wait_ns"] == (10 - 0.5) + (15 - 2)
    # Little's law stays exact with the early hand-over
    assert (s["mean_holders"] + s["mean_waiters"]) * env.now == 20 + 9.5 + 13


def test_deferred_release_is_applied_on_time_for_a_later_waiter():
    """release_after with nobody waiting schedules nothing; a writer arriving before the release
    time still gets the lock exactly then, and the statistics are those of an eager release."""
    env = simpy.Environment()
    lock = MmuLock(env, kind="rwlock")
    log = []

    def reader(name, hold):
        assert lock.acquire(READ, "fault", name) is None
        lock.release_after(name, hold)
        yield env.timeout(0)

    def writer():
        yield env.timeout(2)
        yield from lock.take(WRITE, "zap", "w")
        log.append(env.now)
        yield env.timeout(1)
        lock.release("w")

    env.process(reader("r1", 5))
    env.process(reader("r2", 8))          # the writer must wait for the later of the two
    env.process(writer())
    env.run()
    assert log == [8]
    s = lock.summary()
    assert s["roles"]["fault"]["hold_ns"] == 5 + 8
    assert s["roles"]["zap"]["wait_ns"] == 6
    assert (s["mean_holders"] + s["mean_waiters"]) * env.now == 5 + 8 + 6 + 1
