"""PostgreSQL through psycopg 3 (``postgresql+psycopg://``; asyncio only).

The URL is read as for ``postgresql://`` (asyncpg: see :mod:`drivers.postgres`),
host lists, ``?host=``/``?port=`` and the user info included, with these
differences, all because libpq itself does the connecting here:

- libpq's own parameters pass straight through to it: ``sslmode``,
  ``sslrootcert``, ``sslcert``, ``sslkey``, ``sslcrl``, ``sslpassword``,
  ``channel_binding`` (``require`` works: libpq binds), ``target_session_attrs``,
  ``load_balance_hosts``, ``gssencmode``, ``keepalives*``, ``tcp_user_timeout``,
  ``require_auth`` and the rest of libpq's keywords (``service`` aside: put
  its settings in the URL). A host list and ``target_session_attrs`` are
  libpq's (psycopg tries each host in turn).
- ``sslaccept=strict`` is ``sslmode=verify-full`` (and ``sslrootcert=system``,
  the system's trusted CAs, unless ``sslrootcert`` is given);
  ``sslaccept=accept_invalid_certs`` is ``sslmode=require``. (libpq's
  ``require`` verifies after all when ``~/.postgresql/root.crt`` exists.)
- ``schema`` becomes ``-c search_path=...`` in the startup ``options``.
- ``prepare_threshold``: psycopg prepares a query on the server after that
  many runs on one connection (default 5; ``none``: never).
  ``pgbouncer=true`` sets it to never: behind PgBouncer in transaction mode
  the next query may run on another server connection that lacks the
  statement. Giving both is refused.

``connect_args`` (the ``Pool`` keyword) carries ``row_factory`` (e.g.
``psycopg.rows.dict_row``: ``fetch`` and ``fetchrow`` then return dicts),
``cursor_factory`` and ``context`` (an ``AdaptContext`` with your type
adapters) to :meth:`psycopg.AsyncConnection.connect`; libpq's keywords go in
the URL.

Connections run in autocommit: a plain ``execute`` commits, as on asyncpg,
and ``in_transaction`` is the server's transaction status, set by an explicit
``BEGIN``. Placeholders are psycopg's ``%s`` (and ``%(name)s``); with no
arguments the SQL is sent as written, so a literal ``%`` needs no doubling.

Cancellation mid-query keeps the connection. psycopg on its own answers a
cancelled query with a cancel request and a wait in the cancelled task, and
closes the connection when that wait is itself interrupted (as an anyio
cancel scope does at once); here the connection class leaves the query
pending instead, :meth:`PsycopgDriver.recover` (run by the pool's upkeep,
within the pool's clean-up bound) sends the server-side cancel and waits for
the query's end, and until then the connection is never lent. A call's
``timeout=`` (or ``socket_timeout``) does the same within the call, then
raises :class:`TimeoutError` with the connection usable. ``connect_timeout``
bounds the whole connect (each host of a list within it once more); libpq's
own per-host bound is the same, rounded up to whole seconds and at least 2,
as libpq has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import select
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import errors, waiting
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg.rows import tuple_row

from . import InvalidParameter, PasswordProvider, resolve_password
from ._hosts import Host
from ._pg import (
    READ_ONLY_SQLSTATE,
    RESET_SESSION,
    is_disconnect_sqlstate,
    parse_pg_url,
)
from ._url import HIDDEN, check_connect_args, parse_nonnegative_int, redact

__all__ = ["PsycopgConnection", "PsycopgDriver", "create"]

# libpq's keywords, less connect_timeout (the pool's own), service (a file the
# URL would depend on) and replication (no pool lends a replication session)
_LIBPQ = (
    "user", "password", "passfile", "channel_binding", "dbname", "host", "hostaddr", "port",
    "client_encoding", "options", "application_name", "keepalives", "keepalives_idle",
    "keepalives_interval", "keepalives_count", "tcp_user_timeout", "sslmode",
    "sslnegotiation", "sslcompression", "sslcert", "sslkey", "sslcertmode", "sslpassword",
    "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "requirepeer", "require_auth",
    "min_protocol_version", "max_protocol_version", "ssl_min_protocol_version",
    "ssl_max_protocol_version", "gssencmode", "krbsrvname", "gsslib", "gssdelegation",
    "target_session_attrs", "load_balance_hosts",
)  # fmt: skip
PARAMETERS = (*_LIBPQ, "sslaccept", "sslidentity", "schema", "pgbouncer", "prepare_threshold")
#: what connect_args may carry: the psycopg keywords that are not libpq's
_CONNECT_ARGS = ("row_factory", "cursor_factory", "context")
_MANAGED = {
    "autocommit": "always on: the pool relies on it",
    "prepare_threshold": "?prepare_threshold= or ?pgbouncer=",
    "connect_timeout": "connect_timeout",
    **{name: f"the URL (?{name}=)" for name in _LIBPQ},
}
DEFAULT_PREPARE_THRESHOLD = 5
#: the poll interval psycopg's own waits use (to notice KeyboardInterrupt)
_WAIT_INTERVAL = 0.1

_IDLE = TransactionStatus.IDLE
_ACTIVE = TransactionStatus.ACTIVE
_IN_TRANSACTION = (TransactionStatus.INTRANS, TransactionStatus.INERROR, TransactionStatus.ACTIVE)
_OK = ConnStatus.OK

T = TypeVar("T")


class PsycopgConnection(psycopg.AsyncConnection[Any]):
    """psycopg's ``AsyncConnection``, leaving a cancelled query to the pool.

    psycopg's ``wait`` answers a cancellation by cancelling on the server and
    waiting right there, in the cancelled task, and closes the connection if
    that wait is cancelled too (an anyio scope cancels every await), or takes
    over 5 s. This one keeps the query's generator, so that the driver can
    finish the job where it is allowed to take its time.
    """

    #: the generator of a query cut short by a cancellation, for recover()
    _pool_pending: Any = None

    @classmethod
    def _connect_gen(cls, conninfo: str = "") -> Any:
        """psycopg's connect generator, telling ``_WATCH`` of each socket it waits on.

        libpq makes the socket inside ``connect_start`` and psycopg shows it only
        in what this generator yields; ``connect_watching`` needs it before the
        handshake ends (see there).
        """
        gen = super()._connect_gen(conninfo)
        watch = _WATCH.get()
        if watch is None:
            return (yield from gen)
        try:
            fileno, wait = next(gen)
            while True:
                watch(fileno)  # each time: libpq may move to another address's socket
                ready = yield fileno, wait
                fileno, wait = gen.send(ready)
        except StopIteration as done:
            return done.value

    async def wait(
        self, gen: Any, interval: float = _WAIT_INTERVAL, timeout: float | None = None
    ) -> Any:
        try:
            return await waiting.wait_async(
                gen, self.pgconn.socket, interval=interval, timeout=timeout
            )
        except (asyncio.CancelledError, KeyboardInterrupt):
            if self.pgconn.transaction_status == _ACTIVE:
                self._pool_pending = gen
            raise


#: set by ``connect_watching`` for the connecting task: told each socket of the connect
_WATCH: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar(
    "pool_psycopg_watch", default=None
)


class PsycopgDriver:
    """The adapter. Its connection type is :class:`PsycopgConnection`, psycopg's subclassed."""

    scheme = "postgresql"
    #: psycopg's async connections wait on asyncio's file-descriptor callbacks
    async_libraries: tuple[str, ...] = ("asyncio",)

    #: set by the pool for ``Pool(..., password=callable)``: asked at each connect
    password_provider: PasswordProvider | None = None

    def __init__(
        self,
        *,
        display_url: str,
        conninfo: dict[str, Any],
        connect_kwargs: dict[str, Any],
        prepare_threshold: int | None,
        hosts: Sequence[Host],
        target_session_attrs: str | None,
        connect_timeout: float | None,
        socket_timeout: float | None,
        secrets: Sequence[str] = (),
    ) -> None:
        self._display_url = display_url
        self._conninfo = conninfo
        self._connect_kwargs = connect_kwargs
        #: psycopg's prepare threshold per connection (None with pgbouncer=true: never)
        self.prepare_threshold = prepare_threshold
        self.hosts: tuple[str, ...] = tuple(str(h) for h in hosts)
        self._target = target_session_attrs
        # the whole connect: each host of a list may take connect_timeout
        self._connect_timeout = (
            None if connect_timeout is None else connect_timeout * max(1, len(hosts))
        )
        self._socket_timeout = socket_timeout
        self._secrets = tuple(secrets)

    def __repr__(self) -> str:
        return f"<PsycopgDriver {self._display_url}>"

    async def connect_watching(self, watch: Callable[[int], None]) -> PsycopgConnection:
        """``connect()``, calling ``watch(fd)`` for each socket libpq waits on, from its first.

        For host_connection_limit: a connect abandoned mid-handshake leaves a
        backend that the server lists until it reads our end of stream, and
        psycopg leaves the abandoned libpq connection (its socket open) to the
        garbage collector: the pool ends that session itself, on the socket.
        """
        token = _WATCH.set(watch)
        try:
            return await self.connect()
        finally:
            _WATCH.reset(token)

    def socket_of(self, conn: PsycopgConnection) -> int:
        """The connection's socket descriptor (-1: unknown), for host_connection_limit."""
        try:
            return int(conn.pgconn.socket)
        except psycopg.OperationalError:  # already closed
            return -1

    async def connect(self) -> PsycopgConnection:
        conninfo = self._conninfo
        if self.password_provider is not None:  # asked at each connect, kept by nobody
            conninfo = {**conninfo, "password": await resolve_password(self.password_provider)}
        try:
            with anyio.fail_after(self._connect_timeout):
                return await PsycopgConnection.connect(
                    autocommit=True,
                    prepare_threshold=self.prepare_threshold,
                    **self._connect_kwargs,
                    **conninfo,
                )
        except psycopg.Error as exc:
            message = str(exc)
            if any(secret in message for secret in self._secrets):  # libpq does not echo it
                for secret in self._secrets:
                    message = message.replace(secret, HIDDEN)
                raise type(exc)(message) from None
            raise

    async def close(self, conn: PsycopgConnection) -> None:
        await conn.close()  # sends Terminate, closes the socket: nothing to wait for

    def terminate(self, conn: PsycopgConnection) -> None:
        with contextlib.suppress(Exception):  # the contract: terminate never raises
            conn.pgconn.finish()

    def is_alive(self, conn: PsycopgConnection) -> bool:
        # libpq reads nothing while idle: a session the server ended meanwhile
        # (its FATAL and end of stream wait unread on the socket) would show
        # only at the next query. So a readable idle socket is read now, with
        # no wait: an end of stream makes the status BAD (a NOTIFY or a notice
        # is kept for psycopg, which collects them at its next call).
        pgconn = conn.pgconn
        if pgconn.status != _OK:
            return False
        if pgconn.transaction_status != _IDLE:
            return True  # a query's reply is psycopg's to read
        try:
            # the first read takes the server's FATAL (libpq keeps it as a
            # notice), the next one meets the end of stream
            for _ in range(3):
                readable, _, _ = select.select((pgconn.socket,), (), (), 0)
                if not readable:
                    break
                pgconn.consume_input()
        except (OSError, ValueError, psycopg.Error):
            return False
        return pgconn.status == _OK

    def in_transaction(self, conn: PsycopgConnection) -> bool:
        # a failed transaction too (INERROR); a query still running (ACTIVE,
        # cut short by a cancellation) is not clean either
        return conn.pgconn.transaction_status in _IN_TRANSACTION

    def is_clean(self, conn: PsycopgConnection) -> bool:
        # is_alive() and not in_transaction(), in one call: the fast release's
        # test. A closed pgconn reports UNKNOWN, so IDLE says both.
        return conn.pgconn.transaction_status == _IDLE

    async def _finish_pending(self, conn: PsycopgConnection, limit: float | None) -> None:
        """Cancel the query a cancellation cut short on the server, and wait for its end."""
        gen = conn._pool_pending
        if gen is None:
            return
        conn._pool_pending = None
        try:
            if conn.pgconn.transaction_status == _ACTIVE:
                await conn.cancel_safe(timeout=limit or 0)
                # the query's own end: cancelled (57014), or an error it had anyway
                with contextlib.suppress(psycopg.DatabaseError):
                    await waiting.wait_async(
                        gen, conn.pgconn.socket, interval=_WAIT_INTERVAL, timeout=limit
                    )
        except BaseException:
            # interrupted, timed out or failed: the protocol state is unknown
            conn.pgconn.finish()
            raise
        if conn.pgconn.status != _OK:
            raise ConnectionError("the connection closed while its query was cancelled")

    async def recover(self, conn: PsycopgConnection) -> None:
        """Bring back a connection whose holder was cancelled mid-query.

        The server-side cancel, then the wait for the aborted statement to end
        (the pool bounds it), then a rollback of what the holder left open.
        """
        await self._finish_pending(conn, None)
        if conn.pgconn.transaction_status != _IDLE:
            await conn.execute("ROLLBACK")

    async def reset_session(self, conn: PsycopgConnection) -> None:
        """What ``DISCARD ALL`` does, except dropping prepared statements, in one round trip.

        psycopg's prepared statements survive (DISCARD ALL would drop those it
        has prepared, and it would fail on their next use). Settings given at
        connect time (``schema``, ``application_name``, ``options``) are the
        session's defaults, so ``RESET ALL`` keeps them. ``UNLISTEN *`` ends
        the server's side of ``LISTEN``; the notice and notify handlers the
        borrower added on the connection are forgotten too.
        """
        await conn.execute(RESET_SESSION)
        for name in ("_notice_handlers", "_notify_handlers"):  # private: guarded
            handlers = getattr(conn, name, None)
            if isinstance(handlers, list):
                handlers.clear()

    async def ping(self, conn: PsycopgConnection) -> None:
        await self._bounded(conn, lambda: conn.execute("SELECT 1"))

    async def begin(self, conn: PsycopgConnection) -> None:
        await self._bounded(conn, lambda: conn.execute("BEGIN"))

    async def commit(self, conn: PsycopgConnection) -> None:
        await self._bounded(conn, lambda: conn.execute("COMMIT"))

    async def rollback(self, conn: PsycopgConnection) -> None:
        await self._finish_pending(conn, self._socket_timeout)
        await self._bounded(conn, lambda: conn.execute("ROLLBACK"))

    async def fetch(
        self,
        conn: PsycopgConnection,
        sql: str,
        args: Sequence[Any],
        timeout: float | None = None,
    ) -> list[Any]:
        """All rows, as the connection's ``row_factory`` makes them (tuples by default)."""

        async def run() -> list[Any]:
            cur = await conn.execute(sql, args or None)
            return list(await cur.fetchall())

        return await self._bounded(conn, run, timeout)

    async def fetchrow(
        self,
        conn: PsycopgConnection,
        sql: str,
        args: Sequence[Any],
        timeout: float | None = None,
    ) -> Any | None:
        """The first row (as the ``row_factory`` makes it), or None."""

        async def run() -> Any | None:
            cur = await conn.execute(sql, args or None)
            return await cur.fetchone()

        return await self._bounded(conn, run, timeout)

    async def fetchval(
        self,
        conn: PsycopgConnection,
        sql: str,
        args: Sequence[Any],
        timeout: float | None = None,
    ) -> Any:
        """The first column of the first row, or None, whatever the ``row_factory``."""

        async def run() -> Any:
            cur = conn.cursor(row_factory=tuple_row)
            await cur.execute(sql, args or None)
            row = await cur.fetchone()
            return None if row is None else row[0]

        return await self._bounded(conn, run, timeout)

    async def execute(
        self,
        conn: PsycopgConnection,
        sql: str,
        args: Sequence[Any],
        timeout: float | None = None,
    ) -> Any:
        """The command tag, e.g. ``"INSERT 0 1"``, as asyncpg returns it."""

        async def run() -> str | None:
            cur = await conn.execute(sql, args or None)
            return cur.statusmessage

        return await self._bounded(conn, run, timeout)

    async def executemany(
        self,
        conn: PsycopgConnection,
        sql: str,
        args_iterable: Iterable[Sequence[Any]],
        timeout: float | None = None,
    ) -> None:
        """``sql`` once per argument tuple, pipelined by psycopg; all or nothing."""
        rows = [tuple(args) for args in args_iterable]

        async def run() -> None:
            own = conn.pgconn.transaction_status == _IDLE
            if own:
                await conn.execute("BEGIN")
            try:
                async with conn.cursor() as cur:
                    await cur.executemany(sql, rows)
                if own:
                    await conn.execute("COMMIT")
            except Exception:
                if own and conn.pgconn.transaction_status != _IDLE and not conn.closed:
                    with contextlib.suppress(Exception):
                        await conn.execute("ROLLBACK")
                raise

        await self._bounded(conn, run, timeout)

    async def server_max_connections(self, conn: PsycopgConnection) -> int | None:
        return int(await self.fetchval(conn, "SHOW max_connections", ()))

    def host_of(self, conn: PsycopgConnection) -> str:
        """The server ``conn`` is on, ``"host:port"`` (a Unix socket as ``"/dir:port"``)."""
        return str(Host(conn.info.host, conn.info.port))

    def is_broken_error(self, exc: BaseException) -> bool:
        """psycopg's client-side errors: the connection's protocol state is in doubt."""
        return isinstance(exc, psycopg.InterfaceError) or (
            isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None
        )

    @property
    def wants_primary(self) -> bool:
        """target_session_attrs asks for a writable server: a read-only one is a failover."""
        return self._target in ("read-write", "primary")

    def is_read_only_error(self, exc: BaseException) -> bool:
        """True for SQLSTATE 25006: a write sent to a read-only session (a standby)."""
        return getattr(exc, "sqlstate", None) == READ_ONLY_SQLSTATE

    def is_disconnect_error(self, exc: BaseException) -> bool:
        """True when the server ended the session or the link broke.

        SQLSTATE class 08 and 57P01-57P03 (a shutdown, a crash, a server
        starting or stopping), and psycopg's ``OperationalError`` without a
        SQLSTATE ("server closed the connection unexpectedly", "consuming
        input failed"), which libpq raises for a lost socket. A query
        timeout is not one: the connection stays usable.
        """
        if is_disconnect_sqlstate(getattr(exc, "sqlstate", None)):
            return True
        if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
            return True
        return isinstance(exc, ConnectionError)

    def classify_connect_error(self, exc: BaseException) -> str | None:
        """``"auth"``, ``"database"`` or ``"timeout"`` for Prisma's P1000, P1003, P1002."""
        if isinstance(exc, (TimeoutError, errors.ConnectionTimeout)):
            return "timeout"
        sqlstate = getattr(exc, "sqlstate", None)
        text = str(exc)
        # libpq reports a refused login as text: psycopg's error has no SQLSTATE then
        if sqlstate in ("28P01", "28000") or any(
            marker in text
            for marker in ("password authentication failed", "no pg_hba.conf entry", "role \"")
        ):
            return "auth"
        if sqlstate == "3D000" or ("database \"" in text and "does not exist" in text):
            return "database"
        return None

    async def _bounded(
        self,
        conn: PsycopgConnection,
        call: Callable[[], Awaitable[T]],
        timeout: float | None = None,
    ) -> T:
        """Run ``call`` within ``timeout``, else ``socket_timeout``, if either is set.

        On expiry the query is cancelled on the server and awaited (as asyncpg's
        ``timeout=`` does), so the connection stays usable, then TimeoutError.
        """
        limit = self._socket_timeout if timeout is None else timeout
        if limit is None:
            return await call()
        with anyio.move_on_after(limit):
            return await call()
        await self._finish_pending(conn, max(limit, 1.0))
        name = "socket_timeout" if timeout is None else "timeout"
        raise TimeoutError(f"no reply within {name}={limit}s; the query was cancelled")


def _options_value(text: str) -> str:
    """``text`` as one word of libpq's ``options``: spaces and backslashes escaped."""
    return text.replace("\\", "\\\\").replace(" ", "\\ ")


def create(
    url: str,
    *,
    connect_timeout: float | None,
    socket_timeout: float | None,
    connect_args: Mapping[str, Any] | None = None,
) -> PsycopgDriver:
    """Validate ``url`` (pool parameters already removed) and build the adapter."""
    scheme = url.partition(":")[0].lower()
    if scheme not in ("postgresql+psycopg", "postgres+psycopg"):
        raise InvalidParameter("url", scheme + "://", "must start with postgresql+psycopg://")
    pg = parse_pg_url(url, PARAMETERS, "postgresql+psycopg")
    params = pg.params

    if "prepare_threshold" in params:
        text = params["prepare_threshold"]
        if pg.pgbouncer:
            raise InvalidParameter(
                "prepare_threshold",
                text,
                "must not be given with pgbouncer=true, which turns prepared statements off"
                " (PgBouncer in transaction mode breaks them)",
            )
        threshold = None if text == "none" else parse_nonnegative_int("prepare_threshold", text)
    else:
        threshold = None if pg.pgbouncer else DEFAULT_PREPARE_THRESHOLD

    conninfo: dict[str, Any] = {
        name: params[name]
        for name in _LIBPQ
        if name in params and name not in ("host", "port", "user", "password", "dbname")
    }
    if any(h.host is not None for h in pg.hosts):
        conninfo["host"] = ",".join(h.host or "" for h in pg.hosts)
    if any(h.port is not None for h in pg.hosts):
        conninfo["port"] = ",".join(str(h.port or "") for h in pg.hosts)
    if pg.user is not None:
        conninfo["user"] = pg.user
    if pg.password is not None:
        conninfo["password"] = pg.password
    if pg.database:
        conninfo["dbname"] = pg.database
    if "search_path" in pg.settings:
        option = "-c search_path=" + _options_value(pg.settings["search_path"])
        conninfo["options"] = (
            f"{conninfo['options']} {option}" if conninfo.get("options") else option
        )
    sslaccept = params.get("sslaccept")
    if sslaccept == "strict":
        conninfo["sslmode"] = "verify-full"
        conninfo.setdefault("sslrootcert", "system")
    elif sslaccept == "accept_invalid_certs":
        conninfo.setdefault("sslmode", "require")
    if connect_timeout is not None:
        # libpq's bound per host: whole seconds, at least 2 (psycopg's rule too)
        conninfo["connect_timeout"] = str(max(2, math.ceil(connect_timeout)))

    extra = check_connect_args(
        connect_args or {}, (*_CONNECT_ARGS, *_MANAGED), _MANAGED, "postgresql+psycopg"
    )
    return PsycopgDriver(
        display_url=redact(pg.parts),
        conninfo=conninfo,
        connect_kwargs=extra,
        prepare_threshold=threshold,
        hosts=pg.hosts,
        target_session_attrs=pg.target if "target_session_attrs" in params else None,
        connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        secrets=[s for s in (pg.password, params.get("sslpassword")) if s],
    )
