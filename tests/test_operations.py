"""Operations, live and on real servers: resize(), drain() and rotating passwords.

The load is 100 tasks running queries the whole time; none of them may fail,
grants stay in FIFO order, and what the pool says is checked on the server
(pg_stat_activity by a unique application_name; MariaDB's own password check).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiomysql
import anyio
import asyncpg
import pytest
import pytest_asyncio

import pool
from tests import servers
from tests.conftest import SEEN
from tests.targets import eventually

pytestmark = pytest.mark.asyncio

TASKS = 100


@dataclass
class Load:
    """100 tasks querying through ``db`` until stopped; FIFO checked on every grant."""

    db: pool.Pool[Any]
    queries: int = 0
    failures: list[BaseException] = field(default_factory=list)
    out_of_order: int = 0
    pids: set[int] = field(default_factory=set)
    _tickets: itertools.count[int] = field(default_factory=itertools.count)
    _waiting: dict[int, None] = field(default_factory=dict)  # tickets, oldest first
    _stop: anyio.Event = field(default_factory=anyio.Event)

    async def _task(self) -> None:
        while not self._stop.is_set():
            # The ticket is taken just before the acquire, which joins the queue
            # with no await in between: ticket order is queue order.
            ticket = next(self._tickets)
            self._waiting[ticket] = None
            try:
                async with self.db.acquire() as conn:
                    if next(iter(self._waiting)) != ticket:
                        self.out_of_order += 1  # an older ticket still waits
                    del self._waiting[ticket]
                    self.pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
                    await conn.execute("SELECT pg_sleep(0.002)")
                self.queries += 1
            except Exception as exc:  # pragma: no cover - the assertion shows it
                self._waiting.pop(ticket, None)
                self.failures.append(exc)
            await anyio.sleep(0)

    async def run(self, during: Callable[[], Any]) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(TASKS):
                tg.start_soon(self._task)
            try:
                await during()
            finally:
                self._stop.set()


@pytest_asyncio.fixture
async def pg() -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A URL with a unique application_name, and an admin connection to count its sessions."""
    servers.require(servers.POSTGRES_URL, "PostgreSQL")
    tag = f"pooltest_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(servers.POSTGRES_URL)
    try:
        yield f"{servers.POSTGRES_URL}?application_name={tag}", admin
    finally:
        await admin.close()


async def server_pids(admin: asyncpg.Connection, url: str) -> set[int]:
    tag = url.rpartition("application_name=")[2]
    rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", tag)
    return {int(r["pid"]) for r in rows}


async def test_resize_under_load_follows_the_limit_on_the_server(
    pg: tuple[str, asyncpg.Connection], seen: Callable[[object], None]
) -> None:
    url, admin = pg
    db: pool.Pool[Any] = pool.Pool(url, connection_limit=10, pool_timeout=60)
    seen(db)
    load = Load(db)

    async def settles(limit: int) -> None:
        async def there() -> bool:
            return db.stats().size == limit and len(await server_pids(admin, url)) == limit

        # The surplus goes as it is returned (each holds it for one short query),
        # and the server lets a closed session go a moment later.
        assert await eventually(there, timeout=5), (limit, db.stats())

    async def during() -> None:
        await settles(10)
        for limit in (2, 20, 5):
            await db.resize(limit)
            assert db.stats().limit == limit
            await settles(limit)
            seen(db.stats())
        await anyio.sleep(0.2)

    try:
        await load.run(during)
        stats = db.stats()
    finally:
        await db.disconnect()
    assert not load.failures, load.failures[:3]
    assert load.out_of_order == 0
    assert load.queries > TASKS
    # exactly the surplus closed: 10 -> 2 closes 8, 20 -> 5 closes 15; 10 + 18 opened
    assert stats.closed_by["resize"] == 8 + 15, stats
    assert stats.opened == 10 + 18, stats
    assert stats.closed == stats.closed_by["resize"]
    assert stats.connect_failures == 0


async def test_drain_under_load_replaces_every_backend(
    pg: tuple[str, asyncpg.Connection], seen: Callable[[object], None]
) -> None:
    url, admin = pg
    db: pool.Pool[Any] = pool.Pool(url, connection_limit=10, pool_timeout=60)
    seen(db)
    load = Load(db)
    before: set[int] = set()

    async def during() -> None:
        nonlocal before
        assert await eventually(lambda: _count_is(admin, url, 10), timeout=5)
        before = await server_pids(admin, url)
        queries = load.queries
        await db.drain()
        # the load goes on: the old connections close as they come back
        assert await eventually(
            lambda: _gone(admin, url, before, 10), timeout=5
        ), (before, db.stats())
        assert load.queries > queries

    try:
        await load.run(during)
        stats = db.stats()
        after = await server_pids(admin, url)
    finally:
        await db.disconnect()
    assert len(before) == 10
    assert not (before & after)  # every backend seen before the drain is gone
    assert not load.failures, load.failures[:3]
    assert load.out_of_order == 0
    assert stats.closed_by["drain"] == 10, stats
    assert stats.closed == 10 and stats.opened == 20


async def _count_is(admin: asyncpg.Connection, url: str, n: int) -> bool:
    return len(await server_pids(admin, url)) == n


async def _gone(admin: asyncpg.Connection, url: str, old: set[int], n: int) -> bool:
    now = await server_pids(admin, url)
    return not (now & old) and len(now) == n


async def test_drain_and_resize_on_an_idle_and_a_closed_pool(
    pg: tuple[str, asyncpg.Connection],
) -> None:
    url, admin = pg
    db: pool.Pool[Any] = pool.Pool(url, connection_limit=3)
    await db.drain()  # never opened: nothing to do
    await db.resize(4)
    async with db:
        conns = [await db.acquire() for _ in range(3)]
        for conn in conns:
            await db.release(conn)
        await db.drain()
        assert db.stats().size == 0 and db.stats().closed_by["drain"] == 3
        assert await eventually(lambda: _count_is(admin, url, 0))
        assert await db.fetchval("SELECT 1") == 1
        with pytest.raises(pool.ConfigError):
            await db.resize(0)


# ---------------------------------------------------------------------- rotating passwords


@pytest_asyncio.fixture
async def mysql_user() -> AsyncIterator[tuple[str, Any]]:
    """A MariaDB user of its own, and a root connection that sets its password."""
    servers.require(servers.MYSQL_ADMIN_URL, "MariaDB")
    admin_url = urlsplit(servers.MYSQL_ADMIN_URL)
    admin = await aiomysql.connect(
        host=admin_url.hostname, port=admin_url.port or 3306, user=admin_url.username,
        password=admin_url.password or "", db="test", autocommit=True,
    )
    user = f"rot_{uuid.uuid4().hex[:10]}"
    async with admin.cursor() as cur:
        await cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'Initial-{uuid.uuid4().hex}'")
        await cur.execute(f"GRANT SELECT ON test.* TO '{user}'@'%'")
    try:
        yield user, admin
    finally:
        async with admin.cursor() as cur:
            await cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        admin.close()


def mysql_url(user: str) -> str:
    host = urlsplit(servers.MYSQL_URL)
    return f"mysql://{user}@{host.hostname}:{host.port or 3306}/test"


async def set_password(admin: Any, user: str, password: str) -> None:
    async with admin.cursor() as cur:
        await cur.execute(f"ALTER USER '{user}'@'%%' IDENTIFIED BY %s", (password,))


async def thread_id(db: pool.Pool[Any]) -> int:
    return int(await db.fetchval("SELECT CONNECTION_ID()"))


async def logs_in(user: str, password: str) -> bool:
    host = urlsplit(servers.MYSQL_URL)
    try:
        conn = await aiomysql.connect(
            host=host.hostname, port=host.port or 3306, user=user, password=password, db="test"
        )
    except Exception:
        return False
    conn.close()
    return True


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
async def test_a_rotating_password_provider(
    mysql_user: tuple[str, Any], seen: Callable[[object], None], driver: str
) -> None:
    user, admin = mysql_user
    issued: list[str] = []

    async def provider() -> str:
        # like an IAM token: a new one for every connect, and the old one stops working
        password = f"Rot-{uuid.uuid4().hex}-{len(issued)}"
        await set_password(admin, user, password)
        issued.append(password)
        return password

    url = servers.with_driver(mysql_url(user), driver)
    db: pool.Pool[Any] = pool.Pool(url, connection_limit=3, password=provider)
    try:
        held = [await db.acquire() for _ in range(3)]
        assert len(issued) == 3  # one per connect, each newer than the last
        assert not await logs_in(user, issued[0])  # the first password is dead...
        for conn in held:  # ...but the connections that logged in with it keep working
            async with conn.cursor() as cur:
                await cur.execute("SELECT 1")
                assert (await cur.fetchone())[0] == 1
        old = {int(conn.thread_id()) for conn in held}
        for conn in held:
            await db.release(conn)

        await db.drain()  # replace them: the new ones log in with the newest password
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(db.fetchval, "SELECT SLEEP(0.05)")
        new = {int(rec.raw.thread_id()) for rec in db._ledger.idle}
        assert new and not (new & old)
        assert len(issued) == db.stats().opened  # asked once per connect
        assert await logs_in(user, issued[-1])
        stats = db.stats()
        assert stats.closed_by["drain"] == 3 and stats.connect_failures == 0
        shown = [repr(db), str(db), repr(stats), repr(db.config), repr(db._driver)]
    finally:
        await db.disconnect()
    for text in shown:
        seen(text)
    assert not [p for p in issued for text in (*shown, *SEEN) if p in text]


async def test_a_wrong_password_is_a_connect_error(
    mysql_user: tuple[str, Any], seen: Callable[[object], None]
) -> None:
    user, _ = mysql_user
    wrong = f"Wrong-{uuid.uuid4().hex}"

    async def provider() -> str:
        return wrong

    db: pool.Pool[Any] = pool.Pool(mysql_url(user), password=provider, connect_timeout=5)
    try:
        with pytest.raises(pool.ConnectError) as info:
            await db.fetchval("SELECT 1")
        stats = db.stats()
    finally:
        await db.disconnect()
    assert stats.connect_failures == 1
    texts = [str(info.value), repr(info.value), str(info.value.__cause__), repr(db), repr(stats)]
    for text in texts:
        seen(text)
    assert not [t for t in (*texts, *SEEN) if wrong in t]


async def test_a_sync_callable_and_a_plain_string(
    mysql_user: tuple[str, Any], seen: Callable[[object], None]
) -> None:
    user, admin = mysql_user
    password = f"Plain-{uuid.uuid4().hex}"
    await set_password(admin, user, password)
    calls = 0

    def provider() -> str:
        nonlocal calls
        calls += 1
        return password

    for given in (provider, password):
        db: pool.Pool[Any] = pool.Pool(mysql_url(user), connection_limit=2, password=given)
        seen(db)
        try:
            assert await thread_id(db) > 0
            assert password not in repr(db) and password not in repr(db.stats())
        finally:
            await db.disconnect()
    assert calls == 1
    with pytest.raises(pool.ConfigError) as info:
        pool.Pool(mysql_url(user), password=42)  # type: ignore[arg-type]
    seen(info.value)
    assert not [t for t in SEEN if password in t]


# ---------------------------------------------------------------------- Replicated


async def test_replicated_resizes_and_drains_every_member(
    pg: tuple[str, asyncpg.Connection],
) -> None:
    url, admin = pg
    replica_url = url.replace("application_name=", "application_name=r")
    rp = pool.Replicated(url, replicas=[replica_url], connection_limit=4)
    async with rp:
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(rp.fetchval, "SELECT pg_sleep(0.02)")
                tg.start_soon(rp.execute, "SELECT pg_sleep(0.02)")
        await rp.resize(2)
        stats = rp.stats()
        for member in (stats.primary, *stats.replicas):
            assert member.limit == 2 and member.size <= 2
        before = await server_pids(admin, url) | await server_pids(admin, replica_url)
        await rp.drain()
        stats = rp.stats()
        assert all(m.size == 0 for m in (stats.primary, *stats.replicas))
        assert stats.primary.closed_by["drain"] > 0 and stats.replicas[0].closed_by["drain"] > 0
        assert await rp.fetchval("SELECT 1") == 1 and await rp.execute("SELECT 1")

        async def old_gone() -> bool:
            now = await server_pids(admin, url) | await server_pids(admin, replica_url)
            return not (now & before)

        assert await eventually(old_gone)
        with pytest.raises(pool.ConfigError):
            await rp.resize(-1)
