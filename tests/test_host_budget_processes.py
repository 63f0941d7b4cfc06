"""``host_connection_limit`` across real processes, counted by the servers themselves.

Each test starts several worker processes (tests/budget_worker.py: subprocesses,
not threads) on one budget, in a budget directory of its own (``tmp_path``), and
samples the server's own count of their sessions every 10 ms:
``pg_stat_activity`` filtered by an ``application_name`` the test sets, and
MariaDB's ``information_schema.PROCESSLIST`` filtered by a database the test
creates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest

import pool
from pool._budget import BUDGET_DIR_ENV, HostBudget
from pool._registry import target_of
from tests.latency_proxy import latency_proxy
from tests.servers import MYSQL_ADMIN_URL, POSTGRES_URL, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- processes


class Worker:
    """One worker process; its JSON lines are read as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def line(self, timeout: float = 20.0) -> dict[str, Any]:
        """The next JSON line (skipping error reports), within ``timeout``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self.proc.stdout.readline()
            if not raw:
                raise AssertionError(f"worker {self.proc.pid} ended: rc={self.proc.wait()}")
            msg: dict[str, Any] = json.loads(raw)
            if "error" not in msg or "seconds" in msg:
                return msg
        raise AssertionError("no reply in time")

    async def aline(self, timeout: float = 20.0) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self.line, timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture
def spawn(tmp_path: Any) -> Iterator[Callable[..., Worker]]:
    """Start workers on this test's own budget directory; all are killed at the end."""
    workers: list[Worker] = []
    env = {**os.environ, BUDGET_DIR_ENV: str(tmp_path / "budgets"), "PYTHONPATH": ROOT}

    def start(mode: str, url: str, limit: int, **opts: Any) -> Worker:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.budget_worker", mode, url, str(limit), json.dumps(opts)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )
        worker = Worker(proc)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.proc.kill()
        worker.proc.wait()
        assert worker.proc.stdout is not None
        worker.proc.stdout.close()


def _budget(tmp_path: Any, url: str, limit: int) -> HostBudget:
    scheme = url.split("://", 1)[0]
    return HostBudget(target_of(scheme, url), limit, root=str(tmp_path / "budgets"))


# --------------------------------------------------------------------------- server counts


class Server:
    """A server, a URL for the workers, and the count of their sessions on it."""

    def __init__(self, url: str, count: Callable[[], Any]) -> None:
        self.url = url
        self._count = count
        self.samples: list[int] = []

    async def count(self) -> int:
        value: int = await self._count()
        return value

    @asynccontextmanager
    async def sampling(self) -> AsyncIterator[list[int]]:
        """Every 10 ms, the server's count, into the list yielded."""
        samples: list[int] = []
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def sample() -> None:
                # stopped between queries, never cancelled in one: that would
                # break the admin connection
                while not stop.is_set():
                    samples.append(await self.count())
                    with anyio.move_on_after(0.01):
                        await stop.wait()

            tg.start_soon(sample)
            try:
                yield samples
            finally:
                stop.set()


@asynccontextmanager
async def postgres() -> AsyncIterator[Server]:
    require(POSTGRES_URL, "PostgreSQL")
    import asyncpg

    app = f"budget_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(POSTGRES_URL.replace("postgresql://", "postgres://"))

    async def count() -> int:
        value: int = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
        )
        return value

    try:
        yield Server(f"{POSTGRES_URL}?application_name={app}", count)
    finally:
        await admin.close()


@asynccontextmanager
async def mariadb() -> AsyncIterator[Server]:
    require(MYSQL_ADMIN_URL, "MariaDB")
    import aiomysql

    db = f"budget_{uuid.uuid4().hex[:12]}"
    admin = await aiomysql.connect(host="127.0.0.1", port=3306, user="root", db="test",
                                   autocommit=True)

    async def count() -> int:
        async with admin.cursor() as cur:
            await cur.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s", (db,)
            )
            (value,) = await cur.fetchone()
        return int(value)

    async with admin.cursor() as cur:
        await cur.execute(f"CREATE DATABASE {db}")
    try:
        yield Server(f"mysql://root@127.0.0.1:3306/{db}", count)
    finally:
        async with admin.cursor() as cur:
            await cur.execute(f"DROP DATABASE {db}")
        admin.close()


@asynccontextmanager
async def mariadb_user() -> AsyncIterator[Server]:
    """MariaDB, its sessions counted by a user of the test's own (whatever their DB)."""
    require(MYSQL_ADMIN_URL, "MariaDB")
    import aiomysql

    user = f"budget_{uuid.uuid4().hex[:12]}"
    admin = await aiomysql.connect(host="127.0.0.1", port=3306, user="root", db="test",
                                   autocommit=True)

    async def count() -> int:
        async with admin.cursor() as cur:
            await cur.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s", (user,)
            )
            (value,) = await cur.fetchone()
        return int(value)

    async with admin.cursor() as cur:
        await cur.execute(f"CREATE USER '{user}'@'127.0.0.1'")
        await cur.execute(f"GRANT SELECT ON test.* TO '{user}'@'127.0.0.1'")
    try:
        yield Server(f"mysql://{user}@127.0.0.1:3306/test", count)
    finally:
        async with admin.cursor() as cur:
            await cur.execute(f"DROP USER '{user}'@'127.0.0.1'")
        admin.close()


SERVERS = {"postgres": postgres, "mariadb": mariadb}
SLEEP = {"postgres": "SELECT pg_sleep(0.01)", "mariadb": "SELECT SLEEP(0.01)"}

server_param = pytest.mark.parametrize(
    "kind", [pytest.param("postgres", marks=pytest.mark.postgres),
             pytest.param("mariadb", marks=pytest.mark.mysql)],
)


async def _settle_to(server: Server, expected: int, within: float) -> float:
    """Seconds until the server's count is ``expected`` (fails after ``within``)."""
    began = time.monotonic()
    while (n := await server.count()) != expected:
        assert time.monotonic() - began < within, f"{n} sessions, not {expected}"
        await anyio.sleep(0.01)
    return time.monotonic() - began


async def _sampled(samples: list[int], expected: int, within: float) -> None:
    """Until the sampler's latest count is ``expected`` (fails after ``within``)."""
    began = time.monotonic()
    while not samples or samples[-1] != expected:
        assert time.monotonic() - began < within, f"{samples[-1:]} sessions, not {expected}"
        await anyio.sleep(0.005)


# --------------------------------------------------------------------------- tests


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class TestConfig:
    def test_off_by_default_costs_nothing(self) -> None:
        db = pool.Pool("sqlite:///:memory:")
        assert db.config.host_connection_limit is None
        assert db._engine.host is None
        stats = db.stats()
        assert stats.host_limit is None and stats.host_in_use is None

    def test_url_keyword_and_auto(self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(BUDGET_DIR_ENV, str(tmp_path))
        assert pool.Pool("sqlite:///a.db?host_connection_limit=7").config.host_connection_limit == 7
        assert pool.Pool("sqlite:///a.db", host_connection_limit=3).stats().host_limit == 3
        auto = pool.Pool("sqlite:///a.db?host_connection_limit=auto")
        assert auto.config.host_connection_limit == pool.default_connection_limit()
        assert auto.stats().host_in_use == 0

    @pytest.mark.parametrize("value", [0, -1, "0", "-3", 1.5, "2.5", "abc", True, ""])
    def test_bad_values_name_parameter_and_value(self, value: object) -> None:
        with pytest.raises(pool.ConfigError, match=r"host_connection_limit .*got") as info:
            pool.Pool("sqlite:///a.db", host_connection_limit=value)
        assert info.value.parameter == "host_connection_limit"
        assert info.value.value == value

    def test_shared_and_replicated_members_take_it(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(BUDGET_DIR_ENV, str(tmp_path))
        one = pool.shared(f"sqlite:///{tmp_path / 's.db'}", host_connection_limit=4)
        assert one.stats().host_limit == 4
        assert pool.shared(f"sqlite:///{tmp_path / 's.db'}", host_connection_limit=4) is one
        replicated = pool.Replicated(
            "postgresql://app@db1/shop", replicas=["postgresql://app@db2/shop"],
            host_connection_limit=5,
        )
        assert replicated.primary().config.host_connection_limit == 5
        assert replicated.replica().config.host_connection_limit == 5
        with pytest.raises(pool.ConfigError, match="host_connection_limit"):
            pool.Replicated("postgresql://app@db1/shop", host_connection_limit=0)

    def test_target_never_holds_the_password(self) -> None:
        target = target_of("postgresql", "postgresql://app:s3cret@db:5432/shop?sslmode=x")
        assert "s3cret" not in target and target == "postgresql://app@db:5432/shop"


@pytest.mark.anyio
class TestAcrossProcesses:
    @server_param
    async def test_busy_processes_share_the_budget(self, kind: str, spawn: Any) -> None:
        """4 processes x connection_limit 5 on a budget of 6: the server never sees more than
        6, and every process gets a fair part of the work."""
        async with SERVERS[kind]() as server:
            workers = [
                spawn("work", server.url, 6, connection_limit=5, tasks=8, seconds=4,
                      sql=SLEEP[kind])
                for _ in range(4)
            ]
            for w in workers:
                await w.aline()  # ready
            async with server.sampling() as samples:
                results = [await w.aline() for w in workers]
            assert max(samples) <= 6, max(samples)
            assert max(samples) >= 4  # the budget was used, not starved
            done = [r["done"] for r in results]
            assert all(r["failed"] == 0 for r in results), results
            assert min(done) >= sum(done) / len(done) / 4, done

    @server_param
    async def test_churn_never_exceeds_the_budget(self, kind: str, spawn: Any) -> None:
        """Connections closed and reopened all the time (a 30 ms lifetime): a slot is
        given back only once the server has dropped the session, so the server's count
        never exceeds the budget even while sessions are being torn down."""
        async with SERVERS[kind]() as server:
            workers = [
                spawn("work", server.url, 4, connection_limit=4, tasks=4, seconds=3,
                      sql="SELECT 1", lifetime=0.03)
                for _ in range(4)
            ]
            for w in workers:
                await w.aline()  # ready
            async with server.sampling() as samples:
                results = [await w.aline() for w in workers]
            assert all(r["failed"] == 0 and r["done"] > 0 for r in results), results
            assert sum(r["closed_by"]["lifetime"] for r in results) > 100  # it churned
            assert max(samples) <= 4, sorted(samples)[-10:]

    @pytest.mark.mysql
    async def test_mariadb_churn_across_processes_never_exceeds_the_budget(
        self, spawn: Any
    ) -> None:
        """MariaDB, where a session can outlive the client's close: 3 processes on a budget
        of 4 close and reopen connections all the time (a 20 ms lifetime; every 150 ms a
        drain, or a resize to 1 and back), while the server's own count of the test's own
        user (PROCESSLIST, every 10 ms, whatever the session's DB) never exceeds 4."""
        async with mariadb_user() as server:
            workers = [
                spawn("work", server.url, 4, connection_limit=3, tasks=3, seconds=3,
                      sql="SELECT 1", lifetime=0.02, churn=0.15)
                for _ in range(3)
            ]
            for w in workers:
                await w.aline()  # ready
            async with server.sampling() as samples:
                results = [await w.aline() for w in workers]
            assert all(r["failed"] == 0 and r["done"] > 0 for r in results), results
            closed = [r["closed_by"] for r in results]
            # it churned, in every process and by every mechanism
            assert all(c.get("lifetime", 0) > 0 for c in closed), closed
            assert sum(c.get("drain", 0) + c.get("resize", 0) for c in closed) > 0, closed
            # about 150 in 3 s here: a MariaDB close holds its slot until the session is gone
            assert sum(r["opened"] for r in results) > 90, results
            assert len(samples) > 100, len(samples)  # about every 10 ms for 3 s
            assert max(samples) <= 4, sorted(samples)[-10:]
            assert max(samples) >= 2  # the budget was used, not starved

    @server_param
    async def test_sigkill_frees_the_share_at_once(
        self, kind: str, spawn: Any, tmp_path: Any
    ) -> None:
        async with SERVERS[kind]() as server:
            budget = _budget(tmp_path, server.url, 4)
            holder = spawn("hold", server.url, 4, count=4, lent=True)
            await holder.aline()
            assert budget.in_use() == 4
            assert budget.holders() == [holder.pid] * 4
            os.kill(holder.pid, signal.SIGKILL)
            killed = time.monotonic()
            while budget.in_use():
                assert time.monotonic() - killed < 1.0
                await anyio.sleep(0.005)
            # and a newcomer gets its whole share
            async with server.sampling() as samples:
                newcomer = spawn("hold", server.url, 4, count=4)
                await newcomer.aline()
            assert max(samples) <= 4
            assert budget.holders() == [newcomer.pid] * 4

    @server_param
    async def test_newcomer_served_while_another_holds_idle(self, kind: str, spawn: Any) -> None:
        async with SERVERS[kind]() as server:
            idle = spawn("hold", server.url, 5, count=5)
            await idle.aline()
            assert await server.count() == 5
            async with server.sampling() as samples:
                newcomer = spawn("once", server.url, 5)
                reply = await newcomer.aline()
            assert "error" not in reply, reply
            assert reply["seconds"] < 1.0, reply
            assert max(samples) <= 5, max(samples)

    @pytest.mark.postgres
    async def test_timeout_names_the_budget_and_its_holders(
        self, spawn: Any, tmp_path: Any
    ) -> None:
        async with postgres() as server:
            holder = spawn("hold", server.url, 3, count=3, lent=True)
            await holder.aline()
            late = spawn("once", server.url, 3, pool_timeout=0.5)
            reply = await late.aline()
            assert reply["code"] == "P2024"
            message = reply["error"]
            assert "host_connection_limit=3" in message
            assert f"{holder.pid} (3)" in message
            assert "Hunter2" not in message
            assert await server.count() == 3


@pytest.mark.anyio
class TestAbandonedHandshakes:
    """A connect abandoned mid-handshake: its slot waits for the server to drop the session."""

    @pytest.mark.parametrize("kind, scheme", [
        pytest.param("postgres", "postgresql", marks=pytest.mark.postgres, id="asyncpg"),
        pytest.param("postgres", "postgresql+psycopg", marks=pytest.mark.postgres,
                     id="psycopg"),
        pytest.param("mariadb", "mysql", marks=pytest.mark.mysql, id="aiomysql"),
    ])
    async def test_cancelled_connects_keep_their_slots_until_the_server_drops_them(
        self, kind: str, scheme: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """N connects go through a relay that delays every byte by 100 ms; once the server
        lists all N sessions (their handshakes still under way for the client), the
        callers are cancelled, and a stand-in for another process's pool takes each slot
        the moment it is free and connects directly. The server's own count (every 10 ms)
        never exceeds N: a slot comes back only when the abandoned session is gone.
        (Before: the slots came back at the cancellation, and the server saw 2N.)"""
        limit, delay = 4, 0.1
        root = tmp_path / "budgets"
        monkeypatch.setenv(BUDGET_DIR_ENV, str(root))
        opened = postgres() if kind == "postgres" else mariadb_user()
        async with opened as server:
            parts = urlsplit(server.url)
            user, _, where = parts.netloc.rpartition("@")
            host, _, port = where.partition(":")
            async with latency_proxy(host, int(port), delay=delay) as proxy:
                relayed = urlunsplit(
                    parts._replace(scheme=scheme, netloc=f"{user}@127.0.0.1:{proxy.port}")
                )
                await self._cancel_and_take(server, relayed, scheme, limit, root)

    @staticmethod
    async def _cancel_and_take(
        server: Server, relayed: str, scheme: str, limit: int, root: Any
    ) -> None:
        budget = HostBudget(target_of(scheme, relayed), limit, root=str(root))
        # one pool per connect: a pool's slow start opens one at a time at first
        dbs = [pool.Pool(relayed, host_connection_limit=limit, connection_limit=1,
                         connect_timeout=30, pool_timeout=30) for _ in range(limit)]
        takers: list[pool.Pool[Any]] = []  # each holds one slot and one direct connection
        slots: list[Any] = []

        async def take_freed() -> None:
            # another process's pool, reduced to the budget's protocol: a slot,
            # then a connect (direct: its session shows up within milliseconds)
            while len(slots) < limit:
                slot = budget.take()
                if slot is None:
                    await anyio.sleep(0.001)
                    continue
                slots.append(slot)
                taker = pool.Pool(server.url, connection_limit=1)
                takers.append(taker)
                await taker.fetchval("SELECT 1")  # its connection stays open, idle

        try:
            async with server.sampling() as samples:
                async with anyio.create_task_group() as callers:
                    for db in dbs:
                        callers.start_soon(db.fetchval, "SELECT 1")
                    # every session listed by the server, no handshake done for the client
                    await _sampled(samples, limit, within=10)
                    assert [db.stats().opening for db in dbs] == [1] * limit
                    assert budget.in_use() == limit
                    callers.cancel_scope.cancel()
                with anyio.fail_after(10):
                    await take_freed()
                await _sampled(samples, limit, within=10)  # the abandoned ones are gone
                after = len(samples)
                while len(samples) < after + 5:  # and a few more samples to be sure
                    await anyio.sleep(0.01)
            assert max(samples) <= limit, sorted(samples)[-10:]
            assert len(samples) > 10
        finally:
            for taker in takers:
                await taker.disconnect()
            for slot in slots:
                slot.release()
            for db in dbs:
                await db.disconnect()


class TestTrioAndFork:
    def test_trio_sqlite_newcomer_served_while_another_holds_idle(
        self, spawn: Any, tmp_path: Any
    ) -> None:
        url = f"sqlite:///{tmp_path / 'budget.db'}"
        budget = _budget(tmp_path, url, 3)
        idle = spawn("hold", url, 3, count=3, backend="trio")
        idle.line()
        assert budget.holders() == [idle.pid] * 3
        newcomer = spawn("once", url, 3, backend="trio", sql="SELECT 1")
        reply = newcomer.line()
        assert "error" not in reply and reply["seconds"] < 1.0, reply
        assert budget.in_use() <= 3

    def test_forked_child_keeps_no_slot_of_its_parent(self, spawn: Any, tmp_path: Any) -> None:
        url = f"sqlite:///{tmp_path / 'fork.db'}"
        forker = spawn("fork", url, 2)
        assert forker.line() == {"in_use": 0}


@pytest.mark.anyio
async def test_metrics_report_the_budget(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from pool import _metrics

    monkeypatch.setenv(BUDGET_DIR_ENV, str(tmp_path / "budgets"))
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    db = pool.Pool(f"sqlite:///{tmp_path / 'm.db'}", host_connection_limit=3,
                   meter_provider=provider, name="budgeted")
    plain = pool.Pool(f"sqlite:///{tmp_path / 'p.db'}", meter_provider=provider, name="plain")

    def read() -> dict[str, dict[str, int]]:
        data = reader.get_metrics_data()
        assert data is not None
        found: dict[str, dict[str, int]] = {}
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name.startswith("pool.host_budget."):
                        found[m.name] = {
                            str((p.attributes or {})["db.client.connection.pool.name"]): int(
                                p.value  # type: ignore[union-attr]
                            )
                            for p in m.data.data_points
                        }
        return found

    try:
        async with db.acquire():
            await plain.fetchval("SELECT 1")
            assert read() == {
                "pool.host_budget.limit": {"budgeted": 3},
                "pool.host_budget.in_use": {"budgeted": 1},
            }
    finally:
        await db.disconnect()
        await plain.disconnect()
        _metrics.uninstrument(provider)
        provider.shutdown()
    assert db.stats().host_in_use == 0
