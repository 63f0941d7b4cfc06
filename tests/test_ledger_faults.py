"""Issue 18: the ledger's ordering faults (6, 7, 8, 11), leases, and four suspicions.

Every scenario is ordered with the parking driver's parked calls and
``wait_all_tasks_blocked()``, never with sleeps, on asyncio and trio. After
each step the ledger's invariant holds:
``size == idle + in_use + busy + opening <= limit``.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

import pool
import pool._ledger
from tests.parkingdriver import ParkingConnection, ParkingDriver

pytestmark = pytest.mark.anyio

Db = pool.Pool[ParkingConnection]


def make(limit: int, driver: ParkingDriver | None = None, **overrides: object) -> tuple[Db, Any]:
    driver = driver or ParkingDriver()
    db: Db = pool.Pool("fake://test", driver=driver, connection_limit=limit, **overrides)
    return db, driver


def assert_invariant(db: Db, bound: int | None = None) -> None:
    """``bound``: while a shrink's surplus is still closing, the limit before it."""
    s = db.stats()
    assert s.size == s.idle + s.in_use + s.busy + s.opening <= (bound or s.limit), s


class TestFifoAcrossACheck:
    """Fault 6: a caller whose checked idle connection is retired keeps its place."""

    @pytest.mark.parametrize("how", ["drain", "ping_fails"])
    async def test_it_is_served_before_younger_waiters(self, how: str) -> None:
        # One connection, so that one handoff at a time decides the order.
        # health_check_after=0: every lending of an idle connection checks it first.
        db, driver = make(1, health_check_after=0)
        conn = await db.acquire()
        await db.release(conn)
        driver.park("ping", "connect")
        order: list[str] = []

        async def user(name: str) -> None:
            async with db.acquire():
                order.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(user, "A")
            ping = await driver.parked("ping")  # A checks the idle connection
            tg.start_soon(user, "B")  # the pool is full: B and C wait
            await wait_all_tasks_blocked()  # (trio runs new tasks in any order)
            tg.start_soon(user, "C")
            await wait_all_tasks_blocked()
            assert_invariant(db)
            if how == "drain":
                await db.drain()  # retires the connection A is checking
                ping.release()
            else:
                ping.fail(ConnectionError("the server hung up"))
            connect = await driver.parked("connect")  # its replacement opens
            await wait_all_tasks_blocked()
            assert_invariant(db)
            driver.unpark("connect")
            connect.release()
        # A arrived first: it must be served first, not requeued behind B and C
        assert order == ["A", "B", "C"]
        assert_invariant(db)
        assert driver.concurrent_use == []
        await db.disconnect()
        assert driver.unclosed() == []


class TestResizeCountsClosingConnections:
    """Fault 7: idle connections a resize is still closing count as leaving."""

    @pytest.mark.parametrize("then", ["resize_again", "release_to_a_waiter"])
    async def test_a_held_connection_survives(self, then: str) -> None:
        db, driver = make(3)
        conns = [await db.acquire() for _ in range(3)]
        held = conns[2]
        for conn in conns[:2]:
            await db.release(conn)
        driver.park("close")
        got: list[ParkingConnection] = []

        async def waiter() -> None:
            async with db.acquire() as conn:
                got.append(conn)

        async with anyio.create_task_group() as tg:
            tg.start_soon(db.resize, 1)  # closes the two idle ones gracefully
            first = await driver.parked("close")
            second = await driver.parked("close")
            assert_invariant(db, bound=3)
            if then == "resize_again":
                await db.resize(1)  # while the first resize's closes still run
            else:
                tg.start_soon(waiter)  # size 3 > limit 1: it waits
                await wait_all_tasks_blocked()
                await db.release(held)  # back while the closes still run: the waiter's now
            assert_invariant(db, bound=3)
            assert not held.closed
            driver.unpark("close")
            first.release()
            second.release()
        if then == "resize_again":
            await db.release(held)
        else:
            assert got == [held]
        s = db.stats()
        assert not held.closed, "a connection that was never surplus was closed"
        assert (s.size, s.idle, s.closed_by["resize"]) == (1, 1, 2), s
        assert s.opened == 3, "the pool closed a connection it needed, and opened another"
        assert_invariant(db)
        await db.disconnect()


class TestPoolTimeoutBoundsChecks:
    """Fault 8: pool_timeout bounds the whole acquire, checks of idle connections included."""

    async def test_a_hanging_ping_ends_at_the_deadline(self) -> None:
        # connect_timeout bounds each check on its own: far longer than pool_timeout
        db, driver = make(4, pool_timeout=0.1, connect_timeout=30, health_check_after=0)
        conns = [await db.acquire() for _ in range(4)]
        for conn in conns:
            await db.release(conn)
        driver.park("ping")  # every ping hangs
        with anyio.fail_after(3):  # main waited connect_timeout per hanging ping
            with pytest.raises(pool.PoolTimeoutError):
                async with db.acquire():
                    pass
        s = db.stats()
        # the connection it was pinging was cut short mid-ping: closed, never lent
        assert s.closed_by["check_failed"] == 1, s
        assert (s.size, s.idle, s.in_use, s.busy) == (3, 3, 0, 0), s
        assert s.timeouts == 1
        assert_invariant(db)
        driver.release_all()
        await db.disconnect()
        assert driver.unclosed() == []


class TestDrainCatchesConnectsInFlight:
    """Fault 11: a connection whose connect began before a drain is never lent after it."""

    async def test_the_connect_in_flight_is_replaced(self) -> None:
        db, driver = make(2)
        driver.park("connect")
        got: list[ParkingConnection] = []
        done = anyio.Event()

        async def user() -> None:
            async with db.acquire() as conn:
                got.append(conn)
                await done.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(user)
            old = await driver.parked("connect")
            await db.drain()  # e.g. after a credential rotation
            assert_invariant(db)
            driver.unpark("connect")
            old.release()  # the old connect arrives after drain() returned
            while not got:
                await wait_all_tasks_blocked()
            stale = driver.opened[0]
            assert got[0] is not stale, "a connection begun before drain() was lent after it"
            assert stale.closed
            s = db.stats()
            assert (s.size, s.in_use, s.closed_by["drain"]) == (1, 1, 1), s
            assert_invariant(db)
            done.set()
        await db.disconnect()
        assert driver.unclosed() == []


class TestLeases:
    """Misuse: a stale handle or a second release never frees another holder's lending."""

    @pytest.mark.parametrize("with_error", [False, True])
    async def test_a_stale_handle_is_refused(self, with_error: bool) -> None:
        db, _driver = make(1)
        handle = db.acquire()
        conn = await handle.__aenter__()
        await handle.__aexit__(None, None, None)
        other = await db.acquire()  # the same connection, lent again
        assert other is conn
        exc = ValueError("boom") if with_error else None
        with pytest.raises(pool.PoolError, match="stale"):
            await handle.__aexit__(type(exc) if exc else None, exc, None)
        s = db.stats()
        assert (s.in_use, s.idle) == (1, 0), "the stale handle freed someone else's lending"
        await db.release(other)
        assert_invariant(db)
        await db.disconnect()

    async def test_a_second_release_by_the_previous_holder_is_refused(self) -> None:
        db, _driver = make(1)
        conn = await db.acquire()
        await db.release(conn)
        taken, done = anyio.Event(), anyio.Event()

        async def other_task() -> None:
            async with db.acquire() as mine:
                assert mine is conn
                taken.set()
                await done.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
            await taken.wait()
            with pytest.raises(pool.PoolError, match="released"):
                await db.release(conn)  # the old holder, again
            assert db.stats().in_use == 1
            assert_invariant(db)
            done.set()
        assert db.stats().idle == 1
        await db.disconnect()

    async def test_a_second_release_of_a_handed_connection_is_refused(self) -> None:
        db, _driver = make(1)
        conn = await db.acquire()
        got: list[ParkingConnection] = []

        async def waiter() -> None:
            async with db.acquire() as mine:
                got.append(mine)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            await db.release(conn)  # handed to the waiter, which has not run yet
            with pytest.raises(pool.PoolError, match="released"):
                await db.release(conn)
            assert_invariant(db)
        assert got == [conn]
        s = db.stats()
        assert (s.idle, s.in_use) == (1, 0), s
        await db.disconnect()

    async def test_the_previous_holder_may_release_it_once_its_holder_ended(self) -> None:
        # the holder took it and ended without releasing it: nobody uses it, the
        # release is a clean-up, not a stale one
        db, _driver = make(1)
        conn = await db.acquire()
        got: list[ParkingConnection] = []

        async def waiter() -> None:
            got.append(await db.acquire())

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            await db.release(conn)  # handed to the waiter
        assert got == [conn]
        await db.release(conn)
        assert db.stats().idle == 1
        assert_invariant(db)
        await db.disconnect()

    async def test_another_task_may_still_release_it(self) -> None:
        db, _driver = make(1)
        box: list[ParkingConnection] = []

        async def acquirer() -> None:
            box.append(await db.acquire())

        async with anyio.create_task_group() as tg:
            tg.start_soon(acquirer)
        await db.release(box[0])  # a legitimate hand-over of the release
        assert db.stats().idle == 1
        await db.disconnect()


class TestSuspicions:
    async def test_a_refused_connect_retires_busy_connections_too(self) -> None:
        """6a, real: a rollback in flight when a connect is refused put its connection back."""
        db, driver = make(2)
        conn = await db.acquire()
        conn.in_tx = True  # its release rolls back first (busy meanwhile)
        driver.park("rollback", "connect")

        async def newcomer() -> None:
            with pytest.raises(pool.ConnectError):
                async with db.acquire():
                    pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(db.release, conn)
            rollback = await driver.parked("rollback")
            tg.start_soon(newcomer)
            connect = await driver.parked("connect")
            connect.fail(ConnectionRefusedError(111, "Connection refused"))
            await wait_all_tasks_blocked()
            assert_invariant(db)
            rollback.release()  # the rollback ends well, on a server that is gone
        s = db.stats()
        assert conn.closed, "a connection opened before the server went away was kept"
        assert (s.idle, s.size, s.closed_by["broken"]) == (0, 0, 1), s
        assert_invariant(db)
        await db.disconnect()

    async def test_an_old_holders_error_leaves_the_reopened_pool_alone(self) -> None:
        """6b, real: an orphan's disconnect error retired the reopened pool's connections."""
        db, driver = make(2, driver=FailoverAwareDriver())
        held, reopened = anyio.Event(), anyio.Event()

        async def old_holder() -> None:
            with pytest.raises(ConnectionError):
                async with db.acquire() as conn:
                    held.set()
                    await reopened.wait()
                    # disconnect() closed it: the query fails as a server-ended session would
                    await driver.fetchval(conn, "SELECT 1", ())

        async with anyio.create_task_group() as tg:
            tg.start_soon(old_holder)
            await held.wait()
            await db.disconnect()
            new = await db.acquire()  # the pool reopens, on the same host
            await db.release(new)
            reopened.set()
        s = db.stats()
        assert not new.closed, "the new pool's connection was retired for an orphan's error"
        assert (s.idle, s.closed_by["failover"]) == (1, 0), s
        assert_invariant(db)
        await db.disconnect()

    @pytest.mark.parametrize(("grow_to", "kept"), [(5, 3), (2, 2)])
    async def test_resize_marks_do_not_survive_a_regrow(self, grow_to: int, kept: int) -> None:
        """6c, real: after resize(1) then a grow, held connections still closed when returned."""
        db, _driver = make(3)
        conns = [await db.acquire() for _ in range(3)]
        await db.resize(1)  # marks two held ones
        assert_invariant(db, bound=3)
        await db.resize(grow_to)  # no longer surplus (grow_to=2: one still is)
        for conn in conns:
            await db.release(conn)
        s = db.stats()
        assert (s.idle, s.size, s.closed_by["resize"]) == (kept, kept, 3 - kept), s
        assert_invariant(db)
        await db.disconnect()

    async def test_the_fast_path_never_lends_an_idle_expired_connection(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """6d, real: fresh_until was capped by the lifetime only, not by the idle limit."""
        db, _driver = make(1, max_idle_connection_lifetime=2.0, health_check_after=60)
        conn = await db.acquire()
        await db.release(conn)
        real = time.monotonic

        class Later:
            """The ledger's clock, 5 s on: past the idle limit, within health_check_after."""

            @staticmethod
            def monotonic() -> float:
                return real() + 5.0

        monkeypatch.setattr(pool._ledger, "time", Later)
        async with db.acquire() as again:
            assert again is not conn, "an idle-expired connection was lent unchecked"
        s = db.stats()
        assert s.closed_by["idle_expiry"] == 1, s
        assert_invariant(db)
        await db.disconnect()


class FailoverAwareDriver(ParkingDriver):
    """A driver that wants the primary and says which host each connection is on."""

    wants_primary = True

    def host_of(self, conn: ParkingConnection) -> str:
        return "db:5432"

    def is_read_only_error(self, exc: BaseException) -> bool:
        return False

    def is_disconnect_error(self, exc: BaseException) -> bool:
        return isinstance(exc, ConnectionError)
