"""SQLite through the standard library's sqlite3, in anyio worker threads.

Runs on asyncio and on trio. URLs:

- ``sqlite:///relative/path.db`` (relative to the working directory),
- ``sqlite:////absolute/path.db``,
- ``sqlite:///:memory:``: one in-memory database per :func:`create` call,
  shared by all of that pool's connections. It lives as long as at least one
  of them is open: when the pool closes its last connection (idle expiry
  included), the data is gone.

Parameters:

``busy_timeout``
    seconds a statement waits for another connection's lock before it fails
    with ``database is locked`` (default 5).
``journal_mode``
    wal, delete, truncate, memory or off. Files default to wal, so readers do
    not block the writer nor it them; an in-memory database keeps ``memory``
    (wal is refused for it: SQLite would silently ignore it).

Quirks:

- What ``acquire()`` hands out is :class:`SQLiteConnection`, an async
  wrapper over a :class:`sqlite3.Connection`, not a sqlite3 connection
  itself: its ``fetch``/``fetchrow``/``fetchval``/``execute``/``executemany``
  return coroutines, and each must be awaited. A call made without ``await``
  never runs, and is an error (:class:`UnawaitedCallError`, naming the call)
  at the next awaited call on the connection, at the transaction's
  ``COMMIT`` (which then rolls back) or at the connection's release. To use
  the sqlite3 connection itself, run a function in the connection's worker
  thread: ``await conn.run_sync(lambda raw: raw.executescript(script))``.
- sqlite3 is blocking, so every call runs in a worker thread, and its
  connections are opened with ``check_same_thread=False`` because the next
  call may run on another thread. One statement runs on a connection at a
  time: a call waits for the previous one's thread to return. A cancelled
  call (an anyio or trio scope, or asyncio's ``task.cancel()``, ``wait_for``,
  ``timeout``) interrupts its statement (``sqlite3.Connection.interrupt()``)
  and returns at once; the pool lends the connection again only after that
  statement's thread has returned (``recover``). A terminate that comes while
  a statement runs (``disconnect()`` after its grace) interrupts it and leaves
  the close to the worker thread: closing under a running statement would
  crash the process.
- Connections are in autocommit mode (``isolation_level=None``), so the
  module never opens transactions behind the user's back; ``BEGIN`` is
  explicit, as on the servers. A plain ``BEGIN`` is DEFERRED: a transaction
  that reads and then writes can fail with ``database is locked`` at once, if
  another connection wrote in between; run ``BEGIN IMMEDIATE`` for those.
- ``execute`` returns the cursor's ``rowcount``: rows changed by
  INSERT/UPDATE/DELETE, -1 for other statements. Use
  ``fetchval("SELECT last_insert_rowid()")`` for the new row's id.
- The shared in-memory database uses SQLite's ``memdb`` VFS
  (``file:/pool-mem-<uuid>?vfs=memdb``) rather than the older
  ``mode=memory&cache=shared``: in shared-cache mode a conflicting lock fails
  at once with ``database table is locked`` (SQLITE_LOCKED, which
  ``busy_timeout`` never retries), while memdb waits for the lock like a file
  does. memdb's locks are coarser than wal's, though: while one connection
  holds a write lock, the others' reads wait for it too. SQLite older than
  3.36 has no shared memdb; there we fall back to the shared cache.
- Several connections opening a new file together race to switch it to wal,
  and SQLite fails the losers with ``database is locked`` at once rather than
  waiting; the switch is retried here until ``busy_timeout``.
- ``socket_timeout`` does not apply: there is no socket. A call's own
  ``timeout=`` does: at the deadline the running statement is interrupted
  (``sqlite3.Connection.interrupt()``, from the event loop's thread), the
  call waits for its worker thread (which returns at once), and raises :class:`TimeoutError` chained
  to sqlite3's ``interrupted`` error. The connection stays usable; an
  interrupted write inside a transaction rolls the whole transaction back
  (SQLite's rule).
- ``executemany`` runs in one worker-thread call, inside a transaction of its
  own when none is open: all rows or none, and one commit instead of one per
  row.

``connect_args`` (the ``Pool`` keyword) go to :func:`sqlite3.connect`:
``detect_types``, ``factory``, ``cached_statements``. The others are set by
this module (``timeout`` is ``busy_timeout``; autocommit and
``check_same_thread=False`` are what the pool relies on).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import unquote

import anyio
import anyio.to_thread

from . import InvalidParameter
from ._url import (
    check_connect_args,
    check_known,
    parse_choice,
    parse_seconds,
    query_params,
    split,
)

__all__ = ["SQLiteConnection", "SQLiteDriver", "UnawaitedCallError", "create"]

PARAMETERS = ("busy_timeout", "journal_mode")
JOURNAL_MODES = ("wal", "delete", "truncate", "memory", "off")
DEFAULT_BUSY_TIMEOUT = 5.0
MEMORY = ":memory:"
#: what sqlite3.connect takes (it is a builtin without a signature to read)
_CONNECT_KEYWORDS = (
    "database", "timeout", "detect_types", "isolation_level", "check_same_thread",
    "factory", "cached_statements", "uri", "autocommit",
)
_MANAGED = {
    "database": "the URL's path",
    "timeout": "?busy_timeout=",
    "isolation_level": "always None: autocommit, BEGIN is explicit",
    "autocommit": "always the legacy autocommit mode: BEGIN is explicit",
    "check_same_thread": "always False: each call may run on another worker thread",
    "uri": "the URL",
}
# a named in-memory database that other connections of this process can open
_SHARED_MEMDB = sqlite3.sqlite_version_info >= (3, 36, 0)

T = TypeVar("T")


class UnawaitedCallError(sqlite3.ProgrammingError):
    """A call on an :class:`SQLiteConnection` was made without ``await``: it never ran.

    Raised by the next call awaited on that connection (the transaction's
    ``COMMIT`` included, so that the transaction rolls back) or, failing that,
    by the connection's release to the pool.
    """


# A statement's life, kept under its connection's lock (the worker thread and
# the event loop both move it).
_CREATED: Final = 0  # made, not awaited yet: counted pending on its connection
_QUEUED: Final = 1  # awaited: it owns the connection; its thread has not started
_RUNNING: Final = 2  # its worker thread runs it
_DONE: Final = 3  # its thread returned (or it was dropped before it started)
_ABANDONED: Final = 4  # its caller left before the thread started: it never runs


def _waker() -> tuple[anyio.Event, Callable[[], None]]:
    """An event of the running loop, and a function any thread may call to set it.

    anyio.Event is not thread-safe: the setter posts ``set`` to the loop.
    """
    event = anyio.Event()
    try:
        post: Callable[[Callable[[], object]], object] = (
            asyncio.get_running_loop().call_soon_threadsafe
        )
    except RuntimeError:  # trio: no asyncio loop runs in this thread
        import trio

        post = trio.lowlevel.current_trio_token().run_sync_soon

    def wake() -> None:
        # RuntimeError: the loop has ended (trio's RunFinishedError is one);
        # nobody is left to wake.
        with contextlib.suppress(RuntimeError):
            post(event.set)

    return event, wake


#: how many references an object has (CPython); elsewhere "many", which turns
#: the early unawaited-call check off and leaves it to COMMIT and the release
_refcount: Callable[[object], int] = getattr(sys, "getrefcount", lambda _: 1 << 30)


def _unawaited_error(first: _Statement[Any], count: int) -> UnawaitedCallError:
    more = f" (and {count - 1} more call(s))" if count > 1 else ""
    return UnawaitedCallError(
        f"{first.describe()} was called without await{more}, so it never ran: the pool's "
        "SQLite connection is an async wrapper over sqlite3.Connection, and each of its "
        "calls returns a coroutine to await"
    )


class _Statement(Coroutine[Any, Any, T]):
    """What a call on :class:`SQLiteConnection` returns: a coroutine that runs one statement.

    A real coroutine object, for ``asyncio.create_task``, trio's ``start_soon``
    and ``gather`` (``collections.abc.Coroutine``), that also counts itself
    pending on its connection from the call until it is awaited (or sent,
    thrown into, closed). A call never awaited is found by the next one (see
    :class:`UnawaitedCallError`); a plain ``async def`` cannot do that.
    """

    __slots__ = ("_conn", "_it", "args", "error", "outcome", "sql", "state", "timeout")

    #: the method's name, for error messages
    name = "execute"

    def __init__(
        self, conn: SQLiteConnection, sql: str, args: Any, timeout: float | None
    ) -> None:
        self._conn = conn
        self.sql = sql
        self.args = args
        self.timeout = timeout
        self.state = _CREATED
        self._it: Any = None
        # (only a bounded call keeps these: it reads them after its thread ends)
        self.outcome: Any = None
        self.error: BaseException | None = None
        conn._unawaited.append(self)

    def run(self, raw: sqlite3.Connection) -> T:
        """The statement itself, in the worker thread."""
        raise NotImplementedError

    def describe(self) -> str:
        # the SQL, shortened; never the arguments (they may be secrets)
        sql = " ".join(self.sql.split())
        return f"conn.{self.name}({sql[:60] + '...' if len(sql) > 60 else sql!r})"

    def __repr__(self) -> str:
        return f"<SQLite statement {self.describe()}>"

    def __await__(self) -> Generator[Any, None, T]:
        conn = self._conn
        pending = conn._unawaited
        if pending and pending[0] is self:
            del pending[0]  # the usual case: the call awaited at once
        else:
            conn._out_of_order(self)  # raises
        return conn._run(self).__await__()

    # collections.abc.Coroutine, for create_task() and trio, which drive the
    # object with send/throw rather than await it

    def send(self, value: Any) -> Any:
        it = self._it
        if it is None:
            it = self._it = self.__await__()
        return it.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        it = self._it
        if it is None:
            # thrown into before its first step (a task cancelled before it
            # ran): it never runs, and is no longer pending
            self.close()
            exc = val if val is not None else typ
            raise exc() if isinstance(exc, type) else exc
        return it.throw(typ if val is None else val)

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            return
        with contextlib.suppress(ValueError):
            self._conn._unawaited.remove(self)
        self.state = _DONE  # awaited later: "already awaited"


class _Fetch(_Statement[list[tuple[Any, ...]]]):
    __slots__ = ()
    name = "fetch"

    def run(self, raw: sqlite3.Connection) -> list[tuple[Any, ...]]:
        return raw.execute(self.sql, self.args).fetchall()


class _FetchRow(_Statement["tuple[Any, ...] | None"]):
    __slots__ = ()
    name = "fetchrow"

    def run(self, raw: sqlite3.Connection) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = raw.execute(self.sql, self.args).fetchone()
        return row


class _FetchVal(_Statement[Any]):
    __slots__ = ()
    name = "fetchval"

    def run(self, raw: sqlite3.Connection) -> Any:
        row = raw.execute(self.sql, self.args).fetchone()
        return None if row is None else row[0]


class _Execute(_Statement[int]):
    __slots__ = ()
    name = "execute"

    def run(self, raw: sqlite3.Connection) -> int:
        return raw.execute(self.sql, self.args).rowcount


class _ExecuteMany(_Statement[None]):
    __slots__ = ()
    name = "executemany"

    def run(self, raw: sqlite3.Connection) -> None:
        own = not raw.in_transaction
        if own:
            raw.execute("BEGIN")
        try:
            raw.executemany(self.sql, self.args)
            if own:
                raw.execute("COMMIT")
        except BaseException:
            # (an interrupted write has rolled the transaction back already)
            if own and raw.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    raw.execute("ROLLBACK")
            raise


class _RunSync(_Statement[Any]):
    __slots__ = ("func",)
    name = "run_sync"

    def __init__(
        self, conn: SQLiteConnection, func: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        self.func = func
        super().__init__(conn, getattr(func, "__qualname__", repr(func)), args, None)

    def run(self, raw: sqlite3.Connection) -> Any:
        return self.func(raw, *self.args)

    def describe(self) -> str:
        return f"conn.run_sync({self.sql})"


class SQLiteConnection:
    """What ``pool.acquire()`` hands out for SQLite: an async wrapper, not a sqlite3.Connection.

    It wraps one :class:`sqlite3.Connection` (``.raw``) and runs each call on
    it in a worker thread, so that the event loop never blocks.
    ``fetch``/``fetchrow``/``fetchval``/``execute``/``executemany``/``run_sync``
    return coroutines: await each one. A call that is not awaited never runs,
    and is an error (:class:`UnawaitedCallError`) at the next awaited call on
    the connection, at ``COMMIT`` (the transaction rolls back) or at its
    release to the pool, whichever comes first.

    One statement at a time: a call waits for the connection's previous one
    to return from its thread, even one whose caller was cancelled. A
    cancelled call (an anyio scope, or asyncio's ``task.cancel()``,
    ``wait_for``, ``timeout``) interrupts its statement
    (``sqlite3.Connection.interrupt()``) and returns at once; the pool lends
    the connection again only after the statement's thread has returned.

    To use the sqlite3 connection itself, run a function of yours in the
    connection's worker thread, under the same rules:
    ``await conn.run_sync(lambda raw: raw.executescript(script))``. ``.raw``
    used directly, outside ``run_sync``, may race with a statement still
    running in a thread (and closing it crashes the process): leave that to
    the pool.

    Placeholders are sqlite3's: ``?`` (``:name`` with one dict argument).
    Rows are tuples.
    """

    __slots__ = ("_close_pending", "_closed", "_current", "_lock", "_unawaited", "_wakers", "raw")

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw
        self._closed = False
        # Worker threads and the event loop share what follows; the lock makes
        # each step on it atomic ("is a statement running?" and "close" in
        # particular: closing under a running statement crashes the process).
        self._lock = threading.Lock()
        #: the statement that owns the connection (QUEUED or RUNNING), or None.
        #: Only that statement's own thread (or its caller, before the thread
        #: starts) clears it: an owner, not a flag that any thread may reset.
        self._current: _Statement[Any] | None = None
        self._close_pending = False
        #: setters of the events that tasks waiting for the connection wait on
        self._wakers: list[Callable[[], None]] = []
        #: statements made and not awaited yet, oldest first (almost always empty)
        self._unawaited: list[_Statement[Any]] = []

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SQLiteConnection {state}>"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` (or the pool's terminate) has run."""
        return self._closed

    @property
    def in_transaction(self) -> bool:
        """True between ``BEGIN`` and ``COMMIT``/``ROLLBACK``."""
        # A read of sqlite3_get_autocommit(): no I/O, safe without a thread.
        return not self._closed and self.raw.in_transaction

    # timeout= as on asyncpg's Connection: the statement is interrupted at the
    # deadline and TimeoutError raised; the connection stays usable.

    def fetch(
        self, sql: str, *args: Any, timeout: float | None = None
    ) -> Coroutine[Any, Any, list[tuple[Any, ...]]]:
        """All rows, as tuples."""
        return _Fetch(self, sql, args, timeout)

    def fetchrow(
        self, sql: str, *args: Any, timeout: float | None = None
    ) -> Coroutine[Any, Any, tuple[Any, ...] | None]:
        """The first row, or None."""
        return _FetchRow(self, sql, args, timeout)

    def fetchval(
        self, sql: str, *args: Any, timeout: float | None = None
    ) -> Coroutine[Any, Any, Any]:
        """The first column of the first row, or None."""
        return _FetchVal(self, sql, args, timeout)

    def execute(
        self, sql: str, *args: Any, timeout: float | None = None
    ) -> Coroutine[Any, Any, int]:
        """Rows changed by INSERT/UPDATE/DELETE; -1 for other statements."""
        return _Execute(self, sql, args, timeout)

    def executemany(
        self, sql: str, args_iterable: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> Coroutine[Any, Any, None]:
        """``sql`` once per argument tuple, in one thread call; all rows or none."""
        return _ExecuteMany(self, sql, args_iterable, timeout)

    def run_sync(self, func: Callable[..., T], *args: Any) -> Coroutine[Any, Any, T]:
        """``func(raw, *args)`` in the connection's worker thread: the safe way to ``.raw``.

        Like the other calls, it waits for the connection's previous statement
        and is interrupted (``raw.interrupt()``) if its caller is cancelled.
        """
        return _RunSync(self, func, args)

    async def close(self) -> None:
        """Close; an open transaction is rolled back."""
        await anyio.to_thread.run_sync(self.terminate)

    def terminate(self) -> None:
        """Close now, from any thread. Never raises.

        If a statement is running in a worker thread, it is interrupted and the
        thread closes the connection when the statement ends: closing a
        connection under a running statement would crash the process.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            owner = self._current
            if owner is not None and owner.state == _RUNNING:
                self._close_pending = True
                with contextlib.suppress(Exception):
                    self.raw.interrupt()
                return
            # (a QUEUED owner's thread finds the connection closed and never runs)
            wakers, self._wakers = self._wakers, []
        with contextlib.suppress(Exception):
            self.raw.close()
        for wake in wakers:
            wake()  # callers waiting for the connection: it is closed

    # ------------------------------------------------------------ internals

    def _out_of_order(self, stmt: _Statement[Any]) -> None:
        """``stmt`` is awaited, but is not the oldest call pending: raise if that is a misuse.

        An older call may still be on its way (a task not started yet, a
        gather, a variable awaited later): fine. One that nobody holds any more
        (only this list refers to it) can never be awaited: the trap of a call
        made without ``await``, said now, before the next statement runs.
        """
        pending = self._unawaited
        if stmt not in pending:
            if stmt.state == _ABANDONED:  # dropped at its connection's release
                raise sqlite3.ProgrammingError(
                    f"{stmt.describe()} was awaited after its connection went back "
                    "to the pool: it did not run"
                )
            raise RuntimeError("cannot reuse already awaited coroutine")
        index = pending.index(stmt)
        del pending[index]
        # 2: this list's reference and getrefcount's argument (CPython)
        lost = [i for i in range(index) if _refcount(pending[i]) <= 2]
        if not lost:
            return
        first = pending[lost[0]]
        for i in reversed(lost):
            pending[i].state = _ABANDONED
            del pending[i]
        stmt.state = _ABANDONED
        error = _unawaited_error(first, len(lost))
        error.add_note(f"(found when {stmt.describe()} was awaited, which did not run either)")
        raise error

    def _drop_unawaited(self) -> UnawaitedCallError | None:
        """Forget the calls not awaited yet; the error that names the oldest, if any."""
        pending = self._unawaited
        if not pending:
            return None
        for stmt in pending:
            stmt.state = _ABANDONED
        error = _unawaited_error(pending[0], len(pending))
        pending.clear()
        return error

    def _take(self, stmt: _Statement[Any]) -> bool:
        """Make ``stmt`` the owner, if the connection is free (under the lock)."""
        if self._closed:
            stmt.state = _DONE
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        if self._current is not None:
            return False
        self._current = stmt
        stmt.state = _QUEUED
        return True

    async def _run(self, stmt: _Statement[T]) -> T:
        with self._lock:
            free = self._take(stmt)
        if not free:
            await self._wait(lambda: self._take(stmt))
        if stmt.timeout is not None:
            return await self._run_bounded(stmt, stmt.timeout)
        try:
            # abandon_on_cancel: a cancellation (a scope's or asyncio's own)
            # reaches us at once, to interrupt the statement; the thread still
            # owns the connection until it returns.
            return await anyio.to_thread.run_sync(self._in_thread, stmt, abandon_on_cancel=True)
        except BaseException:
            if stmt.state != _DONE:
                self._stop(stmt)
            raise

    async def _run_bounded(self, stmt: _Statement[T], timeout: float) -> T:
        with anyio.move_on_after(timeout):
            try:
                return await anyio.to_thread.run_sync(
                    self._in_thread, stmt, abandon_on_cancel=True
                )
            except BaseException:
                if stmt.state != _DONE:
                    self._stop(stmt)
                raise
        # The deadline: the statement was interrupted; its thread returns at
        # once with sqlite3's "interrupted", and the connection stays usable.
        await self._wait(lambda: stmt.state >= _DONE)
        error = stmt.error
        if error is None and stmt.state == _DONE:
            return stmt.outcome  # type: ignore[no-any-return]  # it ended just in time
        if error is None or isinstance(error, sqlite3.OperationalError):
            raise TimeoutError(
                f"the statement ran past timeout={timeout}s and was interrupted"
            ) from error
        raise error

    async def _wait(self, ready: Callable[[], bool]) -> None:
        """Until ``ready()`` (asked under the lock) holds; woken by each statement's end.

        No thread waits for the thread: the one that returns posts the wake-up
        to this loop.
        """
        while True:
            with self._lock:
                if ready():
                    return
                event, wake = _waker()
                self._wakers.append(wake)
            await event.wait()

    async def _idle(self) -> None:
        """Until no statement owns the connection (or it is closed)."""
        await self._wait(lambda: self._closed or self._current is None)

    def _stop(self, stmt: _Statement[Any]) -> None:
        """Its caller left (cancelled) before the thread returned: stop the statement."""
        with self._lock:
            if stmt.state == _RUNNING:
                if not self._closed:
                    self.raw.interrupt()  # thread-safe: sqlite3_interrupt()
                return
            if stmt.state != _QUEUED:
                return
            # the thread has not started it: it never will (it looks first)
            stmt.state = _ABANDONED
            if self._current is stmt:
                self._current = None
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    def _interrupt(self) -> None:
        """Interrupt whatever statement runs now (the holder is gone)."""
        with self._lock:
            owner = self._current
            if owner is not None and owner.state == _RUNNING and not self._closed:
                self.raw.interrupt()

    def _in_thread(self, stmt: _Statement[T]) -> T:
        with self._lock:
            if stmt.state != _QUEUED:
                return None  # type: ignore[return-value]  # abandoned: nobody reads it
            if self._closed:
                stmt.state = _DONE
                self._current = None
                wakers, self._wakers = self._wakers, []
                closed = True
            else:
                stmt.state = _RUNNING
                closed = False
        if closed:
            for wake in wakers:
                wake()
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        try:
            outcome = stmt.run(self.raw)
            if stmt.timeout is not None:
                stmt.outcome = outcome
            return outcome
        except BaseException as exc:
            if stmt.timeout is not None:
                stmt.error = exc
            raise
        finally:
            with self._lock:
                stmt.state = _DONE
                if self._current is stmt:
                    self._current = None
                pending, self._close_pending = self._close_pending, False
                wakers = self._wakers
                if wakers:
                    self._wakers = []
            if pending:
                with contextlib.suppress(Exception):
                    self.raw.close()
            for wake in wakers:
                wake()


class SQLiteDriver:
    """The adapter. Its connection type is :class:`SQLiteConnection`."""

    scheme = "sqlite"
    #: sqlite3 runs in anyio worker threads, so on both of anyio's backends
    async_libraries: tuple[str, ...] = ("asyncio", "trio")

    def __init__(
        self,
        *,
        display_url: str,
        target: str,
        uri: bool,
        busy_timeout: float,
        journal_mode: str,
        connect_args: Mapping[str, Any] | None = None,
    ) -> None:
        self._display_url = display_url
        self._target = target
        self._uri = uri
        self.busy_timeout = busy_timeout
        self.journal_mode = journal_mode
        self._connect_args = dict(connect_args or {})

    def __repr__(self) -> str:
        return f"<SQLiteDriver {self._display_url}>"

    async def connect(self) -> SQLiteConnection:
        # One thread call does the open and the PRAGMA, so a cancellation
        # between them cannot leave an open connection that nobody holds.
        return SQLiteConnection(await anyio.to_thread.run_sync(self._open))

    def _open(self) -> sqlite3.Connection:
        raw: sqlite3.Connection = sqlite3.connect(
            self._target,
            timeout=self.busy_timeout,  # sets SQLite's busy timeout
            isolation_level=None,  # autocommit; BEGIN is explicit
            check_same_thread=False,  # each call may run on another worker thread
            uri=self._uri,
            **self._connect_args,
        )
        try:
            self._set_journal_mode(raw)
        except BaseException:
            raw.close()
            raise
        return raw

    def _set_journal_mode(self, raw: sqlite3.Connection) -> None:
        (mode,) = raw.execute("PRAGMA journal_mode").fetchone()
        if mode == self.journal_mode:
            # wal is stored in the file: after the first connection, the rest
            # find it already set and need no lock at all
            return
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                (mode,) = raw.execute(f"PRAGMA journal_mode={self.journal_mode}").fetchone()
                break
            except sqlite3.OperationalError as exc:
                # Switching into or out of wal takes an exclusive lock, and
                # SQLite answers SQLITE_BUSY at once instead of calling its
                # busy handler (seen when a pool opens several connections to
                # a new file together), so busy_timeout is honoured here.
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)  # a worker thread: nothing else waits on it
        # journal_mode answers with the mode in force: a file system without
        # shared memory, say, refuses wal without an error.
        if mode != self.journal_mode:
            raise sqlite3.OperationalError(
                f"journal_mode={self.journal_mode} was refused; the database uses {mode}"
            )

    async def close(self, conn: SQLiteConnection) -> None:
        await conn.close()

    def terminate(self, conn: SQLiteConnection) -> None:
        conn.terminate()

    def is_alive(self, conn: SQLiteConnection) -> bool:
        return not conn.closed

    def is_clean(self, conn: SQLiteConnection) -> bool:
        # is_alive() and not in_transaction(), in one call: the fast release's
        # test. A call left unawaited sends the release the careful way, which
        # asks release_error().
        return not conn._closed and not conn._unawaited and not conn.raw.in_transaction

    def release_error(self, conn: SQLiteConnection) -> BaseException | None:
        """The call its holder never awaited, as the error its release raises; forgotten now.

        Awaited after this, such a call raises instead of running on a
        connection lent to someone else.
        """
        return conn._drop_unawaited()

    async def recover(self, conn: SQLiteConnection) -> None:
        """Its holder was cancelled: stop the statement still running, wait for its thread.

        A cancelled call interrupts its statement and returns at once, while
        the worker thread may still be inside sqlite3: the connection is lent
        again only once that thread has returned. (The pool then rolls back
        what the holder left open.)
        """
        conn._interrupt()
        await conn._idle()

    async def reset_session(self, conn: SQLiteConnection) -> None:
        """Drop the session's temporary tables; the rest of a session lives in the file."""

        def drop_temp_tables(raw: sqlite3.Connection) -> None:
            names = [
                row[0]
                for row in raw.execute("SELECT name FROM temp.sqlite_master WHERE type = 'table'")
            ]
            for name in names:
                raw.execute(f'DROP TABLE temp."{name.replace(chr(34), chr(34) * 2)}"')

        await conn.run_sync(drop_temp_tables)

    async def ping(self, conn: SQLiteConnection) -> None:
        await conn.execute("SELECT 1")

    def in_transaction(self, conn: SQLiteConnection) -> bool:
        return conn.in_transaction

    async def begin(self, conn: SQLiteConnection) -> None:
        await conn.execute("BEGIN")

    async def commit(self, conn: SQLiteConnection) -> None:
        # A call of the transaction not awaited yet would run after its COMMIT,
        # or never: the error, and the pool rolls the transaction back.
        error = conn._drop_unawaited()
        if error is not None:
            raise error
        await conn.execute("COMMIT")

    async def rollback(self, conn: SQLiteConnection) -> None:
        await conn.execute("ROLLBACK")

    async def fetch(
        self,
        conn: SQLiteConnection,
        sql: str,
        args: Sequence[Any],
        timeout: float | None = None,
    ) -> list[Any]:
        return await conn.fetch(sql, *args, timeout=timeout)

    async def fetchrow(
        self,
        conn: SQLiteConnection,
        sql: str,
        args: Sequence[Any],
        timeout: float | None = None,
    ) -> Any | None:
        return await conn.fetchrow(sql, *args, timeout=timeout)

    async def fetchval(
        self,
        conn: SQLiteConnection,
        sql: str,
        args: Sequence[Any],
        timeout: float | None = None,
    ) -> Any:
        return await conn.fetchval(sql, *args, timeout=timeout)

    async def execute(
        self,
        conn: SQLiteConnection,
        sql: str,
        args: Sequence[Any],
        timeout: float | None = None,
    ) -> Any:
        return await conn.execute(sql, *args, timeout=timeout)

    async def executemany(
        self,
        conn: SQLiteConnection,
        sql: str,
        args_iterable: Iterable[Sequence[Any]],
        timeout: float | None = None,
    ) -> None:
        await conn.executemany(sql, args_iterable, timeout=timeout)

    async def server_max_connections(self, conn: SQLiteConnection) -> int | None:
        return None  # no server, no ceiling

    def host_of(self, conn: SQLiteConnection) -> str:
        """The database: the URL as given (there is no host)."""
        return self._display_url

    def is_read_only_error(self, exc: BaseException) -> bool:
        """True for SQLITE_READONLY and its extended codes (a read-only file, say)."""
        code = getattr(exc, "sqlite_errorcode", None)
        return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_READONLY

    def classify_connect_error(self, exc: BaseException) -> str | None:
        """SQLITE_CANTOPEN (a missing directory, a file it may not open): the database."""
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_CANTOPEN:
            return "database"
        return None


def create(
    url: str,
    *,
    connect_timeout: float | None,
    socket_timeout: float | None,
    connect_args: Mapping[str, Any] | None = None,
) -> SQLiteDriver:
    """Validate ``url`` (pool parameters already removed) and build the adapter.

    ``connect_timeout`` and ``socket_timeout`` do not apply: opening a file
    does not hang on a network, and ``busy_timeout`` bounds lock waits.
    ``connect_args`` go to :func:`sqlite3.connect`, checked first.
    """
    parts = split(url)
    if parts.scheme != "sqlite":
        raise InvalidParameter("url", parts.scheme + "://", "must start with sqlite://")
    if parts.netloc:
        raise InvalidParameter(
            "url",
            parts.netloc,
            "must not name a host: write sqlite:///relative.db or sqlite:////absolute.db",
        )
    # sqlite:///x.db has the path "/x.db": the first slash ends the (empty) host
    path = unquote(parts.path[1:])
    if not path:
        raise InvalidParameter("url", url, "must name a database file, or :memory:")
    if "\0" in path:
        raise InvalidParameter("url", url, "must not contain NUL")
    params = query_params(parts)
    check_known(params, PARAMETERS, "sqlite")

    busy_timeout = DEFAULT_BUSY_TIMEOUT
    if "busy_timeout" in params:
        busy_timeout = parse_seconds("busy_timeout", params["busy_timeout"])

    memory = path == MEMORY
    journal_mode = "memory" if memory else "wal"
    if "journal_mode" in params:
        journal_mode = parse_choice("journal_mode", params["journal_mode"], JOURNAL_MODES)
        if memory and journal_mode not in ("memory", "off"):
            raise InvalidParameter(
                "journal_mode", journal_mode, "must be memory or off for an in-memory database"
            )

    if memory:
        name = f"pool-mem-{uuid.uuid4()}"
        target = (
            f"file:/{name}?vfs=memdb" if _SHARED_MEMDB else f"file:{name}?mode=memory&cache=shared"
        )
        uri = True
    else:
        # a plain path, not a file: URI, so that '?' and '#' in a name stay literal
        target, uri = path, False
    extra = check_connect_args(connect_args or {}, _CONNECT_KEYWORDS, _MANAGED, "sqlite")
    return SQLiteDriver(
        display_url=url,
        target=target,
        uri=uri,
        busy_timeout=busy_timeout,
        journal_mode=journal_mode,
        connect_args=extra,
    )
