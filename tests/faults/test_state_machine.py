"""An interleaving model of the pool, explored by Hypothesis.

Every I/O the driver does for the pool *parks*: a connect, a ping, a rollback,
a reset and a graceful close each append an entry to ``ModelDriver.parked``
and wait there until a rule releases it or fails it, picked by index, so that
Hypothesis explores every order in which in-flight I/O can end. Meanwhile the
other rules go on: clients acquire (waiting forever, or with a tiny timeout),
hold, release (clean, or inside a transaction, so that the pool rolls back),
and any client task may be cancelled, whether it waits, holds, or is parked in
a ping or a connect of its own; connections are killed server side; connects
are refused or reset; maintenance runs (``upkeep_once()`` as a task, which
parks on its closes, and the pool's own upkeep task when the clock passes its
tick); time passes, so that connections go stale (pinged before they are
lent), expire (closed by maintenance), leak (reported), and parked I/O and
tiny timeouts run out; ``disconnect()`` runs as a task of its own at any
moment, overlapping whatever is in flight, and the pool reopens on the next
acquire.

After every step, with every task of the loop run until it blocks or ends:

* the counts add up: ``size == idle + in_use + opening + busy <= limit``,
  ``0 <= opening <= connects in flight``, ``opened - closed == idle + in_use +
  busy``, ``acquired`` is what the clients were given, and a closed pool holds
  nothing and nobody waits on it;
* no connection is lent to two holders at once, nor lent while the pool runs
  I/O on it, nor lent closed or dead; every connection the pool counts as lent
  has exactly one holder, and a holder the pool no longer counts holds a
  connection that ``disconnect()`` closed;
* the queue is FIFO: a client is never served before an older client still
  queued (a client's place is when it queued, or when it first claimed an idle
  connection to check it, kept when that check fails and it queues: a client
  pinging a connection is not queued);
* nobody waits beside an idle connection, nor with room to open and nobody
  opening (while connects work);
* nothing leaks: every connection the driver opened and did not see closed is
  idle, lent or busy in the pool; when a ``disconnect()`` returns, every
  connection opened so far is closed;
* every connection is closed once: no close, terminate, ping, rollback or reset
  starts on a connection after its first effective close (a successful
  ``close()``, or ``terminate()``); a terminate after a close that raised is
  the engine's fallback and is allowed; no two pool I/O steps run on one
  connection at once.

The loop is an ``asyncio.Runner`` kept for a whole example, with a virtual
clock: the loop's timers and the engine's ``time.monotonic()`` read ``CLOCK``,
which moves only in ``let_time_pass``, so a run is a function of its steps, as
Hypothesis needs to replay and shrink it.

CI runs ``POOL_MODEL_EXAMPLES`` examples (default below) of up to
``POOL_MODEL_STEPS`` steps; a long run is
``POOL_MODEL_EXAMPLES=20000 pytest tests/faults/test_state_machine.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Sequence
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
from pool import _acquiring, _breaker, _closing, _diagnosis, _ledger, _state
from pool._conn import LENT
from pool._state import CLOSED_STATE

LIMIT = 3
EXAMPLES = int(os.environ.get("POOL_MODEL_EXAMPLES", "1500"))
STEPS = int(os.environ.get("POOL_MODEL_STEPS", "60"))


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
        self.in_tx = False  # the holder began a transaction
        #: how it was first closed: "closed" (a close() that returned) or "terminated"
        self.closed: str | None = None
        #: a close() raised (or was cut short): the engine terminates next
        self.close_failed = False
        #: the pool's I/O running on it now
        self.ops: list[str] = []

    def __repr__(self) -> str:
        flags = " killed" * self.killed + f" {self.closed}" * bool(self.closed)
        return f"<conn {self.id}{flags}>"


@dataclass(eq=False)
class Parked:
    """One driver operation, waiting for a rule to release or fail it."""

    kind: str  # connect, ping, rollback, reset, close
    conn: ModelConnection | None
    future: asyncio.Future[None]

    def __repr__(self) -> str:
        return f"<{self.kind} {self.conn!r}>" if self.conn else f"<{self.kind}>"


class ModelDriver:
    """Every I/O parks in ``parked``; the driver also records what the pool did wrong."""

    scheme = "model"

    def __init__(self, violations: list[str]) -> None:
        self.violations = violations
        self.parked: list[Parked] = []
        self.opened: list[ModelConnection] = []

    async def _park(self, kind: str, conn: ModelConnection | None) -> None:
        op = Parked(kind, conn, asyncio.get_running_loop().create_future())
        self.parked.append(op)
        try:
            await op.future
        finally:
            if op in self.parked:  # cancelled (by a timeout, a scope, disconnect())
                self.parked.remove(op)

    def finish(self, op: Parked, error: BaseException | None) -> None:
        self.parked.remove(op)
        if op.future.done():  # cancelled: its task has yet to run and see it
            return
        if error is None:
            op.future.set_result(None)
        else:
            op.future.set_exception(error)

    def connecting(self) -> int:
        return sum(op.kind == "connect" for op in self.parked)

    async def _io(self, kind: str, conn: ModelConnection) -> None:
        """A round trip the pool makes on an open connection."""
        if conn.closed:
            self.violations.append(f"{kind} on {conn!r}, after it was closed")
        if conn.ops:
            self.violations.append(f"{kind} on {conn!r} while {conn.ops} runs on it")
        conn.ops.append(kind)
        try:
            await self._park(kind, conn)
        finally:
            conn.ops.remove(kind)
        if conn.killed or conn.closed:
            raise ConnectionResetError("the connection is gone")

    async def connect(self) -> ModelConnection:
        await self._park("connect", None)
        conn = ModelConnection()
        self.opened.append(conn)
        return conn

    async def close(self, conn: ModelConnection) -> None:
        if conn.closed:
            self.violations.append(f"close() on {conn!r}, closed already")
        if conn.ops:
            self.violations.append(f"close() on {conn!r} while {conn.ops} runs on it")
        conn.ops.append("close")
        try:
            await self._park("close", conn)
        except BaseException:
            conn.close_failed = True
            raise
        finally:
            conn.ops.remove("close")
        if conn.closed is None:  # (terminated meanwhile: closing it again is a no-op)
            conn.closed = "closed"

    def terminate(self, conn: ModelConnection) -> None:
        failed, conn.close_failed = conn.close_failed, False
        if conn.closed is None:
            conn.closed = "terminated"
        elif not failed:
            self.violations.append(f"terminate() on {conn!r}, closed already")

    def is_alive(self, conn: ModelConnection) -> bool:
        return not conn.killed and not conn.closed

    async def ping(self, conn: ModelConnection) -> None:
        await self._io("ping", conn)

    async def rollback(self, conn: ModelConnection) -> None:
        await self._io("rollback", conn)
        conn.in_tx = False

    async def reset(self, conn: ModelConnection) -> None:
        """Not called by the engine today; parked like the rest if it ever is."""
        await self._io("reset", conn)
        conn.in_tx = False

    def in_transaction(self, conn: ModelConnection) -> bool:
        return conn.in_tx

    async def begin(self, conn: ModelConnection) -> None:
        conn.in_tx = True

    async def commit(self, conn: ModelConnection) -> None:
        conn.in_tx = False

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
    #: waiting -> holding -> releasing -> released | cancelled | timeout | closed | ...
    state: str = "waiting"
    conn: ModelConnection | None = None
    #: its place in line: when it queued, or claimed an idle connection to check it
    place: int | None = None
    #: its entry in the pool's queue, once it queued
    waiter: object = None
    in_tx: bool = False
    error: BaseException | None = None
    go: asyncio.Event = field(default_factory=asyncio.Event)
    scope: anyio.CancelScope | None = None
    task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


def blocked(task: asyncio.Task[Any]) -> bool:
    waiter = task._fut_waiter  # type: ignore[attr-defined]
    return waiter is not None and not waiter.done()


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        CLOCK.now = 1000.0
        self.runner = asyncio.Runner(loop_factory=VirtualTimeLoop)
        self.violations: list[str] = []
        self.driver = ModelDriver(self.violations)
        self.db: pool.Pool[ModelConnection] = pool.Pool(
            "model://machine",
            driver=self.driver,
            connection_limit=LIMIT,
            pool_timeout=0,  # only the tiny-timeout clients time out
            health_check_after=0.01,  # idle a while: pinged before it is lent
            max_idle_connection_lifetime=0.05,
            max_connection_lifetime=0.3,
            leak_detection_threshold=0.1,
        )
        self.ledger = self.db._ledger
        self.clients: list[Client] = []
        self.by_task: dict[asyncio.Task[Any], Client] = {}
        self.tickets = itertools.count()
        self.places = itertools.count()
        self.grants = 0
        self.disconnects: list[asyncio.Task[None]] = []
        self.upkeeps: list[asyncio.Task[None]] = []
        self._watch_the_line()

    def _watch_the_line(self) -> None:
        """Note each client's place in line, where the ledger takes it."""
        ledger = self.ledger
        take_for, enqueue, enqueue_at = ledger.take_for, ledger.enqueue, ledger.enqueue_at

        def me() -> Client | None:
            task = asyncio.current_task()
            return self.by_task.get(task) if task is not None else None

        def watched_take_for(*args: Any) -> Any:
            rec = take_for(*args)
            c = me()
            # The first claim is its place: a client whose check failed claims
            # again, and keeps the place it took when it arrived.
            if rec is not None and c is not None and c.place is None:
                c.place = next(self.places)
            return rec

        def watched_enqueue(waiter: Any) -> None:
            c = me()
            if c is not None:
                c.place, c.waiter = next(self.places), waiter
            enqueue(waiter)

        def watched_enqueue_at(waiter: Any, arrival: int) -> None:
            # queued after checking: it keeps the place of its first claim
            c = me()
            if c is not None:
                if c.place is None:
                    c.place = next(self.places)
                c.waiter = waiter
            enqueue_at(waiter, arrival)

        ledger.take_for = watched_take_for  # type: ignore[method-assign]
        ledger.enqueue = watched_enqueue  # type: ignore[method-assign]
        ledger.enqueue_at = watched_enqueue_at  # type: ignore[method-assign]

    # ------------------------------------------------------------ driving the loop

    async def settle(self) -> None:
        """Run the loop until every other task is blocked or done."""
        me = asyncio.current_task()
        for _ in range(10_000):
            await asyncio.sleep(0)
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            if all(t.done() or blocked(t) for t in tasks):
                return
        raise AssertionError("the tasks never settled: one spins")

    def step(self, coro: Any = None) -> None:
        async def go() -> None:
            if coro is not None:
                await coro
            await self.settle()

        self.runner.run(go())

    # ------------------------------------------------------------ the clients

    async def client(self, c: Client) -> None:
        with anyio.CancelScope() as c.scope:
            try:
                async with self.db.acquire(timeout=c.timeout) as conn:
                    self.granted(c, conn)
                    try:
                        await c.go.wait()
                        if c.in_tx and not conn.closed:
                            conn.in_tx = True
                    finally:
                        c.state = "releasing"  # (or cancelled while holding)
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
        if c.place is None:  # the fast path: it claimed an idle connection just now
            c.place = next(self.places)
        waiters = self.ledger.waiters
        queued = [o for o in self.clients if o.waiter is not None and o.waiter in waiters]
        older = [o.ticket for o in queued if o.place is not None and o.place < c.place]
        if older:
            self.violations.append(f"client {c.ticket} was served before queued {older}")
        if conn.closed or conn.killed:
            self.violations.append(f"client {c.ticket} was lent {conn!r}")
        if conn.ops:
            self.violations.append(f"client {c.ticket} was lent {conn!r} while {conn.ops} runs")
        for other in self.holders():
            if other.conn is conn:
                self.violations.append(f"{conn!r} lent to {c.ticket} and {other.ticket}")
        c.state, c.conn = "holding", conn

    def holders(self) -> list[Client]:
        return [c for c in self.clients if c.state == "holding"]

    def spawn(self, timeout: float | None) -> None:
        c = Client(next(self.tickets), timeout)
        self.clients.append(c)

        async def start() -> None:
            c.task = asyncio.create_task(self.client(c))
            self.by_task[c.task] = c

        self.step(start())

    # ------------------------------------------------------------ rules: clients

    def room_for_a_client(self) -> bool:
        """A few clients beyond the limit: enough to queue, few enough to explore deep."""
        return sum(c.running for c in self.clients) < LIMIT + 3

    @precondition(room_for_a_client)
    @rule()
    def acquire(self) -> None:
        """Also the reconnect: after disconnect(), an acquire reopens the pool."""
        self.spawn(None)

    @precondition(room_for_a_client)
    @rule()
    def acquire_with_a_tiny_timeout(self) -> None:
        self.spawn(0.001)

    @precondition(lambda self: self.holders())
    @rule(data=st.data(), in_tx=st.booleans())
    def release(self, data: st.DataObject, in_tx: bool) -> None:
        """Give a connection back: clean, or inside a transaction (the pool rolls back)."""
        c = data.draw(st.sampled_from(self.holders()))
        c.in_tx = in_tx
        c.go.set()
        self.step()

    @precondition(lambda self: any(c.running for c in self.clients))
    @rule(data=st.data())
    def cancel_a_client(self, data: st.DataObject) -> None:
        """Cancel a client: waiting, holding, releasing, or parked in its ping or connect."""
        c = data.draw(st.sampled_from([c for c in self.clients if c.running]))

        async def cancel() -> None:
            assert c.scope is not None
            c.scope.cancel()  # in the loop: anyio cancels from inside it

        self.step(cancel())

    # ------------------------------------------------------------ rules: parked I/O

    @precondition(lambda self: self.driver.parked)
    @rule(data=st.data())
    def release_parked_op(self, data: st.DataObject) -> None:
        self.driver.finish(data.draw(st.sampled_from(self.driver.parked)), None)
        self.step()

    @precondition(lambda self: self.driver.parked)
    @rule(data=st.data(), refused=st.booleans())
    def fail_parked_op(self, data: st.DataObject, refused: bool) -> None:
        op = data.draw(st.sampled_from(self.driver.parked))
        error: Exception = ConnectionResetError("reset by peer")
        if op.kind == "connect" and refused:
            error = ConnectionRefusedError("refused: the server is down")
        self.driver.finish(op, error)
        self.step()

    @precondition(lambda self: self.driver.parked)
    @rule()
    def release_every_parked_op(self) -> None:
        for op in list(self.driver.parked):
            self.driver.finish(op, None)
        self.step()

    # ------------------------------------------------------------ rules: the world

    @rule(seconds=st.sampled_from([0.0005, 0.002, 0.02, 0.06, 0.6, 6.0]))
    def let_time_pass(self, seconds: float) -> None:
        """Tiny timeouts run out, connections go stale, expire and leak, the upkeep
        task ticks, the breaker's back-off ends, parked I/O times out (6 s)."""
        CLOCK.now += seconds
        self.step()

    @rule()
    def maintenance(self) -> None:
        """One round of upkeep now, in a task that parks on its closes.

        Its scope is one ``disconnect()`` cancels, as it cancels the upkeep task's.
        """
        ledger = self.ledger

        async def upkeep() -> None:
            scope = anyio.CancelScope()
            ledger.scopes.add(scope)
            try:
                with scope:
                    await self.db._engine.upkeep.once()
            finally:
                ledger.scopes.discard(scope)

        async def start() -> None:
            self.upkeeps.append(asyncio.create_task(upkeep()))

        self.step(start())

    @precondition(lambda self: any(not c.closed and not c.killed for c in self.driver.opened))
    @rule(data=st.data())
    def kill_a_connection(self, data: st.DataObject) -> None:
        live = [c for c in self.driver.opened if not c.closed and not c.killed]
        data.draw(st.sampled_from(live)).killed = True
        self.step()

    @precondition(lambda self: any(not rec.raw.killed for rec in self.ledger.idle))
    @rule(data=st.data())
    def kill_an_idle_connection(self, data: st.DataObject) -> None:
        """The server drops a connection that sits idle: while another is being checked,
        the upkeep then takes it out of the idle set (what once left an acquire holding
        a stale idle set, and lent one connection twice)."""
        idle = [rec.raw for rec in self.ledger.idle if not rec.raw.killed]
        data.draw(st.sampled_from(idle)).killed = True
        self.step()

    @precondition(
        lambda self: len(self.ledger.idle) >= 2
        and not self.ledger.waiters
        and self.room_for_a_client()
    )
    @rule(victim=st.integers(min_value=0, max_value=7))
    def check_one_while_the_upkeep_drops_another(self, victim: int) -> None:
        """The interleaving a failover produces, in one step: idle connections go
        stale, a caller takes the newest and checks it (the check parks), the
        server drops another idle one, and the upkeep runs. What happens to the
        parked check (released, failed, cancelled, cut short) is left to the
        other rules."""
        CLOCK.now += 0.02  # past health_check_after: an acquire checks first
        self.step()
        self.spawn(None)  # its ping parks
        idle = [rec.raw for rec in self.ledger.idle if not rec.raw.killed]
        if idle:
            idle[victim % len(idle)].killed = True
            self.step()
        self.maintenance()

    @rule(data=st.data(), grace=st.sampled_from([0.0, 0.1]), as_io_ends=st.booleans())
    def disconnect(self, data: st.DataObject, grace: float, as_io_ends: bool) -> None:
        """disconnect() in a task of its own: it may park on closes, and overlap anything.

        ``as_io_ends``: a parked I/O ends at the same instant, so that its task and
        disconnect() run in the same pass of the loop (its task first).
        """
        ending = None
        if as_io_ends and self.driver.parked:
            ending = data.draw(st.sampled_from(self.driver.parked))

        async def disconnect() -> None:
            await self.db.disconnect(grace=grace)
            still_open = [c for c in self.driver.opened if not c.closed]
            if still_open:
                self.violations.append(f"disconnect() returned, and {still_open} are open")

        async def start() -> None:
            if ending is not None:
                self.driver.finish(ending, None)
            self.disconnects.append(asyncio.create_task(disconnect()))

        self.step(start())

    # ------------------------------------------------------------ invariants

    @invariant()
    def no_violation_seen(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def the_counts_add_up(self) -> None:
        s = self.db.stats()
        assert s.size <= s.limit, s
        assert s.size == s.idle + s.in_use + s.opening + s.busy, s
        assert 0 <= s.opening <= self.driver.connecting(), (s, self.driver.parked)
        assert s.opened - s.closed == s.idle + s.in_use + s.busy, s
        assert s.acquired == self.grants, s
        if self.ledger.state is CLOSED_STATE:
            assert s.size == 0 and s.waiting == 0, f"a closed pool holds or queues: {s}"

    @invariant()
    def no_connection_is_lent_twice_or_leaked(self) -> None:
        ledger = self.ledger
        held = [c.conn for c in self.holders()]
        assert len({id(conn) for conn in held}) == len(held), f"lent twice: {held}"
        for c in self.holders():
            assert c.conn is not None
            rec = ledger.lent.get(id(c.conn))
            if rec is None:  # disconnect() took it back: it must be closed
                assert c.conn.closed, f"{c.conn!r} held, and no longer counted lent"
            else:
                assert rec.raw is c.conn and rec.state is LENT, rec
        held_ids = {id(conn) for conn in held}
        for key, rec in ledger.lent.items():
            assert key in held_ids, f"counted lent, and nobody holds it: {rec}"
        idle = [rec.raw for rec in ledger.idle]
        for conn in idle:
            assert not conn.closed and not conn.ops, f"idle: {conn!r} {conn.ops}"
            assert id(conn) not in held_ids, f"idle and lent: {conn!r}"
        kept = held_ids | {id(conn) for conn in idle} | set(ledger.busy)
        leaked = [c for c in self.driver.opened if id(c) not in kept and not c.closed]
        assert not leaked, f"open, and neither idle, lent nor busy: {leaked}"

    @invariant()
    def no_waiter_is_stranded(self) -> None:
        s = self.db.stats()
        if not s.waiting:
            return
        assert s.idle == 0, f"callers wait while a connection sits idle: {s}"
        if not self.ledger.breaker.failures:
            # connects work: spare capacity must be in use by an opening
            assert s.size == s.limit or s.opening > 0, (
                f"callers wait, there is room to open, and nobody opens: {s}"
            )

    def teardown(self) -> None:
        async def wind_down() -> None:
            """Cancel every client, release all I/O, and disconnect for the last time."""
            final: asyncio.Task[None] | None = None
            for _ in range(200):
                for c in self.clients:
                    if c.scope is not None:
                        c.scope.cancel()
                for op in list(self.driver.parked):
                    self.driver.finish(op, None)
                await self.settle()
                if self.driver.parked or not all(t.done() for t in self.disconnects):
                    continue
                if final is None:
                    final = asyncio.create_task(self.db.disconnect())
                    await self.settle()
                elif final.done():
                    final.result()
                    return
            raise AssertionError(f"never wound down: {self.driver.parked}")

        try:
            self.runner.run(wind_down())
            still_open = [c for c in self.driver.opened if not c.closed]
            assert not still_open, f"open after the last disconnect(): {still_open}"
            assert not self.violations, self.violations
        finally:
            self.runner.close()


class TestStateMachine:
    def test_the_pool_keeps_its_invariants_through_interleaved_io(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        virtual_time(monkeypatch)
        run_state_machine_as_test(
            PoolMachine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )


class _First:
    """A stand-in for Hypothesis' ``data``: draws the first choice, always."""

    def draw(self, strategy: Any) -> Any:
        return next(iter(strategy.elements))


def virtual_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's time.monotonic() is CLOCK's, in every module that reads it."""
    monkeypatch.setattr(_ledger, "time", CLOCK)
    for module in (_acquiring, _breaker, _closing, _diagnosis, _state):
        monkeypatch.setattr(module, "time", CLOCK)


def replay(monkeypatch: pytest.MonkeyPatch) -> tuple[PoolMachine, Callable[[], None]]:
    """A model to drive step by step, and the check of all its invariants."""
    virtual_time(monkeypatch)
    machine = PoolMachine()

    def check() -> None:
        machine.no_violation_seen()
        machine.the_counts_add_up()
        machine.no_connection_is_lent_twice_or_leaked()
        machine.no_waiter_is_stranded()

    return machine, check


class TestReplays:
    """Interleavings that random search reaches too rarely, replayed step by step
    through the same model and its invariants."""

    def test_a_check_fails_while_the_upkeep_dropped_another_idle_connection(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # What once lent one connection twice: an acquire held a reference to
        # the idle set across its check, the upkeep replaced the set, and the
        # failed check sent the acquire back to the stale one.
        machine, check = replay(monkeypatch)
        first = _First()
        try:
            for _ in range(2):  # two connections: the second opens while the first is held
                machine.acquire()
                machine.release_every_parked_op()
                check()
            for _ in range(2):
                machine.release(first, False)  # type: ignore[arg-type]
                check()
            assert len(machine.ledger.idle) == 2
            machine.check_one_while_the_upkeep_drops_another(0)
            check()
            (ping,) = [op for op in machine.driver.parked if op.kind == "ping"]
            machine.driver.finish(ping, ConnectionResetError("the server went away"))
            machine.step()
            check()
        finally:
            machine.teardown()

    @pytest.mark.parametrize("ping_ok", [True, False])
    def test_a_disconnect_lands_while_a_check_is_parked(
        self, monkeypatch: pytest.MonkeyPatch, ping_ok: bool
    ) -> None:
        # What once wedged the pool for good: the check's acquire went on into
        # the closed pool and its reservation was never undone.
        machine, check = replay(monkeypatch)
        first = _First()
        try:
            machine.acquire()
            machine.release_every_parked_op()
            machine.release(first, False)  # type: ignore[arg-type]
            machine.let_time_pass(0.02)  # stale: the next acquire checks it first
            machine.acquire()
            (ping,) = [op for op in machine.driver.parked if op.kind == "ping"]
            machine.disconnect(first, 0.0, False)  # type: ignore[arg-type]
            check()
            if ping in machine.driver.parked:
                machine.driver.finish(ping, None if ping_ok else ConnectionResetError("gone"))
                machine.step()
            check()
            machine.acquire()  # the pool reopens: this one is served
            machine.release_every_parked_op()
            check()
            assert machine.holders(), machine.db.stats()
            s = machine.db.stats()
            assert (s.size, s.opening, s.waiting) == (1, 0, 0), s
        finally:
            machine.teardown()
