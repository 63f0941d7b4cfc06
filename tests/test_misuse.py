"""Misuse, as users make it: each trap is either refused with a clear error or named.

One event loop at a time (a second running loop in another thread is refused,
never handed the first loop's connection), a self-deadlock named in P2024,
Prisma's connect codes (P1000, P1001, P1002, P1003), holders named by the
user's own code when the helpers run as tasks of their own, the use time of a
release handed straight to a waiter, and the metrics exporter's thread
walking the pools while another thread builds them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import aiomysql
import anyio
import asyncpg
import pytest
from anyio import wait_all_tasks_blocked
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import pool
from pool import _metrics
from tests import servers
from tests.fakedriver import FakeDriver
from tests.servers import MYSQL_URL, POSTGRES_URL, SECRET, require

THIS_FILE = __file__


def _run(main: Callable[[], Any], loop: str) -> Any:
    """asyncio.run(main()), on asyncio's own loop or on uvloop's."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


def _in_a_thread(main: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            main()
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


# --------------------------------------------------------------------------- one loop at a time


class TestOneEventLoopAtATime:
    @pytest.mark.parametrize(
        "url",
        [pytest.param(POSTGRES_URL, id="postgres"), pytest.param(MYSQL_URL, id="mysql")],
    )
    @pytest.mark.parametrize("entry", ["fetchval", "acquire", "transaction"])
    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def test_a_second_running_loop_is_refused_not_handed_the_first_loops_idle_connection(
        self, url: str, entry: str, loop: str, seen: Callable[[object], None]
    ) -> None:
        require(url, url.split(":", 1)[0])
        db: pool.Pool[Any] = pool.Pool(url, connection_limit=2, pool_timeout=5)
        ready = threading.Event()
        tried = threading.Event()
        first: dict[str, Any] = {"unhandled": []}

        def first_loop() -> None:
            async def main() -> None:
                loop = asyncio.get_running_loop()
                loop.set_exception_handler(lambda _, ctx: first["unhandled"].append(ctx))
                assert await db.fetchval("SELECT 1") == 1  # one idle connection, on this loop
                ready.set()
                await asyncio.to_thread(tried.wait, 30)  # alive and running meanwhile
                first["after"] = await db.fetchval("SELECT 2")
                first["stats"] = db.stats()
                await db.disconnect()

            _run(main, loop)

        thread, errors = _in_a_thread(first_loop)
        try:
            assert ready.wait(30)

            async def second() -> None:
                with pytest.raises(pool.PoolError) as info:
                    if entry == "fetchval":
                        await db.fetchval("SELECT 1")
                    elif entry == "acquire":
                        async with db.acquire():
                            pass
                    else:
                        async with db.transaction():
                            pass
                seen(info.value)
                assert type(info.value) is pool.PoolError
                assert "one event loop at a time" in str(info.value)
                assert "one Pool per event loop" in str(info.value)

            _run(second, loop)
        finally:
            tried.set()
            thread.join(30)
        assert not errors, errors
        # The first loop never noticed: its connection still works, nothing leaked.
        assert first["after"] == 2
        assert first["stats"].size == 1 and first["stats"].closed == 0
        assert first["unhandled"] == []

    def test_waiters_and_openings_of_a_running_loop_are_not_dropped(self) -> None:
        """Settles the suspicion: a move while the old loop runs would fail its waiters."""
        driver = FakeDriver()
        db: pool.Pool[Any] = pool.Pool("fake://x", driver=driver, connection_limit=1)
        queued = threading.Event()
        tried = threading.Event()
        first: dict[str, Any] = {}

        def first_loop() -> None:
            async def main() -> None:
                driver.gate = anyio.Event()  # its connect waits until we say
                task = asyncio.create_task(db.fetchval("SELECT 1"))
                await wait_all_tasks_blocked()
                first["queued"] = db.stats()
                queued.set()
                await asyncio.to_thread(tried.wait, 30)
                driver.gate.set()
                try:
                    first["result"] = await task
                except BaseException as exc:
                    first["result"] = exc
                await db.disconnect()

            asyncio.run(main())

        thread, errors = _in_a_thread(first_loop)
        try:
            assert queued.wait(30)

            async def second() -> BaseException | None:
                try:
                    await db.fetchval("SELECT 1")
                except BaseException as exc:
                    return exc
                return None

            refused = asyncio.run(second())
        finally:
            tried.set()
            thread.join(30)
        assert not errors, errors
        assert (first["queued"].waiting, first["queued"].opening) == (1, 1)
        # the first loop's waiter got the connection its own opening made (the fake
        # driver's fetchval answers with the connection's id, numbered process-wide)
        assert isinstance(first["result"], int), first["result"]
        assert isinstance(refused, pool.PoolError) and "one event loop at a time" in str(refused)

    def test_a_loop_that_stopped_without_closing_hands_the_pool_over(self) -> None:
        """Not running any more (run_until_complete returned): the next loop takes over."""
        db: pool.Pool[Any] = pool.Pool("sqlite:///:memory:", connection_limit=1)
        old = asyncio.new_event_loop()
        try:
            assert old.run_until_complete(db.fetchval("SELECT 1")) == 1

            async def next_loop() -> Any:
                value = await db.fetchval("SELECT 2")
                await db.disconnect()
                return value

            assert asyncio.run(next_loop()) == 2
        finally:
            old.close()


# --------------------------------------------------------------------------- self-deadlock


class TestSelfDeadlock:
    @pytest.mark.anyio
    @pytest.mark.parametrize("limit", [1, 2])
    async def test_a_task_waiting_on_connections_it_holds_itself_is_told_so(
        self, limit: int
    ) -> None:
        db: pool.Pool[Any] = pool.Pool(
            "fake://x", driver=FakeDriver(), connection_limit=limit, pool_timeout=0.05
        )
        held = [await db.acquire() for _ in range(limit)]
        try:
            with pytest.raises(pool.PoolTimeoutError) as info:
                await db.fetchval("SELECT 1")
        finally:
            for conn in held:
                await db.release(conn)
            await db.disconnect()
        text = str(info.value)
        assert "held by the waiting task itself" in text
        assert f"{limit} of the {limit} connection(s) in use" in text
        assert all(h.task.endswith("(the waiting task itself)") for h in info.value.holders)

    @pytest.mark.anyio
    async def test_connections_held_by_another_task_are_no_self_deadlock(self) -> None:
        db: pool.Pool[Any] = pool.Pool(
            "fake://x", driver=FakeDriver(), connection_limit=1, pool_timeout=0.05
        )
        holding = anyio.Event()
        done = anyio.Event()

        async def holder() -> None:
            async with db.acquire():
                holding.set()
                await done.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await holding.wait()
            with pytest.raises(pool.PoolTimeoutError) as info:
                await db.fetchval("SELECT 1")
            done.set()
        await db.disconnect()
        assert "itself" not in str(info.value)
        assert "Longest holders: " in str(info.value)


# --------------------------------------------------------------------------- connect codes


def _pg_url(user: str = "postgres", database: str = "test") -> str:
    parts = urlsplit(POSTGRES_URL)
    return f"postgresql://{user}:{SECRET}@{parts.hostname}:{parts.port or 5432}/{database}"


def _mysql_url(user: str, password: str = SECRET, database: str = "test") -> str:
    parts = urlsplit(MYSQL_URL)
    return f"mysql://{user}:{password}@{parts.hostname}:{parts.port or 3306}/{database}"


async def _connect_error(url: str, seen: Callable[[object], None], **kw: Any) -> Any:
    db: pool.Pool[Any] = pool.Pool(url, **kw)
    try:
        with pytest.raises(pool.ConnectError) as info:
            await db.connect()
    finally:
        await db.disconnect()
    seen(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert info.value.__cause__ is not None
    return info.value


@pytest.fixture
async def mysql_admin() -> AsyncIterator[Any]:
    require(servers.MYSQL_ADMIN_URL, "MariaDB")
    admin_url = urlsplit(servers.MYSQL_ADMIN_URL)
    admin = await aiomysql.connect(
        host=admin_url.hostname, port=admin_url.port or 3306, user=admin_url.username,
        password=admin_url.password or "", db="test", autocommit=True,
    )
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture
async def mysql_user(mysql_admin: Any) -> AsyncIterator[str]:
    """A MariaDB user with a password of its own and rights on `test` only."""
    user = f"misuse_{uuid.uuid4().hex[:10]}"
    async with mysql_admin.cursor() as cur:
        await cur.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", (SECRET,))
        await cur.execute(f"GRANT SELECT ON test.* TO '{user}'@'%'")
    try:
        yield user
    finally:
        async with mysql_admin.cursor() as cur:
            await cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers: a connect times out."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
class TestConnectCodes:
    async def test_postgres_unknown_role_is_p1000(
        self, anyio_backend: str, seen: Callable[[object], None]
    ) -> None:
        require(POSTGRES_URL, "PostgreSQL")
        role = f"nobody_{uuid.uuid4().hex[:10]}"
        error = await _connect_error(_pg_url(user=role), seen)
        assert error.code == "P1000"
        assert str(error).startswith("Authentication failed against database server at 127.0.0.1")
        assert role in str(error)

    async def test_postgres_role_that_may_not_log_in_is_p1000(
        self, anyio_backend: str, seen: Callable[[object], None]
    ) -> None:
        require(POSTGRES_URL, "PostgreSQL")
        role = f"nologin_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(POSTGRES_URL)
        try:
            # the loopback is trust (any password passes), so a refused login is NOLOGIN
            await admin.execute(f"CREATE ROLE {role} NOLOGIN PASSWORD '{uuid.uuid4().hex}'")
            error = await _connect_error(_pg_url(user=role), seen)
        finally:
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
            await admin.close()
        assert error.code == "P1000"
        assert "Authentication failed" in str(error)

    async def test_postgres_missing_database_is_p1003(
        self, anyio_backend: str, seen: Callable[[object], None]
    ) -> None:
        require(POSTGRES_URL, "PostgreSQL")
        name = f"nodb_{uuid.uuid4().hex[:10]}"
        error = await _connect_error(_pg_url(database=name), seen)
        assert error.code == "P1003"
        assert str(error).startswith(f"Database {name} does not exist at 127.0.0.1:")

    async def test_mysql_wrong_password_is_p1000(
        self, anyio_backend: str, mysql_user: str, seen: Callable[[object], None]
    ) -> None:
        wrong = f"Wrong-{uuid.uuid4().hex}"
        error = await _connect_error(_mysql_url(mysql_user, password=wrong), seen)
        assert wrong not in str(error)
        assert error.code == "P1000"
        assert str(error).startswith("Authentication failed against database server at 127.0.0.1")

    async def test_mysql_unknown_user_is_p1000(
        self, anyio_backend: str, mysql_admin: Any, seen: Callable[[object], None]
    ) -> None:
        error = await _connect_error(_mysql_url(f"nobody_{uuid.uuid4().hex[:10]}"), seen)
        assert error.code == "P1000"

    async def test_mysql_missing_database_is_p1003(
        self, anyio_backend: str, mysql_admin: Any, seen: Callable[[object], None]
    ) -> None:
        name = f"nodb_{uuid.uuid4().hex[:10]}"
        admin = urlsplit(servers.MYSQL_ADMIN_URL)
        url = f"mysql://{admin.username}@{admin.hostname}:{admin.port or 3306}/{name}"
        error = await _connect_error(url, seen)  # 1049, Unknown database
        assert error.code == "P1003"
        assert str(error).startswith(f"Database {name} does not exist at 127.0.0.1:")

    async def test_mysql_database_the_user_may_not_see_is_p1003(
        self, anyio_backend: str, mysql_user: str, seen: Callable[[object], None]
    ) -> None:
        name = f"nodb_{uuid.uuid4().hex[:10]}"
        error = await _connect_error(_mysql_url(mysql_user, database=name), seen)  # 1044
        assert error.code == "P1003"
        assert "(1044," in str(error)

    async def test_sqlite_file_in_a_missing_directory_is_p1003(
        self, anyio_backend: str, seen: Callable[[object], None]
    ) -> None:
        error = await _connect_error("sqlite:////nonexistent-dir/x/y.db", seen)
        assert error.code == "P1003"
        assert str(error).startswith("Database y.db does not exist at /nonexistent-dir/x")

    async def test_a_connect_that_times_out_is_p1002(
        self, anyio_backend: str, silent_port: int, seen: Callable[[object], None]
    ) -> None:
        url = f"postgresql://postgres:{SECRET}@127.0.0.1:{silent_port}/test"
        error = await _connect_error(url, seen, connect_timeout=0.2)
        assert error.code == "P1002"
        assert "timed out" in str(error)

    async def test_a_refused_connect_stays_p1001_and_so_does_failing_fast(
        self, anyio_backend: str, seen: Callable[[object], None]
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: nobody listens there
        db: pool.Pool[Any] = pool.Pool(f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/test")
        codes = []
        try:
            for _ in range(2):  # the second fails fast on the breaker
                with pytest.raises(pool.ConnectError) as info:
                    await db.fetchval("SELECT 1")
                seen(info.value)
                codes.append(info.value.code)
        finally:
            await db.disconnect()
        assert codes == ["P1001", "P1001"]
        assert str(info.value).startswith("Can't reach database server at 127.0.0.1:")

    async def test_failing_fast_keeps_the_code_of_the_failure(
        self, anyio_backend: str, seen: Callable[[object], None]
    ) -> None:
        require(POSTGRES_URL, "PostgreSQL")
        db: pool.Pool[Any] = pool.Pool(_pg_url(database=f"nodb_{uuid.uuid4().hex[:10]}"))
        codes = []
        try:
            for _ in range(2):
                with pytest.raises(pool.ConnectError) as info:
                    await db.fetchval("SELECT 1")
                seen(info.value)
                codes.append(info.value.code)
        finally:
            await db.disconnect()
        assert codes == ["P1003", "P1003"]
        assert "failing fast" in str(info.value)


# --------------------------------------------------------------------------- holders


def _in_asyncio(path: str) -> bool:
    return "asyncio" in path.replace("\\", "/").split("/")[-2:-1]


class TestHoldersNameUserCode:
    @pytest.mark.anyio
    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    @pytest.mark.parametrize("how", ["gather", "create_task", "wait_for"])
    async def test_a_helper_run_as_its_own_task_is_named_not_asyncio(
        self, anyio_backend: str, how: str
    ) -> None:
        driver = FakeDriver()
        db: pool.Pool[Any] = pool.Pool("fake://x", driver=driver, connection_limit=1)
        await db.connect()  # one idle: the helper takes it on the fast path
        driver.query_gate = anyio.Event()
        if how == "gather":
            running: Any = asyncio.ensure_future(asyncio.gather(db.fetchval("SELECT 1")))
        elif how == "create_task":
            running = asyncio.create_task(db.fetch("SELECT 1"))
        else:
            running = asyncio.create_task(asyncio.wait_for(db.execute("SELECT 1"), 10))
        await wait_all_tasks_blocked()
        try:
            with pytest.raises(pool.PoolTimeoutError) as info:
                await db.acquire(timeout=0.05)
        finally:
            driver.query_gate.set()
            await running
            await db.disconnect()
        [holder] = info.value.holders
        name = {"gather": "fetchval", "create_task": "fetch", "wait_for": "execute"}[how]
        assert holder.call_site == f"Pool.{name}() run as its own task", holder
        assert "events.py" not in str(info.value)

    @pytest.mark.anyio
    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_waiter_run_as_its_own_task_is_named_too(self, anyio_backend: str) -> None:
        """The waiter's path (handed a connection as it waited) names it the same way."""
        driver = FakeDriver()
        db: pool.Pool[Any] = pool.Pool("fake://x", driver=driver, connection_limit=1)
        first = await db.acquire()
        waiting = asyncio.ensure_future(asyncio.gather(db.fetchval("SELECT 1")))
        await wait_all_tasks_blocked()
        driver.query_gate = anyio.Event()
        await db.release(first)  # handed to the gathered fetchval, which now holds it
        await wait_all_tasks_blocked()
        try:
            with pytest.raises(pool.PoolTimeoutError) as info:
                await db.acquire(timeout=0.05)
        finally:
            driver.query_gate.set()
            await waiting
            await db.disconnect()
        [holder] = info.value.holders
        assert holder.call_site == "Pool.fetchval() run as its own task", holder

    @pytest.mark.anyio
    async def test_a_direct_call_still_names_the_users_line(self) -> None:
        driver = FakeDriver()
        db: pool.Pool[Any] = pool.Pool("fake://x", driver=driver, connection_limit=1)
        await db.connect()
        driver.query_gate = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def user_code() -> None:
                await db.fetchval("SELECT 1")  # the line the report must name

            tg.start_soon(user_code)
            await wait_all_tasks_blocked()
            with pytest.raises(pool.PoolTimeoutError) as info:
                await db.acquire(timeout=0.05)
            driver.query_gate.set()
        await db.disconnect()
        [holder] = info.value.holders
        assert holder.call_site.startswith(THIS_FILE + ":"), holder

    @pytest.mark.anyio
    async def test_start_soon_of_a_helper_names_it_on_asyncio_and_trio(self) -> None:
        driver = FakeDriver()
        db: pool.Pool[Any] = pool.Pool("fake://x", driver=driver, connection_limit=1)
        await db.connect()
        driver.query_gate = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(db.fetchrow, "SELECT 1")
            await wait_all_tasks_blocked()
            with pytest.raises(pool.PoolTimeoutError) as info:
                await db.acquire(timeout=0.05)
            driver.query_gate.set()
        await db.disconnect()
        [holder] = info.value.holders
        assert holder.call_site == "Pool.fetchrow() run as its own task", holder

    def test_asyncio_run_of_a_helper_names_it(self, caplog: pytest.LogCaptureFixture) -> None:
        """A leak report of a helper that is the whole program names the helper too."""
        driver = FakeDriver()
        db: pool.Pool[Any] = pool.Pool(
            "fake://x", driver=driver, connection_limit=1, leak_detection_threshold=0.05
        )

        async def main() -> None:
            await db.connect()
            driver.query_gate = anyio.Event()
            loop = asyncio.get_running_loop()
            # the helper is the task; the report comes while it holds the connection
            loop.call_later(0.3, driver.query_gate.set)
            await loop.create_task(db.fetchval("SELECT 1"))
            await db.disconnect()

        with caplog.at_level(logging.WARNING, logger="pool"):
            asyncio.run(main())
        leaks = [r.getMessage() for r in caplog.records if "Possible connection leak" in r.message]
        assert leaks, caplog.text
        assert leaks[0].endswith("it was acquired at Pool.fetchval() run as its own task")


# --------------------------------------------------------------------------- metrics


@pytest.fixture
def reader() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    r = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[r])
    yield mp, r
    _metrics.uninstrument()
    mp.shutdown()


def _use_time(r: InMemoryMetricReader, name: str) -> Any:
    data = r.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "db.client.connection.use_time":
                    for p in m.data.data_points:
                        if dict(p.attributes or {}).get("db.client.connection.pool.name") == name:
                            return p
    raise AssertionError("no use_time point")


class TestMetrics:
    @pytest.mark.anyio
    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_use_time_of_a_release_with_an_error_handed_to_a_waiter(
        self, anyio_backend: str, reader: tuple[MeterProvider, InMemoryMetricReader]
    ) -> None:
        """Fault 9: the use time was read after the handoff had reset it (about 0 s)."""
        require(POSTGRES_URL, "PostgreSQL")
        mp, r = reader
        db: pool.Pool[Any] = pool.Pool(
            POSTGRES_URL, connection_limit=1, meter_provider=mp, name="misuse-use-time"
        )
        held = 0.2
        try:

            async def waiter() -> None:
                assert await db.fetchval("SELECT 1") == 1

            async with anyio.create_task_group() as tg:
                with pytest.raises(ZeroDivisionError):
                    async with db.acquire() as conn:
                        tg.start_soon(waiter)
                        await wait_all_tasks_blocked()
                        assert db.stats().waiting == 1
                        await conn.fetchval("SELECT pg_sleep($1)", held)
                        raise ZeroDivisionError  # the release hands it to the waiter
        finally:
            await db.disconnect()
        point = _use_time(r, "misuse-use-time")
        assert point.count == 2  # the holder's use, then the waiter's
        assert point.max >= held, (point.max, point.sum)

    def test_the_exporter_thread_reads_while_another_thread_builds_pools(
        self, reader: tuple[MeterProvider, InMemoryMetricReader]
    ) -> None:
        """Settles the suspicion: it raised "Set changed size during iteration"."""
        mp, r = reader
        pool.instrument(mp)
        failures: list[BaseException] = []

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.exc_info and record.exc_info[1] is not None:
                    failures.append(record.exc_info[1])

        catch = Catch(level=logging.DEBUG)
        logging.getLogger("opentelemetry").addHandler(catch)
        stop = threading.Event()

        def exporter() -> None:
            while not stop.is_set():
                try:
                    r.get_metrics_data()  # what a periodic reader's thread does
                except Exception as exc:
                    failures.append(exc)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as possible
        thread = threading.Thread(target=exporter, daemon=True)
        thread.start()
        try:
            pools = []
            for i in range(3000):
                pools.append(pool.Pool("fake://x", driver=FakeDriver()))
                if i % 300 == 299:
                    pools.clear()  # and let some go: the sets shrink too
                if failures:
                    break
        finally:
            stop.set()
            thread.join(30)
            sys.setswitchinterval(interval)
            logging.getLogger("opentelemetry").removeHandler(catch)
        assert failures == [], failures
