"""PostgreSQL through asyncpg (asyncio only: asyncpg has no trio support).

URL: ``postgresql://user:password@host:port/database?param=value`` (``postgres://``
too). One host only. What the URL leaves out, asyncpg takes from libpq's
environment variables (``PGHOST``, ``PGUSER``, ``PGPASSWORD``, ``PGSSLMODE`` ...)
and ``~/.pgpass``, as psql would; with no host at all it tries the local
Unix sockets first.

Parameters:

``sslmode``
    disable, allow, prefer (asyncpg's default), require, verify-ca, verify-full;
    as in libpq.
``sslrootcert``, ``sslcert``, ``sslkey``
    file paths, as in libpq.
``application_name``, ``options``
    sent in the startup packet; ``options`` is libpq's, e.g. ``-c geqo=off``.
``schema``
    becomes the session's ``search_path``, quoted as an identifier, so any name
    works, ``we"ird; DROP`` included.
``statement_cache_size``
    asyncpg's prepared-statement cache per connection (default 100; 0 = off).
``pgbouncer``
    true turns the statement cache off. asyncpg names its prepared statements,
    and behind PgBouncer in transaction mode the next query may run on another
    server connection that lacks them (or has another statement under the
    same name: wrong results, not just errors). ``pgbouncer=true`` with a
    non-zero ``statement_cache_size`` is refused rather than guessed at.
    PgBouncer also refuses startup parameters it does not track, such as
    ``search_path`` and ``options``, unless its ``ignore_startup_parameters``
    names them (and then the server never sees them).

Quirks smoothed over here: asyncpg reads any query parameter it does not know
as a server setting, so a typo would reach the server as a setting (or be
silently kept); this module validates every parameter itself and hands asyncpg
explicit arguments. ``socket_timeout`` becomes asyncpg's ``command_timeout``: a
query over it raises :class:`TimeoutError` and asyncpg cancels it on the server,
leaving the connection usable. A connect cancelled during TLS negotiation
(sslmode prefer, asyncpg's default, negotiates on every connect) makes asyncpg
log "Future exception was never retrieved ... unexpected connection_lost()":
noise from inside asyncpg, nothing leaks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlencode

import asyncpg

from . import InvalidParameter
from ._url import (
    check_known,
    parse_bool,
    parse_choice,
    parse_host_port,
    parse_nonnegative_int,
    query_params,
    redact,
    split,
    user_and_password,
)

__all__ = ["PostgresDriver", "create", "quote_identifier"]

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# the ones asyncpg parses itself, from a DSN that carries nothing else
_SSL_PARAMS = ("sslmode", "sslrootcert", "sslcert", "sslkey")
PARAMETERS = (
    *_SSL_PARAMS,
    "application_name",
    "options",
    "schema",
    "pgbouncer",
    "statement_cache_size",
)
DEFAULT_STATEMENT_CACHE_SIZE = 100

#: asyncpg's connection; the library has no type hints
Connection = Any


def quote_identifier(name: str) -> str:
    """``name`` as a PostgreSQL identifier: double-quoted, inner quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


def _quiet_cancelled_tls_negotiation() -> None:
    """Stop asyncpg from logging an error when a connect is cancelled early.

    asyncpg negotiates TLS (``sslmode=prefer``, its default) with a protocol
    whose ``on_data`` future is awaited only once the TCP connection exists. A
    connect cancelled just as that connection is made closes the transport, and
    ``connection_lost`` sets an exception on the future nobody awaits: asyncio
    then logs "Future exception was never retrieved ... unexpected
    connection_lost() call" at ERROR. The pool cancels connects on purpose (a
    waiter served by a released connection abandons its opening), so we mark
    that exception as seen. Whoever does await the future still gets it.
    """
    from asyncpg import connect_utils

    base = getattr(connect_utils, "TLSUpgradeProto", None)
    if base is None or getattr(base, "_pool_quiet", False):
        return

    class QuietTLSUpgradeProto(base):  # type: ignore[misc, valid-type]
        _pool_quiet = True

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            future = self.on_data
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: nothing to log at garbage collection

    connect_utils.TLSUpgradeProto = QuietTLSUpgradeProto


_quiet_cancelled_tls_negotiation()


class PostgresDriver:
    """The adapter. Its connection type is asyncpg's own ``Connection``."""

    scheme = "postgresql"

    def __init__(
        self,
        *,
        display_url: str,
        connect_kwargs: dict[str, Any],
        statement_cache_size: int,
        server_settings: dict[str, str],
        socket_timeout: float | None,
    ) -> None:
        self._display_url = display_url
        self._connect_kwargs = connect_kwargs
        #: the prepared-statement cache each connection gets (0 with pgbouncer=true)
        self.statement_cache_size = statement_cache_size
        #: the startup parameters sent to the server (search_path, application_name, options)
        self.server_settings = server_settings
        self._socket_timeout = socket_timeout

    def __repr__(self) -> str:
        return f"<PostgresDriver {self._display_url}>"

    async def connect(self) -> Connection:
        return await asyncpg.connect(
            **self._connect_kwargs,
            statement_cache_size=self.statement_cache_size,
            # asyncpg mutates nothing here, but a fresh dict per connection
            # keeps that an assumption we do not have to make
            server_settings=dict(self.server_settings),
        )

    async def close(self, conn: Connection) -> None:
        # asyncpg aborts the connection itself when the graceful close fails
        # or times out, so nothing is left open whatever happens here.
        await conn.close(timeout=self._socket_timeout)

    def terminate(self, conn: Connection) -> None:
        with contextlib.suppress(Exception):  # the contract: terminate never raises
            conn.terminate()

    def is_alive(self, conn: Connection) -> bool:
        return not conn.is_closed()

    async def ping(self, conn: Connection) -> None:
        # execute() without arguments uses the simple query protocol: one
        # round trip, and no prepared statement in the cache.
        await conn.execute("SELECT 1")

    def in_transaction(self, conn: Connection) -> bool:
        # True in a failed transaction too: the server status byte says 'E'.
        return bool(conn.is_in_transaction())

    async def begin(self, conn: Connection) -> None:
        await conn.execute("BEGIN")

    async def commit(self, conn: Connection) -> None:
        await conn.execute("COMMIT")

    async def rollback(self, conn: Connection) -> None:
        await conn.execute("ROLLBACK")

    async def fetch(self, conn: Connection, sql: str, args: Sequence[Any]) -> list[Any]:
        return list(await conn.fetch(sql, *args))

    async def fetchrow(self, conn: Connection, sql: str, args: Sequence[Any]) -> Any | None:
        return await conn.fetchrow(sql, *args)

    async def fetchval(self, conn: Connection, sql: str, args: Sequence[Any]) -> Any:
        return await conn.fetchval(sql, *args)

    async def execute(self, conn: Connection, sql: str, args: Sequence[Any]) -> Any:
        """Returns the command tag, e.g. ``"INSERT 0 1"``, as asyncpg does."""
        return await conn.execute(sql, *args)

    async def server_max_connections(self, conn: Connection) -> int | None:
        return int(await conn.fetchval("SHOW max_connections"))


def create(
    url: str, *, connect_timeout: float | None, socket_timeout: float | None
) -> PostgresDriver:
    """Validate ``url`` (pool parameters already removed) and build the adapter."""
    parts = split(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise InvalidParameter("url", parts.scheme + "://", "must start with postgresql://")
    params = query_params(parts)
    check_known(params, PARAMETERS, "postgresql")

    host, port = parse_host_port(parts)
    user, password = user_and_password(parts)
    database = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)

    if "sslmode" in params:
        parse_choice("sslmode", params["sslmode"], SSLMODES)
    for name in ("sslrootcert", "sslcert", "sslkey"):
        if name in params and not params[name]:
            raise InvalidParameter(name, "", "must be a file path")

    pgbouncer = parse_bool("pgbouncer", params["pgbouncer"]) if "pgbouncer" in params else False
    if "statement_cache_size" in params:
        statement_cache_size = parse_nonnegative_int(
            "statement_cache_size", params["statement_cache_size"]
        )
        if pgbouncer and statement_cache_size:
            raise InvalidParameter(
                "statement_cache_size",
                params["statement_cache_size"],
                "must be 0 with pgbouncer=true (PgBouncer breaks named prepared statements)",
            )
    else:
        statement_cache_size = 0 if pgbouncer else DEFAULT_STATEMENT_CACHE_SIZE

    server_settings: dict[str, str] = {}
    if "schema" in params:
        schema = params["schema"]
        if not schema or "\0" in schema:
            raise InvalidParameter("schema", schema, "must be a non-empty name without NUL")
        if pgbouncer:
            # PgBouncer (1.18 in transaction mode) cannot carry a search_path startup
            # parameter to the server: it refuses it, or drops it without a word when
            # listed in ignore_startup_parameters. Either way the schema would not hold.
            raise InvalidParameter(
                "schema",
                schema,
                "cannot be honoured with pgbouncer=true (PgBouncer does not pass a "
                "search_path to the server); qualify table names, or set the role's "
                "search_path with ALTER ROLE ... SET search_path",
            )
        server_settings["search_path"] = quote_identifier(schema)
    for name in ("application_name", "options"):
        if name in params:
            if "\0" in params[name]:
                # the startup packet is NUL-separated
                raise InvalidParameter(name, params[name], "must not contain NUL")
            server_settings[name] = params[name]

    ssl = {name: params[name] for name in _SSL_PARAMS if name in params}
    connect_kwargs: dict[str, Any] = {
        # Only the TLS parameters travel in a DSN, because only asyncpg's DSN
        # parser builds the SSL context from sslrootcert/sslcert/sslkey the way
        # libpq does; everything else is an explicit argument.
        "dsn": "postgresql://?" + urlencode(ssl) if ssl else None,
        "host": host,
        "port": port,
        "user": user,
        "password": password,
        "database": database or None,
        "timeout": connect_timeout,
        "command_timeout": socket_timeout,
    }
    return PostgresDriver(
        display_url=redact(parts),
        connect_kwargs=connect_kwargs,
        statement_cache_size=statement_cache_size,
        server_settings=server_settings,
        socket_timeout=socket_timeout,
    )
