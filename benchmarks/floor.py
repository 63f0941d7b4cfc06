"""W2 beside its floor: this pool, the raw-connection limit and a minimal FIFO pool.

    python -m pool_benchmarks.floor --url postgresql://... [--rounds 6] [--json OUT]

W2 (``SELECT 1``, 100 tasks on 10 connections) for three subjects on the same
driver's connections: this pool, the limit (a lock per connection, no pool),
and ``_minimal.MinimalPool`` (a direct handoff to the oldest waiting future,
no guarantees at all). Besides queries/s it reports the client process's
CPU time per query, which says where a gap comes from: the client's own work,
or waiting on the server. The order of the subjects rotates every round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from ._minimal import MinimalPool
from ._peers import Limit, Ours, Subject
from ._workloads import w2_select1

__all__ = ["main"]


class Minimal(Limit):
    """The floor: ``MinimalPool`` over the same driver's raw connections."""

    name = "minimal"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._minimal: MinimalPool | None = None
        self._conns: list[Any] = []

    async def open(
        self, size: int, *, warm: bool = True, acquire_timeout: float | None = None
    ) -> None:
        self._conns = [await self._driver.connect() for _ in range(size)]
        self._minimal = MinimalPool(self._conns)

    def acquire(self, key: int) -> AbstractAsyncContextManager[Any]:
        assert self._minimal is not None
        return self._minimal.acquire()

    async def close(self) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            await self._driver.close(conn)


async def _run(url: str, rounds: int, duration: float) -> dict[str, dict[str, list[float]]]:
    makers: list[type[Subject]] = [Ours, Limit, Minimal]
    out: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds):
        k = r % len(makers)
        order = makers[k:] + makers[:k]
        for make in order[::-1] if r % 2 else order:
            subject = make(url)
            cpu, wall = time.process_time(), time.perf_counter()
            metrics, _ = await w2_select1(subject, size=10, tasks=100, duration=duration, waits=[])
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            queries = metrics["queries_per_s"] * duration
            slot = out.setdefault(subject.name, {"queries_per_s": [], "cpu_us_per_query": []})
            slot["queries_per_s"].append(metrics["queries_per_s"])
            slot["cpu_us_per_query"].append(cpu / queries * 1e6)
            print(f"round {r + 1}: {subject.name:8} {metrics['queries_per_s']:>9,.0f} queries/s, "
                  f"{cpu / queries * 1e6:5.1f} µs of client CPU per query", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pool_benchmarks.floor",
        description="W2 for this pool, the raw-connection limit and a minimal FIFO pool.",
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=1.5)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    figures = asyncio.run(_run(args.url, args.rounds, args.duration))
    limit = statistics.median(figures["limit"]["queries_per_s"])
    print()
    for name, slot in figures.items():
        qps = statistics.median(slot["queries_per_s"])
        cpu = statistics.median(slot["cpu_us_per_query"])
        print(f"{name:8} {qps:>9,.0f} queries/s ({qps / limit:.3f}x the limit), "
              f"{cpu:5.1f} µs of client CPU per query (median of {args.rounds})")
    if args.json:
        command = ["python -m pool_benchmarks.floor", *(sys.argv[1:] if argv is None else argv)]
        doc = {"tool": "pool_benchmarks.floor", "command": " ".join(command), "figures": figures}
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
