"""Memory: a million acquire/release cycles and 100,000 timed-out waiters leave no trace.

On the deterministic driver (asyncio), resident memory after ``gc.collect()`` is
compared with a warmed-up baseline; growth must stay under 20 MiB. The pool's
bookkeeping must be back to empty as well.
"""

from __future__ import annotations

import gc
import time

import anyio
import psutil
import pytest

import pool
from tests.fakedriver import FakeConnection, FakeDriver

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
GROWTH_BOUND = 20 * MiB


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def make(limit: int) -> pool.Pool[FakeConnection]:
    return pool.Pool("fake://memory", driver=FakeDriver(), connection_limit=limit)


class TestMemory:
    async def test_a_million_acquire_release_cycles(self) -> None:
        db = make(limit=4)
        try:
            for _ in range(50_000):  # warm up: caches, free lists, the first connection
                async with db.acquire():
                    pass
            baseline = rss()
            started = time.monotonic()
            for _ in range(1_000_000):
                async with db.acquire():
                    pass
            elapsed = time.monotonic() - started
            growth = rss() - baseline
            s = db.stats()
            print(
                f"\nmemory: 1,000,000 acquire/release cycles in {elapsed:.1f}s "
                f"({elapsed:.1f} us each); RSS {baseline / MiB:.1f} MiB -> "
                f"{(baseline + growth) / MiB:.1f} MiB ({growth / MiB:+.2f} MiB)"
            )
            assert growth < GROWTH_BOUND
            assert elapsed < 20
            assert (s.in_use, s.waiting, s.opening, s.size) == (0, 0, 0, 1), s
            assert s.acquired == 1_050_000
        finally:
            await db.disconnect()

    async def test_a_hundred_thousand_timed_out_waiters(self) -> None:
        db = make(limit=1)
        batch, batches = 1000, 100

        async def wait_in_vain() -> None:
            try:
                await db.acquire(timeout=0.001)
            except pool.PoolTimeoutError:
                return
            raise AssertionError("served by a pool whose only connection is held")

        async def one_batch() -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(batch):
                    tg.start_soon(wait_in_vain)

        try:
            held = await db.acquire()
            for _ in range(10):  # warm up
                await one_batch()
            baseline = rss()
            started = time.monotonic()
            for _ in range(batches):
                await one_batch()
            elapsed = time.monotonic() - started
            growth = rss() - baseline
            s = db.stats()
            print(
                f"\nmemory: {batch * batches:,} timed-out waiters in {elapsed:.1f}s; RSS "
                f"{baseline / MiB:.1f} MiB -> {(baseline + growth) / MiB:.1f} MiB "
                f"({growth / MiB:+.2f} MiB)"
            )
            assert growth < GROWTH_BOUND
            assert s.timeouts == batch * (batches + 10)
            assert (s.in_use, s.waiting, s.opening, s.size) == (1, 0, 0, 1), s
            await db.release(held)
        finally:
            await db.disconnect()
