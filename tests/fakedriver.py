"""A deterministic in-memory driver for the engine's ordering logic.

It is never the only proof of a guarantee: every behaviour tested here is also
tested against a real server. It lets a test open the gate of a connect, make a
connect fail, or kill a connection, exactly when it wants.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import anyio


class FakeConnection:
    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.alive = True
        self.in_tx = False
        self.committed: list[str] = []
        self.pending: list[str] = []
        self.queries = 0

    def __repr__(self) -> str:
        return f"<FakeConnection {self.id}{'' if self.alive else ' dead'}>"


class FakeDriver:
    scheme = "fake"

    def __init__(self) -> None:
        self.connects = 0
        self.attempts = 0
        self.closed: list[FakeConnection] = []
        self.fail_connect: BaseException | None = None
        #: when set, connect() waits for it: the test decides when opening ends
        self.gate: anyio.Event | None = None
        self.query_gate: anyio.Event | None = None
        self.ping_fails = False
        #: seconds each connect takes (models a slow network or TLS handshake)
        self.connect_delay = 0.0
        self.pings = 0

    async def connect(self) -> FakeConnection:
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        elif self.connect_delay:
            await anyio.sleep(self.connect_delay)
        else:
            await anyio.lowlevel.checkpoint()
        if self.fail_connect is not None:
            raise self.fail_connect
        self.connects += 1
        return FakeConnection()

    async def close(self, conn: FakeConnection) -> None:
        self.terminate(conn)

    def terminate(self, conn: FakeConnection) -> None:
        if conn.alive:
            conn.alive = False
            self.closed.append(conn)

    def is_alive(self, conn: FakeConnection) -> bool:
        return conn.alive

    async def ping(self, conn: FakeConnection) -> None:
        self.pings += 1
        await anyio.lowlevel.checkpoint()
        if self.ping_fails or not conn.alive:
            raise ConnectionError("connection is gone")

    def in_transaction(self, conn: FakeConnection) -> bool:
        return conn.in_tx

    async def begin(self, conn: FakeConnection) -> None:
        conn.in_tx = True

    async def commit(self, conn: FakeConnection) -> None:
        conn.committed += conn.pending
        conn.pending = []
        conn.in_tx = False

    async def rollback(self, conn: FakeConnection) -> None:
        conn.pending = []
        conn.in_tx = False

    async def _run(self, conn: FakeConnection, sql: str) -> None:
        if not conn.alive:
            raise ConnectionError("connection is gone")
        conn.queries += 1
        if self.query_gate is not None:
            await self.query_gate.wait()
        else:
            await anyio.lowlevel.checkpoint()
        if conn.in_tx:
            conn.pending.append(sql)
        else:
            conn.committed.append(sql)

    async def fetch(
        self, conn: FakeConnection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> list[Any]:
        await self._run(conn, sql)
        return [(conn.id, *args)]

    async def fetchrow(
        self, conn: FakeConnection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        await self._run(conn, sql)
        return (conn.id, *args)

    async def fetchval(
        self, conn: FakeConnection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        await self._run(conn, sql)
        return conn.id

    async def execute(
        self, conn: FakeConnection, sql: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        await self._run(conn, sql)
        return "OK"

    async def executemany(
        self,
        conn: FakeConnection,
        sql: str,
        args_iterable: Iterable[Sequence[Any]],
        timeout: float | None = None,
    ) -> None:
        for _ in args_iterable:
            await self._run(conn, sql)

    async def server_max_connections(self, conn: FakeConnection) -> int | None:
        return None
