"""Cancelled the asyncio way, the pool stays whole (issue 18, faults 2, 4 and 10).

asyncio cancels with ``task.cancel()``, ``asyncio.wait_for`` and
``asyncio.timeout``; no anyio shield stops those. Each test here cancels a
caller that way while the parking driver holds its I/O at one await, on
asyncio and on uvloop, and then checks the books (``size == idle + in_use +
busy + opening <= limit``, nothing left busy or opening) and every connection
(closed, or reusable). Where anyio cancel scopes apply, trio runs too.

Events, ``wait_all_tasks_blocked()`` and parked calls order everything; the
one tiny timeout is ``asyncio.wait_for``'s own, which cannot be moved.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import uvloop
from anyio import wait_all_tasks_blocked

import pool
from tests.parkingdriver import Op, ParkingConnection, ParkingDriver

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent

Db = pool.Pool[ParkingConnection]

ASYNCIO_LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"loop_factory": uvloop.new_event_loop}), id="uvloop"),
]
#: the three ways asyncio itself cancels
HOW = ["task.cancel", "wait_for", "asyncio.timeout"]

#: wait_for's timeout, while the call is parked for good (it cannot be moved)
WAIT_FOR = 0.1


class RecoveringDriver(ParkingDriver):
    """The parking driver with a driver-side recovery, as asyncpg's adapter has."""

    def __init__(self) -> None:
        super().__init__()
        self.recovered: list[ParkingConnection] = []

    async def recover(self, conn: ParkingConnection) -> None:
        self._check_usable(conn)
        await anyio.lowlevel.checkpoint()
        self.recovered.append(conn)


def make(driver: ParkingDriver | None = None, limit: int = 2, **overrides: Any) -> Db:
    return pool.Pool(
        "fake://native", driver=driver or RecoveringDriver(), connection_limit=limit, **overrides
    )


async def cancel_natively(
    how: str, call: Callable[[], Awaitable[object]], reached: Callable[[], Awaitable[object]]
) -> None:
    """Run ``call()`` in a task; once ``reached()`` returns, cancel it the asyncio way."""
    loop = asyncio.get_running_loop()
    if how == "task.cancel":
        task = loop.create_task(call())  # type: ignore[arg-type]
        await reached()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    elif how == "wait_for":
        task = loop.create_task(asyncio.wait_for(call(), WAIT_FOR))
        await reached()
        with pytest.raises(TimeoutError):
            await task
    else:
        timeouts: list[asyncio.Timeout] = []

        async def bounded() -> None:
            async with asyncio.timeout(None) as timeout:
                timeouts.append(timeout)
                await call()

        task = loop.create_task(bounded())
        await reached()
        timeouts[0].reschedule(loop.time())  # expire now
        with pytest.raises(TimeoutError):
            await task


def assert_books(db: Db) -> None:
    """The ledger's invariant, and nothing left half done."""
    s = db.stats()
    assert s.size == s.idle + s.in_use + s.busy + s.opening <= s.limit, s
    assert (s.busy, s.opening, s.in_use) == (0, 0, 0), s


def assert_each_closed_or_reusable(db: Db, driver: ParkingDriver) -> None:
    idle = {id(rec.raw) for rec in db._ledger.idle}
    for conn in driver.opened:
        if conn.closed:
            assert id(conn) not in idle, conn
        else:
            assert id(conn) in idle, f"{conn!r} is open, and neither idle nor held"
            assert not conn.in_tx, f"{conn!r} went back idle in a transaction"
    assert driver.concurrent_use == []
    assert driver.closed_twice() == []


async def settle(driver: ParkingDriver) -> None:
    """Let every parked call go, and the pool's own work (the upkeep's) end."""
    driver.release_all()
    await wait_all_tasks_blocked()
    driver.release_all()
    await wait_all_tasks_blocked()


# ------------------------------------------------------------------ each await of the clean-up


class Point:
    """One await of the clean-up: how to get a caller parked there."""

    def __init__(
        self,
        op: Op,
        call: Callable[[Db], Awaitable[object]],
        *,
        setup: Callable[[Db], Awaitable[object]] | None = None,
        overrides: dict[str, Any] | None = None,
        reused: bool = False,
        disconnects: bool = False,
    ) -> None:
        self.op = op
        self.call = call
        self.setup = setup
        self.overrides = overrides or {}
        #: finished by the upkeep, the connection is reused (not reconnected)
        self.reused = reused
        #: the cancelled call is a disconnect: it must still end, every connection closed
        self.disconnects = disconnects


async def _one_idle(db: Db) -> None:
    await db.fetchval("SELECT 1")


async def _two_idle(db: Db) -> None:
    async with db.acquire(), db.acquire():
        pass


async def _left_in_transaction(db: Db) -> None:
    async with db.acquire() as conn:
        conn.in_tx = True  # what a holder's own BEGIN leaves


async def _commit(db: Db) -> None:
    async with db.transaction():
        pass


async def _failing_transaction(db: Db) -> None:
    with pytest.raises(KeyError):
        async with db.transaction():
            raise KeyError("the body failed: the release rolls back")


async def _release_while_disconnecting(db: Db) -> None:
    conn = await db.acquire()
    closing = asyncio.get_running_loop().create_task(db.disconnect(grace=30))
    while db._ledger.drained is None:  # until it waits out its grace
        await asyncio.sleep(0)
    try:
        await db.release(conn)  # disconnecting: closed gracefully here
    finally:
        await closing


async def _before_exit_callback(db: Db) -> None:
    await db.disconnect()


def _reset_hook(driver: ParkingDriver) -> Callable[[ParkingConnection], Awaitable[None]]:
    return driver.reset


POINTS = {
    "release-rollback": Point("rollback", _left_in_transaction, reused=True),
    "release-reset-hook": Point("reset", _one_idle, reused=True),
    "transaction-begin": Point("begin", _commit, reused=True),
    "transaction-commit": Point("commit", _commit, reused=True),
    "transaction-rollback": Point("rollback", _failing_transaction, reused=True),
    "query-helper": Point("fetchval", _one_idle, reused=True),
    "check-ping": Point(
        "ping", _one_idle, setup=_one_idle, overrides={"health_check_after": 0}, reused=True
    ),
    "open-connect": Point("connect", _one_idle),
    "release-close-while-disconnecting": Point(
        "close", _release_while_disconnecting, setup=_one_idle
    ),
    "resize-close": Point("close", lambda db: db.resize(1), setup=_two_idle),
    "drain-close": Point("close", lambda db: db.drain(), setup=_two_idle),
    "disconnect-close": Point(
        "close", lambda db: db.disconnect(grace=5), setup=_one_idle, disconnects=True
    ),
}


@pytest.mark.parametrize("anyio_backend", ASYNCIO_LOOPS)
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("point", list(POINTS))
async def test_cancelled_at_each_await_of_the_clean_up(point: str, how: str) -> None:
    spec = POINTS[point]
    driver = RecoveringDriver()
    hooks: dict[str, Any] = {"reset": _reset_hook(driver)} if spec.op == "reset" else {}
    db = make(driver, **hooks, **spec.overrides)
    if spec.setup is not None:
        await spec.setup(db)
    driver.park(spec.op)

    async def reached() -> None:
        await driver.parked(spec.op)
        driver.unpark(spec.op)  # what the upkeep does next goes straight through

    await cancel_natively(how, lambda: spec.call(db), reached)
    await settle(driver)
    if spec.disconnects:
        await db.disconnect()  # waits for the one the cancelled caller began
        assert db.stats().size == 0
        assert driver.unclosed() == [], "the disconnect stopped half way"
        return
    assert_books(db)
    assert_each_closed_or_reusable(db, driver)
    if spec.reused:
        # the clean-up was finished (by the upkeep): not one connection lost
        assert driver.closed() == [], [c.closed_by for c in driver.opened]
        assert len(driver.opened) == 1
    # the pool still serves, and closes everything it opened
    assert await db.fetchval("SELECT 1") in {conn.id for conn in driver.opened}
    assert_books(db)
    await db.disconnect()
    assert driver.unclosed() == []


# ------------------------------------------------------------------ fault 2: disconnect


@pytest.mark.parametrize("anyio_backend", ASYNCIO_LOOPS)
@pytest.mark.parametrize("how", HOW)
class TestDisconnectIsOwnedByThePool:
    async def test_a_held_connection_is_not_left_lent_in_a_closed_pool(self, how: str) -> None:
        driver = ParkingDriver()
        db = make(driver, limit=1)
        held = await db.acquire()
        draining = anyio.Event()

        async def reached() -> None:
            while db._ledger.drained is None:  # the disconnect waits out its grace
                await wait_all_tasks_blocked()
            draining.set()

        await cancel_natively(how, lambda: db.disconnect(grace=5), reached)
        # The caller stopped waiting; the disconnect did not stop: the next use waits for it.
        user = asyncio.get_running_loop().create_task(db.fetchval("SELECT 1"))
        await wait_all_tasks_blocked()
        assert not user.done()
        await db.release(held)  # the holder comes back within the grace: closed
        assert held.closed_by == "close"
        assert await user != held.id  # on a new connection, of the reopened pool
        other = asyncio.get_running_loop().create_task(db.fetchval("SELECT 1"))
        async with db.acquire():
            s = db.stats()
            assert (s.size, s.in_use) == (1, 1), s
        await other
        s = db.stats()
        assert s.size <= 1 and s.size == s.idle + s.in_use + s.busy + s.opening, s
        await db.disconnect()
        assert driver.unclosed() == []

    async def test_the_callbacks_run_to_the_end_and_the_pool_closes(self, how: str) -> None:
        driver = ParkingDriver()
        db = make(driver)
        await db.fetchval("SELECT 1")
        gate, entered = anyio.Event(), anyio.Event()
        ran: list[str] = []
        entries: list[str] = []

        async def slow() -> None:
            entries.append("slow")
            entered.set()
            await gate.wait()
            ran.append("slow")

        async def last() -> None:
            ran.append("last")

        db.on_before_exit(slow)
        db.on_before_exit(last)
        await cancel_natively(how, db.disconnect, entered.wait)
        gate.set()
        await db.disconnect()  # waits for the one in progress: nothing runs twice
        assert entries == ["slow"], "the cancelled caller's callback was cut off and run again"
        assert ran == ["slow", "last"]
        assert db.stats().size == 0
        assert driver.unclosed() == []


# ------------------------------------------------------------------ fault 4: two disconnects


@pytest.mark.parametrize("anyio_backend", [*ASYNCIO_LOOPS, "trio"])
async def test_overlapping_disconnects_run_each_callback_once() -> None:
    driver = ParkingDriver()
    db = make(driver)
    await db.fetchval("SELECT 1")
    gate = anyio.Event()
    calls: list[str] = []

    async def flush() -> None:
        calls.append("flush")
        await gate.wait()

    db.on_before_exit(flush)
    returned: list[str] = []

    async def disconnect(who: str) -> None:
        await db.disconnect()
        assert db.stats().size == 0, f"{who} returned before the pool was closed"
        returned.append(who)

    async with anyio.create_task_group() as tg:
        tg.start_soon(disconnect, "signal handler")
        await wait_all_tasks_blocked()
        tg.start_soon(disconnect, "app shutdown")
        await wait_all_tasks_blocked()
        assert returned == [], "the second call must wait for the first"
        gate.set()
    assert calls == ["flush"]
    assert sorted(returned) == ["app shutdown", "signal handler"]
    assert driver.unclosed() == []


@pytest.mark.parametrize("anyio_backend", [*ASYNCIO_LOOPS, "trio"])
async def test_a_callback_may_disconnect_the_pool_itself() -> None:
    db = make(ParkingDriver())
    await db.fetchval("SELECT 1")
    calls: list[str] = []

    async def stop() -> None:
        calls.append("stop")
        await db.disconnect()  # returns at once: the disconnect goes on after it

    db.on_before_exit(stop)
    with anyio.fail_after(5):
        await db.disconnect()
    assert calls == ["stop"]
    assert db.stats().size == 0


@pytest.mark.parametrize("anyio_backend", [*ASYNCIO_LOOPS, "trio"])
async def test_a_cancel_scope_does_not_cut_a_disconnect_short() -> None:
    driver = ParkingDriver()
    db = make(driver)
    await db.fetchval("SELECT 1")
    driver.park("close")
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(db.disconnect)
            parked = await driver.parked("close")
            scope.cancel()  # shielded: the disconnect goes on
            parked.release()
    assert db.stats().size == 0
    assert driver.unclosed() == []
    assert [c.closed_by for c in driver.opened] == ["close"]


# ------------------------------------------------------------------ fault 10: fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_child_forked_during_disconnect_starts_clean(loop: str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, os
        import uvloop
        import pool
        from tests.parkingdriver import ParkingDriver

        driver = ParkingDriver()
        db = pool.Pool("fake://fork", driver=driver, connection_limit=1)
        new_loop = uvloop.new_event_loop if {loop!r} == "uvloop" else asyncio.new_event_loop
        loop = new_loop()

        async def begin():
            held = await db.acquire()
            closing = asyncio.get_running_loop().create_task(db.disconnect(grace=30))
            while db._ledger.drained is None:   # waiting out its grace for `held`
                await asyncio.sleep(0)
            return held, closing

        held, closing = loop.run_until_complete(begin())
        child = os.fork()
        if child == 0:
            async def in_child():
                await asyncio.wait_for(db.disconnect(), 2)   # nothing of ours to wait for
                assert await db.fetchval("SELECT 1") is not None
                await asyncio.wait_for(db.disconnect(), 2)
            try:
                (uvloop.run if {loop!r} == "uvloop" else asyncio.run)(in_child())
            except BaseException as exc:
                print("child failed:", repr(exc), flush=True)
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "child failed"

        async def end():
            await db.release(held)
            await closing
        loop.run_until_complete(end())
        assert driver.unclosed() == [], driver.unclosed()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok"), done.stdout + done.stderr
