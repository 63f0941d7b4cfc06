"""The one plug-in point: what the engine needs from a database driver.

The bundled drivers live in the ``pool_drivers`` package (the repository's
``drivers/`` folder, installed under a name of ours so that a project's own
``drivers/`` shadows nothing) and never import the engine; they satisfy
:class:`Driver` structurally. The engine imports a driver module
only when a URL with its scheme is opened, so a MySQL user needs no asyncpg.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from ._errors import ConfigError

C = TypeVar("C")

__all__ = ["DISTRIBUTION", "Driver", "check_driver", "check_runs_on", "load_driver"]

#: the distribution that installs the ``pool`` package: what every install hint
#: names (``pool`` on PyPI is another project)
DISTRIBUTION = "pool-engine"


class Driver(Protocol[C]):
    """A database adapter. ``C`` is the driver's own connection type.

    Adapters smooth over their library's quirks (aiomysql's auto-reconnect,
    asyncpg's prepared-statement cache behind PgBouncer, sqlite3's threads),
    so that the engine never has to know them.

    The query helpers take asyncpg's ``timeout=``: seconds for that one call
    (None: the driver's ``socket_timeout``, if any). On expiry they raise
    :class:`TimeoutError` (asyncpg's own, on PostgreSQL), and the connection
    is either still usable or shows ``is_alive() == False``. Drivers written
    before ``timeout=`` and ``executemany`` existed still work as long as the
    engine is not asked to use them: it passes ``timeout`` only when a caller
    gave one.

    Optional members, read with ``getattr`` so that older drivers need none
    of them (the bundled drivers have them all):

    ``async_libraries: tuple[str, ...]``
        the async libraries (sniffio names) the driver runs on, e.g.
        ``("asyncio",)`` for asyncpg and aiomysql, ``("asyncio", "trio")`` for
        sqlite3 in worker threads. Absent: assume any.
    ``host_of(conn) -> str``
        the server a connection is on, ``"host:port"`` (a Unix socket as
        ``"/dir:port"`` on PostgreSQL, its path on MySQL), so that the engine
        can retire every connection of one host of a multi-host URL.
    ``is_read_only_error(exc) -> bool``
        True when a query failed because the server is read-only (SQLSTATE
        25006 on PostgreSQL: a standby, or a read-only session).
    ``is_clean(conn) -> bool``
        ``is_alive(conn) and not in_transaction(conn)`` in one call: what the
        fast release asks of every connection. Absent: the engine asks both.
    ``release_error(conn) -> BaseException | None``
        asked at each release that is not the fast one: a misuse the holder
        left on the connection (SQLite: a call never awaited), which the
        driver forgets as it answers; the release, once done, raises it
        (unless the holder's block already raised).
    ``is_disconnect_error(exc) -> bool``
        True when a query failed because the server ended the session or the
        link broke (a shutdown, a crash, a lost socket), so that a pool that
        wants the primary stops lending that server's other connections.
    ``classify_connect_error(exc) -> "auth" | "database" | "timeout" | None``
        why ``connect()`` raised ``exc``, for :class:`pool.ConnectError`'s
        Prisma code: ``"auth"`` P1000 (credentials refused), ``"database"``
        P1003 (no such database), ``"timeout"`` P1002; None (or absent) P1001,
        except that a ``TimeoutError`` is always P1002.

    For ``host_connection_limit`` (a slot is given back only once the server
    dropped the session, which the pool sees as the end of stream on a
    duplicate of the connection's socket):

    ``socket_of(conn) -> int``
        the connection's socket descriptor, -1 when unknown. Absent: a slot is
        given back as soon as the connection is closed.
    ``session_linger: float``
        seconds the server may still list a session after it closed its
        socket (MariaDB); 0 when the server's end of stream means it is gone.
    ``connect_watching(watch) -> conn``
        ``connect()``, calling ``watch(fd)`` for each socket the connect makes
        (as soon as it is connected, or at least before the driver closes it
        when the connect is cut short), so that a connect abandoned
        mid-handshake keeps its slot until the server dropped its backend.
        Absent: such a connect gives its slot back at once.
    """

    #: the canonical scheme, e.g. ``"postgresql"``; used in log lines
    scheme: str

    async def connect(self) -> C:
        """Open one connection. Raises the library's own error on failure."""
        ...

    async def close(self, conn: C) -> None:
        """Close gracefully (may do one round trip). May raise."""
        ...

    def terminate(self, conn: C) -> None:
        """Close at once: no I/O awaited, never raises."""
        ...

    def is_alive(self, conn: C) -> bool:
        """A local check with no I/O: False once the connection is known dead."""
        ...

    async def ping(self, conn: C) -> None:
        """One round trip to the server; raises if the connection is dead."""
        ...

    def in_transaction(self, conn: C) -> bool:
        """True while the connection holds an open (or failed) transaction."""
        ...

    async def begin(self, conn: C) -> None: ...

    async def commit(self, conn: C) -> None: ...

    async def rollback(self, conn: C) -> None: ...

    async def fetch(
        self, conn: C, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> list[Any]: ...

    async def fetchrow(
        self, conn: C, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any | None: ...

    async def fetchval(
        self, conn: C, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any: ...

    async def execute(
        self, conn: C, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any: ...

    async def executemany(
        self,
        conn: C,
        sql: str,
        args_iterable: Iterable[Sequence[Any]],
        timeout: float | None = None,
    ) -> None:
        """Run ``sql`` once per argument sequence: all or nothing, as asyncpg's is.

        Outside a transaction the driver opens one for the batch; inside one,
        the batch is part of it.
        """
        ...

    async def server_max_connections(self, conn: C) -> int | None:
        """The server's connection ceiling, or None where there is none."""
        ...


# scheme -> (driver module, the extra that installs its library)
_SCHEMES: dict[str, tuple[str, str]] = {
    "postgresql": ("pool_drivers.postgres", "postgres"),
    "postgres": ("pool_drivers.postgres", "postgres"),
    "postgresql+asyncpg": ("pool_drivers.postgres", "postgres"),
    "postgres+asyncpg": ("pool_drivers.postgres", "postgres"),
    "postgresql+psycopg": ("pool_drivers.psycopg", "psycopg"),
    "postgres+psycopg": ("pool_drivers.psycopg", "psycopg"),
    "mysql": ("pool_drivers.mysql", "mysql"),
    "mariadb": ("pool_drivers.mysql", "mysql"),
    "mysql+asyncmy": ("pool_drivers.asyncmy", "asyncmy"),
    "mariadb+asyncmy": ("pool_drivers.asyncmy", "asyncmy"),
    "sqlite": ("pool_drivers.sqlite", ""),
}

SUPPORTED_SCHEMES = tuple(_SCHEMES)

#: the built-in drivers that run on trio (the others need asyncio)
TRIO_SCHEMES = ("sqlite",)


#: what the engine calls without asking first: a driver that lacks one fails at
#: ``Pool()``, not at the first acquire with a bare AttributeError. The rest of
#: :class:`Driver` (``executemany``, ``server_max_connections``, and the members
#: its docstring lists as optional) is asked for with ``getattr`` or only when used.
REQUIRED_METHODS = (
    "connect", "close", "terminate", "is_alive", "ping", "in_transaction",
    "begin", "commit", "rollback", "fetch", "fetchrow", "fetchval", "execute",
)


def check_driver(driver: object) -> None:
    """A ``Pool(driver=...)`` that cannot serve is a ConfigError naming what it lacks."""
    if isinstance(driver, type):
        raise ConfigError(
            "driver",
            driver.__name__,
            f"must be a driver object, not a class: pass {driver.__name__}(...)",
        )
    missing = [name for name in REQUIRED_METHODS if not callable(getattr(driver, name, None))]
    if not isinstance(getattr(driver, "scheme", None), str):
        # read in log lines and error messages
        missing.insert(0, "scheme (a str)")
    if missing:
        raise ConfigError(
            "driver",
            type(driver).__name__,
            f"does not satisfy pool.Driver: it has no {', '.join(missing)}",
        )


def check_runs_on(driver: Driver[Any], library: str) -> None:
    """A driver that cannot run on this event loop is a ConfigError, before any connect."""
    libraries: tuple[str, ...] | None = getattr(driver, "async_libraries", None)
    if libraries is None or library in libraries:
        return
    scheme = getattr(driver, "scheme", "this")
    raise ConfigError(
        "url",
        scheme + "://",
        f"the {scheme} driver runs on {' and '.join(libraries)} only, not on {library}; "
        f"the drivers that run on trio: {', '.join(s + '://' for s in TRIO_SCHEMES)}",
    )


def load_driver(
    scheme: str,
    url: str,
    *,
    connect_timeout: float | None,
    socket_timeout: float | None,
    connect_args: Mapping[str, Any] | None = None,
) -> Driver[Any]:
    """Import the driver module for ``scheme`` and build an adapter for ``url``.

    ``url`` has the pool parameters already removed. A missing library is a
    :class:`ConfigError` that names the extra to install; a driver parameter the
    driver rejects becomes a :class:`ConfigError` too.

    ``connect_args`` (``Pool(..., connect_args={...})``) is what a URL cannot
    carry (an ``SSLContext``, asyncpg's ``server_settings``, a record class);
    the driver checks each key against its library's connect and passes them
    on. A bad key is a :class:`ConfigError` naming the key and the accepted
    ones, never the value, which may be a secret.
    """
    module_name, extra = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if (exc.name or "").startswith("pool_drivers"):
            raise  # our own package is broken: not the user's doing
        raise ConfigError(
            "url",
            scheme + "://",
            f"needs the {exc.name or 'driver'} package: pip install '{DISTRIBUTION}[{extra}]'",
        ) from exc
    from pool_drivers import InvalidParameter

    try:
        if connect_args:
            driver: Driver[Any] = module.create(
                url,
                connect_timeout=connect_timeout,
                socket_timeout=socket_timeout,
                connect_args=connect_args,
            )
        else:  # the keyword only when used: a driver module of an older shape still loads
            driver = module.create(
                url, connect_timeout=connect_timeout, socket_timeout=socket_timeout
            )
    except InvalidParameter as exc:
        raise ConfigError(exc.parameter, exc.value, exc.reason) from None
    return driver
