"""One small adapter per pool, so that every workload runs the same code on each.

An adapter opens a fresh pool of a given size, lends connections through the
pool's own API (the object it returns from :meth:`Subject.acquire` is the
library's own context manager, never a wrapper of ours), runs ``SELECT 1`` the
way that library's users do, and closes. Peers run with their defaults: that
is what their users get.

The peer libraries are imported only when their adapter opens, so the tool
runs on a fresh install with none of them; :func:`subjects_for` lists the
missing ones with the reason.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit

import pool
from pool import _config
from pool._driver import Driver, load_driver

from ._stub import StubDriver

__all__ = [
    "PEERS",
    "Limit",
    "Ours",
    "Subject",
    "normalise_scheme",
    "subjects_for",
    "stub_subjects",
]

Role = Literal["ours", "limit", "peer"]
Query = Callable[[Any], Awaitable[None]]

_SCHEME_ALIASES = {"postgres": "postgresql", "mariadb": "mysql"}


def normalise_scheme(url: str) -> str:
    """``postgres://`` -> ``postgresql``, ``mariadb://`` -> ``mysql``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return _SCHEME_ALIASES.get(scheme, scheme)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------- SELECT 1


async def _fetchval_select1(conn: Any) -> None:
    # asyncpg's Connection, our SQLiteConnection and the stub all have fetchval
    await conn.fetchval("SELECT 1")


async def _cursor_select1(conn: Any) -> None:
    # aiomysql (and PyMySQL) talk through cursors
    async with conn.cursor() as cur:
        await cur.execute("SELECT 1")
        await cur.fetchone()


_SELECT1: dict[str, Query] = {
    "postgresql": _fetchval_select1,
    "sqlite": _fetchval_select1,
    "stub": _fetchval_select1,
    "mysql": _cursor_select1,
}


# ---------------------------------------------------------------------- the interface


class Subject(abc.ABC):
    """A pool under test (or the raw-connection limit), behind one small interface."""

    #: the key used in tables and in the JSON
    name: ClassVar[str]
    role: ClassVar[Role] = "peer"
    #: the distribution whose version is shown
    package: ClassVar[str] = ""
    #: modules that must import for this adapter to run
    modules: ClassVar[tuple[str, ...]] = ()
    #: the URL schemes it runs on
    schemes: ClassVar[frozenset[str]] = frozenset()
    #: what it does with its defaults that a reader of the figures should know
    note: ClassVar[str] = ""
    #: False when it has no notion of an acquire timeout (the raw connections)
    has_timeout: ClassVar[bool] = True

    def __init__(self, url: str) -> None:
        self.url = url  # holds the password: never print it

    @property
    def label(self) -> str:
        return f"{self.name} {_version(self.package)}" if self.package else self.name

    @abc.abstractmethod
    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        """Build a pool of ``size`` connections; ``warm`` opens them all now.

        ``acquire_timeout`` is for the libraries that only take it per pool.
        """

    @abc.abstractmethod
    def acquire(self, key: int) -> AbstractAsyncContextManager[Any]:
        """The library's own ``async with`` that lends a connection.

        ``key`` identifies the calling task (the raw connections use it to
        pick the task's connection; pools ignore it).
        """

    def acquire_timeout(self, key: int, timeout: float) -> AbstractAsyncContextManager[Any]:
        """Like :meth:`acquire`, giving up after ``timeout`` seconds."""
        return self.acquire(key)

    @abc.abstractmethod
    async def query(self, conn: Any) -> None:
        """Run ``SELECT 1`` on a lent connection and read its row."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the pool and every connection it holds."""

    def queue_of(self, key: int) -> int:
        """Which FIFO queue the task ``key`` joins (one per pool; one per connection for raw)."""
        return 0

    def stats(self) -> dict[str, Any] | None:
        """The pool's own statistics, where it has them."""
        return None


# ---------------------------------------------------------------------- this pool


class Ours(Subject):
    """This engine, with its defaults; ``driver`` plugs in the stub."""

    name = "pool"
    role = "ours"
    package = "pool"
    note = (
        "pool: this engine with its defaults; a release sends nothing to the server "
        "unless the connection is dirty."
    )

    def __init__(self, url: str, *, driver: Driver[Any] | None = None) -> None:
        super().__init__(url)
        self._driver = driver
        self._query = _SELECT1["stub" if driver is not None else normalise_scheme(url)]
        self._db: pool.Pool[Any] | None = None

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        overrides: dict[str, object] = {"connection_limit": size}
        if acquire_timeout is not None:
            overrides["pool_timeout"] = acquire_timeout
        db: pool.Pool[Any] = pool.Pool(self.url, driver=self._driver, **overrides)
        self._db = db
        if warm:
            # one after another: each finds no idle connection and opens one
            conns = [await db.acquire() for _ in range(size)]
            for conn in conns:
                await db.release(conn)

    @property
    def db(self) -> pool.Pool[Any]:
        assert self._db is not None, "open() first"
        return self._db

    def acquire(self, key: int) -> AbstractAsyncContextManager[Any]:
        return self.db.acquire()

    def acquire_timeout(self, key: int, timeout: float) -> AbstractAsyncContextManager[Any]:
        return self.db.acquire(timeout=timeout)

    async def query(self, conn: Any) -> None:
        await self._query(conn)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.disconnect()

    def stats(self) -> dict[str, Any] | None:
        return dataclasses.asdict(self._db.stats()) if self._db is not None else None


# ---------------------------------------------------------------------- the physical limit


class _Slot:
    """One raw connection behind its own lock: ``async with slot as conn``."""

    __slots__ = ("conn", "driver", "lock")

    def __init__(self, driver: Driver[Any]) -> None:
        self.driver = driver
        self.lock = asyncio.Lock()
        self.conn: Any = None

    async def __aenter__(self) -> Any:
        await self.lock.acquire()
        conn = self.conn
        if conn is None:  # opened lazily, by the first task that needs it
            try:
                conn = self.conn = await self.driver.connect()
            except BaseException:
                self.lock.release()
                raise
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.lock.release()


class Limit(Subject):
    """The physical limit: N raw connections, task ``k`` always uses connection ``k % N``.

    No pool is involved: each connection is owned by the tasks mapped to it and
    guarded by an ``asyncio.Lock`` (FIFO, and free when nobody holds it).
    """

    name = "limit"
    role = "limit"
    has_timeout = False

    def __init__(self, url: str, *, driver: Driver[Any] | None = None) -> None:
        super().__init__(url)
        if driver is None:
            parsed = _config.parse(url, {})
            driver = load_driver(
                parsed.config.scheme,
                parsed.driver_url,
                connect_timeout=parsed.config.connect_timeout,
                socket_timeout=parsed.config.socket_timeout,
            )
            self._query = _SELECT1[normalise_scheme(url)]
        else:
            self._query = _SELECT1["stub"]
        self._driver: Driver[Any] = driver
        self._slots: list[_Slot] = []

    @property
    def label(self) -> str:
        return "limit (raw connections, one lock each, no pool)"

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        self._slots = [_Slot(self._driver) for _ in range(size)]
        if warm:
            for slot in self._slots:
                slot.conn = await self._driver.connect()

    def acquire(self, key: int) -> AbstractAsyncContextManager[Any]:
        slots = self._slots
        return slots[key % len(slots)]

    async def query(self, conn: Any) -> None:
        await self._query(conn)

    def queue_of(self, key: int) -> int:
        return key % len(self._slots)

    async def close(self) -> None:
        slots, self._slots = self._slots, []
        for slot in slots:
            if slot.conn is not None:
                try:
                    await self._driver.close(slot.conn)
                except Exception:
                    self._driver.terminate(slot.conn)


# ---------------------------------------------------------------------- the peers


def _netloc_and_db(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.lstrip("/")


class Asyncpg(Subject):
    name = "asyncpg"
    package = "asyncpg"
    modules = ("asyncpg",)
    schemes = frozenset({"postgresql"})
    note = (
        "asyncpg: asyncpg.create_pool() with its defaults; its release sends a reset "
        "batch to the server (one round trip per release)."
    )

    def __init__(self, url: str) -> None:
        super().__init__(url)
        netloc, db = _netloc_and_db(url)
        self._dsn = f"postgresql://{netloc}/{db}"
        self._pool: Any = None

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        import asyncpg

        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=size if warm else 0, max_size=size
        )

    def acquire(self, key: int) -> AbstractAsyncContextManager[Any]:
        cm: AbstractAsyncContextManager[Any] = self._pool.acquire()
        return cm

    def acquire_timeout(self, key: int, timeout: float) -> AbstractAsyncContextManager[Any]:
        cm: AbstractAsyncContextManager[Any] = self._pool.acquire(timeout=timeout)
        return cm

    async def query(self, conn: Any) -> None:
        await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        if self._pool is not None:
            p, self._pool = self._pool, None
            await p.close()


class PsycopgPool(Subject):
    name = "psycopg_pool"
    package = "psycopg-pool"
    modules = ("psycopg", "psycopg_pool")
    schemes = frozenset({"postgresql"})
    note = (
        "psycopg_pool: AsyncConnectionPool of psycopg's AsyncConnection, defaults "
        "(autocommit off): each SELECT 1 runs inside BEGIN ... COMMIT."
    )

    def __init__(self, url: str) -> None:
        super().__init__(url)
        netloc, db = _netloc_and_db(url)
        self._dsn = f"postgresql://{netloc}/{db}"
        self._pool: Any = None

    @property
    def label(self) -> str:
        return f"psycopg_pool {_version('psycopg-pool')} (psycopg {_version('psycopg')})"

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        from psycopg_pool import AsyncConnectionPool

        self._pool = AsyncConnectionPool(
            self._dsn, min_size=size if warm else 0, max_size=size, open=False
        )
        await self._pool.open(wait=warm)

    def acquire(self, key: int) -> AbstractAsyncContextManager[Any]:
        cm: AbstractAsyncContextManager[Any] = self._pool.connection()
        return cm

    def acquire_timeout(self, key: int, timeout: float) -> AbstractAsyncContextManager[Any]:
        cm: AbstractAsyncContextManager[Any] = self._pool.connection(timeout=timeout)
        return cm

    async def query(self, conn: Any) -> None:
        cur = await conn.execute("SELECT 1")
        await cur.fetchone()

    async def close(self) -> None:
        if self._pool is not None:
            p, self._pool = self._pool, None
            await p.close()


class SQLAlchemy(Subject):
    name = "sqlalchemy"
    package = "SQLAlchemy"
    modules = ("sqlalchemy", "asyncpg", "greenlet")
    schemes = frozenset({"postgresql"})
    note = (
        "sqlalchemy: create_async_engine() with the asyncpg dialect, pool_size=N, "
        "max_overflow=0, other defaults: each SELECT 1 runs inside BEGIN ... ROLLBACK "
        "(autobegin, then reset on return)."
    )

    def __init__(self, url: str) -> None:
        super().__init__(url)
        netloc, db = _netloc_and_db(url)
        self._dsn = f"postgresql+asyncpg://{netloc}/{db}"
        self._engine: Any = None
        self._select1: Any = None

    @property
    def label(self) -> str:
        return f"sqlalchemy {_version('SQLAlchemy')} (asyncpg dialect)"

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        extra: dict[str, Any] = {}
        if acquire_timeout is not None:
            extra["pool_timeout"] = acquire_timeout
        self._engine = create_async_engine(self._dsn, pool_size=size, max_overflow=0, **extra)
        self._select1 = text("SELECT 1")
        if warm:
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(size):
                    await stack.enter_async_context(self._engine.connect())

    def acquire(self, key: int) -> AbstractAsyncContextManager[Any]:
        cm: AbstractAsyncContextManager[Any] = self._engine.connect()
        return cm

    async def query(self, conn: Any) -> None:
        result = await conn.execute(self._select1)
        result.scalar()

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()


class _WaitFor:
    """aiomysql's acquire bounded by ``asyncio.wait_for`` (it has no timeout of its own)."""

    def __init__(self, pool: Any, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: Any = None

    async def __aenter__(self) -> Any:
        self._conn = await asyncio.wait_for(self._pool.acquire(), self._timeout)
        return self._conn

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pool.release(self._conn)


class Aiomysql(Subject):
    name = "aiomysql"
    package = "aiomysql"
    modules = ("aiomysql",)
    schemes = frozenset({"mysql"})
    note = (
        "aiomysql: aiomysql.create_pool() with its defaults (autocommit off; a "
        "connection released inside a transaction is closed); it has no acquire "
        "timeout, so W4 bounds its acquire with asyncio.wait_for."
    )

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        self._kwargs: dict[str, Any] = {
            "host": parts.hostname or "localhost",
            "port": parts.port or 3306,
            "user": unquote(parts.username or ""),
            "password": unquote(parts.password or ""),
            "db": parts.path.lstrip("/") or None,
        }
        self._pool: Any = None

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        import aiomysql

        self._pool = await aiomysql.create_pool(
            minsize=size if warm else 0, maxsize=size, **self._kwargs
        )

    def acquire(self, key: int) -> AbstractAsyncContextManager[Any]:
        cm: AbstractAsyncContextManager[Any] = self._pool.acquire()
        return cm

    def acquire_timeout(self, key: int, timeout: float) -> AbstractAsyncContextManager[Any]:
        return _WaitFor(self._pool, timeout)

    async def query(self, conn: Any) -> None:
        await _cursor_select1(conn)

    async def close(self) -> None:
        if self._pool is not None:
            p, self._pool = self._pool, None
            p.close()
            await p.wait_closed()


PEERS: tuple[type[Subject], ...] = (Asyncpg, PsycopgPool, SQLAlchemy, Aiomysql)


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


def subjects_for(url: str) -> tuple[list[Subject], dict[str, str]]:
    """This pool, the raw-connection limit and every peer for ``url``'s database.

    Returns the subjects and, for each peer left out, why.
    """
    scheme = normalise_scheme(url)
    subjects: list[Subject] = [Ours(url), Limit(url)]
    skipped: dict[str, str] = {}
    for peer in PEERS:
        if scheme not in peer.schemes:
            continue
        missing = _missing(peer.modules)
        if missing:
            skipped[peer.name] = (
                f"not installed ({', '.join(missing)}): pip install 'pool[bench]'"
            )
            continue
        subjects.append(peer(url))
    return subjects, skipped


def stub_subjects(*, connect_delay: float = 0.0) -> list[Subject]:
    """This pool and the raw limit on the stub driver: no server at all."""
    return [
        Ours("stub://bench", driver=StubDriver(connect_delay=connect_delay)),
        Limit("stub://bench", driver=StubDriver(connect_delay=connect_delay)),
    ]
