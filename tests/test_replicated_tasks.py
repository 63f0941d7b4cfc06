"""A Replicated transaction's connection belongs to the task that opened it, while it is open.

Tasks started inside ``async with rp.transaction()`` inherit its context. They
must never run on the transaction's connection: not at once with the owner
(asyncpg: "another operation is in progress"), and not after the block, when
that connection is back in the pool and lent to someone else. While the block
is open such a task is refused with a PoolError (a read routed elsewhere would
silently miss the transaction's writes); after it, the task routes normally.

On PostgreSQL (the primary on 5432, its streaming replica on 5433) on asyncio
and uvloop; on SQLite (two files standing for primary and replica) on asyncio
and trio, the path Replicated has on trio.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

import pool
from tests import servers


@pytest.fixture
async def table() -> AsyncIterator[str]:
    servers.require(servers.POSTGRES_URL, "PostgreSQL")
    servers.require(servers.REPLICA_URL, "the PostgreSQL replica")
    name = f"rept_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(servers.POSTGRES_URL)
    await admin.execute(f"CREATE TABLE {name} (v int)")
    try:
        yield name
    finally:
        await admin.execute(f"DROP TABLE {name}")
        await admin.close()


def replicated(seen: Callable[[object], None], **kwargs: Any) -> pool.Replicated:
    kwargs.setdefault("connection_limit", 3)
    rp = pool.Replicated(servers.POSTGRES_URL, replicas=[servers.REPLICA_URL], **kwargs)
    seen(rp)
    return rp


@pytest.mark.anyio
class TestPostgres:
    @pytest.fixture(
        params=[
            pytest.param(("asyncio", {}), id="asyncio"),
            pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        ]
    )
    def anyio_backend(self, request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
        if request.param[1]:
            pytest.importorskip("uvloop")
        return request.param  # type: ignore[no-any-return]

    async def test_reads_gathered_inside_a_transaction_are_refused_not_interleaved(
        self, table: str, seen: Callable[[object], None]
    ) -> None:
        async with replicated(seen) as rp:
            async with rp.transaction() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                results = await asyncio.gather(
                    rp.fetchval("SELECT pg_sleep(0.2)"),
                    rp.fetchval(f"SELECT count(*) FROM {table}"),
                    return_exceptions=True,
                )
                # both, not just the second to arrive: gather runs each in a task
                assert [type(r) for r in results] == [pool.PoolError] * 2, results
                for result in results:
                    assert "another task" in str(result)
                    seen(result)
                # the connection was never touched by them: the owner reads on
                # it at once, and still sees its own write
                assert await rp.fetchval(f"SELECT count(*) FROM {table}") == 1
            assert await rp.primary().fetchval(f"SELECT count(*) FROM {table}") == 1

    async def test_a_child_task_is_refused_every_call_while_the_block_is_open(
        self, table: str, seen: Callable[[object], None]
    ) -> None:
        refused: list[str] = []

        async def child(rp: pool.Replicated) -> None:
            calls: dict[str, Callable[[], Any]] = {
                "fetch": lambda: rp.fetch("SELECT 1"),
                "fetchrow": lambda: rp.fetchrow("SELECT 1"),
                "fetchval": lambda: rp.fetchval("SELECT 1"),
                "execute": lambda: rp.execute(f"INSERT INTO {table} VALUES (2)"),
            }
            for name, call in calls.items():
                with pytest.raises(pool.PoolError, match="another task"):
                    await call()
                refused.append(name)
            with pytest.raises(pool.PoolError, match="inside a transaction"):
                rp.replica()
            with pytest.raises(pool.PoolError, match="another task"):
                async with rp.transaction():
                    pass
            refused.append("transaction")

        async with replicated(seen) as rp:
            async with rp.transaction() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                async with anyio.create_task_group() as tg:
                    tg.start_soon(child, rp)
                assert await rp.fetchval(f"SELECT count(*) FROM {table}") == 1
            assert refused == ["fetch", "fetchrow", "fetchval", "execute", "transaction"]
            # the child's refused write did not happen, on any connection
            assert await rp.primary().fetchval(f"SELECT count(*) FROM {table}") == 1

    async def test_a_task_outliving_the_block_never_runs_on_its_connection(
        self, seen: Callable[[object], None]
    ) -> None:
        servers.require(servers.POSTGRES_URL, "PostgreSQL")
        servers.require(servers.REPLICA_URL, "the PostgreSQL replica")
        # one primary connection: after the block the main task holds the very
        # connection the transaction ran on
        async with replicated(seen, connection_limit=1) as rp:
            go = anyio.Event()
            seen_by_background: dict[str, Any] = {}

            async def background() -> None:
                await go.wait()
                seen_by_background["pid"] = await rp.fetchval("SELECT pg_backend_pid()")
                seen_by_background["replica"] = await rp.fetchval("SELECT pg_is_in_recovery()")

            async with anyio.create_task_group() as tg:
                async with rp.transaction() as conn:
                    tx_pid = await conn.fetchval("SELECT pg_backend_pid()")
                    tg.start_soon(background)
                async with rp.primary().acquire() as held:
                    assert await held.fetchval("SELECT pg_backend_pid()") == tx_pid
                    go.set()
                    await anyio.wait_all_tasks_blocked()
                    with anyio.fail_after(5):
                        while "replica" not in seen_by_background:
                            await anyio.sleep(0.01)
                    # and the holder's connection is still usable: nothing ran on it
                    assert await held.fetchval("SELECT 1") == 1
            # routed as any read outside a transaction: to the replica
            assert seen_by_background["replica"] is True
            assert seen_by_background["pid"] != tx_pid

    async def test_a_task_started_inside_may_open_its_own_transaction_after_it(
        self, table: str, seen: Callable[[object], None]
    ) -> None:
        async with replicated(seen) as rp:
            go = anyio.Event()
            pids: list[int] = []

            async def background() -> None:
                await go.wait()
                async with rp.transaction() as conn:
                    pids.append(await conn.fetchval("SELECT pg_backend_pid()"))
                    await rp.execute(f"INSERT INTO {table} VALUES (2)")
                    assert await rp.fetchval(f"SELECT count(*) FROM {table}") == 2

            async with anyio.create_task_group() as tg:
                async with rp.transaction() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
                    tg.start_soon(background)
                go.set()
            assert len(pids) == 1
            assert await rp.primary().fetchval(f"SELECT count(*) FROM {table}") == 2


def sqlite_member(path: Path, who: str) -> str:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE who (name text)")
        db.execute("INSERT INTO who VALUES (?)", (who,))
    db.close()
    return f"sqlite:///{path}"


@pytest.fixture
def sqlite_replicated(tmp_path: Path) -> pool.Replicated:
    return pool.Replicated(
        sqlite_member(tmp_path / "primary.db", "primary"),
        replicas=[sqlite_member(tmp_path / "replica.db", "replica")],
        connection_limit=1,
    )


@pytest.mark.anyio
class TestSQLite:
    async def test_a_child_task_is_refused_while_the_block_is_open(
        self, sqlite_replicated: pool.Replicated
    ) -> None:
        rp = sqlite_replicated
        errors: list[BaseException] = []

        async def child() -> None:
            try:
                await rp.fetchval("SELECT name FROM who")
            except pool.PoolError as exc:
                errors.append(exc)

        async with rp:
            async with rp.transaction():
                await rp.execute("UPDATE who SET name = 'primary, in the transaction'")
                async with anyio.create_task_group() as tg:
                    tg.start_soon(child)
                assert await rp.fetchval("SELECT name FROM who") == "primary, in the transaction"
            assert len(errors) == 1 and "another task" in str(errors[0])

    async def test_a_task_outliving_the_block_routes_normally(
        self, sqlite_replicated: pool.Replicated
    ) -> None:
        rp = sqlite_replicated
        go = anyio.Event()
        read: list[str] = []

        async def background() -> None:
            await go.wait()
            read.append(await rp.fetchval("SELECT name FROM who"))

        async with rp:
            async with anyio.create_task_group() as tg:
                async with rp.transaction():
                    assert await rp.fetchval("SELECT name FROM who") == "primary"
                    tg.start_soon(background)
                go.set()
            assert read == ["replica"]
            assert rp.stats().primary.in_use == 0
