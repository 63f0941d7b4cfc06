"""Read replicas: reads go to a replica, writes and transactions to the primary.

Like Prisma's read-replicas extension: ``$primary()`` and ``$replica()`` are
:meth:`Replicated.primary` and :meth:`Replicated.replica`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio

from . import _config
from ._errors import ConfigError, ConnectError, PoolError
from ._pool import Pool, borrow, driver_of, give_back, lends
from ._shims import running_loop
from ._stats import PoolStats

__all__ = ["Replicated", "ReplicatedStats"]

logger = logging.getLogger("pool")

_STRATEGIES = ("random", "round_robin")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicatedStats:
    """``Replicated.stats()``: one :class:`PoolStats` per member."""

    primary: PoolStats
    replicas: tuple[PoolStats, ...]


def _this_task() -> object:
    """The running task object (asyncio or trio), to tell a transaction's owner apart."""
    if running_loop() is not None:
        return asyncio.current_task()
    import trio  # Replicated runs on trio with the drivers that do (sqlite)

    return trio.lowlevel.current_task()


@dataclass(slots=True, eq=False)
class _OpenTransaction:
    """What ``Replicated._tx`` holds while ``async with rp.transaction()`` is open.

    Tasks started inside the block copy the context, so they see this same
    record; ``owner`` tells them apart from the task that opened it, and
    ``conn`` is cleared when the block ends, so a task that outlives the block
    routes normally rather than onto a connection already back in the pool.
    """

    conn: Any
    owner: object


class Replicated:
    """A primary pool and replica pools behind one query API.

    ``fetch``, ``fetchrow`` and ``fetchval`` go to a replica (chosen at random,
    or in turn with ``strategy="round_robin"``); ``execute`` and
    ``transaction()`` go to the primary. Inside ``async with rp.transaction()``
    every read through ``rp`` runs on the transaction's own connection, so it
    sees its own writes; that connection belongs to the task that opened the
    transaction, so a task started inside the block (``asyncio.gather``,
    ``create_task``, a task group) gets a :class:`PoolError` from ``rp`` while
    the block is open, and routes as usual after it. A replica that cannot be
    reached is skipped (other replicas first, then the primary) with one
    WARNING, and tried again after ``replica_retry_after`` seconds. With
    ``read_your_writes=<seconds>``, reads that follow a write in the same task
    context stay on the primary that long.
    Keyword settings apply to every member.
    """

    def __init__(
        self,
        primary_url: str,
        /,
        replicas: Sequence[str] = (),
        *,
        strategy: str = "random",
        read_your_writes: float | None = None,
        replica_retry_after: float = 5.0,
        **overrides: object,
    ) -> None:
        if isinstance(replicas, str) or not isinstance(replicas, Sequence):
            raise ConfigError("replicas", replicas, "must be a list of URLs")
        if strategy not in _STRATEGIES:
            raise ConfigError("strategy", strategy, f"must be one of {', '.join(_STRATEGIES)}")
        if read_your_writes is not None:
            _config.check_seconds("read_your_writes", read_your_writes)
        _config.check_seconds("replica_retry_after", replica_retry_after)
        self._primary: Pool[Any] = Pool(primary_url, **overrides)  # type: ignore[arg-type]
        self._replicas: list[Pool[Any]] = [
            Pool(url, **overrides)  # type: ignore[arg-type]
            for url in replicas
        ]
        self._round_robin = strategy == "round_robin"
        self._next = 0
        self._ryw = read_your_writes
        self._retry_after = replica_retry_after
        self._down_until = [0.0] * len(self._replicas)
        # Per task context: the open transaction (its connection and its owning
        # task), the last write's time.
        self._tx: ContextVar[_OpenTransaction | None] = ContextVar(
            f"pool_tx_{id(self)}", default=None
        )
        self._members_open: contextlib.AsyncExitStack | None = None  # under "async with"
        self._last_write: ContextVar[float] = ContextVar(
            f"pool_write_{id(self)}", default=-math.inf
        )

    # ------------------------------------------------------------------ members

    def primary(self) -> Pool[Any]:
        """The primary's pool (Prisma's ``$primary()``)."""
        return self._primary

    def replica(self) -> Pool[Any]:
        """A replica's pool, by the strategy (Prisma's ``$replica()``).

        The primary when there is no healthy replica. Raises :class:`PoolError`
        inside :meth:`transaction`, where a replica would not see the
        transaction's writes.
        """
        if self._open_transaction() is not None:
            raise PoolError(
                "replica() was called inside a transaction: a replica cannot see the "
                "transaction's writes. Read through this object, or use primary()."
            )
        return self._read_order()[0]

    def _open_transaction(self) -> _OpenTransaction | None:
        """The transaction open around this call (in this task or the one that started it)."""
        record = self._tx.get()
        if record is None or record.conn is None:  # none, or its block has ended
            return None
        return record

    def _transaction_conn(self, call: str) -> Any:
        """The open transaction's connection, for its owner; None outside a transaction.

        Another task that inherited the context (``asyncio.gather`` of reads,
        ``create_task``, a task group started inside the block) is refused
        rather than routed elsewhere. It must not touch the connection: a
        driver connection runs one statement at a time (asyncpg: "another
        operation is in progress"), and interleaving with the owner's own
        statements inside one transaction has no defined order anyway. Routing
        it to a replica or another primary connection instead would be silent
        and wrong: the read would miss the transaction's uncommitted writes
        (and a write there would run outside the transaction, possibly waiting
        on its locks while the owner waits for it). A loud error makes the
        user choose: await the calls one by one in the transaction's task, or
        read outside the transaction through ``rp.primary()``.
        """
        record = self._open_transaction()
        if record is None:
            return None
        if record.owner is not _this_task():
            raise PoolError(
                f"{call}() was called from another task than the one that opened the "
                "transaction around it (asyncio.gather, create_task or a task group "
                "started inside `async with rp.transaction()`): the transaction's "
                "connection runs one statement at a time, and a read elsewhere would not "
                "see the transaction's writes. Await the calls one after another in the "
                "transaction's task (under asyncio.timeout() rather than "
                "asyncio.wait_for(), which runs its call in a task of its own before "
                "Python 3.12), or read outside the transaction through rp.primary()."
            )
        return record.conn

    def _read_order(self) -> list[Pool[Any]]:
        """Healthy replicas, starting from the strategy's choice, then the primary."""
        n = len(self._replicas)
        if n == 0:
            return [self._primary]
        if self._round_robin:
            start = self._next
            self._next = (self._next + 1) % n
        else:
            start = random.randrange(n)
        now = time.monotonic()
        order = [
            self._replicas[(start + i) % n]
            for i in range(n)
            if self._down_until[(start + i) % n] <= now
        ]
        order.append(self._primary)
        return order

    def _mark_down(self, member: Pool[Any], exc: BaseException) -> None:
        index = self._replicas.index(member)
        was_up = self._down_until[index] <= time.monotonic()
        self._down_until[index] = time.monotonic() + self._retry_after
        if was_up:
            logger.warning(
                "replica %s cannot be reached (%s); reading from the others and the primary, "
                "retrying it in %gs",
                member.config.url,
                exc,
                self._retry_after,
            )

    def _reads_go_to_primary(self) -> bool:
        return self._ryw is not None and time.monotonic() - self._last_write.get() < self._ryw

    def _wrote(self) -> None:
        if self._ryw is not None:
            self._last_write.set(time.monotonic())

    # ------------------------------------------------------------------ queries

    async def _read(self, call: Callable[[Pool[Any]], Awaitable[Any]], method: str,
                    sql: str, args: tuple[Any, ...]) -> Any:
        conn = self._transaction_conn(method)
        if conn is not None:
            return await getattr(driver_of(self._primary), method)(conn, sql, args)
        if self._reads_go_to_primary():
            return await call(self._primary)
        for member in self._read_order():
            if member is self._primary:
                return await call(member)
            try:
                return await call(member)
            except ConnectError as exc:
                self._mark_down(member, exc)
        raise AssertionError("unreachable: the primary ends every read order")

    async def fetch(
        self, sql: str, *args: Any, lane: str | None = None, tenant: Hashable = None
    ) -> list[Any]:
        """All rows, from a replica. ``lane``, ``tenant``: passed on (see :meth:`Pool.acquire`)."""
        self._check_flow(lane, tenant)
        result: list[Any] = await self._read(
            lambda p: p.fetch(sql, *args, lane=lane, tenant=tenant), "fetch", sql, args
        )
        return result

    async def fetchrow(
        self, sql: str, *args: Any, lane: str | None = None, tenant: Hashable = None
    ) -> Any | None:
        """The first row or None, from a replica."""
        self._check_flow(lane, tenant)
        return await self._read(
            lambda p: p.fetchrow(sql, *args, lane=lane, tenant=tenant), "fetchrow", sql, args
        )

    async def fetchval(
        self, sql: str, *args: Any, lane: str | None = None, tenant: Hashable = None
    ) -> Any:
        """The first column of the first row, from a replica."""
        self._check_flow(lane, tenant)
        return await self._read(
            lambda p: p.fetchval(sql, *args, lane=lane, tenant=tenant), "fetchval", sql, args
        )

    async def execute(
        self, sql: str, *args: Any, lane: str | None = None, tenant: Hashable = None
    ) -> Any:
        """A statement, on the primary (inside a transaction: on its connection)."""
        self._check_flow(lane, tenant)
        conn = self._transaction_conn("execute")
        self._wrote()
        if conn is not None:
            return await driver_of(self._primary).execute(conn, sql, args)
        return await self._primary.execute(sql, *args, lane=lane, tenant=tenant)

    def transaction(
        self, *, timeout: float | None = None, lane: str | None = None, tenant: Hashable = None
    ) -> _ReplicatedTransaction:
        """``async with rp.transaction() as conn``: on the primary; reads follow it there."""
        return _ReplicatedTransaction(self, timeout, lane, tenant)

    def acquire(
        self, *, readonly: bool = False, timeout: float | None = None, lane: str | None = None,
        tenant: Hashable = None,
    ) -> _Acquire:
        """A connection from a replica with ``readonly=True``, else from the primary."""
        self._check_flow(lane, tenant)
        return _Acquire(self, readonly, timeout, lane, tenant)

    def _check_flow(self, lane: str | None, tenant: Hashable) -> None:
        """An unknown lane is refused at once (every member has the same lanes)."""
        if lane is not None or tenant is not None:
            for member in (self._primary, *self._replicas):
                member._flow(lane, tenant)

    async def release(self, conn: Any) -> None:
        """Give back a connection taken with ``await rp.acquire(...)``."""
        for member in (self._primary, *self._replicas):
            if lends(member, conn):
                await member.release(conn)
                return
        raise PoolError("this connection is not lent by this pool (released twice?)")

    # ------------------------------------------------------------------ life cycle

    async def connect(self) -> None:
        """Connect the primary (errors raise) and every replica (errors warn)."""
        await self._primary.connect()
        for member in self._replicas:
            try:
                await member.connect()
            except ConnectError as exc:
                self._mark_down(member, exc)

    async def disconnect(self, *, grace: float = 0.0) -> None:
        """Disconnect every member, at once."""
        async with anyio.create_task_group() as tg:
            for member in (self._primary, *self._replicas):
                tg.start_soon(_disconnect, member, grace)

    async def resize(self, connection_limit: int) -> None:
        """:meth:`Pool.resize` on every member: each gets ``connection_limit``."""
        limit = _config.parse_connection_limit(connection_limit)
        async with anyio.create_task_group() as tg:
            for member in (self._primary, *self._replicas):
                tg.start_soon(member.resize, limit)

    async def drain(self) -> None:
        """:meth:`Pool.drain` on every member: every connection is replaced, live."""
        async with anyio.create_task_group() as tg:
            for member in (self._primary, *self._replicas):
                tg.start_soon(member.drain)

    def on_before_exit(self, callback: Callable[[], Awaitable[object]]) -> None:
        """Run ``callback`` when the primary disconnects, before it closes."""
        self._primary.on_before_exit(callback)

    def stats(self) -> ReplicatedStats:
        return ReplicatedStats(
            primary=self._primary.stats(), replicas=tuple(r.stats() for r in self._replicas)
        )

    async def __aenter__(self) -> Replicated:
        """Connect every member and run each one's maintenance until the block ends.

        The primary must connect; a replica that cannot is skipped with a WARNING
        (reads go elsewhere) and connects lazily once it is back.
        """
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await stack.enter_async_context(self._primary)
            for member in self._replicas:
                try:
                    await stack.enter_async_context(member)
                except ConnectError as exc:
                    self._mark_down(member, exc)
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._members_open = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._members_open = self._members_open, None
        try:
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True):
                await self.disconnect()  # members a callback reconnected, and lazy ones

    def __repr__(self) -> str:
        return f"<Replicated primary={self._primary!r} replicas={self._replicas!r}>"


async def _disconnect(member: Pool[Any], grace: float) -> None:
    await member.disconnect(grace=grace)


class _ReplicatedTransaction:
    __slots__ = ("_inner", "_owner", "_record", "_token")

    def __init__(
        self, owner: Replicated, timeout: float | None, lane: str | None, tenant: Hashable
    ) -> None:
        self._owner = owner
        self._inner = owner._primary.transaction(timeout=timeout, lane=lane, tenant=tenant)
        self._token: Any = None
        self._record: _OpenTransaction | None = None

    async def __aenter__(self) -> Any:
        # Raises for another task's open transaction; a nested one in this task:
        if self._owner._transaction_conn("transaction") is not None:
            raise PoolError("a transaction is already open in this task context")
        conn = await self._inner.__aenter__()
        self._record = _OpenTransaction(conn=conn, owner=_this_task())
        self._token = self._owner._tx.set(self._record)
        self._owner._wrote()
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        record, self._record = self._record, None
        try:
            await self._inner.__aexit__(exc_type, exc, tb)
        finally:
            # Cleared only now, after the commit or rollback: until then tasks
            # that inherited the context are still refused, never handed a
            # connection. Cleared whatever happened, so none of them can reach
            # the connection once it is back in the pool.
            if record is not None:
                record.conn = None
            self._owner._tx.reset(self._token)


class _Acquire:
    __slots__ = ("_conn", "_lane", "_member", "_owner", "_readonly", "_tenant", "_timeout")

    def __init__(
        self, owner: Replicated, readonly: bool, timeout: float | None, lane: str | None,
        tenant: Hashable,
    ) -> None:
        self._owner = owner
        self._lane = lane
        self._tenant = tenant
        self._readonly = readonly
        self._timeout = timeout
        self._conn: Any = None
        self._member: Pool[Any] | None = None

    async def _take(self) -> Any:
        owner = self._owner
        if (
            not self._readonly
            or owner._open_transaction() is not None
            or owner._reads_go_to_primary()
        ):
            self._member = owner._primary
            return await borrow(owner._primary, self._timeout, self._lane, self._tenant)
        for member in owner._read_order():
            self._member = member
            if member is owner._primary:
                break
            try:
                return await borrow(member, self._timeout, self._lane, self._tenant)
            except ConnectError as exc:
                owner._mark_down(member, exc)
        return await borrow(owner._primary, self._timeout, self._lane, self._tenant)

    def __await__(self) -> Any:
        return self._take().__await__()

    async def __aenter__(self) -> Any:
        self._conn = await self._take()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._member is not None
        await give_back(self._member, self._conn, exc)


ReplicatedStats.__module__ = "pool"
