"""One small backend per pool, the code an app would write: acquire, query, release.

Every backend answers the same two calls with the library's own API:
:meth:`Backend.one` (acquire a connection, run one query, release it) and
:meth:`Backend.many` (acquire one connection, run the queries on it one after
another, release it). Each opens ``size`` connections when the app starts.

The subjects mirror :mod:`pool_benchmarks._peers`: each peer with its defaults, and
like-for-like (``[lfl]``) set up to make this pool's round trips (one per
statement, nothing on release, no BEGIN/COMMIT). ``pool[reset]`` is this pool
with ``reset_session=true``, a reset on every release like asyncpg's default.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import pool

from .._peers import _NoResetConnection, driver_of

__all__ = ["BACKENDS", "Backend", "ROW_SQL", "backend_for"]

#: asyncpg's placeholders; psycopg and SQLAlchemy spell them their own way
ROW_SQL = "SELECT id, randomnumber FROM world WHERE id = $1"
Row = tuple[int, int]
Style = Literal["default", "lfl", "both"]


def _plain_dsn(url: str, scheme: str = "postgresql") -> str:
    """``url`` without its query string (this pool's settings), under ``scheme``."""
    parts = urlsplit(url)
    return f"{scheme}://{parts.netloc}{parts.path}"


class Backend(abc.ABC):
    name: ClassVar[str]
    style: ClassVar[Style] = "default"
    package: ClassVar[str] = ""
    note: ClassVar[str] = ""

    def __init__(self, url: str, size: int) -> None:
        self.url = url  # may hold a password: never print it
        self.size = size

    @abc.abstractmethod
    async def open(self) -> None:
        """Build the pool and open its ``size`` connections."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def one(self, row_id: int) -> Row:
        """Acquire a connection, fetch one row, release."""

    @abc.abstractmethod
    async def many(self, row_ids: Sequence[int]) -> list[Row]:
        """Acquire one connection, fetch each row on it in turn, release."""


# ---------------------------------------------------------------------- this pool


class Ours(Backend):
    name = "pool"
    style: ClassVar[Style] = "both"
    package = "pool"
    note = (
        "pool: pool.Pool(url, connection_limit=N) with its defaults; a release sends "
        "nothing to the server (a default and a like-for-like row)."
    )
    extra: ClassVar[dict[str, Any]] = {}

    db: pool.Pool[Any]

    def __init__(self, url: str, size: int) -> None:
        super().__init__(url, size)
        # postgresql+psycopg://: this pool lends psycopg's connections, queried
        # as psycopg's users do (as the psycopg_pool backend does)
        self.psycopg = driver_of(url) == "psycopg"

    async def open(self) -> None:
        db = self.db = pool.Pool(self.url, connection_limit=self.size, **self.extra)
        conns = [await db.acquire() for _ in range(self.size)]
        for conn in conns:
            await db.release(conn)

    async def close(self) -> None:
        await self.db.disconnect()

    async def one(self, row_id: int) -> Row:
        async with self.db.acquire() as conn:
            if self.psycopg:
                cur = await conn.execute(_PSYCOPG_SQL, (row_id,))
                row = await cur.fetchone()
            else:
                row = await conn.fetchrow(ROW_SQL, row_id)
        return row[0], row[1]

    async def many(self, row_ids: Sequence[int]) -> list[Row]:
        out = []
        async with self.db.acquire() as conn:
            for row_id in row_ids:
                if self.psycopg:
                    cur = await conn.execute(_PSYCOPG_SQL, (row_id,))
                    row = await cur.fetchone()
                else:
                    row = await conn.fetchrow(ROW_SQL, row_id)
                out.append((row[0], row[1]))
        return out


class OursLazy(Ours):
    """This pool as a service builds it: nothing opened at start (Prisma's lazy connect).

    For benchmarks.host_budget: workers that each open their limit at start would
    wait on one another for the host budget's slots before serving anything.
    Not one of the compared subjects (not in BACKENDS).
    """

    name = "pool[lazy]"
    note = "pool[lazy]: pool.Pool(url, connection_limit=N), nothing opened before a request."

    async def open(self) -> None:
        self.db = pool.Pool(self.url, connection_limit=self.size, **self.extra)


class OursReset(Ours):
    name = "pool[reset]"
    style: ClassVar[Style] = "default"
    note = (
        "pool[reset]: the same with reset_session=true: a reset batch on every "
        "release, as asyncpg's default pool sends."
    )
    extra: ClassVar[dict[str, Any]] = {"reset_session": True}


# ---------------------------------------------------------------------- asyncpg


class Asyncpg(Backend):
    name = "asyncpg"
    package = "asyncpg"
    note = (
        "asyncpg: asyncpg.create_pool(min_size=N, max_size=N), other defaults: a reset "
        "batch (advisory unlock, CLOSE ALL, UNLISTEN *, RESET ALL) on every release."
    )
    no_reset: ClassVar[bool] = False

    def __init__(self, url: str, size: int) -> None:
        super().__init__(url, size)
        self._pool: Any = None

    async def open(self) -> None:
        import asyncpg

        extra: dict[str, Any] = {}
        if self.no_reset:
            extra["connection_class"] = _NoResetConnection.get()
        self._pool = await asyncpg.create_pool(
            _plain_dsn(self.url), min_size=self.size, max_size=self.size, **extra
        )

    async def close(self) -> None:
        await self._pool.close()

    async def one(self, row_id: int) -> Row:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(ROW_SQL, row_id)
        return row[0], row[1]

    async def many(self, row_ids: Sequence[int]) -> list[Row]:
        out = []
        async with self._pool.acquire() as conn:
            for row_id in row_ids:
                row = await conn.fetchrow(ROW_SQL, row_id)
                out.append((row[0], row[1]))
        return out


class AsyncpgNoReset(Asyncpg):
    name = "asyncpg[lfl]"
    style = "lfl"
    no_reset = True
    note = (
        "asyncpg[lfl]: create_pool(connection_class=a Connection whose get_reset_query() "
        "is empty): nothing sent on release."
    )


# ---------------------------------------------------------------------- psycopg_pool

_PSYCOPG_SQL = ROW_SQL.replace("$1", "%s")


class PsycopgPool(Backend):
    name = "psycopg_pool"
    package = "psycopg-pool"
    note = (
        "psycopg_pool: AsyncConnectionPool(min_size=N, max_size=N), defaults: each "
        "request's queries run inside BEGIN ... COMMIT."
    )
    autocommit: ClassVar[bool] = False

    def __init__(self, url: str, size: int) -> None:
        super().__init__(url, size)
        self._pool: Any = None

    async def open(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        extra: dict[str, Any] = {}
        if self.autocommit:
            extra["kwargs"] = {"autocommit": True}
        self._pool = AsyncConnectionPool(
            _plain_dsn(self.url), min_size=self.size, max_size=self.size, open=False, **extra
        )
        await self._pool.open(wait=True)

    async def close(self) -> None:
        await self._pool.close()

    async def one(self, row_id: int) -> Row:
        async with self._pool.connection() as conn:
            cur = await conn.execute(_PSYCOPG_SQL, (row_id,))
            row = await cur.fetchone()
        return row[0], row[1]

    async def many(self, row_ids: Sequence[int]) -> list[Row]:
        out = []
        async with self._pool.connection() as conn:
            for row_id in row_ids:
                cur = await conn.execute(_PSYCOPG_SQL, (row_id,))
                row = await cur.fetchone()
                out.append((row[0], row[1]))
        return out


class PsycopgPoolAutocommit(PsycopgPool):
    name = "psycopg_pool[lfl]"
    style = "lfl"
    autocommit = True
    note = "psycopg_pool[lfl]: kwargs={'autocommit': True}: no BEGIN/COMMIT."


# ---------------------------------------------------------------------- SQLAlchemy


class SQLAlchemy(Backend):
    name = "sqlalchemy"
    package = "SQLAlchemy"
    note = (
        "sqlalchemy: create_async_engine('postgresql+asyncpg://...', pool_size=N, "
        "max_overflow=0), defaults: BEGIN on the first query, ROLLBACK on return."
    )
    autocommit: ClassVar[bool] = False

    def __init__(self, url: str, size: int) -> None:
        super().__init__(url, size)
        self._engine: Any = None
        self._stmt: Any = None

    async def open(self) -> None:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        extra: dict[str, Any] = {}
        if self.autocommit:
            extra["isolation_level"] = "AUTOCOMMIT"
            extra["pool_reset_on_return"] = None
        self._engine = create_async_engine(
            _plain_dsn(self.url, "postgresql+asyncpg"),
            pool_size=self.size,
            max_overflow=0,
            **extra,
        )
        self._stmt = text(ROW_SQL.replace("$1", ":id"))
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(self.size):
                await stack.enter_async_context(self._engine.connect())

    async def close(self) -> None:
        await self._engine.dispose()

    async def one(self, row_id: int) -> Row:
        async with self._engine.connect() as conn:
            row = (await conn.execute(self._stmt, {"id": row_id})).first()
        return row[0], row[1]

    async def many(self, row_ids: Sequence[int]) -> list[Row]:
        out = []
        async with self._engine.connect() as conn:
            for row_id in row_ids:
                row = (await conn.execute(self._stmt, {"id": row_id})).first()
                out.append((row[0], row[1]))
        return out


class SQLAlchemyAutocommit(SQLAlchemy):
    name = "sqlalchemy[lfl]"
    style = "lfl"
    autocommit = True
    note = (
        "sqlalchemy[lfl]: isolation_level='AUTOCOMMIT', pool_reset_on_return=None: "
        "the statements alone, nothing on return."
    )


BACKENDS: dict[str, type[Backend]] = {
    b.name: b
    for b in (
        Ours, OursReset, Asyncpg, AsyncpgNoReset, PsycopgPool, PsycopgPoolAutocommit,
        SQLAlchemy, SQLAlchemyAutocommit,
    )
}


def backend_for(name: str, url: str, size: int) -> Backend:
    try:
        cls = BACKENDS[name] if name != OursLazy.name else OursLazy
    except KeyError:
        raise ValueError(f"unknown subject {name!r}; one of {', '.join(BACKENDS)}") from None
    return cls(url, size)
