"""Idle connections, upkeep, a server restart and 100 concurrent acquires at once.

The interleaving that once lent one connection to two tasks needed exactly
this: idle connections being checked, the upkeep closing expired ones, and
connections dying under both. Each holder writes its own token into a session
variable of the connection it holds and reads it back after an await: if
another task held the same connection meanwhile, the value it reads is not
its own. Afterwards the server's count of the pool's sessions equals ``size``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

import pool
from tests.faults.conftest import FaultDB, new_tag
from tests.faults.helpers import Admin, is_driver_error

pytestmark = pytest.mark.anyio

TASKS = 100


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg is asyncio only


class TestNoConnectionLentTwice:
    async def test_restart_under_upkeep_and_a_hundred_acquires(
        self, faultdb: FaultDB, seen: Callable[[object], None]
    ) -> None:
        tag = new_tag()
        db: pool.Pool[Any] = pool.Pool(
            faultdb.pool_url(tag),
            connection_limit=10,
            pool_timeout=10,
            # every idle connection is checked before it is lent, and the upkeep
            # runs every 50 ms closing the ones past their (short) idle lifetime
            health_check_after=0,
            max_idle_connection_lifetime=0.2,
        )
        seen(db)
        mixups: list[str] = []
        failures: list[BaseException] = []
        served = 0

        async def one(token: str) -> None:
            nonlocal served
            try:
                async with db.acquire() as conn:
                    await conn.execute("SELECT set_config('pool_test.holder', $1, false)", token)
                    await anyio.sleep(0.001)  # let every other task run
                    back = await conn.fetchval("SELECT current_setting('pool_test.holder')")
                    if back != token:
                        mixups.append(f"{token} read back {back}")
                served += 1
            except pool.PoolTimeoutError as exc:  # never: that would be a wedged pool
                failures.append(exc)
                raise
            except Exception as exc:  # the restart's own casualties
                assert isinstance(exc, pool.ConnectError) or is_driver_error(exc), exc
                seen(exc)

        try:
            for round_ in range(3):
                # idle connections, some about to expire
                async with anyio.create_task_group() as tg:
                    for i in range(TASKS):
                        tg.start_soon(one, f"warm-{round_}-{i}")
                await anyio.sleep(0.15)
                async with anyio.create_task_group() as tg:
                    for i in range(TASKS):
                        tg.start_soon(one, f"storm-{round_}-{i}")
                    # the server goes away while the storm is on, and comes back
                    await anyio.sleep(0.01)
                    await anyio.to_thread.run_sync(faultdb.stop)
                    await anyio.to_thread.run_sync(faultdb.start)
                async with anyio.create_task_group() as tg:
                    for i in range(TASKS):
                        tg.start_soon(one, f"after-{round_}-{i}")
        finally:
            if not faultdb.is_running():
                faultdb.start()

        assert not mixups, mixups[:5]
        assert not failures, failures[:1]
        assert served >= 3 * 2 * TASKS  # the warm and after rounds all succeed
        async with Admin.connect(faultdb, tag) as admin:
            s = db.stats()
            seen(s)
            assert (s.in_use, s.waiting, s.opening) == (0, 0, 0), s
            assert await admin.settles_at(s.size), (await admin.count(), s)
            await db.disconnect()
            assert await admin.settles_at(0)
