"""asyncpg-shaped helpers on the pool itself: ``timeout=`` on each, and ``executemany``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio

import pool
from tests.servers import MYSQL_URL, POSTGRES_URL, require
from tests.test_drivers import LONG_QUERY

PLACEHOLDERS = {"postgres": ("$1", "$2"), "mysql": ("%s", "%s"), "sqlite": ("?", "?")}


@pytest_asyncio.fixture(params=["postgres", "mysql", "sqlite"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    name = request.param
    if name == "postgres":
        require(POSTGRES_URL, "PostgreSQL")
        url = POSTGRES_URL
    elif name == "mysql":
        require(MYSQL_URL, "MariaDB")
        url = MYSQL_URL
    else:
        url = f"sqlite:///{tmp_path / 'helpers.db'}"
    db: pool.Pool[Any] = pool.Pool(url, connection_limit=2)
    db.name = name  # type: ignore[attr-defined]  # the dialect, for the test
    try:
        yield db
    finally:
        await db.disconnect()


@pytest.mark.asyncio
class TestPoolHelpers:
    async def test_executemany_writes_a_thousand_rows(self, db: Any) -> None:
        table = f"helpers_{uuid.uuid4().hex[:8]}"
        p1, p2 = PLACEHOLDERS[db.name]
        await db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, label TEXT)")
        try:
            rows = [(i, f"row {i}") for i in range(1000)]
            await db.executemany(f"INSERT INTO {table} (id, label) VALUES ({p1}, {p2})", rows)
            assert await db.fetchval(f"SELECT COUNT(*) FROM {table}") == 1000
            assert db.stats().in_use == 0
        finally:
            await db.execute(f"DROP TABLE {table}")

    @pytest.mark.parametrize("method", ["fetch", "fetchrow", "fetchval", "execute"])
    async def test_timeout_cancels_a_long_query_with_the_drivers_timeout_error(
        self, db: Any, method: str
    ) -> None:
        with anyio.fail_after(10), pytest.raises(TimeoutError) as info:
            await getattr(db, method)(LONG_QUERY[db.name], timeout=0.2)
        assert not isinstance(info.value, pool.PoolTimeoutError)  # the query's, not ours
        # the pool is whole afterwards: nothing lent, and the next query runs
        assert db.stats().in_use == 0
        assert await db.fetchval("SELECT 1", timeout=5) == 1

    async def test_a_bad_timeout_is_a_config_error(self, db: Any) -> None:
        with pytest.raises(pool.ConfigError):
            await db.fetchval("SELECT 1", timeout=-1)
