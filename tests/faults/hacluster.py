"""The two-node failover cluster (``scripts/hacluster``) and the scenarios run on it.

Shared by ``tests/faults/test_failover.py`` (which asserts) and
``tests/faults/failover_figures.py`` (which repeats and summarises). A
scenario runs on its own event loop, plain asyncio or uvloop, through
:func:`run_on`; every time it records is wall-clock (``time.time()``), the
clock of the servers' logs that ``scripts/hacluster`` reads.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import asyncpg

import pool
from tests import servers

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "hacluster"
#: the node that is the primary after ``reset``, and its standby
FIRST, SECOND = 5440, 5441
LOOPS = ("asyncio", "uvloop")
#: trust auth ignores the password; it is there so that the secrets checks cover these tests
SECRET = servers.SECRET
TABLE = "ha_writes"
#: the write, in each PostgreSQL driver's placeholders
INSERT = {
    driver: f"INSERT INTO {TABLE} (id) VALUES ({mark}) RETURNING inet_server_port()"
    for driver, mark in (("asyncpg", "$1"), ("psycopg", "%s"))
}

T = TypeVar("T")


def run_on(loop: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` on a fresh event loop: plain asyncio's, or uvloop's."""
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def new_tag() -> str:
    """An application_name that tells one scenario's connections apart on the server."""
    return f"ha_{uuid.uuid4().hex[:10]}"


def node_url(port: int, **params: object) -> str:
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/postgres{query}"


def multi_url(
    tag: str, hosts: tuple[int, ...] = (FIRST, SECOND), driver: str = "asyncpg", **params: object
) -> str:
    """The pool's URL: every node, the read-write one wanted (as the issue's example)."""
    settings: dict[str, object] = {
        "target_session_attrs": "read-write",
        "connection_limit": 10,
        "connect_timeout": 1,
        "pool_timeout": 5,
        "application_name": tag,
    }
    settings.update(params)
    netloc = ",".join(f"127.0.0.1:{port}" for port in hosts)
    url = f"postgresql://postgres:{SECRET}@{netloc}/postgres?{urlencode(settings)}"
    return servers.with_driver(url, driver)


@dataclass(frozen=True)
class Failover:
    """What ``scripts/hacluster switchover|crash`` reported, from the servers' logs."""

    how: str
    old: int
    new: int
    no_primary_since: float
    primary_since: float
    #: how long the script ran
    script_seconds: float

    @property
    def no_primary_seconds(self) -> float:
        return self.primary_since - self.no_primary_since


class Unavailable(RuntimeError):
    """The cluster cannot be built or driven here."""


@dataclass
class HACluster:
    """``scripts/hacluster``, run as a subprocess."""

    script: Path = SCRIPT

    def run(self, command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.script), command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def must(self, command: str, timeout: float = 60.0) -> dict[str, str]:
        """Run ``command``; its ``key=value`` lines. Raises :class:`Unavailable` on failure."""
        if not self.script.exists():
            raise Unavailable(f"{self.script} is missing")
        try:
            result = self.run(command, timeout)
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"scripts/hacluster {command} took over {timeout}s") from exc
        if result.returncode != 0:
            raise Unavailable(
                f"scripts/hacluster {command} failed: {result.stderr.strip()[-800:]}"
            )
        return dict(
            line.split("=", 1) for line in result.stdout.splitlines() if "=" in line
        )

    def reset(self) -> float:
        """The known state: primary on 5440, standby on 5441, streaming. Returns the seconds."""
        started = time.monotonic()
        self.must("reset")
        return time.monotonic() - started

    def failover(self, how: str) -> Failover:
        """``switchover`` or ``crash``."""
        started = time.monotonic()
        out = self.must(how)
        return Failover(
            how=how,
            old=int(out["old_primary"]),
            new=int(out["new_primary"]),
            no_primary_since=float(out["no_primary_since"]),
            primary_since=float(out["primary_since"]),
            script_seconds=time.monotonic() - started,
        )

    def rebuild(self) -> float | None:
        """Make the old primary a standby; when it started the node: since when it accepts."""
        out = self.must("rebuild")
        since = out.get("accepting_since")
        return float(since) if since else None


# ---------------------------------------------------------------- the server's side


async def admin(port: int) -> Any:
    return await asyncpg.connect(node_url(port), timeout=5)


async def count_backends(port: int, tag: str) -> int:
    conn = await admin(port)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", tag
        ))
    finally:
        await conn.close()


async def settles_at(port: int, tag: str, expected: int, timeout: float = 5.0) -> int:
    """Poll the server's count of ``tag``'s backends until it is ``expected``; the last count."""
    deadline = time.monotonic() + timeout
    while True:
        count = await count_backends(port, tag)
        if count == expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.02)


async def fresh_table(port: int) -> None:
    conn = await admin(port)
    try:
        # No primary key: a duplicate must be visible, not refused.
        await conn.execute(
            f"DROP TABLE IF EXISTS {TABLE};"
            f" CREATE TABLE {TABLE} (id bigint NOT NULL, at timestamptz DEFAULT clock_timestamp())"
        )
    finally:
        await conn.close()


async def stored_ids(port: int) -> list[int]:
    conn = await admin(port)
    try:
        return [int(r["id"]) for r in await conn.fetch(f"SELECT id FROM {TABLE}")]
    finally:
        await conn.close()


# ---------------------------------------------------------------- writes through a failover


@dataclass
class Write:
    """One insert, as the client saw it. Times are ``time.time()``."""

    id: int
    started: float
    #: when the pool lent the connection (nan: it lent none)
    lent_at: float
    ended: float
    #: the server the lent connection was on (the driver's host_of); None: no connection
    port: int | None
    #: what ``inet_server_port()`` returned: the insert committed there
    server_port: int | None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class WriteRun:
    """One scenario: 100 writers while the cluster fails over."""

    loop: str
    failover: Failover
    writes: list[Write]
    stored: list[int]
    stats: pool.PoolStats
    #: the server's count of the pool's backends on the new primary, once it settled
    server_count: int
    #: the ports of the pool's connections (by the server), at the end
    seconds: float
    errors: dict[str, int] = field(default_factory=dict)

    def _on(self, port: int) -> list[Write]:
        return [w for w in self.writes if w.port == port]

    @cached_property
    def acked(self) -> list[Write]:
        return [w for w in self.writes if w.ok]

    @cached_property
    def last_old_success(self) -> float:
        return max(w.ended for w in self.acked if w.server_port == self.failover.old)

    @cached_property
    def first_new_success(self) -> float:
        return min(w.ended for w in self.acked if w.server_port == self.failover.new)

    @cached_property
    def first_old_failure(self) -> float:
        return min(
            (w.ended for w in self.writes if not w.ok and w.port == self.failover.old),
            default=math.inf,
        )

    @property
    def unavailability(self) -> float:
        """No successful write, less the time the cluster itself had no primary."""
        return (
            self.first_new_success - self.last_old_success - self.failover.no_primary_seconds
        )

    @property
    def resumed_after_promotion(self) -> float:
        """From the new primary accepting writes to the pool's first write there."""
        return self.first_new_success - self.failover.primary_since

    @cached_property
    def lent_to_old_after_failure(self) -> list[Write]:
        """Connections to the old primary lent after the first write there failed."""
        first = self.first_old_failure
        return [w for w in self._on(self.failover.old) if w.lent_at > first]

    @cached_property
    def lost(self) -> set[int]:
        """Acknowledged writes missing from the new primary."""
        return {w.id for w in self.acked} - set(self.stored)

    @property
    def duplicates(self) -> int:
        return len(self.stored) - len(set(self.stored))

    def summary(self) -> dict[str, Any]:
        return {
            "how": self.failover.how,
            "loop": self.loop,
            "writes": len(self.writes),
            "acked": len(self.acked),
            "failed": len(self.writes) - len(self.acked),
            "errors": self.errors,
            "lost": len(self.lost),
            "duplicates": self.duplicates,
            "no_primary_seconds": round(self.failover.no_primary_seconds, 4),
            "no_write_seconds": round(self.first_new_success - self.last_old_success, 4),
            "unavailability_seconds": round(self.unavailability, 4),
            "resumed_after_promotion_seconds": round(self.resumed_after_promotion, 4),
            "lent_to_old_after_failure": len(self.lent_to_old_after_failure),
            "failover_script_seconds": round(self.failover.script_seconds, 3),
            "pool_size": self.stats.size,
            "server_count": self.server_count,
            "seconds": round(self.seconds, 2),
        }


WRITERS = 100


async def writes_through_failover(
    cluster: HACluster,
    how: str,
    loop: str,
    *,
    driver: str = "asyncpg",
    seen: Callable[[object], None] | None = None,
) -> WriteRun:
    """100 tasks insert unique ids through a multi-host pool while the cluster fails over."""
    started = time.monotonic()
    await fresh_table(FIRST)
    tag = new_tag()
    db: pool.Pool[Any] = pool.Pool(multi_url(tag, driver=driver))
    insert = INSERT[driver]
    if seen is not None:
        seen(db)
    ids = itertools.count(1)
    writes: list[Write] = []
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            i = next(ids)
            began = time.time()
            lent_at = math.nan
            port: int | None = None
            try:
                async with db.acquire() as conn:
                    lent_at = time.time()
                    port = int(db._driver.host_of(conn).rpartition(":")[2])
                    server_port = await db._driver.fetchval(conn, insert, (i,))
            except Exception as exc:
                writes.append(Write(i, began, lent_at, time.time(), port, None, exc))
                # a client pauses before it retries: a failure returns at once
                await asyncio.sleep(0.01)
            else:
                writes.append(Write(i, began, lent_at, time.time(), port, int(server_port)))

    failover: Failover | None = None
    try:
        await db.connect()
        tasks = [asyncio.create_task(writer()) for _ in range(WRITERS)]
        try:
            await asyncio.sleep(0.5)  # warm: the pool is full and busy
            failover = await asyncio.to_thread(cluster.failover, how)
            # until a second of writes on the new primary, within a bound
            deadline = time.monotonic() + 8.0
            while time.monotonic() < deadline and not any(
                w.ok and w.server_port == failover.new for w in writes
            ):
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            _done, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert not pending, f"{len(pending)} writers did not stop within 10 s (a hang)"
        stats = db.stats()
        server_count = await settles_at(failover.new, tag, stats.size)
        stored = await stored_ids(failover.new)
    finally:
        await db.disconnect()
    errors: dict[str, int] = {}
    for w in writes:
        if w.error is not None:
            name = type(w.error).__name__
            errors[name] = errors.get(name, 0) + 1
            if seen is not None and errors[name] == 1:
                seen(w.error)
    assert failover is not None
    return WriteRun(
        loop=loop,
        failover=failover,
        writes=writes,
        stored=stored,
        stats=stats,
        server_count=server_count,
        seconds=time.monotonic() - started,
        errors=errors,
    )


# ---------------------------------------------------------------- a silent host


@contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never answers: a host that hangs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def closed_port() -> int:
    """A port nobody listens on (refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def in_ci() -> bool:
    return bool(os.environ.get("CI"))
