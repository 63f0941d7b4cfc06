"""SQLite: a cancelled statement stops, one statement at a time, and no call goes unawaited.

Real sqlite3 files. Cancellation the asyncio way (``task.cancel()``,
``wait_for``, ``asyncio.timeout``) and through anyio and trio scopes, on
asyncio, uvloop and trio.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest

import pool
from pool_drivers.sqlite import UnawaitedCallError

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
#: how soon a cancelled statement must give its connection back
FREED_WITHIN = 0.5
#: rows of the long insert: several seconds of work here (about 4 s on the CI box)
LONG_ROWS = 3_000_000
LONG_INSERT = (
    "INSERT INTO t WITH RECURSIVE c(x) AS "
    f"(SELECT started() UNION ALL SELECT x + 1 FROM c WHERE x < {LONG_ROWS}) SELECT x FROM c"
)


class Signalling(sqlite3.Connection):
    """A sqlite3 connection with ``started()``: sets ``running`` when a statement calls it."""

    running = threading.Event()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.create_function("started", 0, self._started)

    @classmethod
    def _started(cls) -> int:
        cls.running.set()
        return 1


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[pool.Pool[Any]]:
    Signalling.running = threading.Event()
    db: pool.Pool[Any] = pool.Pool(
        f"sqlite:///{tmp_path / 'cancel.db'}",
        connection_limit=1,
        connect_args={"factory": Signalling},
    )
    await db.execute("CREATE TABLE t (v INTEGER)")
    try:
        yield db
    finally:
        await db.disconnect()


async def statement_running() -> None:
    """Until the long statement's worker thread is inside it."""
    await anyio.to_thread.run_sync(Signalling.running.wait)


async def check_freed(db: pool.Pool[Any], cancelled_at: float) -> None:
    """The next acquire gets the connection, usable, soon; the statement did not finish."""
    async with db.acquire() as conn:
        got = time.monotonic() - cancelled_at
        rows = await conn.fetchval("SELECT count(*) FROM t")
        usable = time.monotonic() - cancelled_at
    assert got < FREED_WITHIN, f"the connection came back {got:.2f}s after the cancellation"
    # A statement still running on it would hold this one up until it ended.
    assert usable < FREED_WITHIN, f"it took {usable:.2f}s to run SELECT on it"
    assert rows == 0, "the cancelled statement ran to completion: it was not interrupted"
    s = db.stats()
    assert (s.size, s.in_use, s.busy) == (1, 0, 0)


class TestCancelledStatementStops:
    """A cancelled long statement is interrupted, and its connection is free within 0.5 s."""

    @pytest.fixture(params=["asyncio", pytest.param(("asyncio", {"use_uvloop": True}), id="uv")])
    def anyio_backend(self, request: pytest.FixtureRequest) -> Any:
        return request.param

    async def test_task_cancel(self, db: pool.Pool[Any]) -> None:
        task = asyncio.create_task(db.execute(LONG_INSERT))
        await statement_running()
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await check_freed(db, cancelled_at)

    async def test_wait_for(self, db: pool.Pool[Any]) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(db.execute(LONG_INSERT), 0.05)
        await check_freed(db, time.monotonic())

    async def test_asyncio_timeout(self, db: pool.Pool[Any]) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await db.execute(LONG_INSERT)
        await check_freed(db, time.monotonic())

    async def test_anyio_move_on_after_on_a_held_connection(self, db: pool.Pool[Any]) -> None:
        async with db.acquire() as conn:
            started = time.monotonic()
            with anyio.move_on_after(0.05):
                await conn.execute(LONG_INSERT)
            returned = time.monotonic() - started
            assert returned < 0.05 + FREED_WITHIN, f"the cancelled call took {returned:.2f}s"
            # the holder's next call on the same connection runs at once
            assert await conn.fetchval("SELECT count(*) FROM t") == 0
        await check_freed(db, time.monotonic())


class TestCancelledStatementStopsOnTrio:
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "trio"

    async def test_trio_cancel_scope(self, db: pool.Pool[Any]) -> None:
        import trio

        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await db.execute(LONG_INSERT)  # unbounded: only the scope ends it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await statement_running()
            cancelled_at = time.monotonic()
            scope.cancel()
        assert time.monotonic() - cancelled_at < FREED_WITHIN, "the cancelled call hung"
        await check_freed(db, cancelled_at)

    async def test_trio_move_on_after(self, db: pool.Pool[Any]) -> None:
        import trio

        with trio.move_on_after(0.05):
            await db.execute(LONG_INSERT)
        await check_freed(db, time.monotonic())


# The crash: the holder is cancelled natively mid-statement, the next task is
# lent the connection, and disconnect() comes while a statement runs. Main lent
# the connection to the next task while the first statement still ran (two
# threads on one sqlite3 connection), and the close hit a running statement:
# a segmentation fault. The disconnect's moment is varied across runs (it is
# the timing under test, not an ordering of the test's own steps).
CRASH_SCENARIO = textwrap.dedent(
    """
    import asyncio, os, sqlite3, sys, tempfile, threading
    import pool

    DELAY = float(sys.argv[1])
    LONG = ("WITH RECURSIVE c(x) AS (SELECT started() UNION ALL SELECT x + 1 FROM c "
            "WHERE x < 5000000) SELECT count(*) FROM c")
    running = threading.Event()

    class Signalling(sqlite3.Connection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.create_function("started", 0, lambda: running.set() or 1)

    async def main(path):
        db = pool.Pool(f"sqlite:///{path}", connection_limit=1,
                       connect_args={"factory": Signalling})
        first = asyncio.create_task(db.fetchval(LONG))
        await asyncio.to_thread(running.wait)
        first.cancel()
        lent = asyncio.Event()

        async def next_holder():
            async with db.acquire() as conn:
                lent.set()
                await conn.fetchval(LONG)

        second = asyncio.create_task(next_holder())
        await lent.wait()
        await asyncio.sleep(DELAY)
        await db.disconnect()
        for task in (first, second):
            try:
                await task
            except BaseException:
                pass
        print("ran", first.cancelled())

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(main(os.path.join(d, "crash.db")))
    """
)


class TestNoCrash:
    def test_cancelled_holder_next_holder_then_disconnect_fifty_times(
        self, tmp_path: Path
    ) -> None:
        script = tmp_path / "crash_scenario.py"
        script.write_text(CRASH_SCENARIO)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
        delays = [0.0, 0.005, 0.01, 0.02, 0.05, 0.1]

        def run(i: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, str(script), str(delays[i % len(delays)])],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        with ThreadPoolExecutor(max_workers=4) as runner:
            results = list(runner.map(run, range(50)))
        crashed = [r for r in results if r.returncode != 0]
        assert not crashed, (
            f"{len(crashed)} of 50 runs failed; return codes "
            f"{sorted({r.returncode for r in crashed})}; first stderr:\n{crashed[0].stderr[-2000:]}"
        )
        assert all(r.stdout.strip() == "ran True" for r in results)


class TestUnawaitedCall:
    """A call made without ``await`` never runs, and is an error that names it."""

    async def test_in_a_transaction_the_commit_raises_and_rolls_back(
        self, db: pool.Pool[Any]
    ) -> None:
        with pytest.raises(UnawaitedCallError, match=r"conn\.execute\(.*without await"):
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO t VALUES (1)")
                conn.execute("INSERT INTO t VALUES (2)")  # type: ignore[unused-coroutine]
        assert await db.fetchval("SELECT count(*) FROM t") == 0
        s = db.stats()
        assert (s.size, s.in_use, s.busy) == (1, 0, 0)

    async def test_the_next_awaited_call_raises(self, db: pool.Pool[Any]) -> None:
        async with db.acquire() as conn:
            conn.execute("INSERT INTO t VALUES (1)")  # type: ignore[unused-coroutine]
            with pytest.raises(UnawaitedCallError, match=r"conn\.execute\(.*without await"):
                await conn.fetchval("SELECT 1")
            # said once: the connection goes on
            assert await conn.fetchval("SELECT count(*) FROM t") == 0

    async def test_the_release_raises_and_the_connection_goes_back(
        self, db: pool.Pool[Any]
    ) -> None:
        with pytest.raises(UnawaitedCallError, match=r"conn\.fetchval\(.*without await"):
            async with db.acquire() as conn:
                stale = conn.fetchval("SELECT 1")
        s = db.stats()
        assert (s.size, s.idle, s.in_use) == (1, 1, 0)
        async with db.acquire() as again:
            assert again is conn
            # the old holder's call, awaited now, does not run on the new lease
            with pytest.raises(sqlite3.ProgrammingError, match="went back to the pool"):
                await stale
            assert await again.fetchval("SELECT 2") == 2

    async def test_calls_awaited_later_in_order_are_fine(self, db: pool.Pool[Any]) -> None:
        async with db.acquire() as conn:
            first, second = conn.fetchval("SELECT 1"), conn.fetchval("SELECT 2")
            assert (await first, await second) == (1, 2)


class TestStillACoroutine:
    """What users do with coroutines keeps working, one statement at a time."""

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_create_task_gather_and_a_task_cancelled_before_it_ran(
        self, db: pool.Pool[Any]
    ) -> None:
        async with db.acquire() as conn:
            assert await asyncio.create_task(conn.fetchval("SELECT 1")) == 1
            assert await asyncio.gather(*(conn.fetchval("SELECT ?", i) for i in range(5))) == [
                0,
                1,
                2,
                3,
                4,
            ]
            never = asyncio.create_task(conn.fetchval("SELECT 1"))
            never.cancel()
            with pytest.raises(asyncio.CancelledError):
                await never
            assert await conn.fetchval("SELECT 3") == 3  # nothing left pending

    @pytest.mark.parametrize("anyio_backend", ["trio"])
    async def test_trio_start_soon(self, db: pool.Pool[Any]) -> None:
        async with db.acquire() as conn:
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(conn.execute, "INSERT INTO t VALUES (?)", i)
            assert await conn.fetchval("SELECT count(*) FROM t") == 3
