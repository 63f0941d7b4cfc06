"""The private-API shortcuts fall back to the public calls, and lose nothing but speed.

Each shortcut is forced to fail the way a newer CPython or anyio would make it
fail (moved, renamed, answering something else); the pool must still run, and
still name the holder of a connection in its reports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
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


def current_task_for(library: str) -> Callable[[], object]:
    """The task the pool's loop runs now, asked as the fast acquire asks."""
    registry, key = _shims.task_registry_for(library)
    return lambda: registry.get(key)


class TestCurrentTask:
    @pytest.mark.anyio
    async def test_the_shortcut_answers_like_the_public_call(
        self, anyio_backend: str
    ) -> None:
        current = current_task_for(anyio_backend)
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
            assert current_task_for("asyncio")() is asyncio.current_task()
            task = asyncio.current_task()
            assert task is not None
            task.set_name("the-holder")
            # the fallback still tells which task holds it: here, the waiting task itself
            assert await holder_name_in_timeout_error() == "the-holder (the waiting task itself)"

        asyncio.run(main())


    @pytest.mark.parametrize("registry", ["kept", "gone"])
    def test_asyncio_asks_the_pools_loop_not_the_callers(
        self, monkeypatch: pytest.MonkeyPatch, registry: str
    ) -> None:
        # The fast acquire's loop test relies on it: from another event loop
        # (the pool's has ended), "the task the pool's loop runs now" is None.
        if registry == "gone":
            monkeypatch.setattr(_shims, "_asyncio_tasks", SimpleNamespace())
        found: list[object] = []

        async def first() -> Callable[[], object]:
            current = current_task_for("asyncio")
            found.append(current())
            return current

        current = asyncio.run(first())

        async def second() -> None:
            found.append(current())

        asyncio.run(second())
        assert found[0] is not None and found[1] is None

    def test_trio_answers_none_outside_a_trio_run(self) -> None:
        current = current_task_for("trio")

        async def main() -> None:
            assert current() is None  # an asyncio loop runs here, not trio

        assert current() is None
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


async def cancelled_handoff_passes_the_connection_on() -> None:
    """A waiter whose scope is cancelled as it is handed a connection passes it on."""
    db: pool.Pool[Any] = pool.Pool(
        "fake://x", driver=FakeDriver(), connection_limit=1, pool_timeout=2
    )
    conn = await db.acquire()
    got: list[Any] = []
    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def first() -> None:
            with scope:
                got.append(("first", await db.acquire()))

        async def second() -> None:
            got.append(("second", await db.acquire()))

        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        await db.release(conn)  # handed to "first", which has not run yet...
        scope.cancel()  # ...and is cancelled before it does
    assert got == [("second", conn)]
    assert db.stats().in_use == 1
    await db.release(conn)
    await db.disconnect()


class TestCancelPending:
    @pytest.mark.anyio
    async def test_the_shortcut_answers_like_the_public_call(self, anyio_backend: str) -> None:
        pending = _shims.cancel_pending_for(anyio_backend)
        task = current_task_for(anyio_backend)()
        assert pending(task) is False
        with anyio.CancelScope() as outer:
            with anyio.CancelScope(shield=True):
                outer.cancel()
                assert pending(task) is False  # a shield hides the outer cancel
            assert pending(task) is True
            assert anyio.current_effective_deadline() == float("-inf")
            await anyio.lowlevel.checkpoint()
        assert pending(task) is False

    def test_asyncio_uses_the_shortcut(self) -> None:
        async def main() -> None:
            async with anyio.create_task_group():  # an anyio-managed task
                assert _shims.cancel_pending_for("asyncio") is not _shims.public_cancel_pending

        anyio.run(main)

    @pytest.mark.parametrize("module", ["anyio.abc", "anyio._core._no_such_module"])
    def test_falls_back_to_the_public_call(
        self, monkeypatch: pytest.MonkeyPatch, module: str
    ) -> None:
        monkeypatch.setattr(_shims, "_anyio_asyncio_backend", module)

        async def main() -> None:
            assert _shims.cancel_pending_for("asyncio") is _shims.public_cancel_pending
            await cancelled_handoff_passes_the_connection_on()

        anyio.run(main)

    def test_a_task_state_of_another_shape_falls_back(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import anyio._backends._asyncio as backend

        monkeypatch.setattr(backend, "_task_states", SimpleNamespace(data="not a dict"))

        async def main() -> None:
            assert _shims.cancel_pending_for("asyncio") is _shims.public_cancel_pending

        asyncio.run(main())

    @pytest.mark.anyio
    async def test_a_cancelled_handoff_passes_the_connection_on(self) -> None:
        await cancelled_handoff_passes_the_connection_on()


class TestLoopClock:
    def test_asyncio_reads_the_monotonic_clock_directly(self) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            clock = _shims.loop_clock(loop)
            assert abs(clock() - loop.time()) < 0.5

        asyncio.run(main())

    def test_a_loop_with_its_own_clock_keeps_it(self) -> None:
        uvloop = pytest.importorskip("uvloop")

        async def main() -> None:
            loop = asyncio.get_running_loop()
            assert _shims.loop_clock(loop) == loop.time

        uvloop.run(main())
