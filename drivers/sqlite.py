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

- sqlite3 is blocking, so every call runs in a worker thread, and its
  connections are opened with ``check_same_thread=False`` because the next
  call may run on another thread. A cancelled call still waits for its thread
  to finish (the statement is not interrupted). A terminate that comes while
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
  call waits for its worker thread, and raises :class:`TimeoutError` chained
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

import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar
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

__all__ = ["SQLiteConnection", "SQLiteDriver", "create"]

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


class SQLiteConnection:
    """The SQLite driver's own connection: what ``pool.acquire()`` hands out.

    A thin async face over a :class:`sqlite3.Connection` (``.raw``). Each
    method runs its sqlite3 call in a worker thread. There is no lock: a
    pooled connection has one holder at a time, and that holder awaits each
    call before making the next, so no two threads ever use it at once. Use
    ``.raw`` only from a worker thread of your own, e.g.
    ``await anyio.to_thread.run_sync(conn.raw.executescript, script)``.

    Placeholders are sqlite3's: ``?`` (or ``:name`` with a single dict argument
    on ``.raw``). Rows are tuples.
    """

    __slots__ = ("_busy", "_close_pending", "_closed", "_lock", "raw")

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw
        self._closed = False
        # A statement may still run in a worker thread when the pool must close
        # the connection (disconnect() after its grace, a cancelled holder):
        # closing it under the statement crashes the process. The lock makes
        # "is a statement running?" and "close" one step; a close that finds a
        # statement running interrupts it and leaves the close to its thread.
        self._lock = threading.Lock()
        self._busy = False
        self._close_pending = False

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

    async def fetch(
        self, sql: str, *args: Any, timeout: float | None = None
    ) -> list[tuple[Any, ...]]:
        return await self._run(lambda: self.raw.execute(sql, args).fetchall(), timeout)

    async def fetchrow(
        self, sql: str, *args: Any, timeout: float | None = None
    ) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await self._run(
            lambda: self.raw.execute(sql, args).fetchone(), timeout
        )
        return row

    async def fetchval(self, sql: str, *args: Any, timeout: float | None = None) -> Any:
        row = await self.fetchrow(sql, *args, timeout=timeout)
        return None if row is None else row[0]

    async def execute(self, sql: str, *args: Any, timeout: float | None = None) -> int:
        """Rows changed by INSERT/UPDATE/DELETE; -1 for other statements."""
        return await self._run(lambda: self.raw.execute(sql, args).rowcount, timeout)

    async def executemany(
        self, sql: str, args_iterable: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """``sql`` once per argument tuple, in one thread call; all rows or none."""
        raw = self.raw

        def run() -> None:
            own = not raw.in_transaction
            if own:
                raw.execute("BEGIN")
            try:
                raw.executemany(sql, args_iterable)
                if own:
                    raw.execute("COMMIT")
            except BaseException:
                # (an interrupted write has rolled the transaction back already)
                if own and raw.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        raw.execute("ROLLBACK")
                raise

        await self._run(run, timeout)

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
            if self._busy:
                self._close_pending = True
                with contextlib.suppress(Exception):
                    self.raw.interrupt()
                return
        with contextlib.suppress(Exception):
            self.raw.close()

    def _in_thread(self, call: Callable[[], T]) -> T:
        with self._lock:
            if self._closed:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            self._busy = True
        try:
            return call()
        finally:
            with self._lock:
                self._busy = False
                pending, self._close_pending = self._close_pending, False
            if pending:
                with contextlib.suppress(Exception):
                    self.raw.close()

    async def _run(self, call: Callable[[], T], timeout: float | None = None) -> T:
        # Not abandon_on_cancel: a cancelled caller waits for the thread, so
        # the connection is never in use by a thread nobody is awaiting.
        if timeout is None:
            return await anyio.to_thread.run_sync(self._in_thread, call)
        # A cancel scope alone would wait for the statement to finish, however
        # long: a watchdog interrupts it instead, and we still wait for the
        # thread, which then returns at once with sqlite3's "interrupted".
        interrupted = False

        async def watchdog() -> None:
            nonlocal interrupted
            await anyio.sleep(timeout)
            interrupted = True
            with self._lock:  # never interrupt a connection closed meanwhile
                if not self._closed:
                    self.raw.interrupt()  # thread-safe: sqlite3_interrupt()

        outcome: T | None = None
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog)
            try:
                outcome = await anyio.to_thread.run_sync(self._in_thread, call)
            except sqlite3.OperationalError as exc:
                error = exc  # raised below, outside the group, unwrapped
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            if interrupted:
                raise TimeoutError(
                    f"the statement ran past timeout={timeout}s and was interrupted"
                ) from error
            raise error
        return outcome  # type: ignore[return-value]  # set when no error


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
        # is_alive() and not in_transaction(), in one call: the fast release's test
        return not conn.closed and not conn.in_transaction

    async def recover(self, conn: SQLiteConnection) -> None:
        """Nothing to wait for: a cancelled call already waited for its thread's statement.

        (The pool rolls back what the holder left open.)
        """

    async def reset_session(self, conn: SQLiteConnection) -> None:
        """Drop the session's temporary tables; the rest of a session lives in the file."""

        def drop_temp_tables() -> None:
            names = [
                row[0]
                for row in conn.raw.execute(
                    "SELECT name FROM temp.sqlite_master WHERE type = 'table'"
                )
            ]
            for name in names:
                conn.raw.execute(f'DROP TABLE temp."{name.replace(chr(34), chr(34) * 2)}"')

        await conn._run(drop_temp_tables)

    async def ping(self, conn: SQLiteConnection) -> None:
        await conn.execute("SELECT 1")

    def in_transaction(self, conn: SQLiteConnection) -> bool:
        return conn.in_transaction

    async def begin(self, conn: SQLiteConnection) -> None:
        await conn.execute("BEGIN")

    async def commit(self, conn: SQLiteConnection) -> None:
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
