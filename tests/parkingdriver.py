"""A fake driver whose I/O can be parked, so that a test decides the order of events.

Any async operation (``connect``, ``ping``, ``rollback``, ``close``, ``reset``, the
queries...) can be made to *park*: ``driver.park("ping")`` makes every later ping
wait on a gate of its own. The test picks the parked call up with
``parked = await driver.parked("ping")`` (no sleeps: it waits for the call to
arrive) and ends it when it chooses, with ``parked.release()`` or
``parked.fail(exc)``. Parked calls come out in the order they arrived.

The driver also keeps the books a race test needs: every connection it opened,
how each was closed (graceful ``close()`` or ``terminate()``, and whether a
close came after the connection was already closed), and which tasks are inside
an operation on a connection right now, so that two tasks using one connection
at once is recorded.

Optional driver members the engine looks up with ``getattr`` are opt-in, so that
the default driver behaves as it always did: ``ParkingDriver(recover=True)``
adds ``recover`` (a cancelled holder's connection is recovered, not closed),
``reset_session=True`` adds ``reset_session``, ``failover=True`` adds
``wants_primary``, ``host_of`` (``conn.host``) and ``is_read_only_error`` (a
:class:`ReadOnlyError`). :meth:`ParkingDriver.hooks` gives ``configure`` /
``check`` / ``reset`` hooks that park as ops ``"configure"``, ``"check"`` and
``"reset_hook"``.

Only anyio primitives are used: it runs on asyncio and on trio.
"""

from __future__ import annotations

import itertools
from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Any, Literal

import anyio

Op = Literal[
    "connect",
    "ping",
    "rollback",
    "close",
    "reset",
    "begin",
    "commit",
    "fetch",
    "fetchrow",
    "fetchval",
    "execute",
    "executemany",
    "recover",
    "reset_session",
    "configure",
    "check",
    "reset_hook",
]

__all__ = ["Op", "Parked", "ParkingConnection", "ParkingDriver", "ReadOnlyError"]


class ReadOnlyError(Exception):
    """A write refused because the server is read-only (with ``failover=True``)."""


class ParkingConnection:
    """One fake connection, with the record of what happened to it."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        #: the server side is gone (set by ``driver.kill``): is_alive says False
        self.broken = False
        #: closed by the pool (close or terminate): the first call that closed it
        self.closed_by: str | None = None
        self.close_calls = 0
        self.terminate_calls = 0
        #: graceful close() calls made on a connection already closed
        self.late_closes = 0
        self.in_tx = False
        self.queries: list[str] = []
        #: the server it is on (``host_of`` with ``failover=True``)
        self.host = "primary"
        #: ids of the tasks inside an operation on this connection right now
        self.users: set[int] = set()

    @property
    def closed(self) -> bool:
        return self.closed_by is not None

    def __repr__(self) -> str:
        state = f" closed by {self.closed_by}" if self.closed_by else ""
        return f"<ParkingConnection {self.id}{' broken' if self.broken else ''}{state}>"


class Parked:
    """One parked call: the test ends it with :meth:`release` or :meth:`fail`."""

    def __init__(self, op: Op, conn: ParkingConnection | None) -> None:
        self.op = op
        #: the connection the call is about (None for connect)
        self.conn = conn
        self._gate = anyio.Event()
        self._error: BaseException | None = None
        #: the caller was cancelled while parked (it is gone; release is a no-op)
        self.cancelled = False
        #: the call went past its gate (released, failed or cancelled)
        self.done = False

    def __repr__(self) -> str:
        return f"<Parked {self.op} on {self.conn!r}>"

    def release(self) -> None:
        """Let the call go on and succeed."""
        self._gate.set()

    def fail(self, exc: BaseException) -> None:
        """Make the call raise ``exc``."""
        self._error = exc
        self._gate.set()

    async def _wait(self) -> None:
        try:
            await self._gate.wait()
        except BaseException:
            self.cancelled = True
            raise
        finally:
            self.done = True
        if self._error is not None:
            raise self._error


class ParkingDriver:
    """Satisfies ``pool.Driver[ParkingConnection]``; see the module docstring."""

    scheme = "fake"

    def __init__(
        self, *, recover: bool = False, reset_session: bool = False, failover: bool = False
    ) -> None:
        if recover:
            self.recover = self._recover
        if reset_session:
            self.reset_session = self._reset_session
        if failover:
            self.wants_primary = True
            self.host_of = self._host_of
            self.is_read_only_error = self._is_read_only_error
        #: the host new connections go to (``failover=True``)
        self.primary = "primary"
        self.opened: list[ParkingConnection] = []
        self.connect_attempts = 0
        #: (connection, operation) each time a second task entered an operation
        #: on a connection another task was still inside
        self.concurrent_use: list[tuple[ParkingConnection, str]] = []
        self._parking: set[Op] = set()
        self._all_parked: list[Parked] = []
        # parked calls not yet picked up by the test, per operation, oldest first
        self._queues: defaultdict[Op, deque[Parked]] = defaultdict(deque)
        # set when a call of that operation parks, for a test waiting in parked()
        self._arrivals: dict[Op, anyio.Event] = {}

    # ------------------------------------------------------------------ test controls

    def park(self, *ops: Op) -> None:
        """Make every later call of these operations park until the test ends it."""
        self._parking.update(ops)

    def unpark(self, *ops: Op) -> None:
        """Later calls go straight through; calls already parked stay parked."""
        self._parking.difference_update(ops)

    async def parked(self, op: Op, *, timeout: float = 2.0) -> Parked:
        """The next parked call of ``op``, in arrival order; waits for it to arrive."""
        queue = self._queues[op]
        with anyio.fail_after(timeout):
            while not queue:
                arrival = self._arrivals[op] = anyio.Event()
                await arrival.wait()
        return queue.popleft()

    def release_all(self) -> None:
        """Release every call still parked (for a test's clean-up)."""
        self._parking.clear()
        for parked in self._all_parked:
            parked.release()

    def kill(self, conn: ParkingConnection) -> None:
        """The server dropped this connection: is_alive is False, queries fail."""
        conn.broken = True

    def unclosed(self) -> list[ParkingConnection]:
        """Connections opened and never closed: leaked, unless still legitimately held."""
        return [conn for conn in self.opened if not conn.closed]

    def closed(self) -> list[ParkingConnection]:
        """Connections opened and closed since."""
        return [conn for conn in self.opened if conn.closed]

    def closed_twice(self) -> list[ParkingConnection]:
        """Connections closed gracefully more than once, or after they were closed."""
        return [conn for conn in self.opened if conn.close_calls > 1 or conn.late_closes]

    # ------------------------------------------------------------------ internals

    async def _gate(self, op: Op, conn: ParkingConnection | None) -> None:
        if op not in self._parking:
            await anyio.lowlevel.checkpoint()
            return
        parked = Parked(op, conn)
        self._all_parked.append(parked)
        self._queues[op].append(parked)
        arrival = self._arrivals.pop(op, None)
        if arrival is not None:
            arrival.set()
        await parked._wait()

    async def _op(self, op: Op, conn: ParkingConnection) -> None:
        """Enter an operation on ``conn``: record its user, park if asked."""
        task = anyio.get_current_task().id
        if conn.users - {task}:
            self.concurrent_use.append((conn, op))
        conn.users.add(task)
        try:
            await self._gate(op, conn)
        finally:
            conn.users.discard(task)

    @staticmethod
    def _check_usable(conn: ParkingConnection) -> None:
        if conn.closed or conn.broken:
            raise ConnectionError(f"{conn!r} is gone")

    # ------------------------------------------------------------------ the Driver protocol

    async def connect(self) -> ParkingConnection:
        self.connect_attempts += 1
        await self._gate("connect", None)
        conn = ParkingConnection()
        conn.host = self.primary
        self.opened.append(conn)
        return conn

    async def close(self, conn: ParkingConnection) -> None:
        conn.close_calls += 1
        if conn.closed:
            conn.late_closes += 1
            return
        await self._op("close", conn)
        if conn.closed_by is None:
            conn.closed_by = "close"

    def terminate(self, conn: ParkingConnection) -> None:
        conn.terminate_calls += 1
        if conn.closed_by is None:
            conn.closed_by = "terminate"

    def is_alive(self, conn: ParkingConnection) -> bool:
        return not conn.closed and not conn.broken

    async def ping(self, conn: ParkingConnection) -> None:
        self._check_usable(conn)
        await self._op("ping", conn)
        self._check_usable(conn)

    def in_transaction(self, conn: ParkingConnection) -> bool:
        return conn.in_tx

    async def begin(self, conn: ParkingConnection) -> None:
        self._check_usable(conn)
        await self._op("begin", conn)
        conn.in_tx = True

    async def commit(self, conn: ParkingConnection) -> None:
        self._check_usable(conn)
        await self._op("commit", conn)
        conn.in_tx = False

    async def rollback(self, conn: ParkingConnection) -> None:
        self._check_usable(conn)
        await self._op("rollback", conn)
        conn.in_tx = False

    async def reset(self, conn: ParkingConnection) -> None:
        """Optional (not in today's Protocol): restore session state; a no-op here."""
        self._check_usable(conn)
        await self._op("reset", conn)

    async def _query(self, op: Op, conn: ParkingConnection, sql: str) -> None:
        self._check_usable(conn)
        await self._op(op, conn)
        self._check_usable(conn)
        conn.queries.append(sql)

    async def fetch(self, conn: ParkingConnection, sql: str, args: Sequence[Any]) -> list[Any]:
        await self._query("fetch", conn, sql)
        return [(conn.id, *args)]

    async def fetchrow(self, conn: ParkingConnection, sql: str, args: Sequence[Any]) -> Any:
        await self._query("fetchrow", conn, sql)
        return (conn.id, *args)

    async def fetchval(self, conn: ParkingConnection, sql: str, args: Sequence[Any]) -> Any:
        await self._query("fetchval", conn, sql)
        return conn.id

    async def execute(self, conn: ParkingConnection, sql: str, args: Sequence[Any]) -> Any:
        await self._query("execute", conn, sql)
        return "OK"

    async def executemany(
        self, conn: ParkingConnection, sql: str, args: Sequence[Sequence[Any]]
    ) -> None:
        """Optional (not in today's Protocol)."""
        await self._query("executemany", conn, sql)

    async def server_max_connections(self, conn: ParkingConnection) -> int | None:
        return None

    # ------------------------------------------------------------------ opt-in members

    async def _recover(self, conn: ParkingConnection) -> None:
        self._check_usable(conn)
        await self._op("recover", conn)
        conn.in_tx = False

    async def _reset_session(self, conn: ParkingConnection) -> None:
        self._check_usable(conn)
        await self._op("reset_session", conn)

    @staticmethod
    def _host_of(conn: ParkingConnection) -> str:
        return conn.host

    @staticmethod
    def _is_read_only_error(exc: BaseException) -> bool:
        return isinstance(exc, ReadOnlyError)

    def hooks(self) -> dict[str, Any]:
        """``configure`` / ``check`` / ``reset`` hooks that park like the driver's I/O:
        ``Pool(..., **driver.hooks())``, or pick the ones wanted."""

        def hook(op: Op) -> Any:
            async def run(conn: ParkingConnection) -> None:
                await self._op(op, conn)

            return run

        return {"configure": hook("configure"), "check": hook("check"), "reset": hook("reset_hook")}
