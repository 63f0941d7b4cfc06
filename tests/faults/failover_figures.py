"""Failover figures: switchover and crash, N times each, on the real two-node cluster.

    .venv/bin/python -m tests.faults.failover_figures [--runs 5] [--loop asyncio] [--json FILE]

Each run resets ``scripts/hacluster`` to its known state, then 100 tasks write
through a multi-host ``target_session_attrs=read-write`` pool (10 connections)
while the cluster switches over or crashes. It prints, per kind, the median and
the worst of:

- unavailability: (first write acknowledged by the new primary - last write
  acknowledged by the old one) - the time the cluster itself had no primary,
  read from the servers' logs;
- resumed: from the new primary accepting writes to the pool's first write there;
- lost: acknowledged writes missing on the new primary (a crash may lose some:
  replication is asynchronous).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import asyncpg

from tests.faults import hacluster as ha


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--loop", choices=ha.LOOPS, default="asyncio")
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args(argv)

    cluster = ha.HACluster()
    cluster.must("init", timeout=120)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    for how in ("switchover", "crash"):
        for i in range(args.runs):
            cluster.reset()
            run = ha.run_on(
                args.loop, lambda how=how: ha.writes_through_failover(cluster, how, args.loop)
            )
            summary = run.summary()
            runs.append(summary)
            print(
                f"{how} {i + 1}/{args.runs}: unavailability "
                f"{summary['unavailability_seconds'] * 1000:.0f} ms, resumed "
                f"{summary['resumed_after_promotion_seconds'] * 1000:.0f} ms after the "
                f"promotion, cluster without a primary {summary['no_primary_seconds'] * 1000:.0f}"
                f" ms, lost {summary['lost']}, lent to the old primary after its first "
                f"failure {summary['lent_to_old_after_failure']}",
                file=sys.stderr,
            )
    cluster.reset()

    figures: dict[str, Any] = {}
    for how in ("switchover", "crash"):
        mine = [r for r in runs if r["how"] == how]
        figures[how] = {
            key: {
                "median": statistics.median(r[key] for r in mine),
                "worst": max(r[key] for r in mine),
            }
            for key in (
                "unavailability_seconds",
                "resumed_after_promotion_seconds",
                "no_primary_seconds",
                "no_write_seconds",
                "lost",
                "lent_to_old_after_failure",
            )
        }
    print(f"\n{'':12} {'unavailability':>22} {'resumed after promotion':>26} {'no primary':>18}")
    print(f"{'':12} {'median / worst':>22} {'median / worst':>26} {'median / worst':>18}")
    for how, f in figures.items():
        u, r, n = (f[k] for k in ("unavailability_seconds", "resumed_after_promotion_seconds",
                                  "no_primary_seconds"))
        print(
            f"{how:12} {u['median'] * 1000:>11.0f} / {u['worst'] * 1000:>4.0f} ms"
            f" {r['median'] * 1000:>15.0f} / {r['worst'] * 1000:>4.0f} ms"
            f" {n['median'] * 1000:>7.0f} / {n['worst'] * 1000:>4.0f} ms"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "command": " ".join(["python -m tests.faults.failover_figures", *sys.argv[1:]]),
                    "loop": args.loop,
                    "runs_per_kind": args.runs,
                    "writers": ha.WRITERS,
                    "connection_limit": 10,
                    "seconds": round(time.monotonic() - started, 1),
                    "python": platform.python_version(),
                    "asyncpg": asyncpg.__version__,
                    "figures": figures,
                    "runs": runs,
                },
                out,
                indent=1,
            )
            out.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
