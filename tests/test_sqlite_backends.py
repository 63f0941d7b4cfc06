"""The embedded default through the whole pool, on asyncio and on trio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import pool

pytestmark = pytest.mark.anyio


class TestEmbeddedDefault:
    async def test_queries_transactions_and_fifo_on_both_backends(self, tmp_path: Path) -> None:
        db: pool.Pool[Any] = pool.Pool(f"sqlite:///{tmp_path / 'app.db'}", connection_limit=2)
        async with db:
            await db.execute("CREATE TABLE t (v INTEGER)")
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO t VALUES (?)", 1)
            with pytest.raises(RuntimeError):
                async with db.transaction() as conn:
                    await conn.execute("INSERT INTO t VALUES (?)", 2)
                    raise RuntimeError("roll back")
            assert await db.fetchval("SELECT COUNT(*) FROM t") == 1

            # One connection free at a time: with two, two served waiters may resume
            # in either order (trio shuffles ready tasks on purpose), though they
            # were granted in order.
            order: list[int] = []
            a, b = await db.acquire(), await db.acquire()

            async def worker(i: int) -> None:
                async with db.acquire() as conn:
                    order.append(i)
                    await conn.fetchval("SELECT ?", i)

            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(worker, i)
                    await anyio.wait_all_tasks_blocked()
                await db.release(a)
            assert order == list(range(10))
            await db.release(b)
            with pytest.raises(pool.PoolTimeoutError):
                async with db.acquire(), db.acquire(), db.acquire(timeout=0.05):
                    pass
            s = db.stats()
            assert (s.in_use, s.waiting, s.size) == (0, 0, 2)
