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
``socket``
    Prisma's: the path of the server's Unix socket; the host is then not
    dialled (``mysql://root@localhost/db?socket=/run/mysqld/mysqld.sock``).
``user``, ``password``
    alternatives to the user info (giving one both ways is refused); a
    ``?password=`` is hidden wherever the URL is shown.
``sslcert``
    Prisma's meaning: the server's certificate (or its CA) to verify the
    server against. Implies TLS and ``sslaccept=strict``.
``sslaccept``
    ``strict``: TLS, and the server's certificate and host name are verified
    (against ``sslcert``, or else the system's trusted CAs).
    ``accept_invalid_certs``: TLS without verification (what
    ``sslmode=require`` alone does). Either implies ``sslmode=require``.
``sslidentity``, ``sslpassword``
    refused: ``sslidentity`` is a PKCS#12 bundle, which Python's ``ssl``
    cannot load, and ``sslpassword`` is only its password. The error says to
    pass ``connect_args={"ssl": context}`` with an ``ssl.SSLContext`` that
    has ``load_cert_chain(cert, key, password)`` done instead.

``connect_args`` (the ``Pool`` keyword) carries what a URL cannot to
aiomysql's ``Connection``: ``ssl`` (an ``SSLContext``; not with ``ssl*`` URL
parameters), ``sql_mode``, ``init_command``, ``conv``, ``local_infile``,
``server_public_key`` and the rest of its keywords, less those the URL sets.

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
- A holder cancelled mid-query keeps its session: aiomysql would close the
  connection (and leave the statement running on the server); here it stays
  open, and :meth:`MySQLDriver.recover` (run by the pool's upkeep) stops the
  statement with ``KILL QUERY`` on a short-lived side connection with the
  same credentials, reads and drops its answer (error 1317, or its result if
  it ended first), and the pool rolls back what was left open. A reply cut
  off part way (rows read in part) is stopped the same way, then closed.
  Until then the connection is never lent; a holder whose own cancel scope
  cut the query and carries on gets the same recovery before its next one.
- aiomysql has no read timeout, so ``socket_timeout`` (or a call's own
  ``timeout=``) bounds each call with a cancel scope; on expiry the statement
  is stopped and its answer read as above (within 3 s more), and
  :class:`TimeoutError` raised with the connection usable. Cut off with a
  reply read in part, or if stopping it fails, the connection is closed
  instead (``is_alive`` is False from then on). ``connect_timeout`` is a cancel scope too,
  around the whole connect, handshake included (aiomysql's own bounds only the
  TCP connect, and reports expiry as error 2003, "Can't connect"), so an
  expired connect raises :class:`TimeoutError`, as on asyncpg.
- Arguments are interpolated client-side with ``%s``; when ``args`` is
  non-empty a literal ``%`` must be written ``%%``, and when it is empty the
  SQL is sent as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiomysql
import pymysql.err
from pymysql.charset import charset_by_name
from pymysql.constants import CLIENT, CR
from pymysql.err import OperationalError

from ._my import (  # re-exported: the names this module always had
    MAX_APPLICATION_NAME_BYTES,
    PARAMETERS,
    READ_ONLY_ERRORS,
    CutShortMixin,
    MySQLBase,
    read_url,
)
from ._url import check_connect_args, redact

__all__ = ["MAX_APPLICATION_NAME_BYTES", "PARAMETERS", "READ_ONLY_ERRORS", "MySQLDriver", "create"]

#: aiomysql Connection keywords this module sets, and the URL part that sets each
_MANAGED = {
    "host": "the URL's host",
    "port": "the URL's port",
    "unix_socket": "?socket=",
    "user": "the URL's user or ?user=",
    "password": "the URL's password or ?password=",
    "db": "the URL's path",
    "charset": "?charset=",
    "autocommit": "always on: the pool relies on it",
    "connect_timeout": "connect_timeout",
    "program_name": "?application_name=",
}

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


class WatchedConnection(aiomysql.Connection):  # type: ignore[misc]  # aiomysql is untyped
    """aiomysql's ``Connection``, telling ``_pool_watch`` of its socket when closed mid-connect.

    Set by the driver's ``connect_watching`` for host_connection_limit: aiomysql
    closes the socket itself when a handshake read is cancelled, before the
    driver gets control back, so the socket is handed over here, just before.
    """

    _pool_watch: Callable[[int], None] | None = None

    def close(self) -> None:
        watch, self._pool_watch = self._pool_watch, None
        writer = self._writer
        if watch is not None and writer is not None:
            sock = writer.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(Exception):  # the budget must not break a close
                    watch(sock.fileno())
        super().close()


class RecoverableConnection(CutShortMixin, WatchedConnection):
    """aiomysql's connection, kept open when a cancellation cuts a read short.

    aiomysql reads with ``StreamReader.readexactly``, which takes nothing
    from the stream until all it asked for is there: a read cancelled while
    it waits for a reply's first packet leaves the reply whole for
    :meth:`MySQLDriver.recover` (see :class:`CutShortMixin`).
    """


class TLSOnlyConnection(RecoverableConnection):
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


class MySQLDriver(MySQLBase):
    """The adapter. Its connection type is aiomysql's own ``Connection``.

    (With ``sslmode=require``, :class:`TLSOnlyConnection`, a subclass of it.)
    """

    _plain_connection = RecoverableConnection
    _tls_connection = TLSOnlyConnection
    _server_error = pymysql.err.MySQLError

    async def _handshake(self, conn: Connection) -> None:
        # what aiomysql.connect() does inside: aiomysql cleans up after errors
        # but not after cancellation, and would leave the socket to the garbage
        # collector and an "Unclosed connection" ResourceWarning
        await conn._connect()

    #: MariaDB closes a session's socket first and drops it from its process
    #: list after (up to 6 ms later, measured here): a host budget slot waits
    #: this long after the server's EOF before it is given back
    session_linger = 0.05

    def socket_of(self, conn: Connection) -> int:
        """The connection's socket descriptor (-1: unknown), for host_connection_limit.

        The server can list a session for a while after the client's close: the
        pool reads a duplicate of this socket until the server's EOF before it
        gives the connection's slot back.
        """
        writer = conn._writer
        sock = None if writer is None else writer.transport.get_extra_info("socket")
        return -1 if sock is None else int(sock.fileno())

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

    def is_clean(self, conn: Connection) -> bool:
        # is_alive() and not in_transaction(), in one call: the fast release's test
        return (
            not conn.closed
            and not conn._reader.at_eof()
            and not conn.get_transaction_status()
            and conn._pool_cut is None
        )

    def is_broken_error(self, exc: BaseException) -> bool:
        """PyMySQL's client-side errors: a packet it could not read, commands out of sync."""
        if isinstance(exc, pymysql.err.InterfaceError):
            return True
        return isinstance(exc, OperationalError) and exc.args[:1] == (2014,)

    def host_of(self, conn: Connection) -> str:
        """The server ``conn`` is on: ``"host:port"``, or the socket path."""
        if conn.unix_socket:
            return str(conn.unix_socket)
        return f"{conn.host}:{conn.port}"

def _is_charset(name: str) -> bool:
    return charset_by_name(name) is not None


def create(
    url: str,
    *,
    connect_timeout: float | None,
    socket_timeout: float | None,
    connect_args: Mapping[str, Any] | None = None,
) -> MySQLDriver:
    """Validate ``url`` (pool parameters already removed) and build the adapter.

    ``connect_args`` go to aiomysql's ``Connection`` as they are, after a
    check that it takes each key and that the URL does not set it already.
    """
    u = read_url(url, ("mysql", "mariadb"), "mysql", _is_charset)
    extra = check_connect_args(
        connect_args or {}, aiomysql.Connection.__init__, _MANAGED, "mysql"
    )
    u.check_ssl_args(extra)
    connect_kwargs: dict[str, Any] = {
        "host": u.host,
        "port": u.port,
        "unix_socket": u.socket,
        "user": u.user,
        "password": u.password,
        "db": u.database,
        "charset": u.charset,
        "autocommit": True,
        # not connect_timeout: our cancel scope bounds the whole connect
        "ssl": u.ssl,
        "program_name": u.application_name,
        "cursorclass": QuietCursor,
    }
    connect_kwargs.update(extra)
    return MySQLDriver(
        display_url=redact(u.parts),
        connect_kwargs=connect_kwargs,
        # TLSOnlyConnection refuses a server without TLS; an SSLContext from
        # connect_args says as much as sslmode=require does
        tls=connect_kwargs["ssl"] is not None,
        connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
    )
