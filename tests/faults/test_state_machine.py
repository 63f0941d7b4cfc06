"""A state-machine model of the pool, explored by Hypothesis.

Clients acquire (waiting forever, or with a tiny timeout), hold, release, are
cancelled while waiting or holding; connections are killed; connects hang
behind a gate or fail (refused, or reset); the pool is disconnected and used
again. After every step, with every task run until it blocks, the invariants
hold:

* size <= limit, size == idle + in_use + opening, opened - closed == idle + in_use;
* waiters are served first-in first-out (a ticket per acquire, in arrival order);
* no connection is lent twice at once, nor lent while idle, dead or closed;
* no waiter is stranded: none waits while a connection sits idle, nor while
  there is room to open one, nobody opening and no connect failing;
* the counts add up: in use, waiting and acquired match what the clients saw;
* nothing leaks: every connection the driver opened is idle, lent or closed.

It drives the engine on asyncio over a deterministic driver of its own, with an
``asyncio.Runner`` kept for a whole example: each step runs its work in that
loop, and the clients are tasks of the loop that outlive the step. Time is
virtual, for the loop and for the engine's ``time.monotonic()`` alike: it moves
only in the ``let_time_pass`` step, so every run of an example is the same run,
as Hypothesis needs to replay and shrink it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pool
from pool import _breaker, _diagnosis, _engine, _ledger

LIMIT = 3


class VirtualClock:
    """Stands in for the engine's ``time`` module, and for the loop's clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


CLOCK = VirtualClock()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose timers follow CLOCK: they fire when a step moves it."""

    def time(self) -> float:
        return CLOCK.now


class ModelConnection:
    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.killed = False  # by the test: the server side went away
        self.terminated = False  # by the pool

    def __repr__(self) -> str:
        flags = " killed" * self.killed + " closed" * self.terminated
        return f"<conn {self.id}{flags}>"


class ModelDriver:
    """Connects hang while ``gate`` is set, and fail while ``fail`` is set."""

    scheme = "model"

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None
        self.opened: list[ModelConnection] = []
        self.connecting = 0

    async def connect(self) -> ModelConnection:
        self.connecting += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await anyio.lowlevel.checkpoint()
        finally:
            self.connecting -= 1
        if self.fail is not None:
            raise self.fail
        conn = ModelConnection()
        self.opened.append(conn)
        return conn

    async def close(self, conn: ModelConnection) -> None:
        conn.terminated = True

    def terminate(self, conn: ModelConnection) -> None:
        conn.terminated = True

    def is_alive(self, conn: ModelConnection) -> bool:
        return not conn.killed and not conn.terminated

    async def ping(self, conn: ModelConnection) -> None:
        await anyio.lowlevel.checkpoint()
        if not self.is_alive(conn):
            raise ConnectionError("the connection is gone")

    def in_transaction(self, conn: ModelConnection) -> bool:
        return False

    async def begin(self, conn: ModelConnection) -> None: ...

    async def commit(self, conn: ModelConnection) -> None: ...

    async def rollback(self, conn: ModelConnection) -> None: ...

    async def fetch(self, conn: ModelConnection, sql: str, args: Sequence[Any]) -> list[Any]:
        return []

    async def fetchrow(self, conn: ModelConnection, sql: str, args: Sequence[Any]) -> Any:
        return None

    async def fetchval(self, conn: ModelConnection, sql: str, args: Sequence[Any]) -> Any:
        return None

    async def execute(self, conn: ModelConnection, sql: str, args: Sequence[Any]) -> Any:
        return "OK"

    async def server_max_connections(self, conn: ModelConnection) -> int | None:
        return None


@dataclass(eq=False)
class Client:
    """One acquire, from arrival to its end."""

    ticket: int
    timeout: float | None
    state: str = "waiting"  # -> holding -> released | cancelled | timeout | ...
    conn: ModelConnection | None = None
    #: held when the pool was disconnected: the pool no longer counts it
    orphan: bool = False
    error: BaseException | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    scope: anyio.CancelScope | None = None
    task: asyncio.Task[None] | None = None


def blocked(task: asyncio.Task[Any]) -> bool:
    waiter = task._fut_waiter  # type: ignore[attr-defined]
    return waiter is not None and not waiter.done()


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        CLOCK.now = 1000.0
        self.runner = asyncio.Runner(loop_factory=VirtualTimeLoop)
        self.driver = ModelDriver()
        self.db: pool.Pool[ModelConnection] = pool.Pool(
            "model://machine",
            driver=self.driver,
            connection_limit=LIMIT,
            pool_timeout=0,  # only the tiny-timeout clients time out
            health_check_after=0.01,  # a connection idle a while is pinged before it is lent
        )
        self.clients: list[Client] = []
        self.tickets = itertools.count()
        self.grants = 0
        self.violations: list[str] = []

    # ------------------------------------------------------------ driving the loop

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    async def settle(self) -> None:
        """Run the loop until every client task is blocked or done."""
        for _ in range(10_000):
            await asyncio.sleep(0)
            tasks = [c.task for c in self.clients if c.task is not None]
            if all(t.done() or blocked(t) for t in tasks):
                return
        raise AssertionError("the clients never settled: a task spins")

    def step(self, coro: Any = None) -> None:
        async def go() -> None:
            if coro is not None:
                await coro
            await self.settle()

        self.run(go())

    async def client(self, c: Client) -> None:
        with anyio.CancelScope() as c.scope:
            try:
                async with self.db.acquire(timeout=c.timeout) as conn:
                    self.granted(c, conn)
                    await c.release.wait()
                c.state = "released"
                return
            except pool.PoolTimeoutError as exc:
                c.state, c.error = "timeout", exc
                if c.timeout is None:  # pool_timeout=0: it waits for ever
                    self.violations.append(f"client {c.ticket} timed out: {exc}")
            except pool.ConnectError as exc:
                c.state, c.error = "connect-error", exc
            except pool.PoolClosedError as exc:
                c.state, c.error = "closed", exc
            except Exception as exc:
                c.state, c.error = "error", exc
                self.violations.append(f"client {c.ticket} got {exc!r}")
        if c.scope.cancelled_caught:
            c.state = "cancelled"

    def granted(self, c: Client, conn: ModelConnection) -> None:
        self.grants += 1
        older = [o.ticket for o in self.clients if o.ticket < c.ticket and o.state == "waiting"]
        if older:
            self.violations.append(f"client {c.ticket} was served before waiting {older}")
        if conn.killed or conn.terminated:
            self.violations.append(f"client {c.ticket} was lent {conn!r}")
        for other in self.holders():
            if other.conn is conn:
                self.violations.append(f"{conn!r} lent to {c.ticket} and {other.ticket}")
        c.state, c.conn = "holding", conn

    async def cancel(self, c: Client) -> None:
        assert c.scope is not None
        c.scope.cancel()  # in the loop: anyio cancels from inside it

    def holders(self) -> list[Client]:
        return [c for c in self.clients if c.state == "holding"]

    def waiting(self) -> list[Client]:
        return [c for c in self.clients if c.state == "waiting"]

    def spawn(self, timeout: float | None) -> None:
        c = Client(next(self.tickets), timeout)
        self.clients.append(c)

        async def start() -> None:
            c.task = asyncio.create_task(self.client(c))

        self.step(start())

    # ------------------------------------------------------------ rules

    @rule()
    def acquire(self) -> None:
        self.spawn(None)

    @rule()
    def acquire_with_a_tiny_timeout(self) -> None:
        self.spawn(0.001)

    @precondition(lambda self: self.holders())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from(self.holders()))
        c.release.set()
        self.step()

    @precondition(lambda self: self.waiting())
    @rule(data=st.data())
    def cancel_a_waiter(self, data: st.DataObject) -> None:
        self.step(self.cancel(data.draw(st.sampled_from(self.waiting()))))

    @precondition(lambda self: self.holders())
    @rule(data=st.data())
    def cancel_a_holder(self, data: st.DataObject) -> None:
        self.step(self.cancel(data.draw(st.sampled_from(self.holders()))))

    @rule(seconds=st.sampled_from([0.0005, 0.002, 0.02, 0.06, 0.6]))
    def let_time_pass(self, seconds: float) -> None:
        """Tiny timeouts expire, the breaker's back-off ends, idle connections age."""
        CLOCK.now += seconds
        self.step()

    @precondition(lambda self: any(not c.terminated and not c.killed for c in self.driver.opened))
    @rule(data=st.data())
    def kill_a_connection(self, data: st.DataObject) -> None:
        live = [c for c in self.driver.opened if not c.terminated and not c.killed]
        data.draw(st.sampled_from(live)).killed = True
        self.step()

    @precondition(lambda self: self.driver.gate is None)
    @rule()
    def connects_hang(self) -> None:
        self.driver.gate = asyncio.Event()

    @precondition(lambda self: self.driver.gate is not None)
    @rule()
    def connects_finish(self) -> None:
        gate, self.driver.gate = self.driver.gate, None
        assert gate is not None
        gate.set()
        self.step()

    @rule(refused=st.booleans())
    def connects_fail(self, refused: bool) -> None:
        self.driver.fail = (
            ConnectionRefusedError("refused: the server is down")
            if refused
            else ConnectionResetError("reset by peer")
        )

    @rule()
    def disconnect(self) -> None:
        for c in self.holders():
            c.orphan = True
        self.step(self.db.disconnect())

    @rule()
    def reconnect(self) -> None:
        """The server is back, and a client uses the pool again (it reconnects lazily)."""
        self.driver.fail = None
        self.spawn(None)

    # ------------------------------------------------------------ invariants

    @invariant()
    def no_violation_seen_by_the_clients(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def the_totals_add_up(self) -> None:
        s = self.db.stats()
        assert s.size <= s.limit, s
        assert s.size == s.idle + s.in_use + s.opening + s.busy, s
        assert s.opened - s.closed == s.idle + s.in_use, s
        assert s.opening <= self.driver.connecting, s
        assert s.acquired == self.grants, s
        assert s.waiting == len(self.waiting()), (s, self.waiting())
        assert s.in_use == len([c for c in self.holders() if not c.orphan]), s

    @invariant()
    def no_connection_is_lent_twice_or_leaked(self) -> None:
        held = [c.conn for c in self.holders() if not c.orphan]
        idle = [rec.raw for rec in self.db._ledger.idle]
        assert len({id(conn) for conn in held + idle}) == len(held) + len(idle), (held, idle)
        for c in self.holders():
            if c.orphan:
                assert c.conn is not None and c.conn.terminated, c
        for conn in idle:
            assert not conn.terminated, conn
        kept = {id(conn) for conn in held + idle}
        leaked = [c for c in self.driver.opened if id(c) not in kept and not c.terminated]
        assert not leaked, f"open, but neither idle nor lent: {leaked}"

    @invariant()
    def no_waiter_is_stranded(self) -> None:
        s = self.db.stats()
        if not s.waiting:
            return
        assert s.idle == 0, f"callers wait while a connection sits idle: {s}"
        if not self.db._ledger.breaker.failures:
            # connects work: spare capacity must be in use by an opening
            assert s.size == s.limit or s.opening > 0, (
                f"callers wait, there is room to open, and nobody opens: {s}"
            )

    def teardown(self) -> None:
        async def close() -> None:
            for c in self.clients:
                if c.scope is not None:
                    c.scope.cancel()
            if self.driver.gate is not None:
                self.driver.gate.set()
            await self.settle()
            await self.db.disconnect()

        try:
            self.run(close())
        finally:
            self.runner.close()


class TestStateMachine:
    def test_the_pool_keeps_its_invariants_through_random_steps(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(_ledger, "time", CLOCK)  # the engine's time.monotonic()
        for module in (_breaker, _diagnosis, _engine):
            monkeypatch.setattr(module, "time", CLOCK)
        run_state_machine_as_test(
            PoolMachine,
            settings=settings(
                max_examples=300,
                stateful_step_count=50,
                deadline=None,
                database=None,
                report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
