"""MySQL and MariaDB through asyncmy (``mysql+asyncmy://``; asyncio only).

The URL, its parameters and the behaviour are those of ``mysql://``
(aiomysql: see :mod:`drivers.mysql`): ``sslmode``, ``sslaccept``, ``sslcert``,
``charset``, ``application_name``, ``socket``, ``user``, ``password``;
autocommit on; ``%s`` placeholders interpolated client-side; ``ping`` never
reconnects; ``sslmode=require`` refuses a server that offers no TLS before the
login is sent (asyncmy, like aiomysql, would carry on in plain text);
``socket_timeout`` and a call's ``timeout=`` stop the statement (``KILL
QUERY``) and raise :class:`TimeoutError` with the connection usable, or close
it when the reply was cut off part way; ``connect_timeout`` bounds the
whole connect, handshake included.

``connect_args`` carries what a URL cannot to asyncmy's ``Connection``:
``ssl`` (an ``SSLContext``; not with ``ssl*`` URL parameters), ``sql_mode``,
``init_command``, ``conv``, ``local_infile``, ``server_public_key``,
``stmt_cache_size`` (asyncmy's server-side prepared statements, off by
default) and the rest of its keywords, less those the URL sets.

Where asyncmy differs from aiomysql, and what that means here:

- A read cut short by a cancellation makes asyncmy close the connection
  itself (the rest of the reply would be read as the next one's), and the
  statement runs on in the server. Here the connection stays open instead
  and the pool's upkeep recovers it, as on aiomysql: ``KILL QUERY`` on a side
  connection, the statement's answer read and dropped, same session (see
  :meth:`MySQLBase.recover <drivers._my.MySQLBase.recover>`). A reply cut off
  part way (rows read in part) is stopped the same way, then closed.
- asyncmy notices a session the server ended while idle (its protocol sees
  the EOF), so ``is_alive`` is False without a round trip.
- Server notes (``CREATE TABLE IF NOT EXISTS`` on an existing table) are
  fetched with ``SHOW WARNINGS`` and logged by asyncmy's ``asyncmy`` logger
  at WARNING; they are never Python warnings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import asyncmy
from asyncmy import errors
from asyncmy.charset import charset_by_name
from asyncmy.constants import CLIENT, CR

from ._my import CutShortMixin, MySQLBase, read_url
from ._url import check_connect_args, redact

__all__ = ["AsyncmyDriver", "create"]

#: asyncmy Connection keywords this module sets, and the URL part that sets each
_MANAGED = {
    "host": "the URL's host",
    "port": "the URL's port",
    "unix_socket": "?socket=",
    "user": "the URL's user or ?user=",
    "password": "the URL's password or ?password=",
    "password_creator": "Pool(..., password=callable)",
    "database": "the URL's path",
    "db": "the URL's path",
    "charset": "?charset=",
    "autocommit": "always on: the pool relies on it",
    "connect_timeout": "connect_timeout",
    "read_timeout": "socket_timeout",
    "program_name": "?application_name=",
    "sock": "not supported: the driver dials the URL's host",
}

#: asyncmy's connection; Cython, typed by stubs that mypy cannot use here
Connection = Any


class RecoverableConnection(CutShortMixin, asyncmy.Connection):
    """asyncmy's connection, kept open when a cancellation cuts a read short.

    asyncmy reads into its protocol's buffer and consumes a packet only once
    its header is there (the header, then the body); the packet number moves
    with each one taken. A read cancelled while it waits for a reply's first
    header leaves the reply whole for :meth:`AsyncmyDriver.recover` (see
    :class:`CutShortMixin`). Being a subclass turns off asyncmy's fast path
    for cached prepared statements (``stmt_cache_size``), which checks for its
    own class: such a statement goes the generic way.
    """


class TLSOnlyConnection(RecoverableConnection):
    """asyncmy's connection, refusing a server that offers no TLS (sslmode=require).

    The check sits just before authentication: the point where asyncmy would
    otherwise skip TLS without a word and send the login in the clear.
    """

    async def _request_authentication(self) -> None:
        if not self.server_capabilities & CLIENT.SSL:  # type: ignore[attr-defined]
            raise errors.OperationalError(
                CR.CR_SSL_CONNECTION_ERROR,
                "sslmode=require, but the server does not offer TLS",
            )
        await super()._request_authentication()  # type: ignore[misc]


class AsyncmyDriver(MySQLBase):
    """The adapter. Its connection type is asyncmy's own ``Connection``."""

    _plain_connection = RecoverableConnection
    _tls_connection = TLSOnlyConnection
    _server_error = errors.MySQLError

    #: as aiomysql's: MariaDB may list a session this long after the server's EOF
    session_linger = 0.05

    async def _handshake(self, conn: Connection) -> None:
        await conn.connect()

    def socket_of(self, conn: Connection) -> int:
        """The connection's socket descriptor (-1: unknown), for host_connection_limit.

        As aiomysql's driver: the pool reads a duplicate of it until the
        server's EOF before it gives the connection's slot back. asyncmy
        keeps its transport as ``_transport`` (guarded: it is not public).
        """
        transport = getattr(conn, "_transport", None)
        sock = None if transport is None else transport.get_extra_info("socket")
        return -1 if sock is None else int(sock.fileno())

    def is_alive(self, conn: Connection) -> bool:
        # _stream_broken: asyncmy's protocol has seen EOF or an error, or the
        # transport is gone (a session killed while idle); guarded, it is private
        return bool(conn.connected) and not getattr(conn, "_stream_broken", False)

    def is_clean(self, conn: Connection) -> bool:
        # is_alive() and not in_transaction(), in one call: the fast release's test
        return (
            conn.connected
            and not conn._stream_broken
            and not conn.get_transaction_status()
            and conn._pool_cut is None
        )

    async def ping(self, conn: Connection) -> None:
        try:
            await self._bounded(conn, lambda: conn.ping(reconnect=False))
        except BaseException:
            # the session is gone or its protocol state unknown
            conn.close()
            raise

    async def reset_session(self, conn: Connection) -> None:
        """COM_RESET_CONNECTION, as on aiomysql; asyncmy's statement cache is forgotten too.

        The reset drops the session's prepared statements on the server, so
        the ids asyncmy cached (``stmt_cache_size``) would name nothing.
        """
        await super().reset_session(conn)
        cache = getattr(conn, "_stmt_cache", None)  # private: guarded
        if isinstance(cache, dict):
            cache.clear()

    def is_broken_error(self, exc: BaseException) -> bool:
        """asyncmy's client-side errors: a packet it could not read, commands out of sync."""
        if isinstance(exc, errors.InterfaceError):
            return True
        return isinstance(exc, errors.OperationalError) and exc.args[:1] == (
            CR.CR_COMMANDS_OUT_OF_SYNC,
        )

    def host_of(self, conn: Connection) -> str:
        """The server ``conn`` is on: ``"host:port"``, or the socket path."""
        socket = self._connect_kwargs.get("unix_socket")
        if socket:
            return str(socket)
        return f"{self._connect_kwargs['host']}:{self._connect_kwargs['port']}"


def _is_charset(name: str) -> bool:
    with contextlib.suppress(KeyError):
        return charset_by_name(name) is not None
    return False


def create(
    url: str,
    *,
    connect_timeout: float | None,
    socket_timeout: float | None,
    connect_args: Mapping[str, Any] | None = None,
) -> AsyncmyDriver:
    """Validate ``url`` (pool parameters already removed) and build the adapter."""
    u = read_url(url, ("mysql+asyncmy", "mariadb+asyncmy"), "mysql+asyncmy", _is_charset)
    extra = check_connect_args(
        connect_args or {}, asyncmy.Connection.__init__, _MANAGED, "mysql+asyncmy"
    )
    u.check_ssl_args(extra)
    connect_kwargs: dict[str, Any] = {
        "host": u.host,
        "port": u.port,
        "unix_socket": u.socket,
        "user": u.user,
        "password": u.password,
        "database": u.database,
        "charset": u.charset,
        "autocommit": True,
        # our cancel scope bounds the whole connect; asyncmy's own (TCP only)
        # must be a positive number: its largest
        "connect_timeout": 31536000,
        "ssl": u.ssl,
        "program_name": u.application_name,
    }
    connect_kwargs.update(extra)
    return AsyncmyDriver(
        display_url=redact(u.parts),
        connect_kwargs=connect_kwargs,
        tls=connect_kwargs["ssl"] is not None,
        connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
    )
