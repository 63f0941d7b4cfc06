"""Step-by-step replays, through the interleaving model, of the faults of issue 18
that its random search reaches too rarely at CI's example count.

Each is a fixed sequence of the model's own steps (tests/faults/test_state_machine.py)
with every invariant checked after each step; each failed on the main of the
issue for the fault named, and passes once it is fixed.
"""

from __future__ import annotations

import pytest

from tests.faults.test_state_machine import PoolMachine, _First, replay

FIRST = _First()


def hold(machine: PoolMachine, n: int) -> None:
    """``n`` connections opened, each by a client that goes on holding it."""
    for _ in range(n):
        machine.acquire()
        machine.release_every_parked_op()


def open_idle(machine: PoolMachine, check: object, n: int) -> None:
    """``n`` connections opened (each while the others are held), then all released."""
    hold(machine, n)
    for _ in range(n):
        machine.release(FIRST, False)  # type: ignore[arg-type]
    assert len(machine.ledger.idle) == n, machine.db.stats()


def parked(machine: PoolMachine, kind: str) -> list[object]:
    return [op for op in machine.driver.parked if op.kind == kind]


class TestResize:
    def test_a_second_resize_while_the_first_still_closes_spares_the_held_connection(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Fault 7: resize(1) twice while the first one's closes still run: the
        # second counted the connections being closed as surplus still to
        # shed, marked the held one, and closed it when it came back (size 0).
        machine, check = replay(monkeypatch)
        try:
            open_idle(machine, check, 3)
            machine.acquire()  # holds one of the three
            check()
            machine.resize(1)  # the two idle ones: their closes park
            assert len(parked(machine, "close")) == 2, machine.driver.parked
            check()
            machine.resize(1)
            check()
            machine.release(FIRST, False)  # type: ignore[arg-type]
            check()
            machine.release_every_parked_op()
            check()
            s = machine.db.stats()
            assert s.size == 1 and s.closed_by["resize"] == 2, s
        finally:
            machine.teardown()

    def test_a_regrow_cancels_the_marks_of_a_shrink(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Suspicion "resize marks survive a re-grow", settled: resize(1) marks a
        # held connection as surplus; resize(2) makes it not surplus, yet it
        # was closed when it came back (found by the model's search too).
        machine, check = replay(monkeypatch)
        try:
            hold(machine, 2)
            check()
            machine.resize(1)
            check()
            machine.resize(2)
            check()
            machine.release(FIRST, False)  # type: ignore[arg-type]
            check()
            assert machine.db.stats().closed_by["resize"] == 0, machine.db.stats()
        finally:
            machine.teardown()


class TestFifo:
    def test_a_caller_whose_checked_connection_a_drain_retires_keeps_its_place(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Fault 6: a caller checks a stale idle connection; a younger caller
        # queues; drain() retires the connection under the check, and the older
        # caller re-entered the queue at the back: the younger one was served first.
        machine, check = replay(monkeypatch)
        try:
            open_idle(machine, check, 1)
            machine.let_time_pass(0.02)  # stale: the next acquire pings it first
            machine.acquire()  # client A: its ping parks
            (ping,) = parked(machine, "ping")
            machine.drain()  # marks the connection under A's check
            check()
            machine.acquire()  # client B queues, and opens a connection (parks)
            check()
            machine.driver.finish(ping, None)  # A's check ends: drained, so retired
            machine.step()
            check()
            (connect, *_) = parked(machine, "connect")  # B's: it goes to the oldest, A
            machine.driver.finish(connect, None)
            machine.step()
            check()
        finally:
            machine.teardown()

    def test_a_caller_whose_check_fails_keeps_its_place(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Fault 6, the failed ping: the same, with the check failing.
        machine, check = replay(monkeypatch)
        try:
            open_idle(machine, check, 1)
            machine.let_time_pass(0.02)
            machine.acquire()
            (ping,) = parked(machine, "ping")
            machine.acquire()
            check()
            machine.driver.finish(ping, ConnectionResetError("the server went away"))
            machine.step()
            check()
            (connect, *_) = parked(machine, "connect")
            machine.driver.finish(connect, None)
            machine.step()
            check()
        finally:
            machine.teardown()


class TestTimeouts:
    def test_a_tiny_timeout_bounds_the_check_of_a_stale_idle_connection(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Fault 8: the check of a stale idle connection was bounded by
        # connect_timeout only, not by the caller's wait: a hanging ping kept a
        # caller with a 1 ms timeout waiting for seconds.
        machine, check = replay(monkeypatch)
        try:
            open_idle(machine, check, 1)
            machine.let_time_pass(0.02)
            machine.acquire_with_a_tiny_timeout()  # its ping parks, and hangs
            assert parked(machine, "ping"), machine.driver.parked
            machine.let_time_pass(0.002)
            check()
        finally:
            machine.teardown()


class TestDisconnect:
    def test_a_disconnect_cancelled_the_asyncio_way_in_its_grace_leaves_nothing_lent(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Fault 2: disconnect(grace=0.1) cancelled by task.cancel() while it
        # waits out its grace for a held connection: the closed pool kept that
        # connection in its lent set, still open.
        machine, check = replay(monkeypatch)
        try:
            machine.acquire()
            machine.release_every_parked_op()
            machine.disconnect(FIRST, 0.1, False)  # type: ignore[arg-type]
            machine.release_every_parked_op()  # its on_before_exit callback
            check()
            (job,) = [j for j in machine.jobs if j.name == "disconnect" and j.running]
            machine.cancel_a_task(_Pick(job), True)  # type: ignore[arg-type]
            check()
        finally:
            machine.teardown()

    def test_an_acquire_during_a_disconnect_keeps_its_timeout(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Found by the grown model once disconnect() became the pool's own task:
        # an acquire that arrives while a disconnect waits out its grace waited
        # for that disconnect with no bound, past its own tiny timeout.
        machine, check = replay(monkeypatch)
        try:
            machine.acquire()
            machine.release_every_parked_op()
            machine.disconnect(FIRST, 0.1, False)  # type: ignore[arg-type]
            machine.release_every_parked_op()
            check()
            machine.acquire_with_a_tiny_timeout()
            check()
            machine.let_time_pass(0.002)
            check()
        finally:
            machine.teardown()

    def test_overlapping_disconnects_run_on_before_exit_once(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Fault 4 (search finds it at once; replayed to pin it): a second
        # disconnect() while the first runs its callbacks ran them again.
        machine, check = replay(monkeypatch)
        try:
            machine.acquire()
            machine.release_every_parked_op()
            machine.disconnect(FIRST, 0.0, False)  # type: ignore[arg-type]
            machine.disconnect(FIRST, 0.0, False)  # type: ignore[arg-type]
            check()
            machine.release_every_parked_op()
            check()
        finally:
            machine.teardown()


class TestDrain:
    def test_a_connect_in_flight_during_drain_is_not_lent_after_it(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Fault 11 (search finds it; replayed to pin it): the connection a
        # connect in flight during drain() brought back was lent after drain()
        # returned.
        machine, check = replay(monkeypatch)
        try:
            machine.acquire()  # its connect parks
            machine.drain()  # nothing idle: returns at once
            check()
            machine.release_every_parked_op()
            check()
        finally:
            machine.teardown()


class _Pick:
    """A stand-in for Hypothesis' ``data``: draws the given value."""

    def __init__(self, value: object) -> None:
        self.value = value

    def draw(self, strategy: object) -> object:
        return self.value


class TestFoundAt1500:
    """What the model's search found at 1,500 examples (2026-12-06), replayed."""

    def test_a_failed_opening_leaves_the_held_connection_a_shrink_marked_not_surplus(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # resize(1) with one held and one opening marked the held one; the
        # opening then failed, and the held one, no longer surplus, was closed
        # when it came back (size 0 under limit 1).
        machine, check = replay(monkeypatch)
        try:
            machine.acquire()
            machine.release_every_parked_op()
            machine.acquire()  # its connect parks
            check()
            machine.resize(1)
            check()
            machine.fail_parked_op(FIRST, False)  # type: ignore[arg-type]
            check()
            machine.release(FIRST, False)  # type: ignore[arg-type]
            check()
            s = machine.db.stats()
            assert s.closed_by["resize"] == 0 and s.size >= 1, s
        finally:
            machine.teardown()

    def test_a_shrink_counts_the_openings_in_flight_as_leaving(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Two held, two more opening after a grow to 4; resize(1) marked the two
        # held ones only: size 4, two on their way out, limit 1. The openings
        # are given up first now (each closed as it arrives, if surplus still).
        machine, check = replay(monkeypatch)
        try:
            hold(machine, 2)
            machine.acquire()
            machine.acquire()
            machine.resize(4)
            check()
            assert machine.db.stats().opening == 2, machine.db.stats()
            machine.resize(1)
            check()
            machine.release_every_parked_op()
            check()
            for _ in range(2):
                machine.release(FIRST, False)  # type: ignore[arg-type]
                check()
            machine.release_every_parked_op()
            check()
            s = machine.db.stats()
            assert s.size <= 1, s
        finally:
            machine.teardown()

    def test_pool_timeout_counts_the_wait_for_a_disconnect_in_progress(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # An acquire that waited for a disconnect in progress to end, then
        # reopened the pool, started its pool_timeout again from there: it
        # waited longer than its timeout in all.
        machine, check = replay(monkeypatch)
        try:
            machine.acquire()
            machine.disconnect(FIRST, 0.1, True)  # type: ignore[arg-type]  # its connect ends
            machine.let_time_pass(6.0)  # the grace ends: disconnect() closes the held one
            machine.release(FIRST, False)  # type: ignore[arg-type]  # its close parks
            check()
            machine.acquire_with_a_tiny_timeout()  # 1 ms, waits for the disconnect
            machine.let_time_pass(0.0006)
            check()
            machine.fail_parked_op(FIRST, False)  # type: ignore[arg-type]  # the disconnect ends
            check()
            assert machine.ledger.state == "open", machine.db.stats()  # reopened: its connect parks
            machine.let_time_pass(0.0006)  # 1.2 ms since it began
            check()
        finally:
            machine.teardown()

    def test_a_regrow_after_a_drain_keeps_the_drains_marks(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # resize(1) marked a held connection, drain() marked both but kept the
        # first one's reason ("resize"), and resize(2) then undid that mark as
        # a shrink's: the connection, older than the drain, went back idle.
        machine, check = replay(monkeypatch)
        try:
            hold(machine, 2)
            machine.resize(1)
            machine.drain()
            machine.resize(2)
            check()
            for _ in range(2):
                machine.release(FIRST, False)  # type: ignore[arg-type]
                check()
            machine.release_every_parked_op()
            check()
            older = [rec.raw for rec in machine.ledger.idle if rec.raw.drains < 1]
            assert not older, f"idle after drain(), and opened before it: {older}"
        finally:
            machine.teardown()
