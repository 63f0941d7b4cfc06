"""Engine faults found by the fault suite, pinned down on the deterministic driver.

Each test is the smallest sequence of events that shows one fault; the storm,
expiry and state-machine tests find the same faults at scale. They run on
asyncio and trio.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio import wait_all_tasks_blocked

import pool
from tests.fakedriver import FakeConnection, FakeDriver

pytestmark = pytest.mark.anyio


class OneBlip(FakeDriver):
    """``fail_connect`` fails one connect only: a blip, and the server is back."""

    async def connect(self) -> FakeConnection:
        try:
            return await super().connect()
        finally:
            self.fail_connect = None


@asynccontextmanager
async def fake_pool(
    limit: int, driver: FakeDriver | None = None, **overrides: object
) -> AsyncIterator[tuple[pool.Pool[FakeConnection], FakeDriver]]:
    driver = driver or FakeDriver()
    db: pool.Pool[FakeConnection] = pool.Pool(
        "fake://faults", driver=driver, connection_limit=limit, **overrides
    )
    try:
        yield db, driver
    finally:
        await db.disconnect()


class TestOpenerIsNotStranded:
    async def test_a_waiter_whose_connection_went_to_an_older_one_may_open_again(self) -> None:
        # limit 1: h holds the connection; w1 and w2 queue. h's connection breaks,
        # so w2 (the newest) is woken to open one; it goes to w1, the oldest. Then
        # w1's breaks too: the capacity is free again, and w2 must open for itself.
        async with fake_pool(limit=1, pool_timeout=1) as (db, _):
            h = await db.acquire()
            outcome: dict[str, object] = {}

            async def waiter(name: str) -> None:
                try:
                    async with db.acquire() as conn:
                        outcome[name] = "served"
                        conn.alive = False  # breaks while held: closed at release
                except pool.PoolError as exc:
                    outcome[name] = exc

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter, "w1")
                await wait_all_tasks_blocked()
                tg.start_soon(waiter, "w2")
                await wait_all_tasks_blocked()
                h.alive = False
                await db.release(h)
            assert outcome == {"w1": "served", "w2": "served"}, (outcome, db.stats())


class TestBreakerProbe:
    async def test_a_waiter_asleep_when_the_breaker_opens_probes_after_the_back_off(
        self,
    ) -> None:
        # One connection is out, so the breaker does not fail waiters fast. A
        # connect fails (the breaker opens for 50 ms); the server is back at
        # once. The waiter that was already asleep must be woken to probe when
        # the back-off ends, not left to wait out pool_timeout.
        async with fake_pool(limit=2, pool_timeout=2, driver=OneBlip()) as (db, driver):
            held = await db.acquire()
            driver.gate = anyio.Event()
            driver.fail_connect = ConnectionResetError("a network blip")
            outcome: dict[str, object] = {}

            async def opener() -> None:
                with pytest.raises(pool.ConnectError):
                    await db.acquire()

            async def sleeper() -> None:
                started = time.monotonic()
                try:
                    conn = await db.acquire()
                except pool.PoolError as exc:
                    outcome["sleeper"] = exc
                else:
                    outcome["sleeper"] = time.monotonic() - started
                    await db.release(conn)

            async with anyio.create_task_group() as tg:
                tg.start_soon(opener)
                await wait_all_tasks_blocked()  # it is connecting, behind the gate
                tg.start_soon(sleeper)
                await wait_all_tasks_blocked()  # asleep: no capacity to open
                driver.gate.set()  # the connect fails, and the server is back at once
                driver.gate = None
            waited = outcome["sleeper"]
            assert isinstance(waited, float), f"{waited!r}; {db.stats()}"
            assert waited < 1.0  # the back-off is 50 ms, pool_timeout 2 s
            await db.release(held)


class TestHandoffWhileOpening:
    async def test_a_waiter_served_while_its_connect_hangs_takes_the_connection(
        self,
    ) -> None:
        # w opens a connection, and the connect hangs. A connection released
        # meanwhile goes to w, which must take it now, not after its connect.
        async with fake_pool(limit=2, pool_timeout=1) as (db, driver):
            held = await db.acquire()
            driver.gate = anyio.Event()  # never opened: the connect hangs
            got: list[FakeConnection] = []

            async def waiter() -> None:
                got.append(await db.acquire())

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await wait_all_tasks_blocked()
                assert db.stats().opening == 1
                await db.release(held)
            assert got == [held]
            s = db.stats()
            assert (s.in_use, s.opening, s.waiting, s.size) == (1, 0, 0, 1), s
            await db.release(held)


class TestBreakerWait:
    async def test_waiters_do_not_spin_while_the_probe_connect_is_in_flight(self) -> None:
        # A connect fails: the breaker opens for 50 ms. After the back-off, one
        # waiter probes, and its connect hangs (a server slow to answer). Another
        # waiter must sleep meanwhile, not loop on a back-off that already ended.
        async with fake_pool(limit=3, pool_timeout=5) as (db, driver):
            held = await db.acquire()
            driver.fail_connect = ConnectionResetError("a network blip")
            with pytest.raises(pool.ConnectError):
                await db.acquire()
            driver.fail_connect = None
            driver.gate = anyio.Event()  # the probe's connect will hang
            served: list[str] = []

            async def waiter(name: str) -> None:
                async with db.acquire():
                    served.append(name)

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter, "probe")
                await anyio.sleep(0.1)  # the back-off ends: it probes, and hangs
                assert driver.attempts == 3 and db.stats().opening == 1
                tg.start_soon(waiter, "next")
                # Everybody waits: the process should be idle, not busy.
                cpu = time.process_time()
                await anyio.sleep(0.3)
                busy = time.process_time() - cpu
                driver.gate.set()
                await db.release(held)
            assert busy < 0.1, f"{busy:.2f}s of CPU in 0.3s: a waiter spins"
            assert sorted(served) == ["next", "probe"]
