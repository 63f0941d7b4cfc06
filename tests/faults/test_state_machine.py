"""An interleaving model of the pool, explored by Hypothesis.

Every I/O the driver does parks: a connect, a ping, a rollback, a graceful
close, the driver's ``recover`` and ``reset_session``, the ``configure`` /
``check`` / ``reset`` hooks, a holder's query and a transaction's commit, and
the pool's ``on_before_exit`` callback each append an entry to
``ModelDriver.parked`` and wait there until a rule releases it or fails it,
picked by index, so that Hypothesis explores every order in which in-flight I/O
can end. Each example first draws the pool's configuration (which hooks,
``reset_session``, a driver that recovers cancelled connections, a pool that
wants the primary, so that a read-only error is a failover). Meanwhile the
other rules go on: clients acquire (``async with acquire()``, ``await
acquire()`` then ``release()``, or ``transaction()``; waiting forever, or with
a tiny timeout), hold, query, raise in their block, release (clean, or inside a
transaction, so that the pool rolls back); ``resize(n)`` up and down and
``drain()`` run as tasks of their own, overlapping anything; a query fails
read-only (a failover: its server's
connections are retired); any task (a client, a ``disconnect()``, a resize, a
drain, an upkeep round) is cancelled, either through its anyio scope or the
asyncio way (``task.cancel()``, which no anyio shield stops), wherever it is:
waiting, holding, mid-query, mid-commit, in a release, in ``disconnect()``;
connections are killed server side; connects are refused or reset;
maintenance runs (``upkeep_once()`` as a task, which parks on its closes, and
the pool's own upkeep task, which also recovers connections whose holder was
cancelled); time passes; ``disconnect()`` runs as a task of its own at any
moment, and the pool reopens on the next acquire.

After every step, with every task of the loop run until it blocks or ends:

* the counts add up: ``size == idle + in_use + opening + busy``, and ``size``
  exceeds ``limit`` only by connections on their way out (marked by a resize, a
  drain or a failover, or being closed); ``0 <= opening <= connects in
  flight``, ``opened - closed == idle + in_use + busy``, ``acquired`` is what
  the clients were given, and a closed pool holds nothing (no idle, lent or
  busy connection) and nobody waits on it;
* no connection is lent to two holders at once, nor lent while I/O runs on it,
  nor lent closed or dead; every connection the pool counts as lent has
  exactly one holder, and a holder the pool no longer counts holds a
  connection that ``disconnect()`` closed;
* the queue is FIFO, and a requeued caller keeps its place: a client is never
  served before an older client still queued, where a client's place is when
  it first queued or first claimed an idle connection to check it (so a client
  whose checked or handed connection was retired stays ahead of every later
  one); a client with a timeout never waits past it (checks included);
* with lanes and tenants (drawn per example: lanes ``web`` of weight 2 and
  ``batch`` of weight 1 capped at one connection, beside ``default``; clients
  in a lane with a tenant, or none): FIFO inside a tenant (the rule above,
  among the clients of the same lane and tenant), a lane's limit never
  exceeded, and the weighted share in its per-grant form, which is also "no
  lane starved": while a lane of weight ``w`` could be served (it has waiters
  and is under its limit), another lane of weight ``v`` receives at most
  ``ceil(v / w) + 1`` grants before it is served (start-time fair queuing's
  bound);
* resize: a held connection is closed by a resize only if it was surplus then
  (the pool, less the connections already on their way out, above the limit);
* drain: no connection whose connect began before a ``drain()`` is lent after
  that ``drain()`` returned;
* ``on_before_exit`` callbacks run once per disconnect, never two at once;
* nobody waits beside an idle connection, nor with room to open and nobody
  opening (while connects work);
* nothing leaks: every connection the driver opened and did not see closed is
  idle, lent or busy in the pool; when a ``disconnect()`` returns, every
  connection opened so far is closed;
* every connection is closed once: no close, terminate, ping, rollback or reset
  starts on a connection after its first effective close; no two I/O steps run
  on one connection at once.

The loop is an ``asyncio.Runner`` kept for a whole example, with a virtual
clock: the loop's timers and the engine's ``time.monotonic()`` read ``CLOCK``,
which moves only in ``let_time_pass``, so a run is a function of its steps, as
Hypothesis needs to replay and shrink it.

CI runs ``POOL_MODEL_EXAMPLES`` examples (default below) of up to
``POOL_MODEL_STEPS`` steps; a long run is
``python -m tests.faults.model_long_run 5000``. Step-by-step replays of the
faults search reaches too rarely are in ``test_model_replays.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pool
from pool import _acquiring, _breaker, _closing, _diagnosis, _ledger, _state
from pool._conn import LENT
from pool._state import CLOSED_STATE, OPEN, RESIZE

LIMIT = 3
EXAMPLES = int(os.environ.get("POOL_MODEL_EXAMPLES", "1500"))
STEPS = int(os.environ.get("POOL_MODEL_STEPS", "60"))
#: for exploring only: invariants to leave unchecked (comma-separated tags, see
#: ``PoolMachine.flag``), so that a search goes past a fault already found
SKIP = frozenset(filter(None, os.environ.get("POOL_MODEL_SKIP", "").split(",")))


class _Pretty:
    """Hypothesis prints drawn values in a failing example: keep them short."""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


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

    def quiet(self) -> bool:
        """Nothing left to run at this instant: no callback ready, no timer due.

        A task can look blocked while the callback that wakes it is queued
        (a finished task's done-callbacks, asyncio.shield's relay).
        """
        ready: Any = self._ready  # type: ignore[attr-defined]
        timers: Any = self._scheduled  # type: ignore[attr-defined]
        return not ready and not (timers and timers[0].when() <= self.time())


class ReadOnlyError(Exception):
    """A write refused because the server is read-only now (a failover)."""


class UserError(Exception):
    """An error of the holder's own code, raised inside its block."""


class ModelConnection:
    _ids = itertools.count(1)

    def __init__(self, host: str, drains: int) -> None:
        self.id = next(self._ids)
        self.host = host
        #: drain() calls begun before this connection's connect began
        self.drains = drains
        self.killed = False  # by the test: the server side went away
        self.in_tx = False  # the holder began a transaction
        #: how it was first closed: "closed" (a close() that returned) or "terminated"
        self.closed: str | None = None
        #: a close() raised (or was cut short): the engine terminates next
        self.close_failed = False
        #: the I/O running on it now (the pool's, or its holder's)
        self.ops: list[str] = []

    def __repr__(self) -> str:
        flags = " killed" * self.killed + f" {self.closed}" * bool(self.closed)
        return f"<conn {self.id}{flags}>"


@dataclass(eq=False, repr=False)
class Parked(_Pretty):
    """One operation, waiting for a rule to release or fail it."""

    kind: str  # connect, ping, rollback, reset, close, recover, configure, query, ...
    conn: ModelConnection | None
    future: asyncio.Future[None]

    def __repr__(self) -> str:
        return f"<{self.kind} {self.conn!r}>" if self.conn else f"<{self.kind}>"


class ModelDriver:
    """Every I/O parks in ``parked``; the driver also records what the pool did wrong.

    ``recover``, ``reset_session`` and the failover members (``host_of``,
    ``is_read_only_error``, ``wants_primary``) exist only when the example's
    configuration asks for them: the engine looks them up with ``getattr``.
    """

    scheme = "model"

    def __init__(
        self, violations: list[str], *, recover: bool = False, failover: bool = False
    ) -> None:
        self.violations = violations
        self.parked: list[Parked] = []
        self.opened: list[ModelConnection] = []
        #: the host new connections go to; a failover moves it
        self.primary = 1
        #: drain() calls begun so far (each connection notes the count as it connects)
        self.drains = 0
        self.after_commit: Callable[[], None] = lambda: None
        if recover:
            self.recover = self._recover
        if failover:
            self.wants_primary = True
            self.host_of = self._host_of
            self.is_read_only_error = self._is_read_only_error

    async def park(self, kind: str, conn: ModelConnection | None) -> None:
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
        """Connects in flight, and new connections in their configure hook."""
        return sum(op.kind in ("connect", "configure") for op in self.parked)

    async def io(self, kind: str, conn: ModelConnection, *, holder: bool = False) -> None:
        """A round trip on an open connection: the pool's, or its holder's (``holder``)."""
        if conn.closed:
            if holder:  # the holder's own doing (disconnect() closed it): the driver raises
                raise ConnectionResetError("the connection is closed")
            self.violations.append(f"{kind} on {conn!r}, after it was closed")
        if conn.ops:
            self.violations.append(f"{kind} on {conn!r} while {conn.ops} runs on it")
        conn.ops.append(kind)
        try:
            await self.park(kind, conn)
        finally:
            conn.ops.remove(kind)
        if conn.killed or conn.closed:
            raise ConnectionResetError("the connection is gone")

    async def connect(self) -> ModelConnection:
        drains = self.drains
        host = f"host{self.primary}"
        await self.park("connect", None)
        conn = ModelConnection(host, drains)
        self.opened.append(conn)
        return conn

    async def close(self, conn: ModelConnection) -> None:
        if conn.closed:
            self.violations.append(f"close() on {conn!r}, closed already")
        if conn.ops:
            self.violations.append(f"close() on {conn!r} while {conn.ops} runs on it")
        conn.ops.append("close")
        try:
            await self.park("close", conn)
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
        await self.io("ping", conn)

    async def rollback(self, conn: ModelConnection) -> None:
        await self.io("rollback", conn)
        conn.in_tx = False

    async def reset(self, conn: ModelConnection) -> None:
        """Not called by the engine today; parked like the rest if it ever is."""
        await self.io("reset", conn)
        conn.in_tx = False

    async def reset_session(self, conn: ModelConnection) -> None:
        await self.io("reset_session", conn)

    async def _recover(self, conn: ModelConnection) -> None:
        await self.io("recover", conn)

    def _host_of(self, conn: ModelConnection) -> str:
        return conn.host

    @staticmethod
    def _is_read_only_error(exc: BaseException) -> bool:
        return isinstance(exc, ReadOnlyError)

    def in_transaction(self, conn: ModelConnection) -> bool:
        return conn.in_tx

    async def begin(self, conn: ModelConnection) -> None:
        conn.in_tx = True  # (local: a failing BEGIN is a failing query, modelled there)

    async def commit(self, conn: ModelConnection) -> None:
        try:
            await self.io("commit", conn, holder=True)
        finally:
            self.after_commit()  # the release comes next: the model notes it
        conn.in_tx = False

    async def fetch(self, conn: ModelConnection, sql: str, args: Sequence[Any]) -> list[Any]:
        return []

    async def fetchrow(self, conn: ModelConnection, sql: str, args: Sequence[Any]) -> Any:
        return None

    async def fetchval(self, conn: ModelConnection, sql: str, args: Sequence[Any]) -> Any:
        await self.io("query", conn, holder=True)
        return None

    async def execute(self, conn: ModelConnection, sql: str, args: Sequence[Any]) -> Any:
        return "OK"

    async def server_max_connections(self, conn: ModelConnection) -> int | None:
        return None


def hooks_for(driver: ModelDriver, names: Sequence[str]) -> dict[str, Any]:
    """The ``configure`` / ``check`` / ``reset`` hooks asked for: each parks as its name."""

    def hook(name: str) -> Callable[[ModelConnection], Any]:
        async def run(conn: ModelConnection) -> None:
            await driver.io(name, conn)

        return run

    return {name: hook(name) for name in names}


@dataclass(eq=False, repr=False)
class Job(_Pretty):
    """A task of the model's (a client, a disconnect(), a resize, ...): cancellable two ways."""

    name: str
    scope: anyio.CancelScope | None = None
    task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def __repr__(self) -> str:
        return f"<{self.name}{'' if self.running else ' (done)'}>"


@dataclass(eq=False, repr=False)
class Client(Job):
    """One acquire, from arrival to its end."""

    ticket: int = 0
    timeout: float | None = None
    #: "ctx" (async with acquire()), "await" (await acquire(), then release()), "tx"
    kind: str = "ctx"
    #: waiting -> holding [-> querying -> holding] -> releasing -> released | cancelled | ...
    state: str = "waiting"
    conn: ModelConnection | None = None
    #: its place in line: when it first queued, or first claimed an idle connection to check
    place: int | None = None
    #: its entry in the pool's queue, once it queued
    waiter: object = None
    started: float = 0.0
    in_tx: bool = False
    #: what the holder does next: "release", "query", "raise"
    command: str = "release"
    #: its lane and tenant, in a pool with lanes (None: the plain acquire)
    lane: str | None = None
    tenant: str | None = None
    error: BaseException | None = None
    go: asyncio.Event = field(default_factory=asyncio.Event)

    def __repr__(self) -> str:
        return f"<client {self.ticket} {self.kind} {self.state} {self.conn!r}>"


#: the lanes of an example with lanes: a capped one, and a default one beside them
LANES: dict[str, int | pool.Lane] = {"web": 2, "batch": pool.Lane(weight=1, limit=1)}
LANE_WEIGHTS = {"web": 2, "batch": 1, "default": 1}
#: (lane, tenant) a client may draw: the plain acquire, tenants in lanes, a lane alone
FLOWS: list[tuple[str | None, str | None]] = [
    (None, None), ("web", "a"), ("web", "b"), ("batch", "a"), ("batch", None), (None, "b"),
]


def flow_of(c: Client) -> tuple[str, str | None]:
    return (c.lane or "default", c.tenant)


def blocked(task: asyncio.Task[Any]) -> bool:
    waiter = task._fut_waiter  # type: ignore[attr-defined]
    return waiter is not None and not waiter.done()


#: a holder in these states holds its connection in the pool's eyes
HOLDING = ("holding", "querying", "committing")
#: the errors a client may see, the pool's doing or not, that are no violation
EXPECTED = (ConnectionResetError, ReadOnlyError, UserError)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        CLOCK.now = 1000.0
        self.runner = asyncio.Runner(loop_factory=VirtualTimeLoop)
        self.violations: list[str] = []
        self.clients: list[Client] = []
        self.jobs: list[Job] = []
        self.by_task: dict[asyncio.Task[Any], Client] = {}
        self.tickets = itertools.count()
        self.places = itertools.count()
        self.grants = 0
        self.disconnects: list[asyncio.Task[None]] = []
        #: the highest drain() (by its number) that has returned
        self.drained_up_to = 0
        #: on_before_exit: runs in progress, and the epochs whose callback completed
        self.exit_running = 0
        self.exit_done: set[int] = set()
        self.setup()

    def setup(
        self,
        hooks: Sequence[str] = (),
        reset_session: bool = False,
        recover: bool = False,
        failover: bool = False,
        lanes: bool = False,
    ) -> None:
        """Build the pool for this example (before any step has run)."""
        self.driver = ModelDriver(self.violations, recover=recover, failover=failover)
        self.lanes_on = lanes
        extra: dict[str, Any] = {"lanes": LANES} if lanes else {}
        self.db: pool.Pool[ModelConnection] = pool.Pool(
            "model://machine",
            driver=self.driver,
            connection_limit=LIMIT,
            pool_timeout=0,  # only the tiny-timeout clients time out
            health_check_after=0.01,  # idle a while: pinged before it is lent
            max_idle_connection_lifetime=0.05,
            max_connection_lifetime=0.3,
            leak_detection_threshold=0.1,
            reset_session=reset_session,
            **hooks_for(self.driver, hooks),
            **extra,
        )
        self.db.on_before_exit(self.before_exit)
        self.driver.after_commit = self._committed
        self.ledger = self.db._ledger
        self._watch_the_ledger()

    @initialize(
        hooks=st.lists(st.sampled_from(["configure", "check", "reset"]), unique=True),
        reset_session=st.booleans(),
        recover=st.booleans(),
        failover=st.booleans(),
        lanes=st.booleans(),
    )
    def configure_the_pool(
        self, hooks: list[str], reset_session: bool, recover: bool, failover: bool,
        lanes: bool = False,
    ) -> None:
        self.setup(sorted(hooks), reset_session, recover, failover, lanes)

    def _committed(self) -> None:
        task = asyncio.current_task()
        c = self.by_task.get(task) if task is not None else None
        if c is not None and c.state == "committing":
            c.state = "releasing"  # the transaction's release comes next

    def flag(self, tag: str, message: str) -> None:
        """A violation of the invariant ``tag`` (unless POOL_MODEL_SKIP names it)."""
        if tag not in SKIP:
            self.violations.append(message)

    async def before_exit(self) -> None:
        epoch = self.ledger.epoch
        if self.exit_running:
            self.flag("exit", "two on_before_exit runs at once (overlapping disconnects)")
        if epoch in self.exit_done:
            self.flag("exit", "on_before_exit ran twice for one disconnect")
        self.exit_running += 1
        try:
            await self.driver.park("before_exit", None)
            self.exit_done.add(epoch)
        finally:
            self.exit_running -= 1

    def _watch_the_ledger(self) -> None:
        """Note each client's place in line where the ledger takes it, and each resize close."""
        ledger = self.ledger
        take_for, enqueue, retire = ledger.take_for, ledger.enqueue, ledger._retire
        enqueue_at = ledger.enqueue_at

        def me() -> Client | None:
            task = asyncio.current_task()
            return self.by_task.get(task) if task is not None else None

        def watched_take_for(*args: Any) -> Any:
            rec = take_for(*args)
            c = me()
            if rec is not None and c is not None and c.place is None:
                c.place = next(self.places)
            return rec

        def watched_enqueue(waiter: Any) -> None:
            c = me()
            if c is not None:
                if c.place is None:  # a requeued caller keeps its first place
                    c.place = next(self.places)
                c.waiter = waiter
            enqueue(waiter)

        def watched_enqueue_at(waiter: Any, arrival: int) -> None:
            # queued after its check failed: it keeps the place of its first claim
            c = me()
            if c is not None:
                if c.place is None:
                    c.place = next(self.places)
                c.waiter = waiter
            enqueue_at(waiter, arrival)

        def watched_retire(rec: Any, reason: str) -> None:
            held = rec.state is LENT and ledger.lent.get(id(rec.raw)) is not rec
            if held and reason == RESIZE and rec.epoch == ledger.epoch and ledger.state is OPEN:
                others = ledger.doomed + sum(  # (openings a shrink gave up count too)
                    1
                    for r in (*ledger.lent.values(), *ledger.busy.values())
                    if r is not rec and (r.retire_reason or r.expires_at == -math.inf)
                )
                if ledger.size - others <= ledger.limit:
                    self.flag(
                        "resize",
                        f"a resize closed {rec.raw!r}, held and not surplus: size "
                        f"{ledger.size}, {others} others on their way out, limit {ledger.limit}"
                    )
            retire(rec, reason)

        put = ledger._put
        #: (lane, other): grants to ``other`` since ``lane`` could be served and was last
        passed: Counter[tuple[str, str]] = Counter()

        def watched_put(rec: Any, now: float) -> None:
            lanes = ledger.lanes
            if lanes is None:
                put(rec, now)
                return
            # the lanes that could be served as this connection is placed
            servable = {
                name: state.held
                for name, state in lanes.by_name.items()
                if state.waiting and state.held < state.limit
            }
            put(rec, now)
            served = [name for name, held in servable.items() if lanes.by_name[name].held > held]
            if not served:
                return
            (got,) = served
            for name in LANE_WEIGHTS:
                if name == got or name not in servable:
                    for other in LANE_WEIGHTS:
                        passed[name, other] = 0  # served, or nothing to serve: a new count
                    continue
                passed[name, got] += 1
                bound = math.ceil(LANE_WEIGHTS[got] / LANE_WEIGHTS[name]) + 1
                if passed[name, got] > bound:
                    self.flag(
                        "share",
                        f"lane {name} could be served and lane {got} was served "
                        f"{passed[name, got]} times meanwhile (bound {bound})",
                    )

        ledger._put = watched_put  # type: ignore[method-assign]
        ledger.take_for = watched_take_for  # type: ignore[method-assign]
        ledger.enqueue = watched_enqueue  # type: ignore[method-assign]
        ledger.enqueue_at = watched_enqueue_at  # type: ignore[method-assign]
        ledger._retire = watched_retire  # type: ignore[method-assign]

    # ------------------------------------------------------------ driving the loop

    async def settle(self) -> None:
        """Run the loop until every other task is blocked or done."""
        me = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        for _ in range(10_000):
            await asyncio.sleep(0)
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            if all(t.done() or blocked(t) for t in tasks) and loop.quiet():
                return
        raise AssertionError("the tasks never settled: one spins")

    def step(self, coro: Any = None) -> None:
        async def go() -> None:
            if coro is not None:
                await coro
            await self.settle()

        self.runner.run(go())

    def start(self, job: Job, body: Callable[[], Any]) -> None:
        """Run ``body`` as a task of its own, inside an anyio scope (either cancels it)."""
        self.jobs.append(job)

        async def run() -> None:
            with anyio.CancelScope() as job.scope:
                try:
                    await body()
                except Exception as exc:
                    self.violations.append(f"{job.name} raised {exc!r}")

        async def spawn() -> None:
            job.task = asyncio.create_task(run())
            if isinstance(job, Client):
                self.by_task[job.task] = job

        self.step(spawn())

    # ------------------------------------------------------------ the clients

    async def client(self, c: Client) -> None:
        c.started = CLOCK.now
        flow: dict[str, Any] = {}
        if self.lanes_on and (c.lane is not None or c.tenant is not None):
            flow = {"lane": c.lane, "tenant": c.tenant}
        try:
            if c.kind == "tx":
                async with self.db.transaction(timeout=c.timeout, **flow) as conn:
                    await self.hold(c, conn)
                    c.state = "committing"
            elif c.kind == "await":
                conn = await self.db.acquire(timeout=c.timeout, **flow)
                try:
                    await self.hold(c, conn)
                finally:
                    c.state = "releasing"
                    await self.db.release(conn)
            else:
                async with self.db.acquire(timeout=c.timeout, **flow) as conn:
                    await self.hold(c, conn)
            c.state = "released"
        except pool.PoolTimeoutError as exc:
            c.state, c.error = "timeout", exc
            if c.timeout is None:  # pool_timeout=0: it waits for ever
                self.violations.append(f"client {c.ticket} timed out: {exc}")
        except pool.ConnectError as exc:
            c.state, c.error = "connect-error", exc
        except pool.PoolClosedError as exc:
            c.state, c.error = "closed", exc
        except EXPECTED as exc:
            c.state, c.error = "error", exc
        except Exception as exc:
            c.state, c.error = "error", exc
            self.violations.append(f"client {c.ticket} got {exc!r}")
        except BaseException:
            c.state = "cancelled"
            raise
        finally:
            if c.state in ("waiting", *HOLDING, "releasing"):
                c.state = "cancelled"  # (a cancelled anyio scope swallows it)

    async def hold(self, c: Client, conn: ModelConnection) -> None:
        """The holder's block: wait for a command, run it, until told to release."""
        self.granted(c, conn)
        try:
            while True:
                await c.go.wait()
                c.go = asyncio.Event()
                if c.command == "query":
                    c.state = "querying"
                    await self.driver.fetchval(conn, "UPDATE t SET x = 1", ())
                    c.state = "holding"
                elif c.command == "raise":
                    raise UserError("the holder's own error")
                else:
                    if c.in_tx and not conn.closed:
                        conn.in_tx = True
                    return
        finally:
            c.state = "releasing"  # (or cancelled while holding)

    def granted(self, c: Client, conn: ModelConnection) -> None:
        self.grants += 1
        if c.place is None:  # the fast path: it claimed an idle connection just now
            c.place = next(self.places)
        waiters = self.ledger.waiters
        queued = [o for o in self.clients if o.waiter is not None and o.waiter in waiters]
        if self.lanes_on:  # FIFO inside a tenant: among the clients of its lane and tenant
            queued = [o for o in queued if flow_of(o) == flow_of(c)]
        older = [o.ticket for o in queued if o.place is not None and o.place < c.place]
        if older:
            self.flag("fifo", f"client {c.ticket} was served before queued {older}")
        if self.lanes_on and c.lane == "batch":
            # (a holder whose connection disconnect() closed holds nothing of the lane's)
            others = [
                o.ticket
                for o in self.holders()
                if o.lane == "batch" and o is not c and id(o.conn) in self.ledger.lent
            ]
            if len(others) + 1 > LANES["batch"].limit:  # type: ignore[union-attr,operator]
                self.flag("lane-limit", f"client {c.ticket} lent beside {others} in lane batch")
        if conn.closed or conn.killed:
            self.violations.append(f"client {c.ticket} was lent {conn!r}")
        if conn.ops:
            self.violations.append(f"client {c.ticket} was lent {conn!r} while {conn.ops} runs")
        if conn.drains < self.drained_up_to:
            self.flag(
                "drain",
                f"client {c.ticket} was lent {conn!r}, whose connect began before "
                f"drain() {conn.drains + 1}, after that drain() returned"
            )
        for other in self.holders():
            if other.conn is conn:
                self.violations.append(f"{conn!r} lent to {c.ticket} and {other.ticket}")
        c.state, c.conn = "holding", conn

    def holders(self) -> list[Client]:
        return [c for c in self.clients if c.state in HOLDING]

    def spawn(
        self, timeout: float | None, kind: str = "ctx", flow: tuple[str | None, str | None] = (
            None, None)
    ) -> None:
        ticket = next(self.tickets)
        c = Client(f"client {ticket}", ticket=ticket, timeout=timeout, kind=kind)
        c.lane, c.tenant = flow if self.lanes_on else (None, None)
        self.clients.append(c)
        self.start(c, lambda: self.client(c))

    # ------------------------------------------------------------ rules: clients

    def room_for_a_client(self) -> bool:
        """A few clients beyond the limit: enough to queue, few enough to explore deep."""
        return sum(c.running for c in self.clients) < LIMIT + (5 if self.lanes_on else 3)

    @precondition(room_for_a_client)
    @rule(kind=st.sampled_from(["ctx", "await", "tx"]), flow=st.sampled_from(FLOWS))
    def acquire(
        self, kind: str = "ctx", flow: tuple[str | None, str | None] = (None, None)
    ) -> None:
        """Also the reconnect: after disconnect(), an acquire reopens the pool."""
        self.spawn(None, kind, flow)

    @precondition(room_for_a_client)
    @rule(kind=st.sampled_from(["ctx", "await", "tx"]), flow=st.sampled_from(FLOWS))
    def acquire_with_a_tiny_timeout(
        self, kind: str = "ctx", flow: tuple[str | None, str | None] = (None, None)
    ) -> None:
        self.spawn(0.001, kind, flow)

    def holding(self) -> list[Client]:
        return [c for c in self.clients if c.state == "holding"]

    @precondition(lambda self: self.holding())
    @rule(data=st.data(), in_tx=st.booleans())
    def release(self, data: st.DataObject, in_tx: bool) -> None:
        """Give a connection back: clean, or inside a transaction (the pool rolls back)."""
        c = data.draw(st.sampled_from(self.holding()))
        c.in_tx, c.command = in_tx, "release"
        c.go.set()
        self.step()

    @precondition(lambda self: self.holding())
    @rule(data=st.data(), raises=st.booleans())
    def query(self, data: st.DataObject, raises: bool) -> None:
        """A holder runs a query (it parks: it may fail read-only, or be cancelled
        mid-way), or raises an error of its own in its block."""
        c = data.draw(st.sampled_from(self.holding()))
        c.command = "raise" if raises else "query"
        c.go.set()
        self.step()

    # No rule releases a connection a second time from a task of its own: the
    # contract allows a release from another task than the holder's (see
    # Ledger.lease_of), so such a release is not a misuse the pool can tell
    # apart. The misuses it does refuse (a stale handle, the old holder's own
    # second release) are tested in tests/test_ledger_faults.py.

    @precondition(lambda self: any(j.running for j in self.jobs))
    @rule(data=st.data(), natively=st.booleans())
    def cancel_a_task(self, data: st.DataObject, natively: bool) -> None:
        """Cancel any task of ours, wherever it is: through its anyio scope, or the
        asyncio way (``task.cancel()``: no anyio shield stops that)."""
        job = data.draw(st.sampled_from([j for j in self.jobs if j.running]))

        async def cancel() -> None:
            if natively:
                assert job.task is not None
                job.task.cancel()
            elif job.scope is not None:
                job.scope.cancel()  # in the loop: anyio cancels from inside it

        self.step(cancel())

    # ------------------------------------------------------------ rules: the pool's own calls

    @rule(limit=st.integers(min_value=1, max_value=LIMIT + 1))
    def resize(self, limit: int) -> None:
        """resize(n) in a task of its own: up or down, overlapping its closes and anything."""
        self.start(Job(f"resize({limit})"), lambda: self.db.resize(limit))

    @rule()
    def drain(self) -> None:
        """drain() in a task of its own; once it returns, nothing older is lent."""
        self.driver.drains += 1
        number = self.driver.drains
        epoch = self.ledger.epoch

        async def drain() -> None:
            await self.db.drain()
            if self.ledger.epoch == epoch:  # (a disconnect() closed them all anyway)
                self.drained_up_to = max(self.drained_up_to, number)

        self.start(Job(f"drain {number}"), drain)

    # ------------------------------------------------------------ rules: parked I/O

    @precondition(lambda self: self.driver.parked)
    @rule(data=st.data())
    def release_parked_op(self, data: st.DataObject) -> None:
        self.driver.finish(data.draw(st.sampled_from(self.driver.parked)), None)
        self.step()

    @precondition(lambda self: self.driver.parked)
    @rule(data=st.data(), refused=st.booleans())
    def fail_parked_op(self, data: st.DataObject, refused: bool) -> None:
        """Fail an I/O: a connect refused or reset, a query refused as read-only (on a
        pool that wants the primary: a failover, which retires that server's
        connections), anything else reset by peer."""
        op = data.draw(st.sampled_from(self.driver.parked))
        error: Exception = ConnectionResetError("reset by peer")
        if op.kind == "connect" and refused:
            error = ConnectionRefusedError("refused: the server is down")
        elif op.kind in ("query", "commit") and refused:
            error = ReadOnlyError("cannot execute UPDATE in a read-only transaction")
            self.driver.primary += 1  # the server was demoted: new ones go to the new primary
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

        self.start(Job("upkeep round"), upkeep)

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
        job = Job("disconnect")

        async def disconnect() -> None:
            await self.db.disconnect(grace=grace)
            still_open = [c for c in self.driver.opened if not c.closed]
            if still_open:
                self.violations.append(f"disconnect() returned, and {still_open} are open")

        if ending is not None:
            self.driver.finish(ending, None)
        self.start(job, disconnect)
        assert job.task is not None
        self.disconnects.append(job.task)

    # ------------------------------------------------------------ invariants

    @invariant()
    def no_violation_seen(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def the_counts_add_up(self) -> None:
        s = self.db.stats()
        ledger = self.ledger
        # on their way out: those marked, and the openings a shrink gave up
        leaving = ledger.doomed + sum(
            1
            for r in (*ledger.lent.values(), *ledger.busy.values())
            if r.retire_reason or r.expires_at == -math.inf
        )
        assert s.size - leaving <= s.limit, (s, f"{leaving} on their way out")
        assert 0 <= ledger.doomed <= s.opening, (s, f"{ledger.doomed} openings doomed")
        assert s.size == s.idle + s.in_use + s.opening + s.busy, s
        assert s.opening >= 0, s
        if ledger.state is OPEN:  # (closing: a refused opening is uncounted at the end)
            assert s.opening <= self.driver.connecting(), (s, self.driver.parked)
        assert s.opened - s.closed == s.idle + s.in_use + s.busy, s
        assert s.acquired == self.grants, s
        if ledger.state is CLOSED_STATE and "closed" not in SKIP:
            assert s.size == 0 and s.waiting == 0, f"a closed pool holds or queues: {s}"
            assert not ledger.idle and not ledger.lent and not ledger.busy, (
                f"a closed pool keeps connections: {s}"
            )

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
        leaked = [
            c
            for c in self.driver.opened
            if id(c) not in kept and not c.closed and "configure" not in c.ops  # (opening)
        ]
        assert not leaked, f"open, and neither idle, lent nor busy: {leaked}"

    @invariant()
    def no_waiter_is_stranded(self) -> None:
        s = self.db.stats()
        if not s.waiting:
            return
        lanes = self.ledger.lanes
        if lanes is not None and not lanes.servable:
            return  # only waiters of lanes at their limit: nothing may go to them
        assert s.idle == 0, f"callers wait while a connection sits idle: {s}"
        if not self.ledger.breaker.failures:
            # connects work: spare capacity must be in use by an opening
            assert s.size >= s.limit or s.opening > 0, (
                f"callers wait, there is room to open, and nobody opens: {s}"
            )

    @invariant()
    def no_client_waits_past_its_timeout(self) -> None:
        if "timeout" in SKIP:
            return
        late = [
            c.ticket
            for c in self.clients
            if c.timeout is not None
            and c.running
            and c.state == "waiting"
            and CLOCK.now > c.started + c.timeout + 1e-6
        ]
        assert not late, f"clients {late} wait past their timeout (a check unbounded?)"

    def teardown(self) -> None:
        async def wind_down() -> None:
            """Cancel every task, release all I/O, and disconnect for the last time."""
            final: asyncio.Task[None] | None = None
            for _ in range(200):
                for job in self.jobs:
                    if job.scope is not None:
                        job.scope.cancel()
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
                # the same examples in every CI run: a red run is replayable, and a
                # long run (model_long_run.py) explores beyond them
                derandomize=True,
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


def replay(
    monkeypatch: pytest.MonkeyPatch, **setup: Any
) -> tuple[PoolMachine, Callable[[], None]]:
    """A model to drive step by step (its pool set up with ``setup``), and the check
    of all its invariants."""
    virtual_time(monkeypatch)
    machine = PoolMachine()
    if setup:
        machine.setup(**setup)

    def check() -> None:
        machine.no_violation_seen()
        machine.the_counts_add_up()
        machine.no_connection_is_lent_twice_or_leaked()
        machine.no_waiter_is_stranded()
        machine.no_client_waits_past_its_timeout()

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
            for op in [op for op in machine.driver.parked if op.kind == "before_exit"]:
                machine.driver.finish(op, None)  # its on_before_exit callback ends
            machine.step()
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
