"""The private-API shortcuts fall back to the public calls, and lose nothing but speed.

Each shortcut is forced to fail the way a newer CPython or anyio would make it
fail (moved, renamed, answering something else); the pool must still run, and
still name the holder of a connection in its reports.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pool
from pool import _shims
from tests.fakedriver import FakeDriver


async def holder_name_in_timeout_error() -> str:
    db: pool.Pool[Any] = pool.Pool("fake://x", driver=FakeDriver(), connection_limit=1)
    conn = await db.acquire()
    try:
        with pytest.raises(pool.PoolTimeoutError) as info:
            await db.acquire(timeout=0.01)
        return info.value.holders[0].task
    finally:
        await db.release(conn)
        await db.disconnect()


class TestCurrentTask:
    @pytest.mark.anyio
    async def test_the_shortcut_answers_like_the_public_call(
        self, anyio_backend: str
    ) -> None:
        current = _shims.current_task_for(anyio_backend)
        if anyio_backend == "asyncio":
            assert current() is asyncio.current_task()
        else:
            import trio

            assert current() is trio.lowlevel.current_task()

    @pytest.mark.parametrize(
        "registry",
        [
            pytest.param(None, id="gone"),  # CPython 3.14 keeps the current task elsewhere
            pytest.param({}, id="empty"),  # present, but not where the loop keeps it
            pytest.param("not a dict", id="changed-type"),
        ],
    )
    def test_asyncio_falls_back_to_current_task(
        self, monkeypatch: pytest.MonkeyPatch, registry: object
    ) -> None:
        stand_in = SimpleNamespace()
        if registry is not None:
            stand_in._current_tasks = registry
        monkeypatch.setattr(_shims, "_asyncio_tasks", stand_in)

        async def main() -> None:
            assert _shims.current_task_for("asyncio") is asyncio.current_task
            task = asyncio.current_task()
            assert task is not None
            task.set_name("the-holder")
            assert await holder_name_in_timeout_error() == "the-holder"

        asyncio.run(main())


class TestCheckpointIfCancelled:
    @pytest.mark.parametrize("module", ["anyio.abc", "anyio._core._no_such_module"])
    def test_falls_back_to_the_public_call_when_the_backend_lookup_moved(
        self, monkeypatch: pytest.MonkeyPatch, module: str
    ) -> None:
        # a module that exists but no longer has get_async_backend, and one gone
        monkeypatch.setattr(_shims, "_anyio_eventloop_module", module)

        async def main() -> None:
            check = _shims.checkpoint_if_cancelled_for("asyncio")
            assert check is anyio.lowlevel.checkpoint_if_cancelled
            # and the pool still works through its slow path (a waiter is handed
            # a connection, then checks for a pending cancellation)
            db: pool.Pool[Any] = pool.Pool("fake://x", driver=FakeDriver(), connection_limit=1)
            conn = await db.acquire()
            async with anyio.create_task_group() as tg:
                got: list[Any] = []

                async def wait() -> None:
                    got.append(await db.acquire())

                tg.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                await db.release(conn)
            assert got == [conn]
            await db.release(conn)
            await db.disconnect()

        anyio.run(main)

    @pytest.mark.anyio
    async def test_the_shortcut_is_the_backends_own(self, anyio_backend: str) -> None:
        check = _shims.checkpoint_if_cancelled_for(anyio_backend)
        await check()  # runs, and raises nothing outside a cancelled scope
