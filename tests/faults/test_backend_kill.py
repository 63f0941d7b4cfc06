"""Backends killed under load: only the queries on a killed connection fail.

A hundred tasks share ten connections, asking each backend its pid; every 200 ms
for 5 s the server terminates half of the pool's backends. A query may fail only
if the backend it ran on was killed, and then with the driver's own error, never
one of the pool's. Afterwards the pool is at full health. It runs on each
PostgreSQL driver: for 5 s on asyncpg (the default), for 3 s on psycopg.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import pool
from tests.faults.conftest import FaultDB, backend_pid, new_tag
from tests.faults.helpers import Admin, is_driver_error

pytestmark = pytest.mark.anyio

LIMIT = 10
TASKS = 100
KILL_EVERY = 0.2
#: how long the killing goes on, on each driver
KILL_FOR = {"asyncpg": 5.0, "psycopg": 3.0}
# a backend younger than this is left alone: killing one mid-connect would fail
# the connect (a ConnectError, rightly), not a query
SPARE_YOUNGER_THAN = 0.05


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg and psycopg's async connections are asyncio only


class TestBackendKill:
    async def test_killing_half_the_pool_every_200ms_fails_only_the_killed_queries(
        self, faultdb: FaultDB, pg_driver: str, seen: Callable[[object], None]
    ) -> None:
        tag = new_tag()
        url = faultdb.pool_url(tag, pg_driver)
        kill_for = KILL_FOR[pg_driver]
        db: pool.Pool[Any] = pool.Pool(url, connection_limit=LIMIT, pool_timeout=10)
        seen(db)
        rng = random.Random(5)
        killed: set[int] = set()
        ok = 0
        failures: list[tuple[int | None, BaseException]] = []
        #: the backend each task's current query runs on, noted before the query starts
        running_on: dict[int, int] = {}
        fetchval = db._driver.fetchval

        async def noting_fetchval(conn: Any, sql: str, args: Any) -> Any:
            running_on[anyio.get_current_task().id] = backend_pid(conn)
            return await fetchval(conn, sql, args)

        db._driver.fetchval = noting_fetchval  # type: ignore[method-assign]
        sql = (
            "SELECT pg_backend_pid()",
            "SELECT pg_backend_pid() FROM pg_sleep(0.002)",
        )

        async def worker(n: int, stop: anyio.Event) -> None:
            nonlocal ok
            me = anyio.get_current_task().id
            i = 0
            while not stop.is_set():
                i += 1
                running_on.pop(me, None)
                try:
                    if (n + i) % 2:
                        pid = await db.fetchval(sql[i % 2])
                    else:
                        async with db.acquire() as conn:
                            pid = await db._driver.fetchval(conn, sql[i % 2], ())
                except Exception as exc:
                    failures.append((running_on.get(me), exc))
                    seen(exc)
                else:
                    assert pid == running_on[me]
                    ok += 1

        async def killer(admin: Admin) -> None:
            deadline = time.monotonic() + kill_for
            while time.monotonic() < deadline:
                await anyio.sleep(KILL_EVERY)
                pids = await admin.pids(older_than=SPARE_YOUNGER_THAN)
                victims = rng.sample(pids, len(pids) // 2)
                # noted before the kill: a query may fail as soon as it lands
                killed.update(victims)
                await admin.terminate(victims)

        async with Admin.connect(faultdb, tag) as admin:
            try:
                stop = anyio.Event()
                async with anyio.create_task_group() as tg:
                    for n in range(TASKS):
                        tg.start_soon(worker, n, stop)
                    await killer(admin)
                    stop.set()

                kinds = Counter(type(exc).__name__ for _, exc in failures)
                print(
                    f"\nbackend kill: {ok + len(failures)} queries, {len(failures)} failed "
                    f"({', '.join(f'{n} {k}' for k, n in kinds.most_common())}), "
                    f"{len(killed)} connections killed in {kill_for:.0f}s"
                )
                assert len(killed) >= 10 * kill_for  # 50 in 5 s
                assert ok > 200 * kill_for  # 1,000 in 5 s
                assert failures, "no query was running on a killed backend: kill harder"
                for pid, exc in failures:
                    assert not isinstance(exc, pool.PoolError), f"a pool error: {exc!r}"
                    assert is_driver_error(exc), f"not the driver's error: {exc!r}"
                    assert pid in killed, f"failed on backend {pid}, which was not killed: {exc!r}"
                # A connection that failed is closed, never lent again to fail twice.
                assert max(Counter(pid for pid, _ in failures).values()) == 1

                # Full health: once the killed backends are gone, the whole limit
                # is lent at once, and every connection answers.
                assert await admin.all_gone(sorted(killed))
                held = [await db.acquire() for _ in range(LIMIT)]
                pids = {
                    await db._driver.fetchval(conn, "SELECT pg_backend_pid()", ()) for conn in held
                }
                assert len(pids) == LIMIT and not pids & killed
                for conn in held:
                    await db.release(conn)
                s = db.stats()
                seen(s)
                assert (s.size, s.in_use, s.waiting, s.opening) == (LIMIT, 0, 0, 0), s
                assert await admin.settles_at(LIMIT)
            finally:
                await db.disconnect()
