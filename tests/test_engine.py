"""The engine's ordering and bookkeeping, over a deterministic driver, on asyncio and trio.

Every guarantee here is also shown against real servers in test_pool_servers.py.
"""

from __future__ import annotations

import math

import anyio
import pytest
from anyio import wait_all_tasks_blocked

import pool
from tests.fakedriver import FakeConnection, FakeDriver

pytestmark = pytest.mark.anyio


def make(limit: int = 1, **overrides: object) -> tuple[pool.Pool[FakeConnection], FakeDriver]:
    driver = FakeDriver()
    db: pool.Pool[FakeConnection] = pool.Pool(
        "fake://test", driver=driver, connection_limit=limit, **overrides
    )
    return db, driver


async def take(db: pool.Pool[FakeConnection]) -> None:
    await db.acquire()


def assert_clean(db: pool.Pool[FakeConnection]) -> None:
    s = db.stats()
    assert s.in_use == 0
    assert s.waiting == 0
    assert s.opening == 0
    assert s.size == s.idle <= s.limit


class TestFifo:
    async def test_waiters_are_served_in_arrival_order(self) -> None:
        db, _ = make(limit=1)
        order: list[int] = []
        holder = await db.acquire()

        async def worker(i: int) -> None:
            async with db.acquire():
                order.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(worker, i)
                await wait_all_tasks_blocked()  # i is queued before i + 1 starts
            assert db.stats().waiting == 50
            await db.release(holder)
        assert order == list(range(50))
        assert_clean(db)

    async def test_newcomer_at_release_does_not_overtake(self) -> None:
        db, _ = make(limit=1)
        order: list[str] = []
        holder = await db.acquire()

        async def worker(name: str) -> None:
            async with db.acquire():
                order.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, "queued")
            await wait_all_tasks_blocked()
            # Release and arrive in the same step, before the waiter has run.
            await db.release(holder)
            tg.start_soon(worker, "newcomer")
            conn_seen_idle = db.stats().idle
        assert conn_seen_idle == 0  # handed straight to the waiter, never idle
        assert order == ["queued", "newcomer"]

    async def test_idle_connections_are_reused_last_in_first_out(self) -> None:
        db, _ = make(limit=3)
        a, b, c = await db.acquire(), await db.acquire(), await db.acquire()
        for conn in (a, b, c):
            await db.release(conn)
        assert await db.acquire() is c
        assert await db.acquire() is b

    async def test_a_new_connection_goes_to_the_oldest_waiter(self) -> None:
        db, driver = make(limit=2)
        driver.gate = anyio.Event()
        got: list[tuple[str, int]] = []

        async def worker(name: str) -> None:
            conn = await db.acquire()
            got.append((name, conn.id))

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, "first")
            await wait_all_tasks_blocked()
            tg.start_soon(worker, "second")
            await wait_all_tasks_blocked()
            assert db.stats().opening == 1  # slow start: one opening while none is open
            driver.gate.set()
        assert [name for name, _ in got] == ["first", "second"]

    async def test_cancelled_waiters_leave_the_middle_of_the_queue(self) -> None:
        db, _ = make(limit=1)
        holder = await db.acquire()
        order: list[int] = []
        scopes: dict[int, anyio.CancelScope] = {}

        async def worker(i: int) -> None:
            with anyio.CancelScope() as scope:
                scopes[i] = scope
                async with db.acquire():
                    order.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(worker, i)
                await wait_all_tasks_blocked()
            for i in (3, 4, 7):
                scopes[i].cancel()
            await wait_all_tasks_blocked()
            assert db.stats().waiting == 7
            await db.release(holder)
        assert order == [0, 1, 2, 5, 6, 8, 9]
        assert_clean(db)


class TestGrowth:
    async def test_lazy_and_bounded(self) -> None:
        db, driver = make(limit=7)
        assert db.stats().size == 0
        assert driver.connects == 0
        release = anyio.Event()
        peak = 0

        async def holder() -> None:
            nonlocal peak
            async with db.acquire():
                peak = max(peak, db.stats().size)
                await release.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(holder)
            await wait_all_tasks_blocked()
            assert db.stats().size == 7
            assert db.stats().waiting == 23
            release.set()
        assert peak <= 7
        assert driver.connects == 7
        assert db.stats().size == 7

    async def test_a_spike_of_quick_requests_does_not_open_the_whole_limit(self) -> None:
        db, driver = make(limit=10)
        driver.gate = anyio.Event()  # opening is slow; each request is quick
        served = 0

        async def request() -> None:
            nonlocal served
            async with db.acquire():
                served += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(request)
            await wait_all_tasks_blocked()
            assert db.stats().opening == 1  # growth starts at one and doubles
            gate, driver.gate = driver.gate, None
            driver.connect_delay = 0.05  # the next openings are slow
            gate.set()
        assert served == 50
        # the first connection served the queue before a second one was even needed
        assert driver.connects <= 2

    async def test_opens_only_when_none_is_idle(self) -> None:
        db, driver = make(limit=5)
        for _ in range(20):
            async with db.acquire():
                pass
        assert driver.connects == 1


class TestTimeout:
    async def test_timeout_error_has_code_message_and_diagnosis(self) -> None:
        db, _ = make(limit=2, pool_timeout=0.05)
        a, b = await db.acquire(), await db.acquire()
        with pytest.raises(pool.PoolTimeoutError) as info:
            await db.acquire()
        err = info.value
        assert isinstance(err, pool.PoolError)
        assert isinstance(err, TimeoutError)
        assert err.code == "P2024"
        text = str(err)
        assert text.startswith("Timed out fetching a new connection from the connection pool.")
        assert "(Current connection pool timeout: 0.05, connection limit: 2)" in text
        assert "2 in use, 0 idle, 0 opening, 0 waiting" in text
        assert err.in_use == 2
        assert len(err.holders) == 2
        assert "test_engine.py" in err.holders[0].call_site
        assert db.stats().timeouts == 1
        await db.release(a)
        await db.release(b)
        assert_clean(db)

    async def test_per_call_timeout_overrides_and_is_reported(self) -> None:
        db, _ = make(limit=1, pool_timeout=10)
        await db.acquire()
        with anyio.fail_after(5), pytest.raises(pool.PoolTimeoutError, match=r"timeout: 0.02,"):
            await db.acquire(timeout=0.02)

    async def test_zero_waits_forever_and_is_served(self) -> None:
        db, _ = make(limit=1, pool_timeout=0)
        holder = await db.acquire()
        got: list[FakeConnection] = []

        async def waiter() -> None:
            got.append(await db.acquire())

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            assert db.stats().waiting == 1
            await db.release(holder)
        assert got == [holder]

    async def test_timeout_bounds_opening_too(self) -> None:
        db, driver = make(limit=1, pool_timeout=0.05)
        driver.gate = anyio.Event()  # connect never finishes
        with pytest.raises(pool.PoolTimeoutError):
            await db.acquire()
        assert_clean(db)
        assert db.stats().size == 0


class TestCancellation:
    async def test_cancelled_acquire_leaves_no_trace(self) -> None:
        db, _ = make(limit=1)
        holder = await db.acquire()
        before = db.stats()
        with anyio.move_on_after(0.01):
            await db.acquire()
        after = db.stats()
        assert after == before
        await db.release(holder)

    async def test_cancelled_while_opening_leaves_no_trace(self) -> None:
        db, driver = make(limit=1)
        driver.gate = anyio.Event()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(take, db)
                await wait_all_tasks_blocked()
                assert db.stats().opening == 1
                scope.cancel()
        s = db.stats()
        assert (s.size, s.opening, s.waiting, s.in_use, s.opened) == (0, 0, 0, 0, 0)

    async def test_waiter_cancelled_when_handed_a_connection_passes_it_on(self) -> None:
        db, _ = make(limit=1)
        holder = await db.acquire()
        got: list[FakeConnection] = []

        async def second() -> None:
            got.append(await db.acquire())

        async with anyio.create_task_group() as tg:
            first_scope = anyio.CancelScope()
            tg.start_soon(self._acquire_in, db, first_scope)
            await wait_all_tasks_blocked()
            tg.start_soon(second)
            await wait_all_tasks_blocked()
            # Hand the connection to the first waiter, then cancel it before it runs.
            await db.release(holder)
            first_scope.cancel()
        assert got == [holder]
        assert db.stats().in_use == 1

    @staticmethod
    async def _acquire_in(db: pool.Pool[FakeConnection], scope: anyio.CancelScope) -> None:
        with scope:
            await db.acquire()
            pytest.fail("the cancelled waiter must not get the connection")

    async def test_holder_cancelled_mid_query_closes_the_connection(self) -> None:
        db, driver = make(limit=1)
        driver.query_gate = anyio.Event()  # the query never returns
        conn_ids: list[int] = []
        with anyio.move_on_after(0.02):
            async with db.acquire() as conn:
                conn_ids.append(conn.id)
                await driver.fetch(conn, "SELECT slow", ())
        assert driver.closed and driver.closed[0].id == conn_ids[0]
        driver.query_gate = None
        assert await db.fetchval("SELECT 1") != conn_ids[0]
        assert_clean(db)

    async def test_fetch_cancelled_mid_query_closes_the_connection(self) -> None:
        db, driver = make(limit=2)
        driver.query_gate = anyio.Event()
        with anyio.move_on_after(0.02):
            await db.fetch("SELECT slow")
        assert len(driver.closed) == 1
        assert_clean(db)
        assert db.stats().size == 0


class TestRelease:
    async def test_clean_release_needs_no_round_trip(self) -> None:
        db, driver = make(limit=1)
        conn = await db.acquire()
        queries = conn.queries
        await db.release(conn)
        assert conn.queries == queries
        assert driver.pings == 0

    async def test_release_inside_a_transaction_rolls_back(self) -> None:
        db, driver = make(limit=1)
        conn = await db.acquire()
        await driver.begin(conn)
        await driver.execute(conn, "INSERT", ())
        await db.release(conn)
        assert conn.alive and not conn.in_tx and conn.committed == []

    async def test_broken_connection_is_closed_and_never_lent_again(self) -> None:
        db, driver = make(limit=1)
        conn = await db.acquire()
        driver.terminate(conn)
        await db.release(conn)
        assert db.stats().size == 0
        assert await db.acquire() is not conn

    async def test_connection_dead_while_idle_is_never_lent(self) -> None:
        db, _driver = make(limit=2)
        conn = await db.acquire()
        await db.release(conn)
        conn.alive = False  # killed on the server while idle
        assert await db.acquire() is not conn

    async def test_releasing_twice_is_an_error(self) -> None:
        db, _ = make(limit=1)
        conn = await db.acquire()
        await db.release(conn)
        with pytest.raises(pool.PoolError, match="not lent by this pool"):
            await db.release(conn)

    async def test_idle_beyond_health_window_is_pinged_first(self) -> None:
        db, driver = make(limit=1, health_check_after=0)
        conn = await db.acquire()
        await db.release(conn)
        driver.ping_fails = True
        second = await db.acquire()
        assert second is not conn
        assert not conn.alive


class TestTransactions:
    async def test_commits_on_success(self) -> None:
        db, _ = make(limit=1)
        async with db.transaction() as conn:
            await db._driver.execute(conn, "INSERT", ())
        assert conn.committed == ["INSERT"]
        assert not conn.in_tx

    async def test_rolls_back_on_error(self) -> None:
        db, _ = make(limit=1)
        with pytest.raises(RuntimeError):
            async with db.transaction() as conn:
                await db._driver.execute(conn, "INSERT", ())
                raise RuntimeError("boom")
        assert conn.committed == [] and conn.alive
        assert_clean(db)

    async def test_cancellation_closes_the_connection(self) -> None:
        db, driver = make(limit=1)
        with anyio.move_on_after(0.01):
            async with db.transaction() as conn:
                await driver.execute(conn, "INSERT", ())
                await anyio.sleep_forever()
        assert not conn.alive and conn.committed == []
        assert_clean(db)


class TestLimits:
    async def test_max_waiting_rejects_at_once(self) -> None:
        db, _ = make(limit=1, max_waiting=2)
        await db.acquire()
        async with anyio.create_task_group() as tg:
            tg.start_soon(take, db)
            tg.start_soon(take, db)
            await wait_all_tasks_blocked()
            with pytest.raises(pool.TooManyWaitersError):
                await db.acquire()
            tg.cancel_scope.cancel()
        assert db.stats().waiting == 0


class TestLifecycle:
    async def test_disconnect_fails_waiters_and_can_reconnect(self) -> None:
        db, _driver = make(limit=1)
        await db.acquire()
        errors: list[BaseException] = []

        async def waiter() -> None:
            try:
                await db.acquire()
            except pool.PoolClosedError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await wait_all_tasks_blocked()
            await db.disconnect()
        assert len(errors) == 1
        assert db.stats().size == 0
        await db.disconnect()  # idempotent
        assert await db.fetchval("SELECT 1")  # reconnects lazily
        assert db.stats().size == 1

    async def test_connect_opens_one_connection(self) -> None:
        db, driver = make(limit=4)
        async with db:
            assert db.stats().size == 1
            assert driver.connects == 1
        assert db.stats().size == 0

    async def test_connect_error_is_p1001_with_the_cause(self) -> None:
        db, driver = make(limit=2)
        driver.fail_connect = OSError("connection refused")
        with pytest.raises(pool.ConnectError) as info:
            await db.connect()
        assert info.value.code == "P1001"
        assert isinstance(info.value.__cause__, OSError)
        assert_clean(db)
        assert db.stats().size == 0

    async def test_release_after_disconnect_is_harmless(self) -> None:
        db, _ = make(limit=1)
        conn = await db.acquire()
        await db.disconnect()
        await db.release(conn)
        assert db.stats().size == 0

    async def test_stats_totals(self) -> None:
        db, _ = make(limit=1)
        holder = await db.acquire()
        async with anyio.create_task_group() as tg:
            tg.start_soon(db.fetch, "SELECT 1")
            await wait_all_tasks_blocked()
            await db.release(holder)
        s = db.stats()
        # both waited: the first for its connection to open, the second for a release
        assert (s.acquired, s.waited, s.opened, s.closed) == (2, 2, 1, 0)
        assert s.wait_seconds > 0
        assert not math.isnan(s.wait_seconds)


class TestCircuitBreaker:
    async def test_waiters_fail_fast_while_connects_keep_failing(self) -> None:
        db, driver = make(limit=3, pool_timeout=30)
        driver.fail_connect = ConnectionRefusedError("refused")
        driver.gate = anyio.Event()
        errors: list[BaseException] = []

        async def caller() -> None:
            try:
                await db.acquire()
            except pool.ConnectError as exc:
                errors.append(exc)

        with anyio.fail_after(2):  # far below pool_timeout: nobody waits it out
            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(caller)
                await wait_all_tasks_blocked()
                driver.gate.set()
        assert len(errors) == 6
        assert all(isinstance(e.__cause__, ConnectionRefusedError) for e in errors)
        assert driver.attempts == 1  # one opener tried; everyone else failed fast
        attempts = driver.attempts
        with pytest.raises(pool.ConnectError, match="failing fast"):
            await db.acquire()
        assert driver.attempts == attempts  # within the back-off: no new connect
        assert_clean(db)

    async def test_one_probe_after_the_back_off_then_recovery(self) -> None:
        db, driver = make(limit=3)
        driver.fail_connect = ConnectionRefusedError("refused")
        with pytest.raises(pool.ConnectError):
            await db.acquire()
        driver.fail_connect = None  # the server is back
        with anyio.fail_after(2):
            while True:
                try:
                    conn = await db.acquire()
                    break
                except pool.ConnectError:
                    await anyio.sleep(0.01)  # the back-off is short; keep asking
        assert conn.alive
        await db.release(conn)
        s = db.stats()
        assert (s.size, s.in_use) == (1, 0)

    async def test_refused_connects_retire_connections_opened_before(self) -> None:
        db, driver = make(limit=3)
        a, b = await db.acquire(), await db.acquire()
        driver.fail_connect = ConnectionRefusedError("server restarting")
        with pytest.raises(pool.ConnectError):
            await db.acquire()  # needs a new connection, and the server refuses: it is gone
        await db.release(a)
        await db.release(b)
        assert not a.alive and not b.alive  # opened before: retired when they came back
        assert db.stats().size == 0


    async def test_a_sleeping_waiter_probes_when_the_back_off_ends(self) -> None:
        db, driver = make(limit=2, pool_timeout=5)
        holder = await db.acquire()  # lent: so waiters are not failed fast
        driver.fail_connect = ConnectionRefusedError("refused")
        with pytest.raises(pool.ConnectError):
            async with db.acquire():
                pass
        driver.fail_connect = None  # the server is back; nobody releases anything
        with anyio.fail_after(2):  # well before pool_timeout
            async with db.acquire() as conn:
                assert conn is not holder and conn.alive


class TestMaintenance:
    async def test_idle_connections_expire_with_no_calls(self) -> None:
        db, driver = make(limit=4, max_idle_connection_lifetime=0.1)
        async with db:
            conns = [await db.acquire() for _ in range(4)]
            for conn in conns:
                await db.release(conn)
            with anyio.fail_after(2):
                while len(driver.closed) < 4:
                    await anyio.sleep(0.01)  # no pool call: only the maintenance acts
            assert db.stats().size == 0
        assert all(not c.alive for c in conns)

    async def test_lifetime_rotates_connections(self) -> None:
        db, _driver = make(limit=1, max_connection_lifetime=0.05)
        first = await db.acquire()
        await db.release(first)
        with anyio.fail_after(2):
            while (conn := await db.acquire()) is first:
                await db.release(conn)
                await anyio.sleep(0.01)
        await db.release(conn)
        assert not first.alive

    async def test_leak_detection_names_task_and_call_site(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        db, _ = make(limit=2, leak_detection_threshold=0.05)
        async with db:
            async def leaky_worker() -> None:
                await db.acquire()  # never released
                await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                tg.start_soon(leaky_worker, name="leaky-worker")
                with anyio.fail_after(2):
                    while not any("leak" in r.getMessage() for r in caplog.records):
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        [record] = [r for r in caplog.records if "leak" in r.getMessage()]
        assert record.levelname == "WARNING"
        assert "leaky-worker" in record.getMessage()
        assert "test_engine.py:" in record.getMessage()


class TestArguments:
    async def test_bad_timeouts_and_sql(self) -> None:
        db, _ = make(limit=1)
        for bad in (-1, float("nan"), "1", True, 1e9):
            with pytest.raises(pool.ConfigError):
                db.acquire(timeout=bad)  # type: ignore[arg-type]
            with pytest.raises(pool.ConfigError):
                db.transaction(timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await db.fetch(b"SELECT 1")  # type: ignore[arg-type]
        with pytest.raises(pool.ConfigError):
            await db.disconnect(grace=-1)


class TestRepr:
    async def test_repr_shows_state_not_secrets(self) -> None:
        db = pool.Pool("fake://app:topsecret@db/shop", driver=FakeDriver(), connection_limit=9)
        text = repr(db)
        assert "topsecret" not in text
        assert text == "<Pool fake://app:***@db/shop [in use 0, idle 0, waiting 0, limit 9]>"
