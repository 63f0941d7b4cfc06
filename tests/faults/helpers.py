"""Looking at the fault cluster from the server's side, and judging errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import asyncpg
import psutil
import psycopg

import pool
from tests.targets import eventually

if TYPE_CHECKING:
    from tests.faults.conftest import FaultDB

#: what a query may raise when its backend is killed or the server goes away:
#: the driver's own errors, never the pool's. asyncpg raises InternalClientError
#: ("another operation (2) is in progress") for a query sent on a connection that
#: has read the server's FATAL but not yet its end of stream. psycopg raises
#: its OperationalError (a SQLSTATE 57P01, or none for a lost socket).
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    psycopg.Error,
    ConnectionError,
    OSError,
)


def is_driver_error(exc: BaseException) -> bool:
    return isinstance(exc, DRIVER_ERRORS) and not isinstance(exc, pool.PoolError)


class Admin:
    """A plain asyncpg connection (no application_name) for the tests' own queries."""

    def __init__(self, conn: Any, tag: str) -> None:
        self.conn = conn
        self.tag = tag

    @classmethod
    @asynccontextmanager
    async def connect(cls, cluster: FaultDB, tag: str) -> AsyncIterator[Admin]:
        # The URL stays a local: a failure report prints arguments, not locals.
        conn = await asyncpg.connect(cluster.url)
        try:
            yield cls(conn, tag)
        finally:
            await conn.close()

    async def count(self) -> int:
        """How many connections the server sees from the test's pool."""
        return int(await self.conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", self.tag
        ))

    async def pids(self, *, older_than: float = 0.0) -> list[int]:
        """The backend pids of the test's pool, of connections older than ``older_than`` s."""
        rows = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
            " AND backend_start < clock_timestamp() - make_interval(secs => $2)",
            self.tag,
            older_than,
        )
        return [int(row["pid"]) for row in rows]

    async def terminate(self, pids: Sequence[int]) -> list[int]:
        """pg_terminate_backend each of ``pids``; returns the ones the server signalled."""
        rows = await self.conn.fetch(
            "SELECT pid FROM unnest($1::int[]) AS pid WHERE pg_terminate_backend(pid)", list(pids)
        )
        return [int(row["pid"]) for row in rows]

    async def settles_at(self, expected: int, timeout: float = 5.0) -> bool:
        """The server's count reaches ``expected`` (closing is asynchronous)."""

        async def reached() -> bool:
            return await self.count() == expected

        return await eventually(reached, timeout)

    async def all_gone(self, pids: Sequence[int], timeout: float = 5.0) -> bool:
        """Every one of ``pids`` has left pg_stat_activity, and its process has exited."""

        async def gone() -> bool:
            listed = await self.conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids)
            )
            return not listed and not any(psutil.pid_exists(pid) for pid in pids)

        return await eventually(gone, timeout)
