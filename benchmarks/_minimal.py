"""The floor: a direct-handoff FIFO pool in a few lines, with none of the guarantees.

It hands a released connection straight to the oldest waiting future, and
that is all: no timeout, no diagnosis, no cancellation check after a handoff,
no health checks, no growth, no disconnect. It shows what the handoff itself
costs on asyncio, so that what this pool spends beyond it can be measured
(``pool_benchmarks.instructions`` and ``pool_benchmarks.floor``). Not a peer: nobody
should run a service on it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import Any

__all__ = ["MinimalPool"]


class MinimalPool:
    """``async with pool.acquire() as conn``: FIFO, direct handoff, nothing more."""

    def __init__(self, conns: list[Any]) -> None:
        self.idle = list(conns)
        self.waiters: deque[asyncio.Future[Any]] = deque()

    def acquire(self) -> _Lease:
        return _Lease(self)

    async def take(self) -> Any:
        if self.idle and not self.waiters:
            return self.idle.pop()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        try:
            return await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.give(future.result())  # handed one as it was cancelled: pass it on
            else:
                self.waiters.remove(future)
            raise

    def give(self, conn: Any) -> None:
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_result(conn)
                return
        self.idle.append(conn)


class _Lease:
    __slots__ = ("conn", "pool")

    def __init__(self, pool: MinimalPool) -> None:
        self.pool = pool

    async def __aenter__(self) -> Any:
        self.conn = await self.pool.take()
        return self.conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.pool.give(self.conn)
