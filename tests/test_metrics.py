"""OpenTelemetry metrics, read back with the SDK's in-memory reader, on real PostgreSQL.

A scripted load with a known number of connects, acquires, waits, timeouts and
releases; every instrument must report exactly that, under the semantic
conventions' names, units and attributes.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import pool
from pool import _metrics
from pool._ledger import Ledger
from tests import servers

pytestmark = pytest.mark.asyncio

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

UNITS = {
    "db.client.connection.count": "{connection}",
    "db.client.connection.max": "{connection}",
    "db.client.connection.idle.max": "{connection}",
    "db.client.connection.idle.min": "{connection}",
    "db.client.connection.pending_requests": "{request}",
    "db.client.connection.timeouts": "{timeout}",
    "db.client.connection.create_time": "s",
    "db.client.connection.wait_time": "s",
    "db.client.connection.use_time": "s",
}


def pg_url() -> str:
    servers.require(servers.POSTGRES_URL, "PostgreSQL")
    tag = f"pooltest_{uuid.uuid4().hex[:10]}"
    return f"{servers.POSTGRES_URL}?application_name={tag}"


class Reading:
    """One collection: metric name -> (unit, [(attributes, point)])."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.metrics: dict[str, tuple[str, list[tuple[dict[str, Any], Any]]]] = {}
        data = reader.get_metrics_data()
        assert data is not None
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                assert sm.scope.name == "pool"
                for m in sm.metrics:
                    points = [(dict(p.attributes or {}), p) for p in m.data.data_points]
                    self.metrics[m.name] = (m.unit or "", points)

    def points(self, name: str, pool_name: str) -> list[tuple[dict[str, Any], Any]]:
        return [(a, p) for a, p in self.metrics[name][1] if a.get(POOL_NAME) == pool_name]

    def value(self, name: str, pool_name: str, **attrs: str) -> Any:
        want = {POOL_NAME: pool_name, **{k.replace("_", "."): v for k, v in attrs.items()}}
        found = [p for a, p in self.metrics[name][1] if a == want]
        assert len(found) == 1, (name, want, self.metrics[name][1])
        return found[0].value

    def count(self, name: str, pool_name: str) -> int:
        [(attrs, point)] = self.points(name, pool_name)
        assert attrs == {POOL_NAME: pool_name}
        return int(point.count)

    def total(self, name: str, pool_name: str) -> float:
        [(_, point)] = self.points(name, pool_name)
        return float(point.sum)

    def state(self, pool_name: str) -> dict[str, int]:
        return {
            s: self.value("db.client.connection.count", pool_name, db_client_connection_state=s)
            for s in ("idle", "used")
        }


@pytest.fixture
def reader() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    r = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[r])
    yield mp, r
    _metrics.uninstrument()
    mp.shutdown()


async def test_a_scripted_load_is_reported_exactly(
    reader: tuple[MeterProvider, InMemoryMetricReader], seen: Callable[[object], None]
) -> None:
    mp, r = reader
    db: pool.Pool[Any] = pool.Pool(
        pg_url(), connection_limit=2, pool_timeout=30, meter_provider=mp, name="orders"
    )
    seen(db)
    try:
        # 1. two acquires on an empty pool: each waits for its own connect
        a = await db.acquire()
        b = await db.acquire()
        reading = Reading(r)
        units = {n: u for n, (u, _) in reading.metrics.items()}
        assert units == {n: u for n, u in UNITS.items() if n != "db.client.connection.use_time"}
        assert reading.count("db.client.connection.create_time", "orders") == 2
        assert reading.count("db.client.connection.wait_time", "orders") == 2
        assert "db.client.connection.use_time" not in reading.metrics  # nothing released yet
        assert reading.state("orders") == {"idle": 0, "used": 2}

        # 2. three waiters queue behind them
        served: list[int] = []

        async def waiter(i: int) -> None:
            async with db.acquire() as conn:
                served.append(i)
                await conn.fetchval("SELECT 1")

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(waiter, i)
            await wait_all_tasks_blocked()
            reading = Reading(r)
            assert reading.value("db.client.connection.pending_requests", "orders") == 3
            assert reading.value("db.client.connection.max", "orders") == 2
            assert reading.value("db.client.connection.idle.max", "orders") == 2
            assert reading.value("db.client.connection.idle.min", "orders") == 0
            assert reading.value("db.client.connection.timeouts", "orders") == 0

            # 3. a fourth gives up after 50 ms: one timeout, no wait_time point
            with pytest.raises(pool.PoolTimeoutError):
                await db.acquire(timeout=0.05)
            reading = Reading(r)
            assert reading.value("db.client.connection.timeouts", "orders") == 1
            assert reading.value("db.client.connection.pending_requests", "orders") == 3
            await anyio.sleep(0.1)  # every waiter has waited at least 0.15 s now

            # 4. two releases serve the three waiters, in order
            await db.release(a)
            await db.release(b)
        assert served == [0, 1, 2]
        reading = Reading(r)
        assert {n: u for n, (u, _) in reading.metrics.items()} == UNITS
        assert reading.value("db.client.connection.pending_requests", "orders") == 0
        assert reading.count("db.client.connection.wait_time", "orders") == 2 + 3
        assert reading.total("db.client.connection.wait_time", "orders") >= 3 * 0.15
        assert reading.count("db.client.connection.use_time", "orders") == 2 + 3
        assert reading.total("db.client.connection.use_time", "orders") >= 2 * 0.15
        assert reading.count("db.client.connection.create_time", "orders") == 2
        assert reading.state("orders") == {"idle": 2, "used": 0}

        # 5. a fast-path acquire (an idle connection): no wait, one use
        await db.fetchval("SELECT 1")
        async with db.transaction() as conn:  # the slow release (a commit, then the ledger)
            await conn.fetchval("SELECT 1")
        reading = Reading(r)
        assert reading.count("db.client.connection.wait_time", "orders") == 5
        assert reading.count("db.client.connection.use_time", "orders") == 7
        assert reading.count("db.client.connection.create_time", "orders") == 2
        stats = db.stats()
        assert stats.timeouts == 1 and stats.waited == 5 and stats.opened == 2

        # 6. the limits follow resize()
        await db.resize(5)
        reading = Reading(r)
        assert reading.value("db.client.connection.max", "orders") == 5
        assert reading.value("db.client.connection.idle.max", "orders") == 5
    finally:
        await db.disconnect()
    reading = Reading(r)
    assert reading.state("orders") == {"idle": 0, "used": 0}


async def test_pending_requests_counts_the_waiters_when_read(
    reader: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    mp, r = reader
    db: pool.Pool[Any] = pool.Pool(pg_url(), connection_limit=1, meter_provider=mp, name="p")
    try:
        holder = await db.acquire()
        async with anyio.create_task_group() as tg:
            for n in range(1, 6):
                tg.start_soon(db.fetchval, "SELECT 1")
                await wait_all_tasks_blocked()
                assert Reading(r).value("db.client.connection.pending_requests", "p") == n
            await db.release(holder)
        assert Reading(r).value("db.client.connection.pending_requests", "p") == 0
    finally:
        await db.disconnect()


async def test_instrument_covers_pools_built_before_and_after(
    reader: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    mp, r = reader
    before: pool.Pool[Any] = pool.Pool(pg_url(), connection_limit=3, name="before")
    pool.instrument(mp)
    pool.instrument(mp)  # twice: no second set of instruments
    after: pool.Pool[Any] = pool.Pool(pg_url(), connection_limit=4, name="after")
    try:
        await before.fetchval("SELECT 1")
        await after.fetchval("SELECT 1")
        reading = Reading(r)
        assert reading.value("db.client.connection.max", "before") == 3
        assert reading.value("db.client.connection.max", "after") == 4
        for name in ("before", "after"):
            assert reading.count("db.client.connection.use_time", name) == 1
            assert reading.count("db.client.connection.create_time", name) == 1
    finally:
        await before.disconnect()
        await after.disconnect()
    _metrics.uninstrument(mp)
    # uninstrumented again: the ledger's own methods, no recorders
    for db in (before, after):
        assert "give_back" not in vars(db._ledger) and "release" not in vars(db._ledger)
        assert db._engine.record_wait is None and db._engine.record_create is None


async def test_the_global_meter_provider_is_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import metrics

    r = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[r])
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: mp)
    try:
        pool.instrument()
        db: pool.Pool[Any] = pool.Pool(pg_url(), connection_limit=2, name="global")
        try:
            await db.fetchval("SELECT 1")
        finally:
            await db.disconnect()
        assert Reading(r).count("db.client.connection.use_time", "global") == 1
    finally:
        _metrics.uninstrument()
        mp.shutdown()


async def test_an_uninstrumented_pool_runs_the_plain_code() -> None:
    db: pool.Pool[Any] = pool.Pool("sqlite:///:memory:")
    assert "give_back" not in vars(db._ledger) and "take_idle" not in vars(db._ledger)
    assert type(db._ledger).give_back is Ledger.give_back
    assert db._engine.record_wait is None and db._engine.record_create is None
    assert db._engine.metrics is None


async def test_a_reset_hook_pool_keeps_its_slow_release_and_records_it(
    reader: tuple[MeterProvider, InMemoryMetricReader],
) -> None:
    mp, r = reader
    resets = 0

    async def reset(conn: Any) -> None:
        nonlocal resets
        resets += 1

    db: pool.Pool[Any] = pool.Pool(
        pg_url(), connection_limit=1, reset=reset, meter_provider=mp, name="reset"
    )
    try:
        for _ in range(3):
            await db.fetchval("SELECT 1")
    finally:
        await db.disconnect()
    assert resets == 3
    assert Reading(r).count("db.client.connection.use_time", "reset") == 3


async def test_pool_names_never_hold_the_password(seen: Callable[[object], None]) -> None:
    cases = {
        "postgresql://app:s3cr3t@db.example/shop": "db.example:5432/shop",
        "postgresql://app:s3cr3t@db.example:6543/shop?sslmode=disable": "db.example:6543/shop",
        "postgresql://app:s3cr3t@h1:5432,h2/shop": "h1:5432,h2:5432/shop",
        "mysql://app:s3cr3t@db.example/shop": "db.example:3306/shop",
        "sqlite:///var/data/app.db": "var/data/app.db",
        "sqlite:////abs/app.db": "/abs/app.db",
    }
    for url, name in cases.items():
        db: pool.Pool[Any] = pool.Pool(url)
        seen(db._engine.metrics_name)
        assert db._engine.metrics_name == name, url
        assert "s3cr3t" not in db._engine.metrics_name
    assert pool.Pool("sqlite:///:memory:", name="cache")._engine.metrics_name == "cache"
    with pytest.raises(pool.ConfigError):
        pool.Pool("sqlite:///:memory:", name=3)  # type: ignore[arg-type]


async def test_a_missing_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("opentelemetry", "opentelemetry.metrics"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(pool.ConfigError, match=r"pip install 'pool-engine\[otel\]'"):
        pool.Pool("sqlite:///:memory:", meter_provider=object())
    with pytest.raises(pool.ConfigError, match=r"pip install 'pool-engine\[otel\]'"):
        pool.instrument()


async def test_importing_pool_imports_no_opentelemetry() -> None:
    code = (
        "import sys, pool\n"
        "db = pool.Pool('sqlite:///:memory:')\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "assert pool.instrument.__module__ == 'pool'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_lanes_carry_their_lane(
    reader: tuple[MeterProvider, InMemoryMetricReader]
) -> None:
    mp, r = reader
    from tests.fakedriver import FakeDriver

    db: pool.Pool[Any] = pool.Pool(
        "fake://m", driver=FakeDriver(), connection_limit=1, meter_provider=mp, name="lanes",
        lanes={"web": 2, "batch": 1},
    )
    holder = await db.acquire(lane="web")

    async def worker(lane: str) -> None:
        async with db.acquire(lane=lane, tenant="t"):
            pass

    async with anyio.create_task_group() as tg:
        for lane in ("web", "batch", "batch"):
            tg.start_soon(worker, lane)
        await wait_all_tasks_blocked()
        reading = Reading(r)
        name = "db.client.connection.pending_requests"
        assert reading.value(name, "lanes", pool_lane="web") == 1
        assert reading.value(name, "lanes", pool_lane="batch") == 2
        assert reading.value(name, "lanes", pool_lane="default") == 0
        await db.release(holder)
    reading = Reading(r)
    waits = {a.get("pool.lane"): p.count for a, p in reading.points(
        "db.client.connection.wait_time", "lanes")}
    # (the holder's acquire waited too: for the pool's first connect)
    assert waits == {"web": 2, "batch": 2}
