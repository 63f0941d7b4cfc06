"""The conformance suite: the pool's guarantees on PostgreSQL, MariaDB and SQLite, for real.

Each test runs on every driver: asyncpg and psycopg on PostgreSQL, aiomysql and
asyncmy on MariaDB, and sqlite3. Counts are checked on the server itself
(pg_stat_activity, information_schema.processlist), not only in ``stats()``.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio
from anyio import wait_all_tasks_blocked

import pool
from tests.targets import ALL_TARGETS, SERVER_TARGETS, Target, make_target

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture(params=ALL_TARGETS)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    t = make_target(request.param, tmp_path)
    await t.start()
    try:
        yield t
    finally:
        await t.stop()


@pytest_asyncio.fixture(params=SERVER_TARGETS)
async def server_target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    """The targets with a server that can kill a session."""
    t = make_target(request.param, tmp_path)
    await t.start()
    try:
        yield t
    finally:
        await t.stop()


async def make_pool(target: Target, seen: Callable[[object], None], **overrides: Any) -> Any:
    db: pool.Pool[Any] = pool.Pool(target.url, **overrides)
    seen(db)
    return db


class TestFifo:
    async def test_fifty_waiters_are_served_in_arrival_order(
        self, target: Target, seen: Callable[[object], None]
    ) -> None:
        db = await make_pool(target, seen, connection_limit=1)
        async with db:
            order: list[int] = []
            holder = await db.acquire()

            async def worker(i: int) -> None:
                async with db.acquire() as conn:
                    order.append(i)
                    await db._driver.fetchval(conn, target.select_arg, (i,))

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(worker, i)
                    await wait_all_tasks_blocked()
                assert db.stats().waiting == 50
                await db.release(holder)
            assert order == list(range(50))

    async def test_an_arrival_at_release_time_does_not_overtake(
        self, target: Target, seen: Callable[[object], None]
    ) -> None:
        db = await make_pool(target, seen, connection_limit=1)
        async with db:
            order: list[str] = []
            holder = await db.acquire()

            async def worker(name: str) -> None:
                async with db.acquire():
                    order.append(name)

            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(worker, f"queued-{i}")
                    await wait_all_tasks_blocked()
                await db.release(holder)  # handed to queued-0 ...
                tg.start_soon(worker, "newcomer")  # ... as a newcomer finds the queue
            assert order == [f"queued-{i}" for i in range(5)] + ["newcomer"]


class TestGrowth:
    async def test_lazy_growth_never_passes_the_limit_on_the_server(
        self, target: Target, seen: Callable[[object], None]
    ) -> None:
        db = await make_pool(target, seen, connection_limit=7)
        assert db.stats().size == 0
        if target.counts_server_side:
            assert await target.server_count() == 0  # constructing opened nothing
        release = anyio.Event()
        peak_server = 0

        async def holder() -> None:
            async with db.acquire() as conn:
                await db._driver.fetchval(conn, "SELECT 1", ())
                await release.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(holder)
            while db.stats().in_use < 7:
                await anyio.sleep(0.01)
            await wait_all_tasks_blocked()
            if target.counts_server_side:
                peak_server = await target.server_count()
            assert db.stats().size == 7
            release.set()
        assert db.stats().size == 7
        if target.counts_server_side:
            assert peak_server == 7
            assert await target.server_count() == 7
        await db.disconnect()
        if target.counts_server_side:
            assert await target.settles_at(0)


class TestTimeout:
    async def test_third_acquire_times_out_after_one_second_with_p2024(
        self, target: Target, seen: Callable[[object], None]
    ) -> None:
        db = await make_pool(target, seen, connection_limit=2, pool_timeout=1)
        async with db:
            a, b = await db.acquire(), await db.acquire()
            started = time.monotonic()
            with pytest.raises(pool.PoolTimeoutError) as info:
                await db.acquire()
            elapsed = time.monotonic() - started
            seen(info.value)
            assert 1.0 <= elapsed < 1.25
            err = info.value
            assert err.code == "P2024"
            assert isinstance(err, pool.PoolError) and isinstance(err, TimeoutError)
            text = str(err)
            assert text.startswith(
                "Timed out fetching a new connection from the connection pool."
            )
            assert "(Current connection pool timeout: 1, connection limit: 2)" in text
            assert "2 in use, 0 idle, 0 opening, 0 waiting" in text
            await db.release(a)
            await db.release(b)

    async def test_zero_waits_until_a_connection_is_released(
        self, target: Target, seen: Callable[[object], None]
    ) -> None:
        db = await make_pool(target, seen, connection_limit=2, pool_timeout=0)
        async with db:
            a, b = await db.acquire(), await db.acquire()
            got: list[Any] = []

            async def third() -> None:
                got.append(await db.acquire())

            async with anyio.create_task_group() as tg:
                tg.start_soon(third)
                await wait_all_tasks_blocked()
                assert db.stats().waiting == 1 and not got
                await db.release(a)
            assert got == [a]
            await db.release(a)
            await db.release(b)


class TestCancellationStorm:
    async def test_two_thousand_tasks_with_random_cancellations_leak_nothing(
        self, target: Target, seen: Callable[[object], None]
    ) -> None:
        limit = 5
        db = await make_pool(target, seen, connection_limit=limit, pool_timeout=0)
        rng = random.Random(20261122)
        cancelled = completed = 0
        sql = target.select_arg

        async def one(i: int, deadline: float | None) -> None:
            nonlocal cancelled, completed
            with anyio.CancelScope(deadline=deadline or float("inf")) as scope:
                kind = i % 3
                if kind == 0:
                    async with db.acquire() as conn:
                        await db._driver.fetchval(conn, sql, (i,))
                        await anyio.sleep(0)
                elif kind == 1:
                    await db.fetchval(sql, i)
                else:
                    async with db.transaction() as conn:
                        await db._driver.fetchval(conn, sql, (i,))
            if scope.cancelled_caught:
                cancelled += 1
            else:
                completed += 1

        async with anyio.create_task_group() as tg:
            now = anyio.current_time()
            for i in range(2000):
                # a random third are cancelled at a random point in their life
                deadline = now + rng.uniform(0, 0.05) if rng.random() < 1 / 3 else None
                tg.start_soon(one, i, deadline)
        assert cancelled > 100
        assert completed > 1000
        s = db.stats()
        seen(s)
        assert s.in_use == 0 and s.waiting == 0 and s.opening == 0
        assert 0 < s.size <= limit
        if target.counts_server_side:
            assert await target.settles_at(s.size)
        # every idle connection answers a query
        held = [await db.acquire() for _ in range(s.idle)]
        for conn in held:
            assert await db._driver.fetchval(conn, sql, (1,)) == 1
        for conn in held:
            await db.release(conn)
        await db.disconnect()


class TestRelease:
    async def test_release_inside_a_transaction_rolls_back(
        self, target: Target, seen: Callable[[object], None]
    ) -> None:
        db = await make_pool(target, seen, connection_limit=1)
        table = f"t_{target._tag}"
        async with db:
            await db.execute(f"CREATE TABLE {table} (v INTEGER)")
            try:
                conn = await db.acquire()
                await db._driver.begin(conn)
                await db._driver.execute(
                    conn, f"INSERT INTO {table} VALUES ({target.placeholder})", (1,)
                )
                await db.release(conn)  # left inside the transaction
                assert await db.fetchval(f"SELECT COUNT(*) FROM {table}") == 0
            finally:
                await db.execute(f"DROP TABLE {table}")

    async def test_transaction_commits_and_rolls_back(
        self, target: Target, seen: Callable[[object], None]
    ) -> None:
        db = await make_pool(target, seen, connection_limit=2)
        table = f"t_{target._tag}"
        insert = f"INSERT INTO {table} VALUES ({target.placeholder})"
        async with db:
            await db.execute(f"CREATE TABLE {table} (v INTEGER)")
            try:
                async with db.transaction() as conn:
                    await db._driver.execute(conn, insert, (1,))
                with pytest.raises(RuntimeError):
                    async with db.transaction() as conn:
                        await db._driver.execute(conn, insert, (2,))
                        raise RuntimeError("roll it back")
                with anyio.move_on_after(0.05):
                    async with db.transaction() as conn:
                        await db._driver.execute(conn, insert, (3,))
                        await anyio.sleep_forever()
                rows = await db.fetch(f"SELECT v FROM {table}")
                assert [tuple(r) for r in rows] == [(1,)]
            finally:
                await db.execute(f"DROP TABLE {table}")

    async def test_a_connection_killed_while_idle_is_never_lent_again(
        self, server_target: Target, seen: Callable[[object], None]
    ) -> None:
        db = await make_pool(server_target, seen, connection_limit=2)
        async with db:
            conn = await db.acquire()
            session = await server_target.session_id(conn)
            await db.release(conn)
            await server_target.kill(session)
            async with db.acquire() as fresh:
                assert fresh is not conn
                assert await server_target.session_id(fresh) != session
            assert await db.fetchval("SELECT 1") == 1
            assert db.stats().closed >= 1

    async def test_a_connection_broken_while_held_is_closed_not_returned(
        self, server_target: Target, seen: Callable[[object], None]
    ) -> None:
        db = await make_pool(server_target, seen, connection_limit=1)
        async with db:
            conn = await db.acquire()
            await server_target.kill(await server_target.session_id(conn))
            with pytest.raises(Exception) as info:
                await db._driver.fetchval(conn, "SELECT 1", ())
            seen(info.value)
            await db.release(conn)
            assert db.stats().size == 0
            assert await db.fetchval("SELECT 1") == 1


class TestConnect:
    async def test_unreachable_server_is_p1001_with_the_driver_error_chained(
        self, target: Target, seen: Callable[[object], None]
    ) -> None:
        if not target.counts_server_side:
            url = "sqlite:////nonexistent-dir/x/y.db"
        else:
            url = target.url.replace(":5432/", ":1/").replace(":3306/", ":1/")
        db = pool.Pool(url, connect_timeout=2)
        with pytest.raises(pool.ConnectError) as info:
            await db.connect()
        seen(info.value)
        # SQLite has no server to reach: a file it cannot open is Prisma's P1003
        assert info.value.code == ("P1001" if target.counts_server_side else "P1003")
        assert info.value.__cause__ is not None
        assert db.stats().size == 0

    async def test_query_helpers_use_the_drivers_own_placeholders(
        self, target: Target, seen: Callable[[object], None]
    ) -> None:
        db = await make_pool(target, seen, connection_limit=2)
        async with db:
            assert await db.fetchval(target.select_arg, 41) == 41
            two = target.select_arg + ", " + target.select_arg[7:].replace("1", "2")
            row = await db.fetchrow(two, 1, 2)
            assert row is not None and tuple(row) == (1, 2)
            rows = await db.fetch(target.select_arg, 7)
            assert len(rows) == 1
            assert await db.fetchrow("SELECT 1 WHERE 1 = 0") is None
