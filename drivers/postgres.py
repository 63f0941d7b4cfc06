"""PostgreSQL through asyncpg (asyncio only: asyncpg has no trio support).

URL: ``postgresql://user:password@host:port/database?param=value`` (``postgres://``
too), libpq's and Prisma's forms both. A host list is libpq's:
``postgresql://u@h1:5432,h2:5433/db``, or ``?host=h1&host=h2`` (each value
may itself be a comma list) with ``?port=`` one port for all or a comma list
of the same length. Query ``host``/``port`` win over the authority's, as in
libpq, so Prisma's ``postgresql://u@localhost/db?host=/var/run/postgresql``
connects over the Unix socket in that directory. What the URL leaves out,
asyncpg takes from libpq's environment variables (``PGHOST``, ``PGUSER``,
``PGPASSWORD``, ``PGSSLMODE`` ...) and ``~/.pgpass``, as psql would; with no
host at all it tries the local Unix sockets first.

Parameters:

``host``, ``port``
    as above; a host starting with ``/`` is a Unix socket directory.
``user``, ``password``, ``dbname``
    libpq's alternatives to the user info and the path (giving one both ways
    is refused). A ``?password=`` is hidden wherever the URL is shown.
``passfile``
    a ``.pgpass`` file to read the password from (libpq's).
``sslmode``
    disable, allow, prefer (asyncpg's default), require, verify-ca, verify-full;
    as in libpq.
``sslrootcert``, ``sslcert``, ``sslkey``, ``sslcrl``, ``sslpassword``
    file paths, as in libpq (``sslcert`` is the *client* certificate, as in
    libpq, not Prisma's server certificate; use ``sslrootcert`` for that), and
    the password of an encrypted ``sslkey``.
``ssl_min_protocol_version``, ``ssl_max_protocol_version``
    TLSv1, TLSv1.1, TLSv1.2 (the default minimum), TLSv1.3.
``sslaccept``
    Prisma's: ``strict`` requires TLS and verifies the server's certificate
    and host name, against ``sslrootcert`` or else the system's trusted CAs
    (asyncpg's own verify modes only read ``~/.postgresql/root.crt``); it
    goes with no ``sslmode`` or a requiring one. ``accept_invalid_certs``
    encrypts without checking the certificate (refused with ``verify-ca``,
    ``verify-full`` or ``sslrootcert``, which say the opposite).
``sslidentity``
    refused: it is a PKCS#12 bundle, which Python's ``ssl`` cannot load.
    The error says how to convert it for ``sslcert`` + ``sslkey``.
``channel_binding``
    ``disable`` or ``prefer`` (asyncpg never binds: its SCRAM is without
    channel binding). ``require`` is refused, since it could not be honoured.
``target_session_attrs``
    any (default), read-write, read-only, primary, standby, prefer-standby,
    with libpq's meanings. Checked by this module on each connection
    (``SHOW transaction_read_only``, ``pg_is_in_recovery()``) rather than by
    asyncpg, so that each refused host gets its reason.
``load_balance_hosts``
    ``disable`` (default: in order) or ``random`` (libpq 16's): a random
    order on every connect.
``krbsrvname``, ``gsslib``
    Kerberos/GSSAPI service name and library, as in libpq.
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

``connect_args`` (the ``Pool`` keyword) carries what a URL cannot to
:func:`asyncpg.connect`: ``ssl`` (an ``SSLContext``; not with ``ssl*`` URL
parameters), ``server_settings`` (merged with the URL's, no key twice),
``record_class``, ``connection_class``, ``direct_tls``,
``max_cached_statement_lifetime``, ``max_cacheable_statement_size``.

Multi-host connecting (more than one host, or any ``target_session_attrs``
but ``any``): the hosts are tried in order, each within ``connect_timeout``;
the first that fits is kept. With prefer-standby, the first host that is
not a standby is kept open as the fallback while the rest are tried (libpq
dials the list a second time instead). When none fits, :class:`NoSuitableHost`
(a ``ConnectionError``) names each host and why. A single host with
``target_session_attrs`` unset or ``any`` takes the old path: one
``asyncpg.connect``, no extra query.

Quirks smoothed over here: asyncpg reads any query parameter it does not know
as a server setting, so a typo would reach the server as a setting (or be
silently kept); this module validates every parameter itself and hands asyncpg
explicit arguments. ``socket_timeout`` becomes asyncpg's ``command_timeout``: a
query over it raises :class:`TimeoutError` and asyncpg cancels it on the server,
leaving the connection usable; a ``timeout=`` on one call does the same for
that call. A connect cancelled during TLS negotiation
(sslmode prefer, asyncpg's default, negotiates on every connect) makes asyncpg
log "Future exception was never retrieved ... unexpected connection_lost()":
noise from inside asyncpg, nothing leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl as ssl_module
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import asyncpg

from . import InvalidParameter, PasswordProvider, resolve_password
from ._hosts import Host, NoSuitableHost, connect_first
from ._pg import (
    READ_ONLY_SQLSTATE,
    RESET_SESSION,
    TLS_VERSIONS,
    is_disconnect_sqlstate,
    parse_pg_url,
    quote_identifier,
)
from ._url import HIDDEN, check_connect_args, parse_nonnegative_int, redact, split

__all__ = ["NoSuitableHost", "PostgresDriver", "create", "quote_identifier"]

# the ones asyncpg parses itself, from a DSN that carries nothing else
_SSL_PARAMS = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "sslpassword",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
)
PARAMETERS = (
    "host",
    "port",
    "user",
    "password",
    "dbname",
    "passfile",
    *_SSL_PARAMS,
    "sslaccept",
    "sslidentity",
    "channel_binding",
    "target_session_attrs",
    "load_balance_hosts",
    "krbsrvname",
    "gsslib",
    "application_name",
    "options",
    "schema",
    "pgbouncer",
    "statement_cache_size",
)
#: asyncpg.connect keywords this module sets, and the URL parameter that sets each
_MANAGED = {
    "dsn": "the URL itself",
    "host": "the URL's host or ?host=",
    "port": "the URL's port or ?port=",
    "user": "the URL's user or ?user=",
    "password": "the URL's password or ?password=",
    "passfile": "?passfile=",
    "database": "the URL's path or ?dbname=",
    "timeout": "connect_timeout",
    "command_timeout": "socket_timeout",
    "statement_cache_size": "?statement_cache_size= or ?pgbouncer=",
    "target_session_attrs": "?target_session_attrs=",
    "krbsrvname": "?krbsrvname=",
    "gsslib": "?gsslib=",
    "service": "not supported: put the service's settings in the URL",
    "servicefile": "not supported: put the service's settings in the URL",
}
DEFAULT_STATEMENT_CACHE_SIZE = 100
#: asyncpg's connection; the library has no type hints
Connection = Any


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


class _WatchingLoop:
    """The running loop as asyncpg sees it during ``connect_watching``: it reports sockets.

    Every attribute is the real loop's, except ``create_connection`` and
    ``create_unix_connection``, which pass each new transport's socket to
    ``watch`` right after the TCP (or Unix) connect, before the startup
    message: from then on the server may list a backend for it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, watch: Callable[[int], None]) -> None:
        self._loop = loop
        self.watch: Callable[[int], None] | None = watch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def _seen(self, transport: asyncio.BaseTransport) -> None:
        watch = self.watch
        sock = transport.get_extra_info("socket")
        if watch is not None and sock is not None:
            watch(sock.fileno())

    async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await self._loop.create_connection(*args, **kwargs)
        self._seen(transport)
        return transport, protocol

    async def create_unix_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await self._loop.create_unix_connection(*args, **kwargs)
        self._seen(transport)
        return transport, protocol


class PostgresDriver:
    """The adapter. Its connection type is asyncpg's own ``Connection``."""

    scheme = "postgresql"
    #: asyncpg runs on asyncio only
    async_libraries: tuple[str, ...] = ("asyncio",)

    def __init__(
        self,
        *,
        display_url: str,
        connect_kwargs: dict[str, Any],
        statement_cache_size: int,
        server_settings: dict[str, str],
        socket_timeout: float | None,
        hosts: Sequence[Host] = (),
        target_session_attrs: str | None = None,
        load_balance: bool = False,
        secrets: Sequence[str] = (),
    ) -> None:
        self._display_url = display_url
        self._connect_kwargs = connect_kwargs
        #: the prepared-statement cache each connection gets (0 with pgbouncer=true)
        self.statement_cache_size = statement_cache_size
        #: the startup parameters sent to the server (search_path, application_name, options)
        self.server_settings = server_settings
        self._socket_timeout = socket_timeout
        self._hosts = tuple(hosts)
        #: the hosts as the URL lists them, ``"host:port"``; one entry for a single host
        self.hosts: tuple[str, ...] = tuple(str(h) for h in self._hosts)
        # None: one host, no session check, so connect() is one asyncpg.connect
        self._target = target_session_attrs
        self._load_balance = load_balance
        self._secrets = tuple(secrets)

    def __repr__(self) -> str:
        return f"<PostgresDriver {self._display_url}>"

    #: set by the pool for ``Pool(..., password=callable)``: asked at each connect
    password_provider: PasswordProvider | None = None

    async def _kwargs(self) -> dict[str, Any]:
        """The connect keywords, with a password asked for just now if there is a provider."""
        if self.password_provider is None:
            return self._connect_kwargs
        return {**self._connect_kwargs, "password": await resolve_password(self.password_provider)}

    async def connect(self) -> Connection:
        return await self._connect({})

    async def connect_watching(self, watch: Callable[[int], None]) -> Connection:
        """``connect()``, calling ``watch(fd)`` for each socket as soon as it is connected.

        For host_connection_limit: a connect abandoned mid-handshake (cancelled,
        its deadline passed) leaves a backend that the server lists until it
        reads our end of stream, and asyncpg shows no socket before it returns.
        So asyncpg gets the running loop behind a thin wrapper (its documented
        ``loop=`` argument) that reports every ``create_connection`` it makes.
        """
        loop = asyncio.get_running_loop()
        watching = _WatchingLoop(loop, watch)
        try:
            conn = await self._connect({"loop": watching})
        finally:
            watching.watch = None  # a later query cancel's own connection is not ours to watch
        # The connection keeps the loop it was made with; it gets the real one
        # back (asyncio.current_task(loop) looks a loop up by identity). Its
        # protocol keeps the wrapper, which passes every call through.
        with contextlib.suppress(AttributeError):
            conn._loop = loop
            conn._stmt_cache._loop = loop
        return conn

    async def _connect(self, extra: dict[str, Any]) -> Connection:
        kwargs = await self._kwargs()
        if self._target is None:
            return await asyncpg.connect(
                **kwargs,
                **extra,
                statement_cache_size=self.statement_cache_size,
                # asyncpg mutates nothing here, but a fresh dict per connection
                # keeps that an assumption we do not have to make
                server_settings=dict(self.server_settings),
            )
        target = self._target
        return await connect_first(
            self._hosts,
            wanted=f"target_session_attrs={target}",
            connect=functools.partial(self._connect_host, {**kwargs, **extra}),
            judge=self._judge,
            fallback=self._any_role if target == "prefer-standby" else None,
            discard=self.close,
            terminate=self.terminate,
            describe=self._describe,
            shuffle=self._load_balance,
        )

    async def _connect_host(self, kwargs: dict[str, Any], host: Host) -> Connection:
        return await asyncpg.connect(
            **kwargs,
            host=host.host,
            port=host.port,
            # our own check below, not asyncpg's: it gives no per-host reasons
            target_session_attrs="any",
            statement_cache_size=self.statement_cache_size,
            server_settings=dict(self.server_settings),
        )

    async def _judge(self, conn: Connection) -> str | None:
        """None when ``conn`` fits target_session_attrs, else why not."""
        target = self._target
        timeout = self._connect_kwargs["timeout"]
        if target == "any":
            return None
        if target in ("read-write", "read-only"):
            # on in a hot standby too, and under default_transaction_read_only
            read_only = await conn.fetchval("SHOW transaction_read_only", timeout=timeout) == "on"
            if read_only == (target == "read-only"):
                return None
            return "is read-only (transaction_read_only is on)" if read_only else (
                "accepts writes (transaction_read_only is off)"
            )
        # primary, standby, prefer-standby. pg_is_in_recovery() rather than the
        # in_hot_standby report, which PostgreSQL 15 and older do not send.
        standby = bool(await conn.fetchval("SELECT pg_is_in_recovery()", timeout=timeout))
        if standby == (target != "primary"):
            return None
        if standby:
            return "is a standby (pg_is_in_recovery() is true)"
        return "is not a standby (pg_is_in_recovery() is false)"

    async def _any_role(self, conn: Connection) -> bool:
        return True  # prefer-standby falls back to any server

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError) and not str(exc):
            text = f"no answer within connect_timeout={self._connect_kwargs['timeout']}s"
        else:
            text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:  # asyncpg does not echo it, but be sure
            text = text.replace(secret, HIDDEN)
        return text

    def host_of(self, conn: Connection) -> str:
        """The server ``conn`` is on, ``"host:port"`` as in :attr:`hosts`.

        A Unix socket shows as its directory and port: ``"/var/run/postgresql:5432"``.
        """
        addr = conn._addr  # asyncpg keeps the address it connected to
        if isinstance(addr, str):  # a Unix socket: <dir>/.s.PGSQL.<port>
            directory, _, name = addr.rpartition("/")
            return str(Host(directory, int(name.rpartition(".")[2])))
        return str(Host(addr[0], int(addr[1])))

    def is_broken_error(self, exc: BaseException) -> bool:
        """asyncpg's client-side errors: the connection's protocol state is in doubt."""
        return isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError))

    @property
    def wants_primary(self) -> bool:
        """target_session_attrs asks for a writable server: a read-only one is a failover."""
        return self._target in ("read-write", "primary")

    def is_read_only_error(self, exc: BaseException) -> bool:
        """True for SQLSTATE 25006: a write sent to a read-only session (a standby)."""
        return getattr(exc, "sqlstate", None) == READ_ONLY_SQLSTATE

    def classify_connect_error(self, exc: BaseException) -> str | None:
        """Why a connect failed, for Prisma's codes: ``"auth"``, ``"database"`` or None.

        SQLSTATE class 28 (28P01 a wrong password, 28000 an unknown role or one
        that may not log in, or no pg_hba entry) is authentication; 3D000 is a
        database that does not exist. A timeout is the engine's to see.
        """
        sqlstate = getattr(exc, "sqlstate", None)
        if not isinstance(sqlstate, str):
            return None
        if sqlstate.startswith("28"):
            return "auth"
        if sqlstate == "3D000":
            return "database"
        return None

    def is_disconnect_error(self, exc: BaseException) -> bool:
        """True when the server ended the session or the link broke.

        SQLSTATE class 08 (asyncpg's ``ConnectionDoesNotExistError``: "connection
        was closed in the middle of operation"), 57P01-57P03 (a shutdown, a crash
        of another backend, a server starting or stopping), a socket error, and
        asyncpg's ``InternalClientError``, which is what a query sent on a
        connection that has read the server's FATAL but not yet its end of
        stream raises ("cannot switch to state 12; another operation (2) is in
        progress"). A query timeout is not one: the connection stays usable.
        """
        if is_disconnect_sqlstate(getattr(exc, "sqlstate", None)):
            return True
        if isinstance(exc, asyncpg.InternalClientError):
            return True
        return isinstance(exc, ConnectionError)

    async def close(self, conn: Connection) -> None:
        # asyncpg aborts the connection itself when the graceful close fails
        # or times out, so nothing is left open whatever happens here.
        await conn.close(timeout=self._socket_timeout)

    def terminate(self, conn: Connection) -> None:
        with contextlib.suppress(Exception):  # the contract: terminate never raises
            conn.terminate()

    def socket_of(self, conn: Connection) -> int:
        """The connection's socket descriptor (-1: unknown), for host_connection_limit.

        The pool watches a duplicate of it to see the server end the session
        (a backend leaves pg_stat_activity before it closes its socket).
        """
        sock = conn._transport.get_extra_info("socket")  # asyncpg keeps its transport
        return -1 if sock is None else int(sock.fileno())

    def is_alive(self, conn: Connection) -> bool:
        return not conn.is_closed()

    def is_clean(self, conn: Connection) -> bool:
        # is_alive() and not in_transaction(), in one call: the fast release's test
        return not conn.is_closed() and not conn.is_in_transaction()

    async def recover(self, conn: Connection) -> None:
        """Bring back a connection whose holder was cancelled mid-query.

        asyncpg answered the cancellation with a server-side cancel request;
        this waits for the aborted statement to end (the pool bounds the
        wait), then rolls back what the holder left open.
        """
        wait = getattr(conn._protocol, "_wait_for_cancellation", None)  # private: guarded
        is_cancelling = getattr(conn._protocol, "_is_cancelling", None)
        if wait is not None and is_cancelling is not None:
            if is_cancelling():
                await wait(None)
        elif not conn.is_in_transaction():
            # the public way: a query waits for a cancellation in progress first
            await conn.fetchval("SELECT 1")
        if conn.is_closed():
            raise ConnectionError("the connection closed while its query was cancelled")
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")

    async def reset_session(self, conn: Connection) -> None:
        """What ``DISCARD ALL`` does, except dropping prepared statements, in one round trip.

        The statement cache survives (DISCARD ALL would drop the statements
        asyncpg has prepared under its feet). Settings given at connect time
        (``schema``, ``application_name``, ``options``) are the session's
        defaults, so ``RESET ALL`` keeps them.

        ``UNLISTEN *`` ends the server's side of ``add_listener``; asyncpg's
        side is its own table of callbacks, forgotten here as asyncpg's pool
        does on release. Left in place, the next borrower's ``add_listener``
        on the same channel would find it and send no ``LISTEN`` (it would
        never be notified), and the previous borrower's callbacks would get
        the next one's notifications and notices.
        """
        await conn.execute(RESET_SESSION)
        for name in ("_listeners", "_log_listeners"):  # private: guarded
            callbacks = getattr(conn, name, None)
            if callbacks is not None:
                callbacks.clear()

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

    # timeout= is asyncpg's own: on expiry it cancels the query on the server
    # and raises TimeoutError, and the connection stays usable.

    async def fetch(
        self, conn: Connection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> list[Any]:
        return list(await conn.fetch(sql, *args, timeout=timeout))

    async def fetchrow(
        self, conn: Connection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any | None:
        return await conn.fetchrow(sql, *args, timeout=timeout)

    async def fetchval(
        self, conn: Connection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        return await conn.fetchval(sql, *args, timeout=timeout)

    async def execute(
        self, conn: Connection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        """Returns the command tag, e.g. ``"INSERT 0 1"``, as asyncpg does."""
        return await conn.execute(sql, *args, timeout=timeout)

    async def executemany(
        self,
        conn: Connection,
        sql: str,
        args_iterable: Iterable[Sequence[Any]],
        timeout: float | None = None,
    ) -> None:
        """``sql`` once per argument tuple, pipelined; atomic, as asyncpg's is."""
        await conn.executemany(sql, args_iterable, timeout=timeout)

    async def server_max_connections(self, conn: Connection) -> int | None:
        return int(await conn.fetchval("SHOW max_connections"))


def _tls_context(params: Mapping[str, str], *, verify: bool) -> ssl_module.SSLContext:
    """An SSLContext for sslaccept: verifying (system CAs unless sslrootcert) or not."""
    name = "sslrootcert"
    try:
        if verify:
            ctx = ssl_module.create_default_context(cafile=params.get("sslrootcert"))
            if "sslcrl" in params:
                name = "sslcrl"
                ctx.load_verify_locations(cafile=params["sslcrl"])
                ctx.verify_flags |= ssl_module.VERIFY_CRL_CHECK_CHAIN
        else:
            ctx = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl_module.CERT_NONE
        if "sslcert" in params:
            name = "sslcert"
            password = params.get("sslpassword", "")
            ctx.load_cert_chain(
                params["sslcert"], params.get("sslkey"), password=lambda: password
            )
    except (OSError, ssl_module.SSLError) as exc:
        raise InvalidParameter(
            name, params.get(name, ""), f"cannot be loaded ({type(exc).__name__})"
        ) from None
    versions = {v: getattr(ssl_module.TLSVersion, v.replace(".", "_")) for v in TLS_VERSIONS}
    ctx.minimum_version = versions[params.get("ssl_min_protocol_version", "TLSv1.2")]
    if "ssl_max_protocol_version" in params:
        ctx.maximum_version = versions[params["ssl_max_protocol_version"]]
    return ctx


def create(
    url: str,
    *,
    connect_timeout: float | None,
    socket_timeout: float | None,
    connect_args: Mapping[str, Any] | None = None,
) -> PostgresDriver:
    """Validate ``url`` (pool parameters already removed) and build the adapter.

    ``connect_args`` go to :func:`asyncpg.connect` as they are, after a check
    that asyncpg takes each key and that the URL does not set it already.
    """
    parts = split(url)
    if parts.scheme not in ("postgresql", "postgres", "postgresql+asyncpg", "postgres+asyncpg"):
        raise InvalidParameter("url", parts.scheme + "://", "must start with postgresql://")
    pg = parse_pg_url(url, PARAMETERS, "postgresql")
    parts, params, hosts = pg.parts, pg.params, pg.hosts
    user, password, database = pg.user, pg.password, pg.database
    target, load_balance, pgbouncer = pg.target, pg.load_balance, pg.pgbouncer
    if params.get("channel_binding") == "require":
        raise InvalidParameter(
            "channel_binding",
            "require",
            "cannot be honoured: asyncpg's SCRAM authentication has no channel binding"
            " (use prefer or disable, or the psycopg driver: postgresql+psycopg://)",
        )
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
    server_settings = dict(pg.settings)

    ssl_context: ssl_module.SSLContext | None = None
    sslmode = params.get("sslmode")
    if params.get("sslaccept") == "strict":
        ssl_context = _tls_context(params, verify=True)
    elif params.get("sslaccept") == "accept_invalid_certs" and sslmode == "require":
        # asyncpg's require would still verify against ~/.postgresql/root.crt;
        # allow and prefer never verify in asyncpg: its own context is right
        ssl_context = _tls_context(params, verify=False)

    extra = check_connect_args(connect_args or {}, asyncpg.connect, _MANAGED, "postgresql")
    ssl_given = [name for name in (*_SSL_PARAMS, "sslaccept") if name in params]
    if "ssl" in extra and ssl_given:
        raise InvalidParameter(
            "connect_args",
            "ssl",
            f"conflicts with {', '.join(ssl_given)} in the URL: configure TLS in one place",
        )
    if "server_settings" in extra:
        settings = extra.pop("server_settings")
        if not isinstance(settings, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in settings.items()
        ):
            raise InvalidParameter(
                "connect_args", "server_settings", "must be a dict of str to str"
            )
        for key in settings:
            if key in server_settings:
                raise InvalidParameter(
                    "connect_args",
                    "server_settings",
                    f"sets {key!r}, which the URL sets already",
                )
        server_settings.update(settings)

    ssl = {name: params[name] for name in _SSL_PARAMS if name in params}
    connect_kwargs: dict[str, Any] = {
        # Only the TLS parameters travel in a DSN, because only asyncpg's DSN
        # parser builds the SSL context from sslrootcert/sslcert/sslkey the way
        # libpq does; everything else is an explicit argument.
        "dsn": "postgresql://?" + urlencode(ssl) if ssl and ssl_context is None else None,
        "user": user,
        "password": password,
        "database": database or None,
        "timeout": connect_timeout,
        "command_timeout": socket_timeout,
    }
    if ssl_context is not None:
        connect_kwargs["ssl"] = ssl_context
    for name in ("passfile", "krbsrvname", "gsslib"):
        if name in params:  # only when given: older asyncpg lacks some of them
            connect_kwargs[name] = params[name]
    connect_kwargs.update(extra)
    if target is None:
        # one host, no session check: the plain path, one asyncpg.connect
        connect_kwargs["host"] = hosts[0].host
        connect_kwargs["port"] = hosts[0].port
    elif "target_session_attrs" in params and len(hosts) == 1 and target == "any":
        target = None
        connect_kwargs.update(host=hosts[0].host, port=hosts[0].port, target_session_attrs="any")
    return PostgresDriver(
        display_url=redact(parts),
        connect_kwargs=connect_kwargs,
        statement_cache_size=statement_cache_size,
        server_settings=server_settings,
        socket_timeout=socket_timeout,
        hosts=hosts,
        target_session_attrs=target,
        load_balance=load_balance,
        secrets=[s for s in (password, params.get("sslpassword")) if s],
    )
