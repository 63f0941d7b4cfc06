"""Issue 9: the pool as a long-running service uses it, against the real servers.

Upkeep that runs without ``async with db:`` (idle expiry, lifetime rotation,
leak reports), the ``configure``/``check``/``reset`` hooks, ``reset_session``,
deadlines that cancel queries mid-flight, bounded before-exit callbacks, nested
``async with``, and a process that ends without ``disconnect()``. Counts are
taken on the server (``pg_stat_activity`` by a unique ``application_name``)
where the server can give them. PostgreSQL and MariaDB run on asyncio only
(their drivers need it); SQLite runs on trio too. A test about the pool, not
about one driver's API, runs on each driver of its database: ``pg_driver``
(asyncpg, psycopg) and ``my_driver`` (aiomysql, asyncmy).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import pool
from tests import servers

pytestmark = pytest.mark.anyio

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])
#: each PostgreSQL driver, each MariaDB driver
each_pg_driver = pytest.mark.parametrize("pg_driver", list(servers.POSTGRES_SCHEMES))
each_my_driver = pytest.mark.parametrize("my_driver", list(servers.MYSQL_SCHEMES))

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------- helpers


def new_tag() -> str:
    return f"pooltest_svc_{uuid.uuid4().hex[:10]}"


def pg_url(tag: str, driver: str = "asyncpg") -> str:
    servers.require(servers.POSTGRES_URL, "PostgreSQL")
    sep = "&" if "?" in servers.POSTGRES_URL else "?"
    return servers.with_driver(f"{servers.POSTGRES_URL}{sep}application_name={tag}", driver)


def mysql_url(driver: str = "aiomysql") -> str:
    servers.require(servers.MYSQL_URL, "MariaDB")
    return servers.with_driver(servers.MYSQL_URL, driver)


def url_of(where: str, tag: str, tmp_path: Path) -> str:
    """The URL for ``where``: "postgres" (asyncpg), "postgres+psycopg" or "sqlite"."""
    if where == "sqlite":
        return sqlite_url(tmp_path)
    return pg_url(tag, where.partition("+")[2] or "asyncpg")


async def backend_pid(db: pool.Pool[Any], conn: Any) -> int:
    """The PostgreSQL backend of ``conn``, asked through the pool's driver (any driver)."""
    return int(await db._driver.fetchval(conn, "SELECT pg_backend_pid()", ()))


class PgAdmin:
    """The test's own look at the server: the backends of one application_name."""

    def __init__(self, conn: Any, tag: str) -> None:
        self.conn = conn
        self.tag = tag

    async def pids(self) -> set[int]:
        rows = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", self.tag
        )
        return {int(row["pid"]) for row in rows}

    async def count(self) -> int:
        return len(await self.pids())

    async def settles_at(self, expected: int, within: float = 3.0) -> None:
        """Poll the server's count until it is ``expected`` (closing is asynchronous there)."""
        with anyio.fail_after(within):
            while await self.count() != expected:
                await anyio.sleep(0.02)


@asynccontextmanager
async def pg_admin(tag: str) -> AsyncIterator[PgAdmin]:
    import asyncpg

    conn = await asyncpg.connect(servers.POSTGRES_URL)
    try:
        yield PgAdmin(conn, tag)
    finally:
        await conn.close()


@asynccontextmanager
async def disconnecting(db: pool.Pool[Any]) -> AsyncIterator[pool.Pool[Any]]:
    """Use ``db`` lazily (no ``async with db:``), and disconnect it at the end."""
    try:
        yield db
    finally:
        with anyio.CancelScope(shield=True):
            await db.disconnect()


async def hold(db: pool.Pool[Any], n: int) -> list[Any]:
    """Take ``n`` connections at once (each opens a new one on a cold pool)."""
    return [await db.acquire() for _ in range(n)]


def sqlite_url(tmp_path: Path, name: str = "svc.db") -> str:
    return f"sqlite:///{tmp_path / name}"


# ---------------------------------------------------------------------- upkeep without async with


class TestUpkeepOfALazyPool:
    @asyncio_only
    @each_pg_driver
    async def test_idle_surplus_is_closed_on_the_server_with_no_call_made(
        self, pg_driver: str, seen: Callable[[object], None]
    ) -> None:
        tag = new_tag()
        db = pool.shared(pg_url(tag, pg_driver), connection_limit=4, max_idle_connection_lifetime=1)
        seen(db)
        async with pg_admin(tag) as admin, disconnecting(db):
            conns = await hold(db, 4)  # a burst: the pool grows to 4
            for conn in conns:
                await db.release(conn)
            assert db.stats().idle == 4
            assert await admin.count() == 4
            # Nobody calls the pool from here on: only its upkeep can close them.
            await admin.settles_at(0, within=2.0)
            # The server sees a session end before the driver's close returns
            # and the pool counts it closed: give that last step a moment.
            with anyio.move_on_after(1.0):
                while db.stats().busy:
                    await anyio.sleep(0.01)
            stats = db.stats()
            assert (stats.size, stats.idle, stats.closed) == (0, 0, 4)

    @asyncio_only
    @each_pg_driver
    async def test_lifetime_rotation_under_load_fails_no_query(
        self, pg_driver: str, seen: Callable[[object], None]
    ) -> None:
        tag = new_tag()
        db = pool.shared(pg_url(tag, pg_driver), connection_limit=3, max_connection_lifetime=0.3)
        seen(db)
        backends: set[int] = set()
        done = 0

        async def worker() -> None:
            nonlocal done
            while True:
                backends.add(await db.fetchval("SELECT pg_backend_pid()"))
                done += 1
                await anyio.sleep(0.005)

        async with pg_admin(tag) as admin, disconnecting(db):
            with anyio.move_on_after(1.5):  # the load: any failure ends the test
                async with anyio.create_task_group() as tg:
                    for _ in range(10):
                        tg.start_soon(worker)
            stats = db.stats()
            assert done > 100
            assert len(backends) > 3  # rotated: more backends than the limit over time
            assert stats.closed >= len(backends) - 3
            assert stats.size <= 3
            assert await admin.count() <= 3

    @pytest.mark.parametrize(
        ("anyio_backend", "where"), [("asyncio", "postgres"), ("asyncio", "postgres+psycopg"),
                                     ("asyncio", "sqlite"), ("trio", "sqlite")]
    )
    async def test_a_leak_is_reported_after_connect_alone(
        self,
        where: str,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
        seen: Callable[[object], None],
    ) -> None:
        caplog.set_level(logging.WARNING, logger="pool")
        url = url_of(where, new_tag(), tmp_path)
        db: pool.Pool[Any] = pool.Pool(url, connection_limit=2, leak_detection_threshold=0.1)
        seen(db)
        sites: list[str] = []
        taken = anyio.Event()

        async def leaky() -> None:
            sites.append(f"{__file__}:{sys._getframe().f_lineno + 1}")
            await db.acquire()  # never released
            taken.set()
            await anyio.sleep_forever()

        def leak_warnings() -> list[str]:
            return [
                r.getMessage() for r in caplog.records if "connection leak" in r.getMessage()
            ]

        async with disconnecting(db):
            await db.connect()  # no async with: the upkeep must run all the same
            async with anyio.create_task_group() as tg:
                tg.start_soon(leaky, name="leaky-service-task")
                await taken.wait()
                with anyio.fail_after(2):
                    while not leak_warnings():
                        await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
        (message, *_) = leak_warnings()
        assert "leaky-service-task" in message
        assert message.endswith(f"acquired at {sites[0]}"), message


# ---------------------------------------------------------------------- hooks


@asyncio_only
class TestHooks:
    async def test_configure_registers_a_jsonb_codec(self, seen: Callable[[object], None]) -> None:
        configured: list[Any] = []

        async def configure(conn: Any) -> None:
            await conn.set_type_codec(
                "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
            configured.append(conn)

        db: pool.Pool[Any] = pool.Pool(pg_url(new_tag()), configure=configure, connection_limit=2)
        seen(db)
        async with db:
            value = await db.fetchval("""SELECT '{"a": [1, 2], "b": null}'::jsonb""")
            assert value == {"a": [1, 2], "b": None}
            assert await db.fetchval("SELECT $1::jsonb ->> 'k'", {"k": "v"}) == "v"
        assert len(configured) == 1

    @each_pg_driver
    async def test_a_failing_configure_is_a_connect_error_and_opens_nothing(
        self, pg_driver: str, seen: Callable[[object], None]
    ) -> None:
        class HookFailed(Exception):
            pass

        async def configure(conn: Any) -> None:
            raise HookFailed("no codec for you")

        tag = new_tag()
        db: pool.Pool[Any] = pool.Pool(
            pg_url(tag, pg_driver), configure=configure, connection_limit=2
        )
        seen(db)
        async with pg_admin(tag) as admin, disconnecting(db):
            with pytest.raises(pool.ConnectError) as info:
                await db.connect()
            seen(info.value)
            assert isinstance(info.value.__cause__, HookFailed)
            assert db.stats().size == 0
            await admin.settles_at(0)  # the half-set-up connection was closed

    @each_pg_driver
    async def test_a_check_that_fails_once_is_followed_by_a_healthy_connection(
        self, pg_driver: str, seen: Callable[[object], None]
    ) -> None:
        checked: list[int] = []

        async def check(conn: Any) -> None:
            checked.append(id(conn))
            if len(checked) == 1:
                raise RuntimeError("refused once")

        tag = new_tag()
        db: pool.Pool[Any] = pool.Pool(pg_url(tag, pg_driver), check=check, connection_limit=2)
        seen(db)
        async with pg_admin(tag) as admin, disconnecting(db):
            await db.connect()  # a new connection is not checked; it goes idle
            (first,) = await admin.pids()
            async with db.acquire() as conn:  # the idle one is checked, refused, replaced
                pid = await backend_pid(db, conn)
            assert pid != first
            assert len(checked) == 1
            stats = db.stats()
            assert (stats.opened, stats.closed, stats.size) == (2, 1, 1)
            assert await db.fetchval("SELECT pg_backend_pid()") == pid  # checked, passed
            assert len(checked) == 2
            await admin.settles_at(1)

    @each_pg_driver
    async def test_the_reset_hook_sees_every_release(
        self, pg_driver: str, seen: Callable[[object], None]
    ) -> None:
        resets: list[Any] = []

        async def reset(conn: Any) -> None:
            resets.append(conn)

        db: pool.Pool[Any] = pool.Pool(
            pg_url(new_tag(), pg_driver), reset=reset, connection_limit=2
        )
        seen(db)
        async with disconnecting(db):
            await db.fetchval("SELECT 1")
            async with db.acquire() as conn:
                await db._driver.fetchval(conn, "SELECT 1", ())
            conn = await db.acquire()
            await db.release(conn)
            async with db.transaction() as tx:
                await tx.execute("SELECT 1")
            with pytest.raises(Exception, match="division by zero"):
                await db.fetchval("SELECT 1/0")
            with anyio.move_on_after(0.05):  # cancelled mid-query: recovered, then reset
                await db.fetchval("SELECT pg_sleep(1)")
            with anyio.fail_after(3):
                while len(resets) < 6:
                    await anyio.sleep(0.01)
            assert len(resets) == 6
            assert db.stats().closed == 0


# ---------------------------------------------------------------------- reset_session


async def _dirty_pg_session(conn: Any) -> None:
    await conn.execute("SET statement_timeout = '1234s'")
    await conn.execute("SET search_path = pg_catalog")
    await conn.execute("SET app.tenant = 'acme'")
    await conn.execute("LISTEN svc_channel")
    await conn.execute("CREATE TEMP TABLE svc_scratch (x int)")
    await conn.execute("SELECT pg_advisory_lock(90909)")


async def _pg_session_state(db: pool.Pool[Any], conn: Any) -> dict[str, Any]:
    async def fetchval(sql: str) -> Any:
        return await db._driver.fetchval(conn, sql, ())

    return {
        "statement_timeout": await fetchval("SHOW statement_timeout"),
        "search_path": await fetchval("SHOW search_path"),
        # a custom setting once set stays defined: reset, it is the empty string
        "tenant": await fetchval("SELECT current_setting('app.tenant', true)") or None,
        "listening": await fetchval("SELECT count(*) FROM pg_listening_channels()"),
        "temp_table": await fetchval("SELECT to_regclass('pg_temp.svc_scratch')") is not None,
        "advisory_locks": await fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        ),
    }


CLEAN_PG = {
    "statement_timeout": "0",
    "search_path": '"$user", public',
    "tenant": None,
    "listening": 0,
    "temp_table": False,
    "advisory_locks": 0,
}
DIRTY_PG = {
    "statement_timeout": "1234s",
    "search_path": "pg_catalog",
    "tenant": "acme",
    "listening": 1,
    "temp_table": True,
    "advisory_locks": 1,
}


@asyncio_only
class TestResetSession:
    @each_pg_driver
    @pytest.mark.parametrize(("reset", "expected"), [(True, CLEAN_PG), (False, DIRTY_PG)])
    async def test_postgres_session_state_of_one_borrower_and_the_next(
        self,
        pg_driver: str,
        reset: bool,
        expected: dict[str, Any],
        seen: Callable[[object], None],
    ) -> None:
        db: pool.Pool[Any] = pool.Pool(
            pg_url(new_tag(), pg_driver), connection_limit=1, reset_session=reset
        )
        seen(db)
        async with disconnecting(db):
            async with db.acquire() as conn:
                pid = await backend_pid(db, conn)
                await _dirty_pg_session(conn)
            async with db.acquire() as conn:
                assert await backend_pid(db, conn) == pid
                assert await _pg_session_state(db, conn) == expected
            assert db.stats().opened == 1

    async def test_postgres_listeners_of_one_borrower_do_not_reach_the_next(
        self, seen: Callable[[object], None]
    ) -> None:
        db: pool.Pool[Any] = pool.Pool(pg_url(new_tag()), connection_limit=1, reset_session=True)
        seen(db)
        first: list[str] = []
        second: list[str] = []
        async with disconnecting(db):
            async with db.acquire() as conn:
                await conn.add_listener("svc_events", lambda *args: first.append(args[3]))
                conn.add_log_listener(lambda _conn, message: first.append(str(message)))
            async with db.acquire() as conn:
                got = anyio.Event()

                def on_event(*args: Any) -> None:
                    second.append(args[3])
                    got.set()

                await conn.add_listener("svc_events", on_event)
                assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 1
                await conn.fetchval("SELECT pg_notify('svc_events', 'hello')")
                with anyio.fail_after(2):
                    await got.wait()
                await conn.remove_listener("svc_events", on_event)
                await conn.execute("DO $$ BEGIN RAISE NOTICE 'for the second only'; END $$")
        assert second == ["hello"]
        assert first == []

    async def test_postgres_prepared_statements_survive_a_reset(
        self, seen: Callable[[object], None]
    ) -> None:
        db: pool.Pool[Any] = pool.Pool(pg_url(new_tag()), connection_limit=1, reset_session=True)
        seen(db)
        async with disconnecting(db):
            async with db.acquire() as conn:
                stmt = await conn.prepare("SELECT $1::int + 1")
                assert await conn.fetchval("SELECT $1::int * 2", 21) == 42  # cached
            async with db.acquire() as conn:
                assert await stmt.fetchval(1) == 2  # the statement object still works
                assert await conn.fetchval("SELECT $1::int * 2", 4) == 8  # the cache still works
                assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements") >= 2
            assert db.stats().closed == 0

    @each_my_driver
    @pytest.mark.parametrize("reset", [True, False])
    async def test_mariadb_user_variables_and_temp_tables(
        self, my_driver: str, reset: bool, seen: Callable[[object], None]
    ) -> None:
        db: pool.Pool[Any] = pool.Pool(
            mysql_url(my_driver), connection_limit=1, reset_session=reset
        )
        seen(db)
        async with disconnecting(db):
            async with db.acquire() as conn:
                thread = conn.thread_id()
                await db._driver.execute(conn, "SET @x = 1", ())
                await db._driver.execute(conn, "CREATE TEMPORARY TABLE svc_scratch (x INT)", ())
                await db._driver.execute(conn, "INSERT INTO svc_scratch VALUES (7)", ())
            async with db.acquire() as conn:
                assert conn.thread_id() == thread
                x = await db._driver.fetchval(conn, "SELECT @x", ())
                if reset:
                    assert x is None
                    # gone: the same name can be created again
                    await db._driver.execute(conn, "CREATE TEMPORARY TABLE svc_scratch (y INT)", ())
                    assert await db._driver.fetch(conn, "SELECT * FROM svc_scratch", ()) == []
                else:
                    assert x == 1
                    assert await db._driver.fetch(conn, "SELECT x FROM svc_scratch", ()) == [(7,)]
                # autocommit survives the reset: a plain write is committed
                assert await db._driver.fetchval(conn, "SELECT @@autocommit", ()) == 1
            assert db.stats().opened == 1


# ---------------------------------------------------------------------- deadlines


@asyncio_only
class TestDeadlines:
    @each_pg_driver
    async def test_postgres_timeouts_open_nothing_and_the_backends_stay(
        self, pg_driver: str, seen: Callable[[object], None]
    ) -> None:
        tag = new_tag()
        db: pool.Pool[Any] = pool.Pool(pg_url(tag, pg_driver), connection_limit=5)
        seen(db)
        async with pg_admin(tag) as admin, disconnecting(db):
            for conn in await hold(db, 5):
                await db.release(conn)
            assert db.stats().opened == 5
            backends = await admin.pids()
            assert len(backends) == 5
            lent_before = db.stats().acquired

            failed = 0

            async def request() -> None:
                nonlocal failed
                with pytest.raises(TimeoutError), anyio.fail_after(0.02):
                    await db.fetchval("SELECT pg_sleep(0.05)")
                failed += 1

            for _ in range(10):  # 200 requests, 20 at a time
                async with anyio.create_task_group() as tg:
                    for _ in range(20):
                        tg.start_soon(request)
            assert failed == 200
            assert db.stats().acquired - lent_before >= 5  # some were cancelled mid-query
            seen_pids: set[int] = set()

            async def query() -> None:
                seen_pids.add(await db.fetchval("SELECT pg_backend_pid()"))

            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(query)
            assert seen_pids == backends
            stats = db.stats()
            assert (stats.opened, stats.closed, stats.size) == (5, 0, 5)
            assert await admin.pids() == backends

    @each_my_driver
    async def test_mariadb_timeouts_recover_the_connections(
        self, my_driver: str, seen: Callable[[object], None]
    ) -> None:
        db: pool.Pool[Any] = pool.Pool(mysql_url(my_driver), connection_limit=5)
        seen(db)
        async with disconnecting(db):
            for conn in await hold(db, 5):
                await db.release(conn)
            assert db.stats().opened == 5
            failed = 0

            async def request() -> None:
                nonlocal failed
                with pytest.raises(TimeoutError), anyio.fail_after(0.02):
                    await db.fetchval("SELECT SLEEP(0.05)")
                failed += 1

            for _ in range(10):
                async with anyio.create_task_group() as tg:
                    for _ in range(20):
                        tg.start_soon(request)
            assert failed == 200
            # each SLEEP stopped with KILL QUERY, its answer read: the sessions kept
            assert db.stats().closed == 0
            results: list[int] = []

            async def query() -> None:
                async with db.acquire() as conn:
                    results.append(await db._driver.fetchval(conn, "SELECT 1", ()))
                    await anyio.sleep(0.01)  # hold it a moment: demand for all five

            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(query)
            assert results == [1] * 200
            stats = db.stats()
            assert (stats.size, stats.idle, stats.in_use, stats.busy) == (5, 5, 0, 0)


# ---------------------------------------------------------------------- shutdown


class TestShutdown:
    @pytest.mark.parametrize(
        ("anyio_backend", "where"),
        [("asyncio", "postgres"), ("asyncio", "postgres+psycopg"), ("trio", "sqlite")],
    )
    async def test_a_hanging_before_exit_callback_is_abandoned(
        self,
        where: str,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
        seen: Callable[[object], None],
    ) -> None:
        caplog.set_level(logging.WARNING, logger="pool")
        tag = new_tag()
        url = url_of(where, tag, tmp_path)
        db: pool.Pool[Any] = pool.Pool(url, before_exit_timeout=0.2)
        seen(db)
        started = anyio.Event()

        async def hangs() -> None:
            started.set()
            await anyio.sleep_forever()

        db.on_before_exit(hangs)
        await db.fetchval("SELECT 1")
        begun = anyio.current_time()
        with anyio.fail_after(1.0):
            await db.disconnect()
        took = anyio.current_time() - begun
        assert started.is_set()
        assert 0.2 <= took < 0.7
        assert any(
            r.levelno == logging.WARNING and "before_exit_timeout" in r.getMessage()
            for r in caplog.records
        )
        stats = db.stats()
        assert (stats.size, stats.idle, stats.in_use) == (0, 0, 0)
        if where != "sqlite":
            async with pg_admin(tag) as admin:
                await admin.settles_at(0)

    @asyncio_only
    @each_pg_driver
    @pytest.mark.parametrize("how", ["nested", "two tasks"])
    async def test_the_first_async_with_exit_leaves_the_other_owner_alone(
        self, pg_driver: str, how: str, seen: Callable[[object], None]
    ) -> None:
        tag = new_tag()
        url = pg_url(tag, pg_driver)

        def shared() -> pool.Pool[Any]:
            return pool.shared(url, connection_limit=3)

        db = shared()
        seen(db)
        async with pg_admin(tag) as admin, disconnecting(db):
            if how == "nested":
                async with shared() as outer:
                    async with outer.acquire() as conn:
                        async with shared() as inner:
                            assert inner is outer is db
                            await inner.fetchval("SELECT 1")
                        # the inner exit disconnected nothing: the held one still works
                        assert await db._driver.fetchval(conn, "SELECT 41 + 1", ()) == 42
                        assert db.stats().in_use == 1
                    assert await outer.fetchval("SELECT 1") == 1
                    assert db.stats().closed == 0
            else:
                holding = anyio.Event()
                answers: list[int] = []

                async def long_owner() -> None:
                    async with shared() as mine, mine.acquire() as conn:
                        holding.set()
                        # in flight while the other owner exits
                        answers.append(
                            await db._driver.fetchval(conn, "SELECT 7 FROM pg_sleep(0.3)", ())
                        )
                        answers.append(await mine.fetchval("SELECT 8"))

                async def short_owner() -> None:
                    await holding.wait()
                    async with shared() as mine:
                        await mine.fetchval("SELECT 1")
                        with anyio.fail_after(2):
                            while not await admin.conn.fetchval(
                                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                                " AND query LIKE '%pg_sleep%' AND state = 'active'", tag
                            ):
                                await anyio.sleep(0.01)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(long_owner)
                    tg.start_soon(short_owner)
                    await holding.wait()
                    assert db.stats().in_use == 1
                assert answers == [7, 8]
            # the last exit disconnected
            stats = db.stats()
            assert (stats.size, stats.idle, stats.in_use) == (0, 0, 0)
            await admin.settles_at(0)

    @pytest.mark.parametrize(
        ("anyio_backend", "where"), [("asyncio", "postgres"), ("asyncio", "postgres+psycopg"),
                                     ("asyncio", "sqlite"), ("trio", "sqlite")]
    )
    async def test_no_upkeep_task_remains_after_disconnect(
        self, anyio_backend: str, where: str, tmp_path: Path, seen: Callable[[object], None]
    ) -> None:
        url = url_of(where, new_tag(), tmp_path)
        db: pool.Pool[Any] = pool.Pool(url, max_idle_connection_lifetime=1)
        seen(db)
        for _ in range(2):  # and again after a reconnect
            await db.fetchval("SELECT 1")  # lazily opened: the upkeep runs
            assert upkeep_tasks(anyio_backend) == 1
            await db.disconnect()
            assert upkeep_tasks(anyio_backend) == 0


def upkeep_tasks(backend: str) -> int:
    if backend == "asyncio":
        return sum(t.get_name() == "pool upkeep" for t in asyncio.all_tasks() if not t.done())
    import trio

    def walk(task: Any) -> int:
        found = int(task.name == "pool upkeep")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                found += walk(child)
        return found

    return walk(trio.lowlevel.current_root_task())


# ------------------------------------------------------------------ a process without disconnect

_ASYNCIO_SCRIPT = """
import asyncio, sys
import pool

async def main():
    lite = pool.shared(sys.argv[1])
    await lite.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    await lite.execute("INSERT INTO t VALUES (?)", 1)
    conn = await lite.acquire()          # one still held at exit
    await conn.fetchval("SELECT 1")
    pg = pool.Pool(sys.argv[2], connection_limit=3, max_idle_connection_lifetime=1)
    await pg.connect()
    rows = await asyncio.gather(*(pg.fetchval("SELECT pg_backend_pid()") for _ in range(10)))
    held = await pg.acquire()            # one still held at exit
    await pg._driver.fetchval(held, "SELECT 1", ())
    print("ok", len(rows), flush=True)
    # returns without disconnect()

asyncio.run(main())
"""

_TRIO_SCRIPT = """
import sys
import trio
import pool

async def main():
    lite = pool.shared(sys.argv[1], max_idle_connection_lifetime=1)
    await lite.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(lite.execute, "INSERT INTO t VALUES (?)", i)
    conn = await lite.acquire()          # one still held at exit
    await conn.fetchval("SELECT 1")
    print("ok", await lite.fetchval("SELECT count(*) FROM t"), flush=True)
    # returns without disconnect()

trio.run(main)
"""


_REFUSED_SCRIPT = """
import asyncio, sys
import pool

async def main():
    db = pool.Pool(sys.argv[1], connect_timeout=1)
    try:
        await db.connect()
    except pool.ConnectError:
        print("refused", flush=True)
    # returns without disconnect()

asyncio.run(main())
"""


class TestExitWithoutDisconnect:
    @pytest.mark.parametrize(
        "flags", [[], ["-W", "error"], ["-X", "dev", "-W", "error"]],
        ids=["default", "W-error", "X-dev-W-error"],
    )
    @pytest.mark.parametrize(
        ("library", "pg_driver"),
        [("asyncio", "asyncpg"), ("asyncio", "psycopg"), ("trio", None)],
        ids=["asyncio", "asyncio-psycopg", "trio"],
    )
    def test_the_process_ends_quietly(
        self, library: str, pg_driver: str | None, flags: list[str], tmp_path: Path
    ) -> None:
        if library == "asyncio":
            tag = new_tag()
            args = [_ASYNCIO_SCRIPT, sqlite_url(tmp_path, "exit.db"), pg_url(tag, str(pg_driver))]
        else:
            args = [_TRIO_SCRIPT, sqlite_url(tmp_path, "exit.db")]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("PYTHONWARNINGS", None)
        done = subprocess.run(
            [sys.executable, *flags, "-c", textwrap.dedent(args[0]), *args[1:]],
            capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("ok"), done.stdout
        # -X dev turns on asyncio's debug mode, which reports any callback that
        # ran over 0.1 s: on a loaded 2-core machine that is the machine, not
        # something the pool left behind
        noise = [
            line
            for line in done.stderr.splitlines()
            if not (line.startswith("Executing <") and " took " in line)
        ]
        assert noise == [], done.stderr

    # psycopg's refusal ends within one turn of the loop: the upkeep's task group
    # once spawned a child in its first step, and the loop ended before that
    # child ran ("coroutine '_finish_all' was never awaited")
    @pytest.mark.parametrize("pg_driver", ["asyncpg", "psycopg"])
    def test_a_refused_connect_at_the_end_of_the_loop_is_quiet(
        self, pg_driver: str, tmp_path: Path
    ) -> None:
        """connect() fails (nothing listens), and the program returns without disconnect()."""
        url = pg_url(new_tag(), pg_driver).replace(":5432/", ":1/")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("PYTHONWARNINGS", None)
        done = subprocess.run(
            [sys.executable, "-W", "error", "-c", textwrap.dedent(_REFUSED_SCRIPT), url],
            capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("refused"), done.stdout
        assert done.stderr == ""

    @pytest.mark.parametrize("where", ["postgres", "postgres+psycopg", "sqlite"])
    def test_a_shared_pool_serves_one_event_loop_after_another(
        self, where: str, tmp_path: Path, seen: Callable[[object], None]
    ) -> None:
        """No disconnect() between two asyncio.run() calls (and trio.run for SQLite)."""
        tag = new_tag()
        url = url_of(where, tag, tmp_path)
        db = pool.shared(url, connection_limit=1)
        seen(db)
        sessions: list[Any] = []

        async def use(library: str) -> None:
            assert db.stats().size == 0  # the last loop's connections were closed with it
            async with anyio.create_task_group() as tg:  # one waits: a future on this loop
                for _ in range(2):
                    tg.start_soon(db.fetchval, "SELECT 1")
            async with db.acquire() as conn:
                sessions.append(await backend_pid(db, conn) if where != "sqlite" else id(conn))
            assert upkeep_tasks(library) == 1
            if where != "sqlite" and len(sessions) > 1:
                async with pg_admin(tag) as admin:
                    assert sessions[-2] not in await admin.pids()

        runs = ["asyncio", "asyncio"] if where != "sqlite" else ["asyncio", "trio", "asyncio"]
        try:
            for library in runs:
                anyio.run(use, library, backend=library)
        finally:
            anyio.run(db.disconnect)
        assert len(set(sessions)) == len(runs)

