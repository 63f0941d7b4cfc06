"""One small adapter per pool, so that every workload runs the same code on each.

An adapter opens a fresh pool of a given size, lends connections through the
pool's own API (the object it returns from :meth:`Subject.acquire` is the
library's own context manager, never a wrapper of ours), runs ``SELECT 1`` the
way that library's users do, and closes.

Each peer comes in up to two styles. *Default* rows run it with its defaults:
that is what its users get (asyncpg's pool resets every connection on release,
psycopg_pool and SQLAlchemy wrap each statement in a transaction). *Like-for-like*
rows (a name ending in ``[lfl]``) configure it so that every pool makes the same
round trips as this one: one per statement, no reset, no BEGIN/COMMIT. This
pool is both (its defaults send nothing on release); ``pool[reset]`` is this
pool with ``reset_session=True``, where the build has it.

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
from pool._driver import DISTRIBUTION, Driver, load_driver

from ._stub import StubDriver

__all__ = [
    "PEERS",
    "Limit",
    "Ours",
    "OursMeter",
    "OursReset",
    "READ_SQL",
    "RW_ROWS",
    "Subject",
    "WRITE_SQL",
    "driver_of",
    "normalise_scheme",
    "sqlite_path",
    "subjects_for",
    "supports_reset_session",
    "stub_subjects",
]

Role = Literal["ours", "limit", "peer"]
#: "default": the library's defaults; "lfl": like-for-like; "both": this pool and the limit
Style = Literal["default", "lfl", "both"]
Query = Callable[[Any], Awaitable[None]]

#: the read/write mix (RW): a table of RW_ROWS rows, read and updated by id
RW_ROWS = 1000
READ_SQL = "SELECT v FROM bench_rw WHERE id = ?"
WRITE_SQL = "UPDATE bench_rw SET v = v + 1 WHERE id = ?"
#: every workload; a subject runs those in its ``applies``
ALL = frozenset({"W1", "W2", "W3", "W4", "W5", "RW"})

_SCHEME_ALIASES = {"postgres": "postgresql", "mariadb": "mysql"}
#: the driver this pool uses for a URL that names none
_DEFAULT_DRIVERS = {"postgresql": "asyncpg", "mysql": "aiomysql", "sqlite": "sqlite3"}


def normalise_scheme(url: str) -> str:
    """The database: ``postgres://`` -> ``postgresql``, ``mariadb+asyncmy://`` -> ``mysql``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    base = scheme.split("+", 1)[0]
    return _SCHEME_ALIASES.get(base, base)


def driver_of(url: str) -> str:
    """The driver this pool runs on for ``url``: ``postgresql+psycopg://`` -> ``psycopg``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if "+" in scheme:
        return scheme.split("+", 1)[1]
    base = normalise_scheme(url)
    return _DEFAULT_DRIVERS.get(base, base)


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
    # aiomysql and asyncmy (as PyMySQL) talk through cursors
    async with conn.cursor() as cur:
        await cur.execute("SELECT 1")
        await cur.fetchone()


async def _psycopg_select1(conn: Any) -> None:
    # psycopg 3: the connection's execute() returns its cursor
    cur = await conn.execute("SELECT 1")
    await cur.fetchone()


#: SELECT 1 the way each driver's users run it, by driver (see driver_of)
_SELECT1: dict[str, Query] = {
    "asyncpg": _fetchval_select1,
    "psycopg": _psycopg_select1,
    "sqlite3": _fetchval_select1,
    "stub": _fetchval_select1,
    "aiomysql": _cursor_select1,
    "asyncmy": _cursor_select1,
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
    #: the driver under a peer's connections (this pool's: the URL's, see driver_of)
    driver_name: ClassVar[str] = ""
    #: what it does with its defaults that a reader of the figures should know
    note: ClassVar[str] = ""
    #: False when it has no notion of an acquire timeout (the raw connections)
    has_timeout: ClassVar[bool] = True
    style: ClassVar[Style] = "default"
    #: the workloads it takes part in (W6 is this pool's alone, on the stub driver)
    applies: ClassVar[frozenset[str]] = ALL - {"RW"}

    def __init__(self, url: str) -> None:
        self.url = url  # holds the password: never print it

    @property
    def label(self) -> str:
        return f"{self.name} {_version(self.package)}" if self.package else self.name

    @property
    def driver(self) -> str:
        """The driver whose connections it lends, as the report names it."""
        return self.driver_name

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

    @property
    def unavailable(self) -> str | None:
        """Why this subject cannot run in this build, or None when it can."""
        return None

    async def read(self, conn: Any, row: int) -> None:
        """RW: read row ``row`` of ``bench_rw`` (SQLite subjects only)."""
        raise NotImplementedError(f"{self.name} has no read/write mix")

    async def write(self, conn: Any, row: int) -> None:
        """RW: update row ``row`` of ``bench_rw``, committed when this returns."""
        raise NotImplementedError(f"{self.name} has no read/write mix")

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
    package = DISTRIBUTION
    style: ClassVar[Style] = "both"
    applies = ALL
    note = (
        "pool: this engine with its defaults; a release sends nothing to the server "
        "unless the connection is dirty (so it is a default and a like-for-like row)."
    )
    #: keyword overrides every pool of this subject gets
    extra: ClassVar[dict[str, object]] = {}

    def __init__(self, url: str, *, driver: Driver[Any] | None = None) -> None:
        super().__init__(url)
        self._driver = driver
        self._query = _SELECT1["stub" if driver is not None else driver_of(url)]
        self._db: pool.Pool[Any] | None = None

    @property
    def driver(self) -> str:
        return "stub" if self._driver is not None else driver_of(self.url)

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        overrides: dict[str, Any] = {"connection_limit": size, **self.extra, **self._more()}
        if acquire_timeout is not None:
            overrides["pool_timeout"] = acquire_timeout
        db: pool.Pool[Any] = pool.Pool(self.url, driver=self._driver, **overrides)
        self._db = db
        if warm:
            # one after another: each finds no idle connection and opens one
            conns = [await db.acquire() for _ in range(size)]
            for conn in conns:
                await db.release(conn)

    def _more(self) -> dict[str, Any]:
        """Keyword arguments built per pool (a subclass's own objects)."""
        return {}

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

    async def read(self, conn: Any, row: int) -> None:
        await conn.fetchval(READ_SQL, row)

    async def write(self, conn: Any, row: int) -> None:
        # the driver's connections are in autocommit mode: one statement, committed
        await conn.execute(WRITE_SQL, row)


def supports_reset_session() -> bool:
    """True when this build's PoolConfig has a ``reset_session`` setting."""
    return "reset_session" in {f.name for f in dataclasses.fields(pool.PoolConfig)}


class OursReset(Ours):
    """This engine with ``reset_session=True``: it resets each connection on release.

    The setting is another change's; the subject runs only where the build has it.
    """

    name = "pool[reset]"
    style: ClassVar[Style] = "lfl"
    note = (
        "pool[reset]: this engine with reset_session=True (a reset on every release, "
        "like asyncpg's default pool)."
    )
    extra: ClassVar[dict[str, object]] = {"reset_session": True}

    @property
    def unavailable(self) -> str | None:
        return None if supports_reset_session() else "n/a (not supported by this build)"


class OursMeter(Ours):
    """This engine reporting OpenTelemetry metrics: what a meter costs on acquire and release.

    Each pool gets its own SDK ``MeterProvider`` with an in-memory reader (no
    exporter: the cost measured is the recording, not the shipping).
    """

    name = "pool[otel]"
    note = (
        "pool[otel]: this engine with Pool(meter_provider=...), an OpenTelemetry SDK "
        "MeterProvider read by an InMemoryMetricReader: every release records use_time, "
        "every wait wait_time, every connect create_time."
    )
    modules = ("opentelemetry.sdk",)

    def __init__(self, url: str, *, driver: Driver[Any] | None = None) -> None:
        super().__init__(url, driver=driver)
        self._provider: Any = None
        self._reader: Any = None

    @property
    def unavailable(self) -> str | None:
        if _missing(self.modules):
            return "n/a (pip install 'pool-engine[otel]' opentelemetry-sdk)"
        return None

    def _more(self) -> dict[str, Any]:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        self._reader = InMemoryMetricReader()
        self._provider = MeterProvider(metric_readers=[self._reader])
        return {"meter_provider": self._provider}

    async def close(self) -> None:
        await super().close()
        if self._provider is not None:
            provider, self._provider = self._provider, None
            self._reader.get_metrics_data()  # one collection, as an exporter would make
            provider.shutdown()


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
    style: ClassVar[Style] = "both"
    applies = ALL - {"W4"}
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
            self._query = _SELECT1[driver_of(url)]
            self._on = driver_of(url)
        else:
            self._query = _SELECT1["stub"]
            self._on = "stub"
        self._driver: Driver[Any] = driver
        self._slots: list[_Slot] = []

    @property
    def label(self) -> str:
        return "limit (raw connections, one lock each, no pool)"

    @property
    def driver(self) -> str:
        return self._on

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

    async def read(self, conn: Any, row: int) -> None:
        await conn.fetchval(READ_SQL, row)

    async def write(self, conn: Any, row: int) -> None:
        await conn.execute(WRITE_SQL, row)

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


class _NoResetConnection:
    """Built lazily: an ``asyncpg.Connection`` whose release sends no reset query.

    ``create_pool(reset=None)`` is asyncpg's *default* (``Connection.reset()``,
    which sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL``), not "no reset": asyncpg 0.32's pool calls ``con.reset()``
    when its ``reset`` is None. Since 0.30 the query comes from
    ``Connection.get_reset_query()``, which a subclass may override; an empty
    one makes the release send nothing unless a transaction was left open.
    """

    made: ClassVar[type[Any] | None] = None

    @classmethod
    def get(cls) -> type[Any]:
        if cls.made is None:
            import asyncpg

            class NoReset(asyncpg.Connection):  # type: ignore[misc]
                def get_reset_query(self) -> str:
                    return ""

            cls.made = NoReset
        return cls.made


class Asyncpg(Subject):
    name = "asyncpg"
    driver_name = "asyncpg"
    package = "asyncpg"
    modules = ("asyncpg",)
    schemes = frozenset({"postgresql"})
    note = (
        "asyncpg: asyncpg.create_pool() with its defaults; its release sends a reset "
        "batch to the server (one round trip per release)."
    )
    #: like-for-like: no reset query on release
    no_reset: ClassVar[bool] = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        netloc, db = _netloc_and_db(url)
        self._dsn = f"postgresql://{netloc}/{db}"
        self._pool: Any = None

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        import asyncpg

        extra: dict[str, Any] = {}
        if self.no_reset:
            extra["connection_class"] = _NoResetConnection.get()
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=size if warm else 0, max_size=size, **extra
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


class AsyncpgNoReset(Asyncpg):
    name = "asyncpg[lfl]"
    style = "lfl"
    no_reset = True
    note = (
        "asyncpg[lfl]: create_pool(connection_class=a Connection whose get_reset_query() "
        "is empty): its release sends nothing (reset=None would keep the default reset)."
    )


class PsycopgPool(Subject):
    name = "psycopg_pool"
    driver_name = "psycopg"
    package = "psycopg-pool"
    modules = ("psycopg", "psycopg_pool")
    schemes = frozenset({"postgresql"})
    note = (
        "psycopg_pool: AsyncConnectionPool of psycopg's AsyncConnection, defaults "
        "(autocommit off): each SELECT 1 runs inside BEGIN ... COMMIT."
    )
    autocommit: ClassVar[bool] = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        netloc, db = _netloc_and_db(url)
        self._dsn = f"postgresql://{netloc}/{db}"
        self._pool: Any = None

    @property
    def label(self) -> str:
        return f"{self.name} {_version('psycopg-pool')} (psycopg {_version('psycopg')})"

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        from psycopg_pool import AsyncConnectionPool

        extra: dict[str, Any] = {}
        if self.autocommit:
            extra["kwargs"] = {"autocommit": True}
        self._pool = AsyncConnectionPool(
            self._dsn, min_size=size if warm else 0, max_size=size, open=False, **extra
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


class PsycopgPoolAutocommit(PsycopgPool):
    name = "psycopg_pool[lfl]"
    style = "lfl"
    autocommit = True
    note = (
        "psycopg_pool[lfl]: its connections in autocommit mode (kwargs={'autocommit': "
        "True}): SELECT 1 alone, no BEGIN/COMMIT."
    )


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
    #: like-for-like: AUTOCOMMIT and no rollback on return
    autocommit: ClassVar[bool] = False
    dialect: ClassVar[str] = "asyncpg"
    driver_name = "asyncpg"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._dsn = self.dsn_of(url)
        self._engine: Any = None
        self._select1: Any = None
        self._read: Any = None
        self._write: Any = None

    def dsn_of(self, url: str) -> str:
        netloc, db = _netloc_and_db(url)
        return f"postgresql+asyncpg://{netloc}/{db}"

    @property
    def label(self) -> str:
        return f"{self.name} {_version('SQLAlchemy')} ({self.dialect} dialect)"

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        extra: dict[str, Any] = {}
        if acquire_timeout is not None:
            extra["pool_timeout"] = acquire_timeout
        if self.autocommit:
            # AUTOCOMMIT alone still lets the pool call the DBAPI rollback() on
            # return, a round trip on aiosqlite: turn that off too.
            extra["isolation_level"] = "AUTOCOMMIT"
            extra["pool_reset_on_return"] = None
        self._engine = create_async_engine(self._dsn, pool_size=size, max_overflow=0, **extra)
        self._select1 = text("SELECT 1")
        self._read = text(READ_SQL.replace("?", ":id"))
        self._write = text(WRITE_SQL.replace("?", ":id"))
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

    async def read(self, conn: Any, row: int) -> None:
        result = await conn.execute(self._read, {"id": row})
        result.scalar()

    async def write(self, conn: Any, row: int) -> None:
        await conn.execute(self._write, {"id": row})
        if not self.autocommit:
            await conn.commit()  # SQLAlchemy 2.0 style: autobegin, then commit

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()


class SQLAlchemyAutocommit(SQLAlchemy):
    name = "sqlalchemy[lfl]"
    style = "lfl"
    autocommit = True
    note = (
        "sqlalchemy[lfl]: the same engine with isolation_level='AUTOCOMMIT' and "
        "pool_reset_on_return=None: the statement alone, nothing on return."
    )


# ---------------------------------------------------------------------- SQLite peers


def sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite:///path`` URL; None for the in-memory database."""
    path = url.split("://", 1)[1].split("?", 1)[0]
    path = unquote(path[1:] if path.startswith("/") else path)
    return None if path in ("", ":memory:") else path


class _Shared:
    """``async with`` that lends the one shared connection (no pool, no lock)."""

    __slots__ = ("conn",)

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def __aenter__(self) -> Any:
        return self.conn

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class _AiosqliteBase(Subject):
    package = "aiosqlite"
    modules = ("aiosqlite",)
    schemes = frozenset({"sqlite"})
    driver_name = "aiosqlite"
    has_timeout = False
    #: like-for-like: isolation_level=None (no implicit BEGIN, so no commit() to
    #: send) and execute_fetchall (one trip to the connection's thread per read)
    autocommit: ClassVar[bool] = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._path = sqlite_path(url) or ""

    def _connect(self) -> Any:
        import aiosqlite

        if self.autocommit:
            return aiosqlite.connect(self._path, isolation_level=None)
        return aiosqlite.connect(self._path)

    async def _fetch(self, conn: Any, sql: str, params: tuple[Any, ...]) -> None:
        if self.autocommit:
            await conn.execute_fetchall(sql, params)
        else:
            # what aiosqlite's README shows: a cursor as a context manager
            async with conn.execute(sql, params) as cur:
                await cur.fetchone()

    async def query(self, conn: Any) -> None:
        await self._fetch(conn, "SELECT 1", ())

    async def read(self, conn: Any, row: int) -> None:
        await self._fetch(conn, READ_SQL, (row,))

    async def write(self, conn: Any, row: int) -> None:
        await conn.execute(WRITE_SQL, (row,))
        if not self.autocommit:
            await conn.commit()  # sqlite3's default opened a transaction for the UPDATE


class AiosqlitePerTask(_AiosqliteBase):
    """No pool: each unit of work opens its own aiosqlite connection and closes it."""

    name = "aiosqlite/task"
    # W3 and W4 ask how a pool grants its connections; here nothing is granted
    applies = frozenset({"W1", "W2", "RW"})
    note = (
        "aiosqlite/task: no pool; each unit of work (a W1 cycle, a query) runs in "
        "`async with aiosqlite.connect(path) as db:`, a new connection and thread each time."
    )

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        return None

    def acquire(self, key: int) -> AbstractAsyncContextManager[Any]:
        cm: AbstractAsyncContextManager[Any] = self._connect()
        return cm

    async def close(self) -> None:
        return None


class AiosqlitePerTaskAutocommit(AiosqlitePerTask):
    name = "aiosqlite/task[lfl]"
    style = "lfl"
    autocommit = True
    applies = frozenset({"W2", "RW"})  # W1 runs no statement: the same as aiosqlite/task
    note = (
        "aiosqlite/*[lfl]: isolation_level=None (no implicit BEGIN, no commit()) and "
        "execute_fetchall: one trip to the connection's thread per statement."
    )


class AiosqliteShared(_AiosqliteBase):
    """No pool: one aiosqlite connection that every task uses at once.

    aiosqlite runs a connection's calls one at a time on its own thread, in
    the order they were made, so the tasks queue there instead of in a pool.
    """

    name = "aiosqlite/shared"
    # no acquire at all: W1 (getting a connection), W3 and W4 do not apply
    applies = frozenset({"W2", "RW"})
    note = (
        "aiosqlite/shared: no pool; one aiosqlite connection opened at the start, "
        "used by every task at once (its thread runs the calls in order)."
    )

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._conn: Any = None

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        self._conn = await self._connect()

    def acquire(self, key: int) -> AbstractAsyncContextManager[Any]:
        return _Shared(self._conn)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()


class AiosqliteSharedAutocommit(AiosqliteShared):
    name = "aiosqlite/shared[lfl]"
    style = "lfl"
    autocommit = True
    note = ""  # said once, by aiosqlite/task[lfl]


class SQLAlchemySqlite(SQLAlchemy):
    modules = ("sqlalchemy", "aiosqlite", "greenlet")
    schemes = frozenset({"sqlite"})
    dialect = "aiosqlite"
    driver_name = "aiosqlite"
    applies = ALL
    note = (
        "sqlalchemy (SQLite): create_async_engine('sqlite+aiosqlite:///...') with its pool "
        "(AsyncAdaptedQueuePool), pool_size=N, max_overflow=0, other defaults: a "
        "rollback() on every return, and a commit() after each write."
    )

    def dsn_of(self, url: str) -> str:
        return f"sqlite+aiosqlite:///{sqlite_path(url)}"


class SQLAlchemySqliteAutocommit(SQLAlchemySqlite):
    name = "sqlalchemy[lfl]"
    style = "lfl"
    autocommit = True
    note = SQLAlchemyAutocommit.note


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
    driver_name = "aiomysql"
    package = "aiomysql"
    modules = ("aiomysql",)
    schemes = frozenset({"mysql"})
    note = (
        "aiomysql: aiomysql.create_pool() with its defaults (autocommit off; a "
        "connection released inside a transaction is closed); it has no acquire "
        "timeout, so W4 bounds its acquire with asyncio.wait_for."
    )

    autocommit: ClassVar[bool] = False

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        self._kwargs: dict[str, Any] = {
            "autocommit": self.autocommit,
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


class AiomysqlAutocommit(Aiomysql):
    name = "aiomysql[lfl]"
    style = "lfl"
    autocommit = True
    note = "aiomysql[lfl]: create_pool(autocommit=True), as this pool's connections run."


PEERS: tuple[type[Subject], ...] = (
    Asyncpg, AsyncpgNoReset, PsycopgPool, PsycopgPoolAutocommit, SQLAlchemy,
    SQLAlchemyAutocommit, Aiomysql, AiomysqlAutocommit, AiosqlitePerTask,
    AiosqlitePerTaskAutocommit, AiosqliteShared, AiosqliteSharedAutocommit, SQLAlchemySqlite,
    SQLAlchemySqliteAutocommit,
)


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


def subjects_for(
    url: str,
    *,
    styles: frozenset[str] = frozenset({"default", "lfl"}),
    peers: bool = True,
    meter: bool = False,
) -> tuple[list[Subject], dict[str, str]]:
    """This pool, the raw-connection limit and every peer for ``url``'s database.

    ``styles`` picks the peer rows ("default", "lfl"); ``peers=False`` keeps
    this pool and the limit alone. Returns the subjects and, for each peer
    left out, why. A subject whose ``unavailable`` is set is returned too: the
    runner shows it as a row that says why, and does not run it. ``meter`` adds
    ``pool[otel]``, this pool with an OpenTelemetry meter provider.
    """
    scheme = normalise_scheme(url)
    subjects: list[Subject] = [Ours(url), Limit(url)]
    if meter:
        subjects.insert(1, OursMeter(url))
    if "lfl" in styles:
        subjects.insert(1, OursReset(url))
    skipped: dict[str, str] = {}
    if not peers:
        return [s for s in subjects if not isinstance(s, OursReset)], skipped
    # A URL that names its driver (postgresql+psycopg://) asks for like for
    # like: the peers lending that driver's connections, when there are some.
    named = url.split("://", 1)[0].lower().partition("+")[2]
    same = {p for p in PEERS if named and scheme in p.schemes and p.driver_name == named}
    for peer in PEERS:
        if scheme not in peer.schemes or peer.style not in styles:
            continue
        if same and peer not in same:
            skipped[peer.name] = f"lends {peer.driver_name}'s connections, not {named}'s"
            continue
        missing = _missing(peer.modules)
        if missing:
            # the SQLite peers are the main job's (the bench extra); the others, bench-full's
            extra = "bench" if scheme == "sqlite" else "bench-full"
            skipped[peer.name] = (
                f"not installed ({', '.join(missing)}): pip install 'pool-engine[{extra}]'"
            )
            continue
        if scheme == "sqlite" and sqlite_path(url) is None:
            skipped[peer.name] = "an in-memory database is the pool's own: use a file URL"
            continue
        subjects.append(peer(url))
    return subjects, skipped


def stub_subjects(*, connect_delay: float = 0.0) -> list[Subject]:
    """This pool and the raw limit on the stub driver: no server at all."""
    return [
        Ours("stub://bench", driver=StubDriver(connect_delay=connect_delay)),
        Limit("stub://bench", driver=StubDriver(connect_delay=connect_delay)),
    ]
