"""What the two MySQL drivers (aiomysql, asyncmy) share: the URL rules and the queries.

No driver library is imported here, so that an asyncmy user needs no aiomysql
and the other way round. Both libraries descend from PyMySQL and keep its
connection API (``cursor()``, ``begin()``, ``get_transaction_status()``,
``ensure_closed()``, the ``(code, message)`` errors), which is what
:class:`MySQLBase` relies on; each driver adds its connect, its liveness test
and its own client-side errors.
"""

from __future__ import annotations

import contextlib
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast
from urllib.parse import SplitResult, unquote

import anyio

from . import InvalidParameter, PasswordProvider, resolve_password
from ._url import (
    HIDDEN,
    check_known,
    credentials,
    parse_choice,
    parse_host_port,
    query_params,
    split,
)

__all__ = ["CutShortMixin", "MySQLBase", "MySQLURL", "read_url"]

PARAMETERS = (
    "sslmode",
    "sslaccept",
    "sslcert",
    "sslidentity",
    "sslpassword",
    "charset",
    "application_name",
    "socket",
    "user",
    "password",
)
SSLMODES = ("disable", "require")
SSLACCEPT = ("strict", "accept_invalid_certs")
#: errors for a write refused by a read-only server: 1290 (--read-only),
#: 1792 (a READ ONLY transaction), 1836 (a read-only replica, MySQL 5.7+)
READ_ONLY_ERRORS = frozenset({1290, 1792, 1836})
#: a failed login (Prisma's P1000): ER_ACCESS_DENIED_ERROR (a wrong password or
#: an unknown user) and ER_ACCESS_DENIED_NO_PASSWORD_ERROR (1698, MariaDB's
#: answer to a user it does not know, or one that may not log in without a password)
AUTH_ERRORS = frozenset({1045, 1698})
#: the database (P1003): ER_DBACCESS_DENIED_ERROR (no rights on it, which MySQL
#: also answers for one that does not exist) and ER_BAD_DB_ERROR
DATABASE_ERRORS = frozenset({1044, 1049})
DEFAULT_CHARSET = "utf8mb4"
# aiomysql writes the total length of the connection attributes as a single
# byte, and its own attributes take about 70 of the 250 that fit; a longer
# name would fail inside the handshake with a struct.error.
MAX_APPLICATION_NAME_BYTES = 128

#: the protocol command that resets a session (MySQL 5.7.3+, MariaDB 10.2.4+)
_COM_RESET_CONNECTION = 0x1F

#: the protocol command of a text query
_COM_QUERY = 0x03
#: the bound on stopping a statement a cancellation cut short: the side
#: connection that sends KILL QUERY, and the read of the statement's answer.
#: Below the pool's clean-up bound (5 s), so that the driver's own error says
#: what failed.
CANCEL_TIMEOUT: Final = 3.0

#: what a cancellation left on a connection (``_pool_cut``): a query's whole
#: reply still owed (its first packet not read yet), or a reply read in part
PENDING: Final = "pending"
DESYNCED: Final = "desynced"

#: a PyMySQL-style connection (aiomysql's, asyncmy's); neither library is typed
Connection = Any
T = TypeVar("T")


class CutShortMixin:
    """A connection that keeps its socket when a cancellation cuts a read short.

    aiomysql and asyncmy answer a read cancelled mid-query by closing the
    connection (their ``_close_on_cancel``): the rest of the reply would be
    read as the next command's. The statement then runs on in the server to
    its end. Here the connection stays open and remembers where the read
    stopped, so that :meth:`MySQLBase.recover` can stop the statement with
    ``KILL QUERY`` and read its answer. Where the cut left the read:

    ``PENDING``
        a text query's reply, no packet of it read yet (``_next_seq_id`` is
        still 1, the number of the reply's first packet): the answer can be
        read whole, and the connection is as good as new.
    ``DESYNCED``
        anything else (rows read in part, a packet's header without its body,
        a prepared statement, a LOAD DATA): no way back to a packet boundary;
        recover stops the statement and the connection is closed.

    A holder whose own cancel scope cut the query may carry on with the
    connection: its next command does the recovery first (and fails, the
    connection closed, where recover would). Without a driver to do it (a
    connection not made by :meth:`MySQLBase.connect`), the command closes the
    connection as the library would have at the cancel, and its own
    "Cancelled during execution" error is what the caller sees.
    """

    #: None, PENDING or DESYNCED (see the class docstring)
    _pool_cut: str | None = None
    #: the last protocol command sent
    _pool_command: int = 0
    #: the driver's recovery (MySQLBase._finish_cut), set at connect
    _pool_finish: Callable[[Any], Awaitable[None]] | None = None

    async def _execute_command(self, command: int, sql: Any) -> None:
        library = cast(Any, super())
        if self._pool_cut is not None:
            if self._pool_finish is None:
                self._pool_cut = None
                library._close_on_cancel()
            else:
                await self._pool_finish(self)
        self._pool_command = command
        await library._execute_command(command, sql)

    def _close_on_cancel(self) -> None:
        me = cast(Any, self)
        if self._pool_command == _COM_QUERY and me._next_seq_id == 1:
            self._pool_cut = PENDING
        else:
            self._pool_cut = DESYNCED


def _is_server_error(exc: BaseException) -> bool:
    """An error packet's error: the server's whole answer, read to its end.

    The client's own codes (2000-2999: a lost connection, commands out of
    sync) and errors without a code (a wrong packet number) are not.
    """
    code = exc.args[0] if isinstance(exc, Exception) and exc.args else None
    return isinstance(code, int) and not 2000 <= code < 3000


class MySQLBase:
    """The driver methods aiomysql and asyncmy connections answer alike."""

    scheme = "mysql"
    #: both libraries run on asyncio only
    async_libraries: tuple[str, ...] = ("asyncio",)
    #: set by the pool for ``Pool(..., password=callable)``: asked at each connect
    password_provider: PasswordProvider | None = None
    _socket_timeout: float | None = None
    #: the library's connection class, and its subclass that refuses a server
    #: without TLS (``sslmode=require``); set by each driver
    _plain_connection: Any = None
    _tls_connection: Any = None
    #: the library's base error class, whose ``args[0]`` is the server's error
    #: number (PyMySQL's, asyncmy's); set by each driver
    _server_error: type[BaseException] = Exception

    def __init__(
        self,
        *,
        display_url: str,
        connect_kwargs: dict[str, Any],
        tls: bool,
        connect_timeout: float | None,
        socket_timeout: float | None,
    ) -> None:
        self._display_url = display_url
        self._connect_kwargs = connect_kwargs
        self._connection_class: Any = self._tls_connection if tls else self._plain_connection
        self._connect_timeout = connect_timeout
        self._socket_timeout = socket_timeout

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._display_url}>"

    async def _handshake(self, conn: Any) -> None:
        """Connect an already built connection object (the library's own call)."""
        raise NotImplementedError

    def is_alive(self, conn: Connection) -> bool:
        """Each library sees a dead connection its own way: each driver says."""
        raise NotImplementedError

    async def connect(self) -> Any:
        return await self._connect(None)

    async def connect_watching(self, watch: Callable[[int], None]) -> Any:
        """``connect()``; a connect cut short tells ``watch`` of its socket before closing it.

        For host_connection_limit: the server lists a session from its TCP
        accept on, and still for a while after the client let go. Neither
        library shows a socket before its handshake ends; a connection class
        with ``_pool_watch`` (aiomysql's, here) hands its socket to ``watch``
        when it is closed mid-connect (aiomysql closes it itself when a read is
        cancelled), so the pool still sees the server drop the session before
        the slot is given back.
        """
        return await self._connect(watch)

    async def _connect(self, watch: Callable[[int], None] | None) -> Any:
        # The Connection is built here and then connected, so that we hold it
        # if we are cancelled mid-handshake and can close its socket (neither
        # library cleans up after a cancellation).
        kwargs = self._connect_kwargs
        if self.password_provider is not None:  # asked at each connect, kept by nobody
            kwargs = {**kwargs, "password": await resolve_password(self.password_provider)}
        conn = self._connection_class(**kwargs)
        watched = watch is not None and hasattr(conn, "_pool_watch")
        if watched:
            conn._pool_watch = watch
        try:
            with anyio.fail_after(self._connect_timeout):
                await self._handshake(conn)
        except BaseException:
            conn.close()
            raise
        if watched:
            conn._pool_watch = None  # connected: the pool watches it from now on (socket_of)
        conn._pool_finish = self._finish_cut
        return conn

    def classify_connect_error(self, exc: BaseException) -> str | None:
        """Why a connect failed, for Prisma's codes: ``"auth"``, ``"database"`` or None.

        See ``AUTH_ERRORS`` (1045, 1698) and ``DATABASE_ERRORS`` (1044, 1049).
        """
        if not isinstance(exc, self._server_error) or not exc.args:
            return None
        number = exc.args[0]
        if number in AUTH_ERRORS:
            return "auth"
        if number in DATABASE_ERRORS:
            return "database"
        return None

    async def close(self, conn: Connection) -> None:
        if conn._pool_cut is not None:
            # its statement would run on in the server after the close (the
            # server notices a closed socket only when it next writes)
            with contextlib.suppress(Exception), anyio.move_on_after(CANCEL_TIMEOUT):
                await self._kill_query(int(conn.thread_id()))
            conn._pool_cut = None
        try:
            with anyio.fail_after(self._socket_timeout):
                await conn.ensure_closed()  # sends COM_QUIT, then closes
        finally:
            # ensure_closed() leaves the socket open when the write fails
            conn.close()

    def terminate(self, conn: Connection) -> None:
        with contextlib.suppress(Exception):  # the contract: terminate never raises
            conn.close()  # synchronous: drops the transport, sends nothing

    def in_transaction(self, conn: Connection) -> bool:
        # a statement a cancellation cut short is not clean either: its reply
        # is owed (rollback() reads it first)
        return bool(conn.get_transaction_status()) or conn._pool_cut is not None

    async def recover(self, conn: Connection) -> None:
        """Bring back a connection whose holder was cancelled mid-query.

        The statement is stopped with ``KILL QUERY`` on a side connection, and
        its answer (error 1317, or its result if it ended first) read and
        dropped: the session, its thread id and an open transaction (which the
        pool then rolls back) are kept. A reply the cancellation cut off part
        way cannot be read back to a packet boundary: its statement is stopped
        all the same, then this raises and the pool closes the connection.
        """
        await self._finish_cut(conn)

    async def _finish_cut(self, conn: Connection) -> None:
        cut = conn._pool_cut
        if cut is None:
            return
        try:
            with anyio.fail_after(CANCEL_TIMEOUT):
                await self._kill_query(int(conn.thread_id()))
                if cut == DESYNCED:
                    raise ConnectionError(
                        "a cancellation cut a reply off part way: the connection is closed"
                    )
                conn._pool_cut = None
                await self._discard_reply(conn)
        except BaseException:
            # failed, timed out or cut short again: the protocol state is unknown
            conn._pool_cut = None
            conn.close()
            raise

    async def _kill_query(self, thread_id: int) -> None:
        """``KILL QUERY`` for ``thread_id``, on a connection of its own (same credentials).

        KILL QUERY ends the statement, not the session; on a session that is
        idle already it does nothing (MariaDB and MySQL forget it at the next
        command).
        """
        side = await self.connect()
        try:
            async with side.cursor() as cur:
                await cur.execute(f"KILL QUERY {thread_id:d}")
        except BaseException:
            self.terminate(side)
            raise
        await self.close(side)

    async def _discard_reply(self, conn: Connection) -> None:
        """Read the interrupted statement's answer, and any result sets after it."""
        while True:
            try:
                await conn._read_query_result()
            except Exception as exc:
                if not _is_server_error(exc):
                    raise
                return  # an error packet ends the command's answer (1317 here)
            result = conn._result
            if result is None or not result.has_next:
                return

    async def reset_session(self, conn: Connection) -> None:
        """COM_RESET_CONNECTION: user variables, temporary tables, session settings, locks.

        Neither aiomysql nor asyncmy has a public call for it: the command goes
        through their private ``_execute_command``, checked here; without it the reset
        fails and the pool closes the connection instead. The reset puts the
        session's character set and autocommit back to the server's
        defaults, so both are set again.
        """
        execute = getattr(conn, "_execute_command", None)
        read_ok = getattr(conn, "_read_ok_packet", None)
        if execute is None or read_ok is None:
            raise NotImplementedError("this driver library has no COM_RESET_CONNECTION")

        async def reset() -> None:
            await execute(_COM_RESET_CONNECTION, b"")
            await read_ok()
            # the client's side already uses this character set: only the
            # server's needs setting again (a name checked when the URL was read)
            async with conn.cursor() as cur:
                await cur.execute("SET NAMES " + conn.character_set_name())
            await conn.autocommit(True)

        await self._bounded(conn, reset)

    async def begin(self, conn: Connection) -> None:
        await self._bounded(conn, conn.begin)

    async def commit(self, conn: Connection) -> None:
        await self._bounded(conn, conn.commit)

    async def rollback(self, conn: Connection) -> None:
        # a statement a cancellation cut short, whose holder carried on (the
        # cancel scope was its own): stopped, and its answer read, first
        await self._finish_cut(conn)
        await self._bounded(conn, conn.rollback)

    async def fetch(
        self, conn: Connection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> list[Any]:
        """All rows, as tuples."""

        async def run() -> list[Any]:
            async with conn.cursor() as cur:
                await cur.execute(sql, tuple(args) or None)
                return list(await cur.fetchall())

        return await self._bounded(conn, run, timeout)

    async def fetchrow(
        self, conn: Connection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any | None:
        """The first row as a tuple, or None."""

        async def run() -> Any | None:
            async with conn.cursor() as cur:
                await cur.execute(sql, tuple(args) or None)
                return await cur.fetchone()

        return await self._bounded(conn, run, timeout)

    async def fetchval(
        self, conn: Connection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        """The first column of the first row, or None."""
        row = await self.fetchrow(conn, sql, args, timeout)
        return None if row is None else row[0]

    async def execute(
        self, conn: Connection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        """The number of rows affected (for a SELECT, the number of rows)."""

        async def run() -> int:
            async with conn.cursor() as cur:
                return int(await cur.execute(sql, tuple(args) or None))

        return await self._bounded(conn, run, timeout)

    async def executemany(
        self,
        conn: Connection,
        sql: str,
        args_iterable: Iterable[Sequence[Any]],
        timeout: float | None = None,
    ) -> None:
        """``sql`` once per argument tuple; all or nothing, as asyncpg's is.

        aiomysql sends an ``INSERT ... VALUES`` as multi-row statements. Outside
        a transaction this opens one, so that a failure halfway leaves nothing.
        """
        rows = [tuple(args) for args in args_iterable]
        own = not conn.get_transaction_status()

        async def run() -> None:
            if own:
                await conn.begin()
            try:
                async with conn.cursor() as cur:
                    await cur.executemany(sql, rows)
                if own:
                    await conn.commit()
            except Exception:
                if own and not conn.closed:
                    with contextlib.suppress(Exception):
                        await conn.rollback()
                raise

        try:
            await self._bounded(conn, run, timeout)
        except TimeoutError:
            # a timeout keeps the connection (the statement stopped): the
            # batch's own transaction must not outlive the batch
            if own and self.in_transaction(conn) and self.is_alive(conn):
                await self.rollback(conn)
            raise

    async def server_max_connections(self, conn: Connection) -> int | None:
        return int(await self.fetchval(conn, "SELECT @@max_connections", ()))

    def is_read_only_error(self, exc: BaseException) -> bool:
        """True for a write the server refused as read-only (1290, 1792, 1836)."""
        # PyMySQL's errors (aiomysql re-exports them) carry (code, message)
        code = exc.args[0] if isinstance(exc, Exception) and exc.args else None
        return isinstance(code, int) and code in READ_ONLY_ERRORS

    async def _bounded(
        self, conn: Connection, call: Callable[[], Awaitable[T]], timeout: float | None = None
    ) -> T:
        """Run ``call`` within ``timeout``, else ``socket_timeout``, if either is set."""
        limit = self._socket_timeout if timeout is None else timeout
        if limit is None:
            return await call()
        with anyio.move_on_after(limit):
            return await call()
        name = "socket_timeout" if timeout is None else "timeout"
        closed = f"no reply within {name}={limit}s; the connection was closed"
        if conn._pool_cut is not None:
            # The statement is stopped here, as recover() does: its whole
            # answer still owed, it is read and the connection kept; read in
            # part, the connection is closed (within).
            try:
                await self._finish_cut(conn)
            except Exception as exc:
                raise TimeoutError(closed) from exc
            raise TimeoutError(
                f"no reply within {name}={limit}s; the statement was stopped"
                " (KILL QUERY) and the connection is usable"
            )
        # cut off outside a read (no reply owed is known of): its state is
        # unknown, so the connection cannot be used again
        conn.close()
        raise TimeoutError(closed)


@dataclass
class MySQLURL:
    """A MySQL URL read and checked, in no driver's terms yet."""

    parts: SplitResult
    params: dict[str, str]
    host: str
    port: int
    socket: str | None
    user: str | None
    password: str
    database: str | None
    charset: str
    ssl: ssl_module.SSLContext | None
    application_name: str

    def check_ssl_args(self, extra: Mapping[str, Any]) -> None:
        """An ``ssl`` in connect_args and ``ssl*`` in the URL: TLS set up in two places."""
        ssl_given = [n for n in ("sslmode", "sslaccept", "sslcert") if n in self.params]
        if "ssl" in extra and ssl_given:
            raise InvalidParameter(
                "connect_args",
                "ssl",
                f"conflicts with {', '.join(ssl_given)} in the URL: configure TLS in one place",
            )


def read_url(
    url: str, schemes: Sequence[str], driver: str, is_charset: Callable[[str], bool]
) -> MySQLURL:
    """The rules every MySQL driver (aiomysql, asyncmy) reads its URL with."""
    parts = split(url)
    if parts.scheme not in schemes:
        raise InvalidParameter("url", parts.scheme + "://", f"must start with {schemes[0]}://")
    params = query_params(parts)
    check_known(params, PARAMETERS, driver)

    host, port = parse_host_port(parts)
    user, password = credentials(parts, params)
    database = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    socket = params.get("socket")
    if socket is not None and (not socket or "\0" in socket):
        raise InvalidParameter("socket", socket, "must be the path of the server's Unix socket")

    if "sslidentity" in params or "sslpassword" in params:
        name = "sslidentity" if "sslidentity" in params else "sslpassword"
        raise InvalidParameter(
            name,
            params["sslidentity"] if name == "sslidentity" else HIDDEN,
            "cannot be used: sslidentity is a PKCS#12 bundle, which Python's ssl module"
            " cannot load (and sslpassword is only its password); build an ssl.SSLContext,"
            " call load_cert_chain(cert, key, password) on it, and pass"
            " connect_args={'ssl': context}",
        )
    sslmode = parse_choice("sslmode", params.get("sslmode", "disable"), SSLMODES)
    sslaccept = None
    if "sslaccept" in params:
        sslaccept = parse_choice("sslaccept", params["sslaccept"], SSLACCEPT)
    if "sslcert" in params:
        if not params["sslcert"]:
            raise InvalidParameter("sslcert", "", "must be a file path")
        if sslaccept == "accept_invalid_certs":
            raise InvalidParameter(
                "sslaccept",
                sslaccept,
                "contradicts sslcert, which is there to verify the server's certificate",
            )
        sslaccept = "strict"
    if sslaccept is not None:
        if "sslmode" in params and sslmode == "disable":
            raise InvalidParameter(
                "sslmode", "disable", "contradicts sslaccept and sslcert, which need TLS"
            )
        sslmode = "require"

    ssl: ssl_module.SSLContext | None = None
    if sslmode == "require" and sslaccept == "strict":
        try:
            ssl = ssl_module.create_default_context(cafile=params.get("sslcert"))
        except (OSError, ssl_module.SSLError) as exc:
            raise InvalidParameter(
                "sslcert", params["sslcert"], f"cannot be loaded ({type(exc).__name__})"
            ) from None
    elif sslmode == "require":
        ssl = ssl_module.create_default_context()
        # encryption without verification: see the module docstring
        ssl.check_hostname = False
        ssl.verify_mode = ssl_module.CERT_NONE

    charset = params.get("charset", DEFAULT_CHARSET)
    if not is_charset(charset):
        raise InvalidParameter("charset", charset, "must be a MySQL character set, e.g. utf8mb4")

    application_name = params.get("application_name", "")
    if len(application_name.encode()) > MAX_APPLICATION_NAME_BYTES:
        raise InvalidParameter(
            "application_name",
            application_name,
            f"must be at most {MAX_APPLICATION_NAME_BYTES} bytes in UTF-8",
        )

    return MySQLURL(
        parts=parts,
        params=params,
        host=host or "localhost",
        port=port or 3306,
        socket=socket,
        user=user,
        password=password or "",
        database=database or None,
        charset=charset,
        ssl=ssl,
        application_name=application_name,
    )
