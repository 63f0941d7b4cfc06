"""One process of a host-budget test (tests/test_host_budget_processes.py).

``python -m tests.budget_worker MODE URL LIMIT [options as JSON]``: builds a
pool with ``host_connection_limit=LIMIT`` and does one thing, reporting on
stdout, one JSON object a line (``{"ready": ...}`` first where the test waits
for it). It runs until done, or until the test kills it.

Modes:

* ``work``: ``tasks`` tasks run ``sql`` in a loop for ``seconds``; reports
  how many statements ran and failed, and how many connections were opened.
  ``churn``: every that many seconds, one more task drains the pool (every
  connection replaced) and resizes it down to 1 and back up: connections
  closed and opened all the time, by three mechanisms.
* ``hold``: opens ``count`` connections and keeps them (``lent``: held by
  tasks; else idle in the pool), reports ready, then sleeps.
* ``once``: one statement; reports how long the acquire took (the
  process's start-up and imports are not counted).
* ``fork``: (SQLite) opens one connection, forks a child that sleeps, and
  disconnects in the parent; reports the budget's slots in use then.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import anyio

import pool
from pool._pool import driver_of


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def main(mode: str, url: str, limit: int, opts: dict[str, Any]) -> None:
    limit_ = limit
    db = pool.Pool(
        url,
        host_connection_limit=limit,
        connection_limit=opts.get("connection_limit", limit),
        pool_timeout=opts.get("pool_timeout", 10),
        max_connection_lifetime=opts.get("lifetime"),
    )
    sql = opts.get("sql", "SELECT 1")
    if mode == "work":
        done = failed = 0
        until = time.monotonic() + opts["seconds"]

        async def loop() -> None:
            nonlocal done, failed
            while time.monotonic() < until:
                try:
                    await db.execute(sql)
                    done += 1
                except pool.PoolError as exc:
                    failed += 1
                    say(error=str(exc))

        async def churn(every: float) -> None:
            limit = opts.get("connection_limit", limit_)
            flip = False
            while time.monotonic() < until:
                await anyio.sleep(every)
                flip = not flip
                if flip:
                    await db.drain()
                else:
                    await db.resize(1)
                    await db.resize(limit)

        say(ready=os.getpid())
        async with anyio.create_task_group() as tg:
            for _ in range(opts.get("tasks", 4)):
                tg.start_soon(loop)
            if opts.get("churn"):
                tg.start_soon(churn, opts["churn"])
        stats = db.stats()
        say(done=done, failed=failed, closed_by=dict(stats.closed_by), opened=stats.opened)
        await db.disconnect()
    elif mode == "hold":
        count = opts["count"]
        got = anyio.Event()
        held = 0

        async def hold() -> None:
            nonlocal held
            async with db.acquire() as conn:
                await driver_of(db).execute(conn, sql, ())
                held += 1
                if held == count:
                    got.set()
                if opts.get("lent"):
                    await anyio.sleep_forever()
                await got.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(hold)
            await got.wait()
            say(ready=os.getpid(), stats=str(db.stats()))
            await anyio.sleep_forever()
    elif mode == "once":
        began = time.monotonic()
        try:
            await db.execute(sql)
        except pool.PoolTimeoutError as exc:
            say(seconds=time.monotonic() - began, error=str(exc), code=exc.code)
        else:
            say(seconds=time.monotonic() - began)
        await db.disconnect()
    elif mode == "fork":
        await db.execute(sql)
        child = os.fork()
        if child == 0:
            time.sleep(30)  # a long-lived worker: it must not keep the parent's slot
            os._exit(0)
        try:
            await db.disconnect()
            say(in_use=pool.Pool(url, host_connection_limit=limit).stats().host_in_use)
        finally:
            os.kill(child, 9)
            os.waitpid(child, 0)


if __name__ == "__main__":
    mode, url, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    anyio.run(main, mode, url, limit, opts, backend=opts.get("backend", "asyncio"))
