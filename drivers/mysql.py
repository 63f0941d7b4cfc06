"""MySQL and MariaDB through aiomysql (asyncio only: aiomysql is built on asyncio).

URL: ``mysql://user:password@host:port/database?param=value`` (``mariadb://``
too). Host defaults to ``localhost`` over TCP, port to 3306; with no user,
aiomysql logs in as the operating-system user.

Parameters:

``sslmode``
    ``disable`` (the default) or ``require``. ``require`` encrypts but does
    **not** verify the server: its context has ``check_hostname=False`` and
    ``CERT_NONE``, like the MySQL client's ``--ssl-mode=REQUIRED``. It guards
    against eavesdropping, not against a server in the middle. aiomysql on its
    own quietly carries on in plain text when the server offers no TLS; with
    ``require`` we refuse such a server before logging in (error 2026).
``charset``
    the connection character set (default ``utf8mb4``; PyMySQL reads ``utf8``
    as ``utf8mb4``).
``application_name``
    sent as the ``program_name`` connection attribute (what
    ``performance_schema.session_connect_attrs`` shows), at most 128 bytes.

Quirks smoothed over here:

- Connections run with ``autocommit=True``: a plain ``execute`` commits, as on
  asyncpg, and the server's IN_TRANS status flag (``in_transaction``) is only
  set by an explicit ``BEGIN``.
- aiomysql's ``closed`` only turns True when aiomysql itself closes, so
  ``is_alive`` also looks for an EOF the event loop has already received: a
  session killed while idle is known dead without a round trip.
- ``ping()`` reconnects by default, which would swap the session (and any
  transaction) under the pool's feet; we pass ``reconnect=False``, and drop
  the socket when a ping fails so that ``is_alive`` turns False at once.
- aiomysql's cursor turns every server note (``CREATE TABLE IF NOT EXISTS``
  on an existing table, say) into a Python ``Warning``, at the cost of an
  extra ``SHOW WARNINGS`` round trip, and the warning is an exception under
  ``-W error``. PyMySQL dropped that in 1.0 and asyncpg never did it; our
  connections use a cursor class that does not either. Run ``SHOW WARNINGS``
  to see them.
- aiomysql has no read timeout, so ``socket_timeout`` bounds each call with a
  cancel scope; on expiry the connection (stuck mid-protocol) is closed and
  :class:`TimeoutError` raised. ``connect_timeout`` is a cancel scope too,
  around the whole connect, handshake included (aiomysql's own bounds only the
  TCP connect, and reports expiry as error 2003, "Can't connect"), so an
  expired connect raises :class:`TimeoutError`, as on asyncpg.
- Arguments are interpolated client-side with ``%s``; when ``args`` is
  non-empty a literal ``%`` must be written ``%%``, and when it is empty the
  SQL is sent as it is.
"""

from __future__ import annotations

import contextlib
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote

import aiomysql
import anyio
from pymysql.charset import charset_by_name
from pymysql.constants import CLIENT, CR
from pymysql.err import OperationalError

from . import InvalidParameter
from ._url import (
    check_known,
    parse_choice,
    parse_host_port,
    query_params,
    redact,
    split,
    user_and_password,
)

__all__ = ["MySQLDriver", "create"]

PARAMETERS = ("sslmode", "charset", "application_name")
SSLMODES = ("disable", "require")
DEFAULT_CHARSET = "utf8mb4"
# aiomysql writes the total length of the connection attributes as a single
# byte, and its own attributes take about 70 of the 250 that fit; a longer
# name would fail inside the handshake with a struct.error.
MAX_APPLICATION_NAME_BYTES = 128

#: aiomysql's connection; the library has no type hints
Connection = Any
T = TypeVar("T")


class QuietCursor(aiomysql.Cursor):  # type: ignore[misc]  # aiomysql is untyped
    """aiomysql's cursor without the ``SHOW WARNINGS`` round trip and Python warning.

    It is the connections' ``cursorclass``, so a user's own ``conn.cursor()``
    gets it too; ``conn.cursor(aiomysql.DictCursor)`` brings the warnings back.
    """

    async def _show_warnings(self, conn: Connection) -> None:
        return None


class TLSOnlyConnection(aiomysql.Connection):  # type: ignore[misc]  # aiomysql is untyped
    """aiomysql's connection, refusing a server that offers no TLS (sslmode=require).

    The check sits just before authentication: the point where aiomysql would
    otherwise skip TLS without a word and send the login in the clear.
    """

    async def _request_authentication(self) -> None:
        if not self.server_capabilities & CLIENT.SSL:
            raise OperationalError(
                CR.CR_SSL_CONNECTION_ERROR,
                "sslmode=require, but the server does not offer TLS",
            )
        await super()._request_authentication()


class MySQLDriver:
    """The adapter. Its connection type is aiomysql's own ``Connection``.

    (With ``sslmode=require``, :class:`TLSOnlyConnection`, a subclass of it.)
    """

    scheme = "mysql"

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
        self._connection_class: Any = TLSOnlyConnection if tls else aiomysql.Connection
        self._connect_timeout = connect_timeout
        self._socket_timeout = socket_timeout

    def __repr__(self) -> str:
        return f"<MySQLDriver {self._display_url}>"

    async def connect(self) -> Connection:
        # The Connection is built here and connected with _connect() (what
        # aiomysql.connect() does inside) so that we hold it if we are
        # cancelled mid-handshake: aiomysql cleans up after errors but not
        # after cancellation, and would leave the socket to the garbage
        # collector and an "Unclosed connection" ResourceWarning.
        conn = self._connection_class(**self._connect_kwargs)
        try:
            with anyio.fail_after(self._connect_timeout):
                await conn._connect()
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self, conn: Connection) -> None:
        try:
            with anyio.fail_after(self._socket_timeout):
                await conn.ensure_closed()  # sends COM_QUIT, then closes
        finally:
            # ensure_closed() leaves the socket open when the write fails
            conn.close()

    def terminate(self, conn: Connection) -> None:
        with contextlib.suppress(Exception):  # the contract: terminate never raises
            conn.close()  # synchronous: drops the transport, sends nothing

    def is_alive(self, conn: Connection) -> bool:
        # aiomysql reads nothing while a connection is idle, but asyncio does:
        # a session the server ended (KILL, a restart) has already left EOF on
        # the stream reader, so that is seen here without any I/O. (MySQL 8
        # sends an error packet before closing on wait_timeout; that one is
        # left to ping.)
        return not conn.closed and not conn._reader.at_eof()

    async def ping(self, conn: Connection) -> None:
        try:
            await self._bounded(conn, lambda: conn.ping(reconnect=False))
        except BaseException:
            # After a failed ping the session is gone or its protocol state
            # unknown (MariaDB answers a killed session's next command with
            # an error packet and leaves the socket open).
            conn.close()
            raise

    def in_transaction(self, conn: Connection) -> bool:
        return bool(conn.get_transaction_status())

    async def begin(self, conn: Connection) -> None:
        await self._bounded(conn, conn.begin)

    async def commit(self, conn: Connection) -> None:
        await self._bounded(conn, conn.commit)

    async def rollback(self, conn: Connection) -> None:
        await self._bounded(conn, conn.rollback)

    async def fetch(self, conn: Connection, sql: str, args: Sequence[Any]) -> list[Any]:
        """All rows, as tuples."""

        async def run() -> list[Any]:
            async with conn.cursor() as cur:
                await cur.execute(sql, tuple(args) or None)
                return list(await cur.fetchall())

        return await self._bounded(conn, run)

    async def fetchrow(self, conn: Connection, sql: str, args: Sequence[Any]) -> Any | None:
        """The first row as a tuple, or None."""

        async def run() -> Any | None:
            async with conn.cursor() as cur:
                await cur.execute(sql, tuple(args) or None)
                return await cur.fetchone()

        return await self._bounded(conn, run)

    async def fetchval(self, conn: Connection, sql: str, args: Sequence[Any]) -> Any:
        """The first column of the first row, or None."""
        row = await self.fetchrow(conn, sql, args)
        return None if row is None else row[0]

    async def execute(self, conn: Connection, sql: str, args: Sequence[Any]) -> Any:
        """The number of rows affected (for a SELECT, the number of rows)."""

        async def run() -> int:
            async with conn.cursor() as cur:
                return int(await cur.execute(sql, tuple(args) or None))

        return await self._bounded(conn, run)

    async def server_max_connections(self, conn: Connection) -> int | None:
        return int(await self.fetchval(conn, "SELECT @@max_connections", ()))

    async def _bounded(self, conn: Connection, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call``, within ``socket_timeout`` if one is set."""
        if self._socket_timeout is None:
            return await call()
        with anyio.move_on_after(self._socket_timeout):
            return await call()
        # Cancelled mid-protocol: the rest of the reply would be read as the
        # answer to the next query, so the connection cannot be used again.
        conn.close()
        raise TimeoutError(
            f"no reply within socket_timeout={self._socket_timeout}s; the connection was closed"
        )


def create(url: str, *, connect_timeout: float | None, socket_timeout: float | None) -> MySQLDriver:
    """Validate ``url`` (pool parameters already removed) and build the adapter."""
    parts = split(url)
    if parts.scheme not in ("mysql", "mariadb"):
        raise InvalidParameter("url", parts.scheme + "://", "must start with mysql://")
    params = query_params(parts)
    check_known(params, PARAMETERS, "mysql")

    host, port = parse_host_port(parts)
    user, password = user_and_password(parts)
    database = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)

    ssl: ssl_module.SSLContext | None = None
    if parse_choice("sslmode", params.get("sslmode", "disable"), SSLMODES) == "require":
        ssl = ssl_module.create_default_context()
        # encryption without verification: see the module docstring
        ssl.check_hostname = False
        ssl.verify_mode = ssl_module.CERT_NONE

    charset = params.get("charset", DEFAULT_CHARSET)
    if charset_by_name(charset) is None:
        raise InvalidParameter("charset", charset, "must be a MySQL character set, e.g. utf8mb4")

    application_name = params.get("application_name", "")
    if len(application_name.encode()) > MAX_APPLICATION_NAME_BYTES:
        raise InvalidParameter(
            "application_name",
            application_name,
            f"must be at most {MAX_APPLICATION_NAME_BYTES} bytes in UTF-8",
        )

    connect_kwargs: dict[str, Any] = {
        "host": host or "localhost",
        "port": port or 3306,
        "user": user,
        "password": password or "",
        "db": database or None,
        "charset": charset,
        "autocommit": True,
        # not connect_timeout: our cancel scope bounds the whole connect
        "ssl": ssl,
        "program_name": application_name,
        "cursorclass": QuietCursor,
    }
    return MySQLDriver(
        display_url=redact(parts),
        connect_kwargs=connect_kwargs,
        tls=ssl is not None,
        connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
    )
