"""The psycopg 3 and asyncmy drivers against the real servers.

Cancellation mid-query on psycopg, asyncmy and aiomysql keeps the connection
(same backend pid or thread id, nothing left running; on MySQL a reply cut off
part way closes it instead, its statement stopped); PgBouncer in transaction
mode runs without prepared statements; a host list skips a refused host; P2024
and FIFO hold as on the default drivers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest

import pool
from tests import servers

pytestmark = pytest.mark.anyio

PSYCOPG_URL = servers.POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)
ASYNCMY_URL = servers.MYSQL_URL.replace("mysql://", "mysql+asyncmy://", 1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # psycopg's async waits and asyncmy are asyncio only


def _needs(url: str, module: str) -> None:
    pytest.importorskip(module)
    servers.require(url.replace("+psycopg", "").replace("+asyncmy", ""), module)


@dataclass(frozen=True)
class MidQuery:
    """One driver's part in the cancellation test."""

    url: str
    module: str
    sleep: str
    session: str
    #: how many of the sleeps still run on the server
    running: str


#: the test user's statements with a SLEEP still running, but for the one asking
MY_RUNNING = (
    "SELECT COUNT(*) FROM information_schema.processlist WHERE COMMAND = 'Query'"
    " AND INFO LIKE '%SLEEP%' AND ID <> CONNECTION_ID()"
    " AND USER = SUBSTRING_INDEX(USER(), '@', 1)"
)

MID_QUERY = {
    "psycopg": MidQuery(
        PSYCOPG_URL, "psycopg", "SELECT pg_sleep(5)", "SELECT pg_backend_pid()",
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'",
    ),
    "asyncmy": MidQuery(
        ASYNCMY_URL, "asyncmy", "SELECT SLEEP(5)", "SELECT CONNECTION_ID()", MY_RUNNING
    ),
    "aiomysql": MidQuery(
        servers.MYSQL_URL, "aiomysql", "SELECT SLEEP(5)", "SELECT CONNECTION_ID()", MY_RUNNING
    ),
}


@pytest.mark.parametrize("driver", ["psycopg", "asyncmy", "aiomysql"])
async def test_twenty_cancellations_mid_query_keep_the_session(driver: str) -> None:
    """task.cancel() and a cancel scope, 20 times mid-query: same session, nothing left running."""
    d = MID_QUERY[driver]
    _needs(d.url, d.module)
    async with pool.Pool(d.url, connection_limit=1) as db:
        session = await db.fetchval(d.session)
        try:
            for i in range(20):
                if i % 2:
                    with anyio.move_on_after(0.02):
                        await db.fetchval(d.sleep)
                else:
                    task = asyncio.ensure_future(db.fetchval(d.sleep))
                    await asyncio.sleep(0.02)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
            assert await db.fetchval(d.session) == session
            assert await db.fetchval(d.running) == 0
            assert db.stats().closed == 0
            assert db.stats().closed_by.get("broken", 0) == 0
        finally:
            # what a failure left running would hold the server's sessions for 5 s
            # more, and the next tests count those: end it
            await _end_leftover_sleeps(db, d)


async def _end_leftover_sleeps(db: pool.Pool[Any], d: MidQuery) -> None:
    if d.module == "psycopg":
        await db.fetchval(
            "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity"
            " WHERE query = 'SELECT pg_sleep(5)' AND pid <> pg_backend_pid()"
        )
        return
    rows = await db.fetch(
        "SELECT ID FROM information_schema.processlist WHERE INFO = 'SELECT SLEEP(5)'"
    )
    for (thread,) in rows:
        await db.execute(f"KILL QUERY {int(thread)}")


each_my_driver = pytest.mark.parametrize("driver", ["asyncmy", "aiomysql"])

#: rows of 20 kB, each after a 10 ms sleep: more than MariaDB's 16 kB network
#: buffer, so the rows reach the client one by one while the query runs (3 s)
MANY_ROWS = "SELECT REPEAT('x', 20000), SLEEP(0.01) FROM seq_1_to_300"


async def _my_sessions_running(db: pool.Pool[Any]) -> int:
    """The test user's SLEEPs still running, once the server has ended those it was told to.

    A statement KILL QUERY stopped, or whose client closed mid-reply, ends in the
    server a moment after: that is waited for (bounded), not slept through.
    """
    with anyio.move_on_after(2.0):
        while await db.fetchval(MY_RUNNING):
            await anyio.sleep(0.01)
    return int(await db.fetchval(MY_RUNNING))


@each_my_driver
async def test_a_cancellation_while_rows_are_read_recovers_or_closes(driver: str) -> None:
    """Cut off mid-result-set: the session is kept or closed, never lent half read."""
    d = MID_QUERY[driver]
    _needs(d.url, d.module)
    async with pool.Pool(d.url, connection_limit=1) as db:
        session = await db.fetchval(d.session)
        sessions = {session}
        try:
            for i in range(4):
                if i % 2:
                    with anyio.move_on_after(0.2):
                        await db.fetch(MANY_ROWS)
                else:
                    task = asyncio.ensure_future(db.fetch(MANY_ROWS))
                    await asyncio.sleep(0.2)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                # the next answer is its own, not the rest of the rows
                assert await db.fetchval("SELECT %s + 1", i) == i + 1
                sessions.add(await db.fetchval(d.session))
            stats = db.stats()
            # each connection that was not kept was closed as broken, none leaked
            assert stats.closed == stats.closed_by.get("broken", 0) == len(sessions) - 1
            assert (stats.size, stats.in_use, stats.busy) == (1, 0, 0)
            assert await _my_sessions_running(db) == 0
        finally:
            await _end_leftover_sleeps(db, d)


@each_my_driver
async def test_cuts_at_every_step_of_a_quick_query_keep_the_session(driver: str) -> None:
    """A cancellation racing a query's end: KILL QUERY comes too late, the answer is read."""
    d = MID_QUERY[driver]
    _needs(d.url, d.module)
    async with pool.Pool(d.url, connection_limit=1) as db:
        session = await db.fetchval(d.session)
        for steps in range(12):
            task = asyncio.ensure_future(db.fetchval("SELECT %s", steps))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                assert await task == steps  # it ended before the cancel came
            assert await db.fetchval("SELECT %s + 100", steps) == steps + 100
        assert await db.fetchval(d.session) == session
        assert db.stats().closed == 0


@each_my_driver
async def test_a_holder_that_survives_its_cancel_scope(driver: str) -> None:
    """Its own scope cut the query, and it carries on: its next query gets its own answer."""
    d = MID_QUERY[driver]
    _needs(d.url, d.module)
    async with pool.Pool(d.url, connection_limit=1) as db:
        session = await db.fetchval(d.session)
        try:
            async with db.acquire() as conn:
                with anyio.move_on_after(0.05):
                    await db._driver.fetchval(conn, d.sleep, ())
                # the SLEEP's answer is owed, and read first: not taken for this one's
                assert await db._driver.fetchval(conn, "SELECT 1", ()) == 1
                with anyio.move_on_after(0.05):
                    await db._driver.fetchval(conn, d.sleep, ())
            # released with the second one's answer owed: recovered before it is lent
            assert await db.fetchval("SELECT 2") == 2
            assert await db.fetchval(d.running) == 0
            assert await db.fetchval(d.session) == session
            assert db.stats().closed == 0
        finally:
            await _end_leftover_sleeps(db, d)


@each_my_driver
async def test_closing_a_cut_connection_stops_its_statement(driver: str) -> None:
    """The driver's close() of a connection whose query was cut: nothing runs on after it."""
    d = MID_QUERY[driver]
    _needs(d.url, d.module)
    async with pool.Pool(d.url, connection_limit=1) as db:
        raw = db._driver
        conn = await raw.connect()
        try:
            with anyio.move_on_after(0.05):
                await raw.fetchval(conn, d.sleep, ())
            assert not raw.is_clean(conn)  # type: ignore[attr-defined]
        finally:
            await raw.close(conn)
        try:
            assert await _my_sessions_running(db) == 0
        finally:
            await _end_leftover_sleeps(db, d)


class TestPsycopg:
    async def test_queries_transactions_and_psycopg_rows(
        self, seen: Callable[[object], None]
    ) -> None:
        _needs(servers.POSTGRES_URL, "psycopg")
        async with pool.Pool(PSYCOPG_URL, connection_limit=2) as db:
            seen(db)
            assert await db.fetchval("SELECT %s::int + 1", 41) == 42
            assert await db.fetch("SELECT 1, 'a'") == [(1, "a")]
            async with db.transaction() as conn:
                assert db._driver.in_transaction(conn)
            assert db.stats().closed == 0

    async def test_reset_session(self) -> None:
        _needs(servers.POSTGRES_URL, "psycopg")
        async with pool.Pool(PSYCOPG_URL, connection_limit=1, reset_session=True) as db:
            await db.execute("SET statement_timeout = 1234")
            assert await db.fetchval("SHOW statement_timeout") == "0"

    async def test_pgbouncer_transaction_mode_100_tasks_20_queries(self) -> None:
        _needs(servers.PGBOUNCER_URL, "psycopg")
        url = servers.PGBOUNCER_URL.replace("postgresql://", "postgresql+psycopg://", 1)
        errors: list[BaseException] = []
        async with pool.Pool(url + "?pgbouncer=true", connection_limit=10) as db:

            async def worker(n: int) -> None:
                for i in range(20):
                    try:
                        assert await db.fetchval("SELECT %s::int", n * 100 + i) == n * 100 + i
                    except Exception as exc:  # counted, not raised: the figure is the proof
                        errors.append(exc)

            async with anyio.create_task_group() as tg:
                for n in range(100):
                    tg.start_soon(worker, n)
        assert errors == []

    async def test_a_host_list_skips_the_refused_first_host(self) -> None:
        _needs(servers.POSTGRES_URL, "psycopg")
        url = PSYCOPG_URL.replace("@127.0.0.1:5432", "@127.0.0.1:1,127.0.0.1:5432")
        async with pool.Pool(url, connection_limit=1) as db:
            assert await db.fetchval("SELECT 1") == 1
            async with db.acquire() as conn:
                assert db._driver.host_of(conn) == "127.0.0.1:5432"

    async def test_p2024(self) -> None:
        _needs(servers.POSTGRES_URL, "psycopg")
        async with pool.Pool(PSYCOPG_URL, connection_limit=1, pool_timeout=0.2) as db:
            async with db.acquire():
                with pytest.raises(pool.PoolTimeoutError) as info:
                    await db.fetchval("SELECT 1")
            assert info.value.code == "P2024"

    async def test_a_missing_extra_is_named(self) -> None:
        with pytest.raises(pool.ConfigError) as info:
            pool.Pool("postgresql+psycopgx://u@h/db")
        assert "unsupported scheme" in str(info.value)


class TestAsyncmy:
    async def test_queries_reset_and_timeout(self) -> None:
        _needs(servers.MYSQL_URL, "asyncmy")
        async with pool.Pool(ASYNCMY_URL, connection_limit=1, reset_session=True) as db:
            assert await db.fetchval("SELECT %s + 1", 41) == 42
            await db.execute("SET @x = 1")
            assert await db.fetchval("SELECT @x") is None
            with pytest.raises(TimeoutError):
                await db.fetchval("SELECT SLEEP(5)", timeout=0.1)
            assert await db.fetchval("SELECT 2") == 2
            assert db.stats().closed_by["reset_failed"] == 0

    async def test_the_host_budget_sees_its_socket(self, tmp_path: Any) -> None:
        # host_connection_limit waits for the server's EOF on a duplicate of it
        # before a slot comes back: a connection whose socket is unknown would
        # give its slot back while MariaDB still lists the session
        _needs(servers.MYSQL_URL, "asyncmy")
        import os
        import socket

        async with pool.Pool(ASYNCMY_URL, connection_limit=1) as db, db.acquire() as conn:
            fd = db._driver.socket_of(conn)  # type: ignore[attr-defined]
            assert fd >= 0
            with socket.socket(fileno=os.dup(fd)) as sock:
                assert sock.getpeername()[1] == urlsplit(servers.MYSQL_URL).port

    async def test_no_password_in_output(self, seen: Callable[[object], None]) -> None:
        _needs(servers.MYSQL_URL, "asyncmy")
        db: pool.Pool[Any] = pool.Pool(ASYNCMY_URL, connection_limit=1)
        seen(db)
        seen(db._driver)
        assert servers.SECRET not in repr(db) + repr(db._driver)
