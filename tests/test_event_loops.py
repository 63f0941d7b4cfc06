"""One pool, many event loops: a CLI's asyncio.run per command, a test's loop per test.

A pool opened on one loop and used from another drops the old loop's
connections and reopens on the new one; with connections still lent on
another running loop it refuses with a PoolError. On trio, a driver that
needs asyncio is a ConfigError at first use.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import pool
from tests.fakedriver import FakeDriver
from tests.servers import MYSQL_URL, POSTGRES_URL, require

REPO = Path(__file__).resolve().parent.parent

# One shared pool for the pytest-asyncio tests below, each on a loop of its own.
_SQLITE_URL = "sqlite:///:memory:?connection_limit=2"


def _run_script(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


class TestSuccessiveAsyncioRuns:
    @pytest.mark.parametrize(
        "url",
        [
            pytest.param(POSTGRES_URL, id="postgres"),
            pytest.param(MYSQL_URL, id="mysql"),
            pytest.param("sqlite:///:memory:", id="sqlite"),
        ],
    )
    def test_one_shared_pool_under_three_asyncio_runs(self, url: str) -> None:
        if not url.startswith("sqlite"):
            require(url, url.split(":", 1)[0])
        done = _run_script(
            f"""
            import asyncio, pool
            db = pool.shared({url!r})

            async def command(i):
                async with db.acquire():
                    pass
                assert await db.fetchval("SELECT 1") == 1
                async with db.transaction() as conn:
                    pass
                print("ok", i, db.stats().in_use, flush=True)

            for i in range(3):
                asyncio.run(command(i))
            """
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["ok", "0", "0", "ok", "1", "0", "ok", "2", "0"]
        # no "Task was destroyed", no "Event loop is closed", no warning at all
        assert done.stderr == "", done.stderr


@pytest.mark.asyncio
class TestPytestAsyncioLoopPerTest:
    """pytest-asyncio gives each test a new loop; a module-level pool follows."""

    async def test_first(self) -> None:
        assert await pool.shared(_SQLITE_URL).fetchval("SELECT 1") == 1

    async def test_second(self) -> None:
        assert await pool.shared(_SQLITE_URL).fetchval("SELECT 2") == 2

    async def test_third(self) -> None:
        db = pool.shared(_SQLITE_URL)
        async with db.acquire() as conn:
            assert await conn.fetchval("SELECT 3") == 3


class TestLentOnAnotherLoop:
    def test_a_connection_still_lent_on_a_running_loop_refuses_with_a_pool_error(self) -> None:
        db: pool.Pool[Any] = pool.Pool("fake://x", driver=FakeDriver())
        holding = threading.Event()
        let_go = threading.Event()

        def other_thread() -> None:
            async def hold() -> None:
                conn = await db.acquire()
                holding.set()
                while not let_go.is_set():
                    await asyncio.sleep(0.001)
                await db.release(conn)
                await db.disconnect()

            asyncio.run(hold())

        thread = threading.Thread(target=other_thread)
        thread.start()
        try:
            assert holding.wait(10)

            async def here() -> None:
                with pytest.raises(pool.PoolError, match="another running event loop"):
                    await db.acquire()

            asyncio.run(here())
        finally:
            let_go.set()
            thread.join(10)


class TestBrokenConnections:
    @pytest.mark.anyio
    async def test_a_connection_that_failed_for_an_unknown_reason_is_closed(self) -> None:
        driver = FakeDriver()
        db: pool.Pool[Any] = pool.Pool("fake://x", driver=driver)

        async def wrong_loop(conn: Any, sql: str, args: Any) -> Any:
            raise RuntimeError("Task got Future attached to a different loop")

        driver.fetchval = wrong_loop  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await db.fetchval("SELECT 1")
        s = db.stats()
        assert (s.idle, s.closed) == (0, 1), s
        await db.disconnect()


class TestTrio:
    @pytest.mark.parametrize("url", [POSTGRES_URL, MYSQL_URL], ids=["postgres", "mysql"])
    def test_a_driver_that_needs_asyncio_is_a_config_error_on_trio(self, url: str) -> None:
        db: pool.Pool[Any] = pool.Pool(url)

        async def main() -> None:
            for _ in range(2):  # the second time too: the breaker never opened
                with pytest.raises(pool.ConfigError, match="sqlite://") as info:
                    await db.fetchval("SELECT 1")
                assert "trio" in str(info.value)
            assert db.stats().size == 0

        anyio.run(main, backend="trio")
