"""Read replicas through pool.Replicated, on a real streaming replica (scripts/servers)."""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import pytest_asyncio

import pool
from tests import servers
from tests.targets import eventually

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parent.parent
# where scripts/servers keeps the replica (machine-wide: every checkout shares it)
REPLICA_DIR = Path(os.environ.get("POOL_SERVERS_DIR", "/var/lib/pool-test-servers")) / "replica"


def pg_ctl(*args: str) -> None:
    [binary] = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1:]
    subprocess.run(
        ["runuser", "-u", "postgres", "--", binary, "-D", str(REPLICA_DIR), *args],
        check=True, capture_output=True, timeout=60,
    )


@pytest_asyncio.fixture
async def table() -> AsyncIterator[str]:
    servers.require(servers.POSTGRES_URL, "PostgreSQL")
    servers.require(servers.REPLICA_URL, "the PostgreSQL replica")
    name = f"rep_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(servers.POSTGRES_URL)
    await admin.execute(f"CREATE TABLE {name} (v int)")
    try:
        yield name
    finally:
        await admin.execute(f"DROP TABLE {name}")
        await admin.close()


def replicated(seen: Callable[[object], None], **kwargs: Any) -> pool.Replicated:
    rp = pool.Replicated(
        servers.POSTGRES_URL, replicas=[servers.REPLICA_URL], connection_limit=3, **kwargs
    )
    seen(rp)
    return rp


class TestRouting:
    async def test_reads_go_to_the_replica(
        self, table: str, seen: Callable[[object], None]
    ) -> None:
        async with replicated(seen) as rp:
            assert await rp.fetchval("SELECT pg_is_in_recovery()") is True
            assert await rp.primary().fetchval("SELECT pg_is_in_recovery()") is False
            assert await rp.replica().fetchval("SELECT pg_is_in_recovery()") is True
            async with rp.acquire(readonly=True) as conn:
                assert await conn.fetchval("SELECT pg_is_in_recovery()") is True
            async with rp.acquire() as conn:
                assert await conn.fetchval("SELECT pg_is_in_recovery()") is False

    async def test_writes_land_on_the_primary_and_replicate(
        self, table: str, seen: Callable[[object], None]
    ) -> None:
        async with replicated(seen) as rp:
            await rp.execute(f"INSERT INTO {table} VALUES ($1)", 7)
            assert await rp.primary().fetchval(f"SELECT count(*) FROM {table}") == 1

            async def replicated_yet() -> bool:
                return await rp.fetchval(f"SELECT count(*) FROM {table}") == 1

            assert await eventually(replicated_yet, timeout=5)

    async def test_a_transaction_reads_its_own_writes(
        self, table: str, seen: Callable[[object], None]
    ) -> None:
        async with replicated(seen) as rp:
            async with rp.transaction() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                # reads through rp follow the transaction onto its connection
                assert await rp.fetchval(f"SELECT count(*) FROM {table}") == 1
                assert await rp.fetchval("SELECT pg_is_in_recovery()") is False
                with pytest.raises(pool.PoolError, match="inside a transaction"):
                    rp.replica()
            assert await rp.primary().fetchval(f"SELECT count(*) FROM {table}") == 1

    async def test_read_your_writes_keeps_reads_on_the_primary(
        self, table: str, seen: Callable[[object], None]
    ) -> None:
        async with replicated(seen, read_your_writes=30) as rp:
            assert await rp.fetchval("SELECT pg_is_in_recovery()") is True
            await rp.execute(f"INSERT INTO {table} VALUES (1)")
            assert await rp.fetchval("SELECT pg_is_in_recovery()") is False
            assert await rp.fetchval(f"SELECT count(*) FROM {table}") == 1

    async def test_round_robin_and_stats_cover_every_member(
        self, seen: Callable[[object], None]
    ) -> None:
        servers.require(servers.REPLICA_URL, "the PostgreSQL replica")
        rp = pool.Replicated(
            servers.POSTGRES_URL, replicas=[servers.REPLICA_URL, servers.REPLICA_URL],
            strategy="round_robin", connection_limit=2,
        )
        async with rp:
            for _ in range(4):
                await rp.fetchval("SELECT 1")
            stats = rp.stats()
            assert stats.primary.size == 1
            assert [s.acquired for s in stats.replicas] == [2 + 1, 2 + 1]  # + connect()
        assert rp.stats().primary.size == 0

    async def test_async_with_runs_every_members_maintenance(
        self, seen: Callable[[object], None]
    ) -> None:
        servers.require(servers.REPLICA_URL, "the PostgreSQL replica")
        async with replicated(seen, max_idle_connection_lifetime=0.2) as rp:
            await rp.fetchval("SELECT 1")
            await rp.execute("SELECT 1")
            assert rp.stats().primary.size == 1 and rp.stats().replicas[0].size == 1
            with anyio.fail_after(3):  # no calls: only the members' maintenance acts
                while rp.stats().primary.size or rp.stats().replicas[0].size:
                    await anyio.sleep(0.05)

    async def test_bad_arguments(self) -> None:
        with pytest.raises(pool.ConfigError):
            pool.Replicated(servers.POSTGRES_URL, replicas=servers.REPLICA_URL)
        with pytest.raises(pool.ConfigError):
            pool.Replicated(servers.POSTGRES_URL, replicas=[], strategy="fastest")
        with pytest.raises(pool.ConfigError):
            pool.Replicated(servers.POSTGRES_URL, replicas=[], read_your_writes=-1)


class TestFailover:
    async def test_a_stopped_replica_falls_back_to_the_primary_with_one_warning(
        self, table: str, caplog: pytest.LogCaptureFixture, seen: Callable[[object], None]
    ) -> None:
        caplog.set_level(logging.WARNING, logger="pool")
        rp = replicated(seen, connect_timeout=2)
        try:
            await rp.connect()
            await rp.replica().disconnect()  # its connections would die with it anyway
            pg_ctl("-m", "fast", "-w", "stop")
            for _ in range(5):
                assert await rp.fetchval("SELECT pg_is_in_recovery()") is False
            warnings = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
            assert len(warnings) == 1
            assert warnings[0].levelno == logging.WARNING
            assert "5433" in warnings[0].getMessage()
        finally:
            subprocess.run([str(REPO / "scripts" / "servers")], check=True, timeout=120)
            await rp.disconnect()
        with anyio.fail_after(10):
            rp2 = replicated(seen, replica_retry_after=0)
            async with rp2:
                assert await rp2.fetchval("SELECT pg_is_in_recovery()") is True
