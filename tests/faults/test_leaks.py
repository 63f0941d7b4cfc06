"""Leak diagnosis: a connection that is never given back is traced to its holder.

A task named "leaky-task" takes the pool's only connection and never releases
it. Within ``leak_detection_threshold`` (inside ``async with db:``) a WARNING
names the task and the file:line of its acquire; the next caller's
PoolTimeoutError names them too, in its message and in ``.holders``. On the
deterministic driver (asyncio and trio) and on the throwaway PostgreSQL.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import pool
from tests.fakedriver import FakeDriver
from tests.faults.conftest import new_tag

pytestmark = pytest.mark.anyio


@pytest.fixture
def make_pool(request: pytest.FixtureRequest, where: str) -> Callable[..., pool.Pool[Any]]:
    if where == "postgres":
        url = request.getfixturevalue("faultdb").pool_url(new_tag())
        return lambda **overrides: pool.Pool(url, **overrides)
    return lambda **overrides: pool.Pool("fake://leaks", driver=FakeDriver(), **overrides)


class TestLeakDiagnosis:
    @pytest.mark.parametrize(
        ("anyio_backend", "where"),
        [("asyncio", "fake"), ("trio", "fake"), ("asyncio", "postgres")],
    )
    async def test_the_warning_and_the_timeout_name_the_task_and_its_acquire(
        self,
        make_pool: Callable[..., pool.Pool[Any]],
        caplog: pytest.LogCaptureFixture,
        seen: Callable[[object], None],
    ) -> None:
        caplog.set_level(logging.WARNING, logger="pool")
        db = make_pool(connection_limit=1, pool_timeout=0.3, leak_detection_threshold=0.2)
        seen(db)
        sites: list[str] = []
        taken = anyio.Event()

        async def leaky() -> None:
            sites.append(f"{__file__}:{sys._getframe().f_lineno + 1}")
            await db.acquire()  # never released
            taken.set()
            await anyio.sleep_forever()

        def leak_warnings() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "Possible connection leak" in r.getMessage()]

        async with db, anyio.create_task_group() as tg:
            tg.start_soon(leaky, name="leaky-task")
            await taken.wait()
            (site,) = sites
            assert not leak_warnings()  # not before the threshold
            with anyio.fail_after(3):  # maintenance runs every 50 ms here
                while not leak_warnings():
                    await anyio.sleep(0.02)
            (warning,) = leak_warnings()
            assert warning.levelno == logging.WARNING
            message = warning.getMessage()
            assert "leaky-task" in message
            assert message.endswith(f"acquired at {site}"), message

            with pytest.raises(pool.PoolTimeoutError) as info:
                await db.acquire()
            err = info.value
            seen(err)
            assert f"leaky-task at {site}, held for" in str(err)
            holder = err.holders[0]
            assert holder.task == "leaky-task"
            assert holder.call_site == site
            assert holder.held_for >= 0.2
            assert (err.in_use, err.waiting) == (1, 0)
            tg.cancel_scope.cancel()
        assert len(leak_warnings()) == 1  # one WARNING per leak, not one per tick
