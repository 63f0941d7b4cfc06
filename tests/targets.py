"""The real databases the conformance suite runs on, each through each of its drivers.

A target is named by its database, and by its driver when that is not the
database's default: ``postgres`` (asyncpg), ``postgres+psycopg``, ``mysql``
(aiomysql), ``mysql+asyncmy``, ``sqlite``. Each knows how to count, from the
server's side, the connections a test's pool holds, and how to kill one of them
on the server.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import psutil

from tests import servers


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> bool:
    """Poll ``check`` until it is true (a server-side condition), or time out."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.02)


#: every server target: each database through each of its drivers, the default first
POSTGRES_TARGETS = ("postgres", "postgres+psycopg")
MYSQL_TARGETS = ("mysql", "mysql+asyncmy")
SERVER_TARGETS = (*POSTGRES_TARGETS, *MYSQL_TARGETS)
ALL_TARGETS = (*SERVER_TARGETS, "sqlite")


@dataclass
class Target:
    #: the database, then "+driver" when the driver is not the default
    name: str
    #: the URL a test's pool uses: tagged so the server can tell its connections apart
    url: str = field(repr=False)
    #: the SQL placeholder for the first argument
    placeholder: str
    #: a query that returns its one integer argument
    select_arg: str = "SELECT ?"
    _admin: Any = field(default=None, repr=False)
    _tag: str = ""

    @property
    def database(self) -> str:
        """``postgres``, ``mysql`` or ``sqlite``, whatever the driver."""
        return self.name.partition("+")[0]

    @property
    def driver(self) -> str:
        """The driver library: asyncpg, psycopg, aiomysql, asyncmy or sqlite3."""
        default = {"postgres": "asyncpg", "mysql": "aiomysql", "sqlite": "sqlite3"}
        return self.name.partition("+")[2] or default[self.database]

    async def start(self) -> None:
        if self.database == "postgres":
            import asyncpg

            self._admin = await asyncpg.connect(servers.POSTGRES_URL)
        elif self.database == "mysql":
            import aiomysql

            admin = urlsplit(servers.MYSQL_ADMIN_URL)
            self._admin = await aiomysql.connect(
                host=admin.hostname, port=admin.port or 3306, user=admin.username,
                password=admin.password or "", db="test", autocommit=True,
            )
            # Sessions of earlier tests' pools may still be going away.
            await eventually(lambda: self._count_is(0))

    async def stop(self) -> None:
        if self._admin is not None:
            if self.database == "postgres":
                await self._admin.close()
            else:
                self._admin.close()

    @property
    def counts_server_side(self) -> bool:
        return self.name != "sqlite"

    async def server_count(self) -> int:
        """How many connections the server sees from this test's pool."""
        if self.database == "postgres":
            return int(await self._admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", self._tag
            ))
        if self.database == "mysql":
            async with self._admin.cursor() as cur:
                await cur.execute(
                    "SELECT COUNT(*) FROM information_schema.processlist WHERE USER = 'pool_test'"
                )
                (count,) = await cur.fetchone()
                return int(count)
        raise AssertionError("sqlite has no server to ask")

    async def _count_is(self, expected: int) -> bool:
        return await self.server_count() == expected

    async def settles_at(self, expected: int) -> bool:
        """The server's count reaches ``expected`` (closing is asynchronous on the server)."""
        return await eventually(lambda: self._count_is(expected))

    async def session_id(self, conn: Any) -> int:
        """The server's id of ``conn``'s session (a backend pid, a thread id)."""
        if self.name == "postgres":
            return int(await conn.fetchval("SELECT pg_backend_pid()"))
        if self.name == "postgres+psycopg":
            cur = await conn.execute("SELECT pg_backend_pid()")
            (pid,) = await cur.fetchone()
            return int(pid)
        if self.database == "mysql":
            return int(conn.thread_id())  # aiomysql's and asyncmy's alike
        return id(conn)

    async def kill(self, session: int) -> None:
        """Kill one session on the server, and wait until the server says it is gone."""
        if self.database == "postgres":
            await self._admin.execute("SELECT pg_terminate_backend($1)", session)

            async def gone() -> bool:
                # The server lists the session as gone a moment before the backend
                # exits and its socket closes: wait for the process itself.
                return not psutil.pid_exists(session) and not await self._admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", session
                )
        else:
            async with self._admin.cursor() as cur:
                await cur.execute(f"KILL {int(session)}")

            async def gone() -> bool:
                async with self._admin.cursor() as cur:
                    await cur.execute(
                        "SELECT COUNT(*) FROM information_schema.processlist WHERE ID = %s",
                        (session,),
                    )
                    (n,) = await cur.fetchone()
                    return int(n) == 0
        assert await eventually(gone)


def make_target(name: str, tmp_path: Path) -> Target:
    """The target ``name`` (one of ``ALL_TARGETS``) for one test."""
    tag = f"pooltest_{uuid.uuid4().hex[:10]}"
    database, _, driver = name.partition("+")
    if database == "postgres":
        servers.require(servers.POSTGRES_URL, "PostgreSQL")
        sep = "&" if "?" in servers.POSTGRES_URL else "?"
        url = f"{servers.POSTGRES_URL}{sep}application_name={tag}"
        if driver:
            url = servers.with_driver(url, driver)
        # asyncpg numbers its placeholders; psycopg takes %s
        mark = "%s" if driver == "psycopg" else "$1"
        return Target(name, url, mark, select_arg=f"SELECT {mark}::int", _tag=tag)
    if database == "mysql":
        servers.require(servers.MYSQL_URL, "MariaDB")
        url = servers.with_driver(servers.MYSQL_URL, driver) if driver else servers.MYSQL_URL
        return Target(name, url, "%s", select_arg="SELECT %s", _tag=tag)
    assert name == "sqlite", f"no target {name!r}"
    return Target(name, f"sqlite:///{tmp_path / 'conformance.db'}", "?", _tag=tag)
