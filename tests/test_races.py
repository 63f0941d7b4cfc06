"""Regression tests for four races in the engine, on asyncio and trio.

Each scenario is ordered with events, ``wait_all_tasks_blocked()`` and the parking
driver's parked calls, never with sleeps; the only polling waits for background
maintenance, inside ``fail_after``. The SQLite crash runs in a subprocess, since
a segfault would take pytest down with it.

Only the public API is used, so the tests hold for any engine with the same
contract. (While I/O is parked, a connection may be counted as neither idle nor
in use, so no test asserts ``size == idle + in_use + opening`` then.)
"""

from __future__ import annotations

import functools
import os
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from anyio import wait_all_tasks_blocked

import pool
from tests.parkingdriver import ParkingConnection, ParkingDriver

pytestmark = pytest.mark.anyio

Db = pool.Pool[ParkingConnection]

REPO = Path(__file__).resolve().parent.parent


def make(limit: int, **overrides: object) -> tuple[Db, ParkingDriver]:
    driver = ParkingDriver()
    db: Db = pool.Pool("fake://test", driver=driver, connection_limit=limit, **overrides)
    return db, driver


def assert_sane(db: Db) -> None:
    """Counters that must hold at every moment, I/O parked or not."""
    s = db.stats()
    assert s.opening >= 0, s
    assert 0 <= s.size <= s.limit, s
    assert 0 <= s.idle <= s.size, s
    assert s.in_use <= s.limit, s
    assert s.idle + s.opening <= s.size, s


def assert_every_connection_closed_once(driver: ParkingDriver) -> None:
    assert driver.unclosed() == [], f"leaked (never closed): {driver.unclosed()}"
    assert driver.closed_twice() == [], f"closed twice: {driver.closed_twice()}"


class Holders:
    """Who holds which connection: a connection lent to two tasks at once is recorded."""

    def __init__(self) -> None:
        self._holder: dict[int, str] = {}
        self.conflicts: list[str] = []

    def take(self, conn: ParkingConnection, who: str) -> None:
        other = self._holder.get(conn.id)
        if other is not None:
            self.conflicts.append(f"{conn!r} lent to {who} while {other} still holds it")
        self._holder[conn.id] = who

    def give(self, conn: ParkingConnection, who: str) -> None:
        if self._holder.get(conn.id) == who:
            del self._holder[conn.id]


class TestOneConnectionLentToTwoTasks:
    """Failure 1: an acquire that pinged a connection kept using a stale idle set.

    The acquire pops B and pings it; meanwhile maintenance drops X (dead) and
    rebuilds the idle set; the ping fails, and the acquire takes A from the old
    set while A is still idle in the new one: the next acquire gets A as well.
    """

    async def test_failed_ping_after_maintenance_rebuilt_the_idle_set(self) -> None:
        db, driver = make(
            limit=3,
            health_check_after=0,  # every idle connection is pinged before it is lent
            leak_detection_threshold=0.2,  # maintenance ticks every 0.05 s
            pool_timeout=1,
        )
        holders = Holders()
        release_errors: list[pool.PoolError] = []
        first_holds = anyio.Event()
        first_may_go = anyio.Event()

        async def release(conn: ParkingConnection, who: str) -> None:
            holders.give(conn, who)
            try:
                await db.release(conn)
            except pool.PoolError as exc:  # "released twice?": the books were shared too
                release_errors.append(exc)

        async def first() -> None:
            conn = await db.acquire()
            holders.take(conn, "first")
            first_holds.set()
            await first_may_go.wait()
            await release(conn, "first")

        try:
            async with db, anyio.create_task_group() as tg:
                x, a, b = await db.acquire(), await db.acquire(), await db.acquire()
                for conn in (x, a, b):  # idle, most recent last: X, A, B
                    await db.release(conn)
                assert db.stats().idle == 3

                driver.park("ping")
                tg.start_soon(first)
                ping_b = await driver.parked("ping")
                assert ping_b.conn is b  # the most recent idle connection goes first

                driver.kill(x)  # maintenance drops X and rebuilds the idle set
                with anyio.move_on_after(2):
                    while not x.closed:
                        await anyio.sleep(0.01)
                assert x.closed, "precondition: maintenance never closed the dead idle X"

                driver.unpark("ping")
                ping_b.fail(ConnectionError("B is gone"))
                with anyio.fail_after(2):
                    await first_holds.wait()

                second = await db.acquire()
                holders.take(second, "second")
                await release(second, "second")
                first_may_go.set()
        finally:
            driver.release_all()
        assert holders.conflicts == [], holders.conflicts
        assert release_errors == [], release_errors
        assert driver.concurrent_use == [], driver.concurrent_use
        assert_every_connection_closed_once(driver)


class TestDisconnectDuringHealthCheck:
    """Failure 2: disconnect() while an acquire pings an idle connection wedges the pool.

    The acquire goes on after the ping into a closed pool, reserves a slot that
    nothing gives back, and the pool stays at size=1, opening=1: with
    connection_limit=1 every later acquire times out.
    """

    @pytest.mark.parametrize("ping_outcome", ["succeeds", "fails"])
    async def test_pool_is_usable_after_the_ping_ends(self, ping_outcome: str) -> None:
        db, driver = make(limit=1, health_check_after=0, pool_timeout=0.5)
        async with db.acquire():
            pass
        outcome: list[object] = []

        async def pinging_acquire() -> None:
            try:
                async with db.acquire() as conn:
                    outcome.append(("live" if driver.is_alive(conn) else "dead", conn))
            except pool.PoolError as exc:
                outcome.append(exc)

        driver.park("ping")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pinging_acquire)
                ping = await driver.parked("ping")
                tg.start_soon(db.disconnect)  # a disconnect may wait for the ping: a task
                await wait_all_tasks_blocked()
                driver.unpark("ping")
                if ping_outcome == "succeeds":
                    ping.release()
                else:
                    ping.fail(ConnectionError("gone"))
        finally:
            driver.release_all()

        # The pool is used again: it must connect, not time out.
        for _ in range(2):
            async with db.acquire(timeout=0.5) as conn:
                assert driver.is_alive(conn)
        assert_sane(db)
        assert db.stats().opening == 0
        assert db.stats().in_use == 0
        # The acquire caught in the middle got a connection or PoolClosedError.
        assert len(outcome) == 1
        assert not isinstance(outcome[0], pool.PoolTimeoutError), outcome[0]
        if isinstance(outcome[0], BaseException):
            assert isinstance(outcome[0], pool.PoolClosedError), outcome[0]
        await db.disconnect()
        assert_every_connection_closed_once(driver)


class TestConnectionsLeakAcrossDisconnect:
    """Failure 3: a connection on its way to a task or back escapes disconnect()."""

    async def test_connection_handed_to_a_waiter_that_has_not_run_yet(self) -> None:
        """(a) release(c) hands c to a queued waiter; disconnect() runs before the waiter does."""
        db, driver = make(limit=1)
        holder = await db.acquire()
        got: list[str] = []
        disconnected = False

        async def waiter() -> None:
            try:
                async with db.acquire() as conn:
                    alive = driver.is_alive(conn)
                    got.append(f"{'live' if alive else 'dead'} {conn!r}")
                    if disconnected and alive:
                        got.append("a live connection after disconnect() returned")
            except pool.PoolClosedError:
                got.append("PoolClosedError")

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            assert db.stats().waiting == 1
            # The same synchronous step: no await between the handoff and the disconnect.
            await db.release(holder)
            await db.disconnect()
            disconnected = True

        assert_every_connection_closed_once(driver)
        assert "a live connection after disconnect() returned" not in got, got
        assert_sane(db)

    @pytest.mark.parametrize("give_back", ["after_reopen", "during_reopen"])
    async def test_handed_connection_never_joins_the_reopened_pool(self, give_back: str) -> None:
        """(a) The same, with the pool connected again before the waiter lets go."""
        db, driver = make(limit=1)
        holder = await db.acquire()
        old = holder
        waiter_holds = anyio.Event()
        waiter_may_go = anyio.Event()
        waiter_done = anyio.Event()

        async def waiter() -> None:
            try:
                async with db.acquire():
                    waiter_holds.set()
                    await waiter_may_go.wait()
            except pool.PoolClosedError:
                pass
            finally:
                waiter_done.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await wait_all_tasks_blocked()
                await db.release(holder)
                await db.disconnect()
                if give_back == "after_reopen":
                    await db.connect()  # the waiter runs meanwhile, and holds on
                    await wait_all_tasks_blocked()
                    waiter_may_go.set()
                    await waiter_done.wait()
                else:
                    driver.park("connect")
                    tg.start_soon(db.connect)
                    connecting = await driver.parked("connect")
                    await wait_all_tasks_blocked()
                    waiter_may_go.set()  # gives back while the new pool is opening
                    await waiter_done.wait()
                    await wait_all_tasks_blocked()
                    driver.unpark("connect")
                    connecting.release()
        finally:
            driver.release_all()

        await wait_all_tasks_blocked()
        assert_sane(db)  # the old connection did not join the new pool's idle set
        assert old.closed, f"{old!r} of the disconnected pool is still open"
        async with db.acquire() as conn:
            assert conn is not old
        assert_sane(db)
        await db.disconnect()
        assert_every_connection_closed_once(driver)

    @pytest.mark.parametrize("grace", [0, 1])
    @pytest.mark.parametrize("rollback_outcome", ["succeeds", "fails"])
    async def test_connection_rolling_back_on_release_is_closed(
        self, rollback_outcome: str, grace: float
    ) -> None:
        """(b) A rollback on release is parked, disconnect() runs, then the rollback ends."""
        db, driver = make(limit=2)
        conn = await db.acquire()
        await driver.begin(conn)  # left in a transaction: release rolls it back
        driver.park("rollback")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(db.release, conn)
                rollback = await driver.parked("rollback")
                tg.start_soon(functools.partial(db.disconnect, grace=grace))
                await wait_all_tasks_blocked()
                driver.unpark("rollback")
                if rollback_outcome == "succeeds":
                    rollback.release()
                else:
                    rollback.fail(ConnectionError("gone"))
        finally:
            driver.release_all()
        assert conn.closed, f"{conn!r}, rolled back after disconnect(), was never closed"
        assert_every_connection_closed_once(driver)
        assert_sane(db)
        assert db.stats().idle == 0


# Run in a subprocess: it may crash the interpreter. argv: mode url backend.
SQLITE_SCRIPT = textwrap.dedent(
    """
    import random
    import sqlite3
    import sys

    import anyio

    import pool

    SLOW = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) "
        "SELECT count(*) FROM c"
    )
    QUICK = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000) "
        "SELECT count(*) FROM c"
    )
    LIMIT = 4
    violations = []


    def check(db, when):
        s = db.stats()
        if s.opening < 0 or s.size < 0 or s.size > s.limit or s.idle > s.limit:
            violations.append(f"{when}: {s}")


    async def held(url):
        # Tasks hold connections and run statements; disconnect(grace=0) closes
        # them meanwhile, from the event loop thread.
        db = pool.Pool(url, connection_limit=LIMIT, pool_timeout=5)
        outcomes = set()
        for _ in range(20):
            running = 0
            all_running = anyio.Event()

            async def holder():
                nonlocal running
                try:
                    async with db.acquire() as conn:
                        running += 1
                        if running == LIMIT:
                            all_running.set()
                        while True:
                            await conn.fetchval(SLOW)
                except (sqlite3.Error, pool.PoolError) as exc:
                    outcomes.add(type(exc).__name__)

            async with anyio.create_task_group() as tg:
                for _ in range(LIMIT):
                    tg.start_soon(holder)
                await all_running.wait()
                await anyio.sleep(0.02)  # let the statements get going: timing, not order
                await db.disconnect(grace=0)
                check(db, "after disconnect")
        print("outcomes", sorted(outcomes))


    async def storm(url):
        # Many tasks acquire and query; some are cancelled at random moments; the
        # pool is disconnected and connected again, over and over.
        db = pool.Pool(url, connection_limit=LIMIT, pool_timeout=5)
        rng = random.Random(1234)

        async def worker():
            while True:
                with anyio.move_on_after(rng.random() * 0.01):
                    try:
                        async with db.acquire() as conn:
                            check(db, "after acquire")
                            await conn.fetchval(QUICK)
                    except (sqlite3.Error, pool.PoolError):
                        pass
                check(db, "after release")
                await anyio.lowlevel.checkpoint()

        async def monitor():
            while True:
                check(db, "monitor")
                await anyio.sleep(0.001)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(monitor)
                for _ in range(24):
                    tg.start_soon(worker)
                for round_ in range(150):
                    await anyio.sleep(rng.random() * 0.01)
                    await db.disconnect(grace=rng.choice([0, 0, 0.005]))
                    check(db, "after disconnect")
                    if round_ % 3 == 0:
                        await db.connect()
                        check(db, "after connect")
                tg.cancel_scope.cancel()
        await db.disconnect()
        check(db, "at the end")


    mode, url, backend = sys.argv[1:4]
    anyio.run({"held": held, "storm": storm}[mode], url, backend=backend)
    print("violations", len(violations), violations[:3])
    print("survived")
    """
)


async def run_sqlite_script(tmp_path: Path, mode: str, url: str, backend: str) -> None:
    script = tmp_path / "sqlite_race.py"
    script.write_text(SQLITE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-X", "faulthandler", str(script), mode, url, backend],
            check=False,
            cwd=tmp_path,
            env=env,
        )
    out, err = done.stdout.decode(), done.stderr.decode()
    tail = "\n".join(err.splitlines()[-25:])
    assert done.returncode == 0, (
        f"{mode} on {backend}: exit status {done.returncode}\n{out}\nstderr:\n{tail}"
    )
    assert "survived" in out, out
    assert "violations 0 " in out, out


class TestCountersAndSQLiteCrash:
    """Failure 4: counters go negative; SQLite is closed under a running statement."""

    async def test_opener_woken_just_before_disconnect_keeps_counters_sane(self) -> None:
        """A waiter reserved to open (a dead connection freed its slot), then disconnect().

        Deterministic, on the parking driver: the waiter runs only after
        disconnect() reset the counters, and gives back a reservation that no
        longer exists: opening and size go to -1, and the limit stops holding.
        """
        db, driver = make(limit=1, pool_timeout=1)
        holder = await db.acquire()
        outcome: list[BaseException | str] = []

        async def waiter() -> None:
            try:
                async with db.acquire():
                    outcome.append("connection")
            except pool.PoolError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            driver.kill(holder)
            await db.release(holder)  # closed: its slot goes to the waiter, to open
            await db.disconnect()
        assert_sane(db)
        assert len(outcome) == 1

        # The limit still holds afterwards: two tasks, one connection at a time.
        peak = 0

        async def use() -> None:
            nonlocal peak
            async with db.acquire():
                peak = max(peak, db.stats().in_use, len(driver.opened) - len(driver.closed()))
                await wait_all_tasks_blocked()

        async with anyio.create_task_group() as tg:
            tg.start_soon(use)
            tg.start_soon(use)
        assert peak <= 1
        assert_sane(db)
        await db.disconnect()
        assert_every_connection_closed_once(driver)

    @pytest.mark.parametrize("where", ["file", "memory"])
    async def test_disconnect_while_statements_run_does_not_crash(
        self, tmp_path: Path, anyio_backend: str, where: str
    ) -> None:
        url = "sqlite:///:memory:" if where == "memory" else f"sqlite:///{tmp_path / 'db.sqlite'}"
        await run_sqlite_script(tmp_path, "held", url, anyio_backend)

    async def test_cancel_and_disconnect_storm(self, tmp_path: Path, anyio_backend: str) -> None:
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
        await run_sqlite_script(tmp_path, "storm", url, anyio_backend)


class Line:
    """Tasks that queue for a connection by name, and hold it until ``done`` is set."""

    def __init__(self, db: Db) -> None:
        self.db = db
        self.granted: list[str] = []
        self.done = anyio.Event()

    async def wait(self, name: str) -> None:
        async with self.db.acquire():
            self.granted.append(name)
            await self.done.wait()


async def test_waiters_handed_connections_that_a_drain_retires_keep_their_order() -> None:
    """Two waiters are handed connections; a drain retires both before either runs.

    Each goes back to the head of the queue, ahead of everyone still waiting,
    and the older of the two stays ahead of the younger: the new connections
    go to them in the order they first queued (they used to be requeued in
    reverse, one in front of the other). One new connection at a time, so
    that the order seen is the pool's, not the scheduler's (trio runs the
    tasks woken together in a random order).
    """
    db, driver = make(2)
    first, second = await db.acquire(), await db.acquire()
    line = Line(db)
    granted, done = line.granted, line.done

    async with anyio.create_task_group() as tg:
        for name in ("older", "younger", "youngest"):
            tg.start_soon(line.wait, name)
            await wait_all_tasks_blocked()
        driver.park("connect")
        await db.release(first)  # handed to "older", which has not run yet
        await db.release(second)  # handed to "younger", which has not run yet
        await db.drain()  # marks both: neither may be lent now
        for expected in (["older"], ["older", "younger"]):
            connecting = await driver.parked("connect")
            connecting.release()
            await wait_all_tasks_blocked()
            assert granted == expected
        driver.unpark("connect")
        done.set()
    assert granted == ["older", "younger", "youngest"]
    assert db.stats().closed_by["drain"] == 2
    assert_sane(db)
    await db.disconnect()
    assert_every_connection_closed_once(driver)


async def test_a_resize_retires_the_last_handed_connection_first() -> None:
    """Shrinking marks held connections first, then the last handed ones.

    Two waiters are handed connections, and the pool shrinks by more than the
    one connection held before either runs. Marking the older waiter's
    connection would send it back to the queue while the younger one is
    served: the pool marks the younger one's instead, so the older one is
    served first, and the younger one next.
    """
    db, driver = make(3)
    held, first, second = await db.acquire(), await db.acquire(), await db.acquire()
    line = Line(db)
    granted, done = line.granted, line.done

    async with anyio.create_task_group() as tg:
        for name in ("older", "younger"):
            tg.start_soon(line.wait, name)
            await wait_all_tasks_blocked()
        await db.release(first)  # handed to "older", which has not run yet
        await db.release(second)  # handed to "younger", which has not run yet
        await db.resize(1)  # two too many: the held one, and one handed
        await wait_all_tasks_blocked()
        assert granted == ["older"]
        await db.release(held)  # marked: closed, not handed on
        await wait_all_tasks_blocked()
        assert granted == ["older"]
        done.set()  # "older" gives its connection back: it goes to "younger"
    assert granted == ["older", "younger"]
    assert db.stats().closed_by["resize"] == 2
    assert db.stats().size == 1
    await db.disconnect()
    assert_every_connection_closed_once(driver)
