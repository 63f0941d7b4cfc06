"""One pool per process, start-up and shutdown, on a real PostgreSQL server."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio
from anyio import wait_all_tasks_blocked

import pool
from tests import servers
from tests.targets import Target, make_target

REPO = Path(__file__).resolve().parent.parent


@pytest_asyncio.fixture
async def pg(tmp_path: Path) -> AsyncIterator[Target]:
    target = make_target("postgres", tmp_path)
    await target.start()
    try:
        yield target
    finally:
        await target.stop()


def run_script(
    code: str, *, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run Python code in a fresh process; secrets go by environment, never argv."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )


@pytest.mark.asyncio
class TestOnePoolPerProcess:
    @pytest.mark.parametrize("builder", ["shared", "Pool"])
    async def test_reloading_the_module_twenty_times_under_load(
        self, pg: Target, tmp_path: Path, builder: str, caplog: pytest.LogCaptureFixture,
        seen: Callable[[object], None],
    ) -> None:
        limit = 3
        module_name = f"app_db_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{module_name}.py").write_text(
            f"import pool\nURL = {pg.url!r}\n"
            f"db = pool.{builder}(URL, connection_limit={limit})\n"
        )
        sys.path.insert(0, str(tmp_path))
        built: list[pool.Pool[Any]] = []
        try:
            module = importlib.import_module(module_name)
            built.append(module.db)
            peak = 0
            stop = anyio.Event()

            async def query() -> None:
                while not stop.is_set():
                    assert await module.db.fetchval("SELECT 1") == 1

            async def watch() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, await pg.server_count())
                    await anyio.sleep(0.005)

            caplog.set_level(logging.WARNING, logger="pool")
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                for _ in range(50):
                    tg.start_soon(query)
                for _ in range(20):
                    await anyio.sleep(0.02)  # let the load run on this module's pool
                    importlib.reload(pool)
                    module = importlib.reload(module)
                    built.append(module.db)
                await anyio.sleep(0.05)
                stop.set()
            peak = max(peak, await pg.server_count())
            warnings = [r for r in caplog.records if "pool.shared" in r.getMessage()]
            for record in warnings:
                seen(record.getMessage())
            if builder == "shared":
                assert len({id(db) for db in built}) == 1
                assert peak <= limit
                assert not warnings
            else:
                # The classic failure, reproduced: every execution adds a pool.
                assert peak > limit
                assert warnings
                assert "pools are now open to postgresql://postgres:***@127.0.0.1:5432/test" in (
                    warnings[-1].getMessage()
                )
        finally:
            sys.path.remove(str(tmp_path))
            for db in {id(db): db for db in built}.values():
                await db.disconnect()
            sys.modules.pop(module_name, None)
        assert await pg.settles_at(0)

    async def test_a_forked_child_gets_a_fresh_pool(self, pg: Target) -> None:
        result = run_script(
            """
            import asyncio, os, sys
            import pool
            url = os.environ["POOL_FORK_URL"]
            db = pool.shared(url, connection_limit=2)
            loop = asyncio.new_event_loop()
            pid_before = loop.run_until_complete(db.fetchval("SELECT pg_backend_pid()"))
            child = os.fork()
            if child == 0:
                async def in_child():
                    # the inherited pool was reset: closing it touches nothing
                    await db.disconnect()
                    fresh = pool.shared(url, connection_limit=2)
                    assert fresh is not db, "the child must get a fresh pool"
                    pid = await fresh.fetchval("SELECT pg_backend_pid()")
                    assert pid != pid_before
                    await fresh.disconnect()
                try:
                    asyncio.run(in_child())
                except BaseException as exc:
                    print("child failed:", repr(exc), flush=True)
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(child, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "child failed"
            pid_after = loop.run_until_complete(db.fetchval("SELECT pg_backend_pid()"))
            assert pid_after == pid_before, "the parent's connection must survive"
            loop.run_until_complete(db.disconnect())
            print("ok")
            """,
            env={"POOL_FORK_URL": pg.url},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().endswith("ok")


@pytest.mark.asyncio
class TestShutdown:
    async def test_sigint_runs_before_exit_then_ends_as_usual(self, pg: Target) -> None:
        table = f"sig_{pg._tag}"
        await pg._admin.execute(f"CREATE TABLE {table} (note text)")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(
                    """
                    import os, sys, anyio, pool
                    url, table = os.environ["POOL_SIG_URL"], sys.argv[1]
                    async def main():
                        db = pool.shared(url, connection_limit=4)
                        async def last_words():
                            await db.execute(f"INSERT INTO {table} VALUES ('bye')")
                        db.on_before_exit(last_words)
                        async with pool.handle_signals():
                            await db.fetchval("SELECT 1")
                            print("serving", flush=True)
                            while True:
                                await db.fetchval("SELECT 1")
                                await anyio.sleep(0.005)
                    anyio.run(main)
                    """
                ), table],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "POOL_SIG_URL": pg.url},
            )
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "serving"
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == -signal.SIGINT, err  # the normal interrupt status
            assert "KeyboardInterrupt" in err
            assert await pg._admin.fetchval(f"SELECT count(*) FROM {table}") == 1
            assert await pg.settles_at(0)
        finally:
            await pg._admin.execute(f"DROP TABLE {table}")

    async def test_disconnect_grace_bounds_a_holder_that_never_releases(
        self, pg: Target, seen: Callable[[object], None]
    ) -> None:
        db: pool.Pool[Any] = pool.Pool(pg.url, connection_limit=1, pool_timeout=0)
        seen(db)
        errors: list[BaseException] = []

        async def hog() -> None:
            await db.acquire()  # and never gives it back
            await anyio.sleep_forever()

        async def waiter() -> None:
            try:
                await db.acquire()
            except pool.PoolClosedError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hog)
            while db.stats().in_use == 0:
                await anyio.sleep(0.005)
            for _ in range(3):
                tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            assert db.stats().waiting == 3
            started = time.monotonic()
            await db.disconnect(grace=0.5)
            elapsed = time.monotonic() - started
            tg.cancel_scope.cancel()
        assert 0.5 <= elapsed < 0.75
        assert len(errors) == 3
        assert await pg.settles_at(0)

    async def test_grace_waits_for_a_holder_that_does_release(self, pg: Target) -> None:
        db: pool.Pool[Any] = pool.Pool(pg.url, connection_limit=2)
        released = anyio.Event()

        async def short_holder() -> None:
            async with db.acquire() as conn:
                await anyio.sleep(0.05)
                await conn.fetchval("SELECT 1")  # finishes its work during the grace
            released.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(short_holder)
            while db.stats().in_use == 0:
                await anyio.sleep(0.005)
            await db.disconnect(grace=5)
        assert released.is_set()
        assert db.stats().size == 0

    async def test_disconnect_is_idempotent_and_the_pool_reconnects(self, pg: Target) -> None:
        db: pool.Pool[Any] = pool.Pool(pg.url, connection_limit=2)
        await db.connect()
        await db.disconnect()
        await db.disconnect()
        assert await pg.settles_at(0)
        assert await db.fetchval("SELECT 1") == 1
        await db.disconnect()

    async def test_before_exit_callbacks_may_use_the_pool(self, pg: Target) -> None:
        db: pool.Pool[Any] = pool.Pool(pg.url, connection_limit=2)
        results: list[int] = []

        async def callback() -> None:
            results.append(await db.fetchval("SELECT 42"))

        db.on_before_exit(callback)
        await db.connect()
        await db.disconnect()
        assert results == [42]
        with pytest.raises(TypeError):
            db.on_before_exit("not callable")  # type: ignore[arg-type]


@pytest.mark.asyncio
class TestStartupLogs:
    async def test_info_line_on_first_connect(
        self, pg: Target, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="pool")
        db: pool.Pool[Any] = pool.Pool(pg.url, connection_limit=9)
        assert not [r for r in caplog.records if r.name == "pool"]  # construction is silent
        await db.connect()
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert "Starting a postgresql pool with 9 connections." in messages
        await db.disconnect()

    async def test_warns_when_the_limit_exceeds_max_connections(
        self, pg: Target, caplog: pytest.LogCaptureFixture
    ) -> None:
        server_max = int(await pg._admin.fetchval("SHOW max_connections"))
        caplog.set_level(logging.WARNING, logger="pool")
        within: pool.Pool[Any] = pool.Pool(pg.url, connection_limit=server_max)
        await within.connect()
        await within.disconnect()
        assert not [r for r in caplog.records if "max_connections" in r.getMessage()]
        over: pool.Pool[Any] = pool.Pool(pg.url, connection_limit=server_max + 50)
        await over.connect()
        await over.disconnect()
        [record] = [r for r in caplog.records if "max_connections" in r.getMessage()]
        assert record.levelno == logging.WARNING
        assert (
            f"connection_limit={server_max + 50} exceeds the server's "
            f"max_connections={server_max}" in record.getMessage()
        )


class TestSharedKey:
    def test_same_target_and_settings_give_the_same_pool(self) -> None:
        url = "sqlite:////tmp/pool-shared-test.db"
        a = pool.shared(url, connection_limit=2)
        b = pool.shared(url + "?connection_limit=2")
        c = pool.shared(url, connection_limit=3)
        assert a is b
        assert c is not a


class TestRecommendedLimit:
    def test_hand_computed_values(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import pool._config as config

        monkeypatch.setattr(config, "default_connection_limit", lambda: 9)  # 4 cores
        assert pool.recommended_connection_limit() == 9
        assert pool.recommended_connection_limit(instances=2) == 4
        assert pool.recommended_connection_limit(instances=3) == 3
        assert pool.recommended_connection_limit(instances=20) == 1
        assert pool.recommended_connection_limit(serverless=True) == 1
        assert pool.recommended_connection_limit(instances=1, server_max_connections=5) == 5
        assert pool.recommended_connection_limit(instances=2, server_max_connections=6) == 3
        assert pool.recommended_connection_limit(instances=4, server_max_connections=100) == 2

    @pytest.mark.parametrize(
        "kwargs",
        [{"instances": 0}, {"instances": 1.5}, {"instances": True},
         {"serverless": "yes"}, {"server_max_connections": 0}],
    )
    def test_bad_arguments(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(pool.ConfigError):
            pool.recommended_connection_limit(**kwargs)


def test_postgres_url_is_reachable_for_this_module() -> None:
    servers.require(servers.POSTGRES_URL, "PostgreSQL")
