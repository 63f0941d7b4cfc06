"""The server goes away for 3 s under load (stopped, or crashed), and comes back.

Twenty tasks loop over queries (pool_timeout=10) while the throwaway cluster is
stopped, left down for 3 s, and started again. While it is down, every call
fails fast with ConnectError (the circuit breaker), never by waiting out
pool_timeout; within a second of the server's return, queries succeed again;
and nothing leaks. It runs on each PostgreSQL driver; on psycopg the server
stays down for 1.5 s, which is still hundreds of calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

import pool
from tests.faults.conftest import FaultDB, new_tag
from tests.faults.helpers import Admin, is_driver_error

pytestmark = pytest.mark.anyio

TASKS = 20
#: how long the server stays down, on each driver
DOWN_FOR = {"asyncpg": 3.0, "psycopg": 1.5}
POOL_TIMEOUT = 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg and psycopg's async connections are asyncio only


@dataclass
class Call:
    started: float
    ended: float
    error: BaseException | None = None


class TestServerRestart:
    @pytest.mark.parametrize("how", ["stop", "crash"])
    async def test_down_for_three_seconds_fails_fast_and_recovers_within_a_second(
        self, faultdb: FaultDB, pg_driver: str, seen: Callable[[object], None], how: str
    ) -> None:
        tag = new_tag()
        url = faultdb.pool_url(tag, pg_driver)
        down_for = DOWN_FOR[pg_driver]
        db: pool.Pool[Any] = pool.Pool(url, connection_limit=5, pool_timeout=POOL_TIMEOUT)
        seen(db)
        calls: list[Call] = []

        async def worker(stop: anyio.Event) -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    assert await db.fetchval("SELECT 1") == 1
                except Exception as exc:
                    calls.append(Call(started, time.monotonic(), exc))
                    seen(exc)
                    # A client backs off a little before it retries (a failing
                    # call returns at once, and a loop without a pause would
                    # spin the event loop).
                    await anyio.sleep(0.01)
                else:
                    calls.append(Call(started, time.monotonic()))

        try:
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                for _ in range(TASKS):
                    tg.start_soon(worker, stop)
                await anyio.sleep(0.5)  # warm: the pool is full and busy
                stopping = time.monotonic()
                if how == "stop":  # a fast shutdown: sessions are told, then closed
                    await anyio.to_thread.run_sync(faultdb.stop)
                else:  # kill -9 of the postmaster: its backends exit when they notice
                    await anyio.to_thread.run_sync(faultdb.kill)
                    await anyio.to_thread.run_sync(faultdb.wait_until_gone)
                down = time.monotonic()
                await anyio.sleep(down_for)
                restarting = time.monotonic()
                await anyio.to_thread.run_sync(faultdb.start)
                up = time.monotonic()
                await anyio.sleep(1.5)
                stop.set()
        finally:
            if not faultdb.is_running():
                faultdb.start()

        errors = [c for c in calls if c.error is not None]
        kinds = sorted({type(c.error).__name__ for c in errors})
        timeouts = [c for c in errors if isinstance(c.error, pool.PoolTimeoutError)]
        assert not timeouts, f"a caller waited out pool_timeout: {timeouts[0].error}"
        # While the server is down, every call fails, and fails fast, with P1001.
        # (It may accept connections a moment before `faultdb start` returns.)
        outage = [c for c in calls if down <= c.started and c.ended <= restarting]
        assert len(outage) > 50
        for c in outage:
            assert isinstance(c.error, pool.ConnectError), f"in the outage: {c.error!r}"
            assert c.ended - c.started < 1.0, f"took {c.ended - c.started:.2f}s: {c.error}"
        assert any("failing fast" in str(c.error) for c in outage)
        # Those in flight as it stopped got the driver's error, or a ConnectError.
        for c in errors:
            assert c.ended >= stopping, f"failed before the outage: {c.error!r}"
            assert isinstance(c.error, pool.ConnectError) or is_driver_error(c.error), c.error
        # Back within a second of the server, and every call from then on succeeds.
        back = min(c.ended for c in calls if c.error is None and c.started >= up)
        recovery = back - up
        late = [c for c in calls if c.started >= up + 1.0]
        slowest = max(c.ended - c.started for c in outage)
        print(
            f"\nserver restart ({how}, {pg_driver}): down {down_for:.1f}s; {len(outage)} calls "
            f"failed fast in the outage (slowest {slowest * 1000:.0f} ms); "
            f"first success {recovery * 1000:.0f} ms after the server was back; "
            f"errors seen: {', '.join(kinds)}"
        )
        assert recovery < 1.0
        assert late and all(c.error is None for c in late)

        # No leak: the pool holds what the server sees.
        async with Admin.connect(faultdb, tag) as admin:
            s = db.stats()
            seen(s)
            assert (s.in_use, s.waiting, s.opening) == (0, 0, 0), s
            assert await admin.settles_at(s.size)
            await db.disconnect()
            assert await admin.settles_at(0)
