"""The one plug-in point: what the engine needs from a database driver.

Drivers live in the top-level ``drivers`` package and never import the engine;
they satisfy :class:`Driver` structurally. The engine imports a driver module
only when a URL with its scheme is opened, so a MySQL user needs no asyncpg.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from ._errors import ConfigError

C = TypeVar("C")

__all__ = ["Driver", "load_driver"]


class Driver(Protocol[C]):
    """A database adapter. ``C`` is the driver's own connection type.

    Adapters smooth over their library's quirks (aiomysql's auto-reconnect,
    asyncpg's prepared-statement cache behind PgBouncer, sqlite3's threads),
    so that the engine never has to know them.
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

    async def fetch(self, conn: C, sql: str, args: Sequence[Any]) -> list[Any]: ...

    async def fetchrow(self, conn: C, sql: str, args: Sequence[Any]) -> Any | None: ...

    async def fetchval(self, conn: C, sql: str, args: Sequence[Any]) -> Any: ...

    async def execute(self, conn: C, sql: str, args: Sequence[Any]) -> Any: ...

    async def server_max_connections(self, conn: C) -> int | None:
        """The server's connection ceiling, or None where there is none."""
        ...


# scheme -> (driver module, the extra that installs its library)
_SCHEMES: dict[str, tuple[str, str]] = {
    "postgresql": ("drivers.postgres", "postgres"),
    "postgres": ("drivers.postgres", "postgres"),
    "mysql": ("drivers.mysql", "mysql"),
    "mariadb": ("drivers.mysql", "mysql"),
    "sqlite": ("drivers.sqlite", ""),
}

SUPPORTED_SCHEMES = tuple(_SCHEMES)


def load_driver(
    scheme: str,
    url: str,
    *,
    connect_timeout: float | None,
    socket_timeout: float | None,
) -> Driver[Any]:
    """Import the driver module for ``scheme`` and build an adapter for ``url``.

    ``url`` has the pool parameters already removed. A missing library is a
    :class:`ConfigError` that names the extra to install; a driver parameter the
    driver rejects becomes a :class:`ConfigError` too.
    """
    module_name, extra = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if (exc.name or "").startswith("drivers"):
            raise  # our own package is broken: not the user's doing
        raise ConfigError(
            "url",
            scheme + "://",
            f"needs the {exc.name or 'driver'} package: pip install 'pool[{extra}]'",
        ) from exc
    from drivers import InvalidParameter

    try:
        driver: Driver[Any] = module.create(
            url, connect_timeout=connect_timeout, socket_timeout=socket_timeout
        )
    except InvalidParameter as exc:
        raise ConfigError(exc.parameter, exc.value, exc.reason) from None
    return driver
