"""Issue 18 on a real PostgreSQL: a cancelled disconnect, and a pool never disconnected.

Fault 2: ``asyncio.wait_for(db.disconnect(grace=5), ...)`` while a connection
is held left it lent in a closed pool; released, it went back idle, and the
reopened pool with ``connection_limit=1`` ran two backends. The leak: a pool
never disconnected, on an event loop closed without cancelling its tasks,
kept its sessions open after ``gc.collect()`` (anyio's task-state table kept
the upkeep task, and the task the pool). Both on asyncio and uvloop; the
server's own count (pg_stat_activity, by application_name) is the proof.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import uvloop

import pool
from tests.faults.conftest import FaultDB, new_tag

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]

ASYNCIO_LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"loop_factory": uvloop.new_event_loop}), id="uvloop"),
]


async def backends(faultdb: FaultDB, tag: str) -> int:
    admin = await asyncpg.connect(faultdb.url)
    try:
        return int(await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", tag
        ))
    finally:
        await admin.close()


async def cancel_disconnect(how: str, call: Callable[[], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    if how == "wait_for":
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call(), 0.05)
    elif how == "asyncio.timeout":
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await call()
    else:
        task = loop.create_task(call())  # type: ignore[arg-type]
        loop.call_later(0.05, task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("anyio_backend", ASYNCIO_LOOPS)
@pytest.mark.parametrize("how", ["wait_for", "task.cancel", "asyncio.timeout"])
async def test_a_cancelled_disconnect_leaves_no_second_backend(
    faultdb: FaultDB, how: str, seen: Callable[[object], None]
) -> None:
    tag = new_tag()
    db: pool.Pool[Any] = pool.Pool(faultdb.pool_url(tag), connection_limit=1)
    seen(db)
    held = await db.acquire()
    await cancel_disconnect(how, lambda: db.disconnect(grace=5))
    await db.release(held)  # the holder comes back within the grace
    try:
        # the reopened pool: two users at once, on its one connection
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(db.fetchval, "SELECT pg_sleep(0.05)")
            await anyio.sleep(0.02)
            s = db.stats()
            assert s.size <= 1 and s.in_use <= 1, s
            assert await backends(faultdb, tag) <= 1
        s = db.stats()
        assert s.size <= 1 and s.size == s.idle + s.in_use + s.busy + s.opening, s
        assert await backends(faultdb, tag) == s.size
    finally:
        await db.disconnect()
    assert await backends(faultdb, tag) == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_pool_never_disconnected_on_a_closed_loop_is_freed_by_gc(
    faultdb: FaultDB, loop: str
) -> None:
    tag = new_tag()
    script = textwrap.dedent(
        """
        import asyncio, gc, os, time
        import asyncpg, uvloop
        import pool

        db = pool.Pool(os.environ["POOL_LEAK_URL"], connection_limit=3)

        async def main():  # a test of pytest-asyncio's older loops: no disconnect()
            await db.fetchval("SELECT 1")
            conn = await db.acquire()  # never given back: idle in transaction, a lock held
            await conn.execute("BEGIN; LOCK TABLE pg_class IN ACCESS SHARE MODE")

        new_loop = uvloop.new_event_loop if os.environ["POOL_LEAK_LOOP"] == "uvloop" else None
        loop = (new_loop or asyncio.new_event_loop)()
        loop.run_until_complete(main())
        loop.close()  # without cancelling its tasks
        del db
        gc.collect()

        async def sessions():
            admin = await asyncpg.connect(os.environ["POOL_LEAK_ADMIN"])
            try:
                deadline = time.monotonic() + 1.0
                while True:
                    n = await admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                        os.environ["POOL_LEAK_TAG"],
                    )
                    if n == 0 or time.monotonic() > deadline:
                        return n
                    await asyncio.sleep(0.02)
            finally:
                await admin.close()

        print("sessions left:", asyncio.run(sessions()))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={
            **os.environ, "PYTHONPATH": str(REPO), "POOL_LEAK_URL": faultdb.pool_url(tag),
            "POOL_LEAK_ADMIN": faultdb.url, "POOL_LEAK_TAG": tag, "POOL_LEAK_LOOP": loop,
        },
    )
    assert done.returncode == 0, done.stderr.replace(faultdb.url, "***")
    assert done.stdout.strip() == "sessions left: 0", done.stdout + done.stderr
