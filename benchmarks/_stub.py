"""A driver whose every operation returns at once: the pool's own cost, with no server.

Like HikariCP's stub JDBC driver: ``pool.Pool("stub://bench", driver=StubDriver())``
measures the engine alone. Its coroutines never suspend, so an acquire or a
release through it costs exactly what the engine does around the driver call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import anyio

__all__ = ["StubConnection", "StubDriver"]


class StubConnection:
    """A connection that answers every query with ``1``, at once."""

    __slots__ = ("closed", "in_tx")

    def __init__(self) -> None:
        self.closed = False
        self.in_tx = False

    async def fetchval(self, sql: str, *args: Any) -> int:
        return 1


class StubDriver:
    """Satisfies :class:`pool.Driver` with no I/O at all.

    ``connect_delay`` (seconds) makes opening a connection take that long, for
    the spike workload on a database with no TCP server (none by default).
    """

    scheme = "stub"

    def __init__(self, *, connect_delay: float = 0.0) -> None:
        self.connect_delay = connect_delay
        #: connections opened, in all
        self.opened = 0

    async def connect(self) -> StubConnection:
        if self.connect_delay:
            await anyio.sleep(self.connect_delay)
        self.opened += 1
        return StubConnection()

    async def close(self, conn: StubConnection) -> None:
        conn.closed = True

    def terminate(self, conn: StubConnection) -> None:
        conn.closed = True

    def is_alive(self, conn: StubConnection) -> bool:
        return not conn.closed

    def is_clean(self, conn: StubConnection) -> bool:
        return not conn.closed and not conn.in_tx

    async def ping(self, conn: StubConnection) -> None:
        return None

    def in_transaction(self, conn: StubConnection) -> bool:
        return conn.in_tx

    async def begin(self, conn: StubConnection) -> None:
        conn.in_tx = True

    async def commit(self, conn: StubConnection) -> None:
        conn.in_tx = False

    async def rollback(self, conn: StubConnection) -> None:
        conn.in_tx = False

    async def fetch(
        self, conn: StubConnection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> list[Any]:
        return [(1,)]

    async def fetchrow(
        self, conn: StubConnection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any | None:
        return (1,)

    async def fetchval(
        self, conn: StubConnection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        return 1

    async def execute(
        self, conn: StubConnection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        return "SELECT 1"

    async def executemany(
        self,
        conn: StubConnection,
        sql: str,
        args_iterable: Iterable[Sequence[Any]],
        timeout: float | None = None,
    ) -> None:
        return None

    async def server_max_connections(self, conn: StubConnection) -> int | None:
        return None
