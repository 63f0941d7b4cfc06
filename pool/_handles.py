"""What ``Pool.acquire()`` and ``Pool.transaction()`` return."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from ._acquiring import Flow
    from ._engine import Engine

__all__ = ["Acquire", "LaneAcquire", "Transaction"]

C = TypeVar("C")


class Acquire(Generic[C]):
    """Awaitable (then ``await db.release(conn)``), and an async context manager."""

    __slots__ = ("_conn", "_engine", "_lease", "_ledger", "_timeout")

    def __init__(self, engine: Engine[C], timeout: float | None) -> None:
        # (Pool.acquire() sets these three itself, the same way: keep them alike)
        self._engine = engine
        # the fast paths' owner, one attribute away: they run on every acquire
        self._ledger = engine.ledger
        self._timeout = timeout
        # _conn and _lease are set by __aenter__, and read only by __aexit__:
        # not set here, two stores less on every acquire

    def __await__(self) -> Any:
        return self._await().__await__()

    async def _await(self) -> C:
        conn = self._ledger.take_idle()  # the fast path: the user is two frames up
        if conn is None:
            conn = await self._engine.acquire(self._timeout)
        return conn

    async def __aenter__(self) -> C:
        ledger = self._ledger
        # Someone waits: the fast path would refuse, so do not call it (under load)
        conn = ledger.take_idle() if not ledger.waiters else None
        if conn is None:
            conn = await self._engine.acquire(self._timeout)
        self._conn = conn
        # Every lending takes the next number of the ledger's running count, and
        # nothing was lent since ours (no await in between): that is our lease.
        self._lease = ledger.acquired
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn: Any = self._conn
        ledger = self._ledger
        if exc is None and ledger.give_back(conn, self._lease):
            return
        # A stale handle (released already, the connection lent again since)
        # must not free someone else's lending.
        ledger.check_lease(conn, self._lease)
        await self._engine.release(conn, exc)


class LaneAcquire(Acquire[C]):
    """``db.acquire(lane=..., tenant=...)``: the same handle, always on the careful path.

    A subclass, so that a plain ``acquire()`` pays nothing for lanes.
    """

    __slots__ = ("_flow",)

    def __init__(self, engine: Engine[C], timeout: float | None, flow: Flow | None) -> None:
        super().__init__(engine, timeout)
        self._flow = flow

    async def _await(self) -> C:
        if self._flow is None:  # the default lane of a pool without lanes: plain FIFO
            return await super()._await()
        return await self._engine.acquire(self._timeout, self._flow)

    async def __aenter__(self) -> C:
        if self._flow is None:
            return await super().__aenter__()
        conn = await self._engine.acquire(self._timeout, self._flow)
        self._conn = conn
        self._lease = self._ledger.acquired  # (as in Acquire: nothing lent since ours)
        return conn


class Transaction(Generic[C]):
    """``async with db.transaction() as conn``: commit on success, roll back on error."""

    __slots__ = ("_conn", "_engine", "_flow", "_timeout")

    def __init__(self, engine: Engine[C], timeout: float | None, flow: Flow | None = None) -> None:
        self._engine = engine
        self._timeout = timeout
        self._flow = flow
        self._conn: C | None = None

    async def __aenter__(self) -> C:
        engine = self._engine
        conn = engine.ledger.take_idle() if self._flow is None else None
        if conn is None:
            conn = await engine.acquire(self._timeout, self._flow)
        try:
            await engine.driver.begin(conn)
        except BaseException as exc:
            await engine.release(conn, exc)
            raise
        self._conn = conn
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        engine, conn = self._engine, self._conn
        self._conn = None
        assert conn is not None
        if exc is None:
            try:
                await engine.driver.commit(conn)
            except BaseException as commit_error:
                await engine.release(conn, commit_error)
                raise
            await engine.release(conn, None)
        else:
            # Any other error: the release rolls back (or closes, for a cancellation).
            await engine.release(conn, exc)
