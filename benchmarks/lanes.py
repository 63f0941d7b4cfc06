"""``python -m pool_benchmarks.lanes [--json OUT] [--url URL]``: the noisy neighbour.

Four connections. One tenant floods the pool: 64 tasks, each running 50 ms
queries back to back (``SELECT pg_sleep(0.05)``). Another tenant runs
``SELECT 1`` after ``SELECT 1``, one at a time. Two runs of the same load:

- ``fifo``: a pool without tenants, strict FIFO: each quiet query waits
  behind the whole flood (64 queued queries over 4 connections, ~0.8 s);
- ``tenants``: the same pool, each task naming its tenant
  (``tenant="noisy"`` / ``tenant="quiet"``): the tenants with waiters take
  turns, so a quiet query waits for the next connection to come free.

Reported for each: the quiet tenant's wait for a connection (p50, p99, how
many it ran), and the throughput of each tenant and in total (queries per
second): turns must not cost the flood its throughput.

Against PostgreSQL (``--url``, default the test server on 127.0.0.1:5432), or
with ``--url sleep://`` on an in-process driver whose queries are timed sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import pool

from ._stub import StubConnection, StubDriver

__all__ = ["main", "run"]

CONNECTIONS = 4
FLOOD = 64
SLOW = 0.05
DURATION = 4.0
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


class SleepDriver(StubDriver):
    """The stub driver, whose ``SELECT pg_sleep(s)`` sleeps ``s`` seconds."""

    scheme = "sleep"

    async def execute(
        self, conn: StubConnection, sql: str, args: Sequence[Any],
        timeout: float | None = None,  # noqa: ASYNC109  (the Driver protocol's signature)
    ) -> Any:
        if sql.startswith("SELECT pg_sleep("):
            await asyncio.sleep(float(sql[len("SELECT pg_sleep("):-1]))
        return "SELECT 1"


def _pool(url: str) -> pool.Pool[Any]:
    if url.startswith("sleep:"):
        return pool.Pool("sleep://bench", driver=SleepDriver(), connection_limit=CONNECTIONS,
                         pool_timeout=0)
    return pool.Pool(url, connection_limit=CONNECTIONS, pool_timeout=0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(url: str, tenants: bool, duration: float = DURATION) -> dict[str, Any]:
    """One run: the flood and the quiet tenant for ``duration`` seconds."""
    db = _pool(url)
    noisy = "noisy" if tenants else None  # (no tenant: the plain FIFO acquire)
    quiet = "quiet" if tenants else None
    done = {"noisy": 0, "quiet": 0}
    waits: list[float] = []
    async with db:
        await asyncio.gather(*(db.execute("SELECT 1") for _ in range(CONNECTIONS)))
        stop = time.monotonic() + duration

        async def flood() -> None:
            while time.monotonic() < stop:
                await db.execute(f"SELECT pg_sleep({SLOW})", tenant=noisy)
                done["noisy"] += 1

        async def neighbour() -> None:
            while time.monotonic() < stop:
                asked = time.monotonic()
                async with db.acquire(tenant=quiet) as conn:
                    waits.append(time.monotonic() - asked)
                    await conn.fetchval("SELECT 1")
                done["quiet"] += 1

        started = time.monotonic()
        floods = [asyncio.create_task(flood()) for _ in range(FLOOD)]
        await asyncio.sleep(0)  # the flood queues first
        await neighbour()
        await asyncio.gather(*floods)
        elapsed = time.monotonic() - started
    return {
        "mode": "tenants" if tenants else "fifo",
        "quiet_queries": done["quiet"],
        "quiet_wait_p50_ms": round(_percentile(waits, 0.5) * 1000, 2),
        "quiet_wait_p99_ms": round(_percentile(waits, 0.99) * 1000, 2),
        "quiet_wait_mean_ms": round(statistics.fmean(waits) * 1000, 2),
        "noisy_qps": round(done["noisy"] / elapsed, 1),
        "quiet_qps": round(done["quiet"] / elapsed, 1),
        "total_qps": round((done["noisy"] + done["quiet"]) / elapsed, 1),
        "seconds": round(elapsed, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pool_benchmarks.lanes", description=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL, help="PostgreSQL URL, or sleep://")
    parser.add_argument("--seconds", type=float, default=DURATION)
    parser.add_argument("--json", metavar="OUT", help="write the figures to OUT")
    args = parser.parse_args(argv)
    results = [asyncio.run(run(args.url, tenants, args.seconds)) for tenants in (False, True)]
    for r in results:
        print(
            f"{r['mode']:8} quiet wait p50 {r['quiet_wait_p50_ms']:8.2f} ms  "
            f"p99 {r['quiet_wait_p99_ms']:8.2f} ms  ({r['quiet_queries']} queries)  "
            f"throughput {r['total_qps']:6.1f} q/s (noisy {r['noisy_qps']}, "
            f"quiet {r['quiet_qps']})"
        )
    if args.json:
        doc = {
            "benchmark": "lanes: the noisy neighbour",
            "command": "python -m pool_benchmarks.lanes --json OUT"
            + ("" if args.url == DEFAULT_URL else f" --url {args.url}"),
            "target": "sleep driver" if args.url.startswith("sleep:") else "postgresql",
            "connections": CONNECTIONS,
            "flood": {"tasks": FLOOD, "query_seconds": SLOW},
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "results": results,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
