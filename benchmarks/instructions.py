"""Instructions per acquire/release cycle, counted by valgrind: repeatable on a busy machine.

    python -m pool_benchmarks.instructions [--json OUT]

Each subject runs a fixed number of cycles under ``valgrind --tool=callgrind``;
the same program with zero cycles (imports, setup) is counted too, and the
difference, divided by the cycles, is the cost of one cycle. Instruction
counts do not depend on what else the machine runs, unlike seconds.

Subjects, all on asyncio with no I/O (this pool on the stub driver):

- ``pool``: this engine, ``async with db.acquire()``;
- ``pool-budget``: the same with ``host_connection_limit`` (a machine-wide
  budget in a temporary directory): its fast path must cost the same;
- ``lock``: the raw-connection limit's shape, one ``asyncio.Lock`` per connection;
- ``minimal``: a direct-handoff FIFO pool with no guarantees (``_minimal.py``).

Modes: ``contended``, 100 tasks on 10 connections, each cycle holding the
connection across one ``asyncio.sleep(0)`` (every acquire waits: the
handoff); ``fast``, one task on one connection, nothing in between (the fast
path alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

__all__ = ["main"]

SUBJECTS = ("pool", "pool-budget", "lock", "minimal")
MODES = {"contended": (100, 10, 20_000), "fast": (1, 1, 50_000)}  # tasks, connections, cycles


async def _child(subject: str, tasks: int, size: int, cycles: int) -> None:
    per_task = cycles // tasks
    # Contended: hold across one await, so that the tasks really take turns.
    # One task alone: nothing in between, the fast path and nothing else.
    hold = tasks > 1
    worker: Callable[[int], Coroutine[Any, Any, None]]
    if subject in ("pool", "pool-budget"):
        import pool

        from ._stub import StubDriver

        budgeted = subject == "pool-budget"
        if budgeted:
            import os
            import tempfile

            os.environ["POOL_HOST_BUDGET_DIR"] = tempfile.mkdtemp(prefix="pool-bench-budget-")
        db: pool.Pool[Any] = pool.Pool(
            "stub://bench", driver=StubDriver(), connection_limit=size,
            host_connection_limit=size if budgeted else None,
        )
        held = [await db.acquire() for _ in range(size)]  # open them all first
        for conn in held:
            await db.release(conn)
        acquire = db.acquire

        async def worker(key: int) -> None:
            for _ in range(per_task):
                async with acquire():
                    if hold:
                        await asyncio.sleep(0)

    elif subject == "lock":
        locks = [asyncio.Lock() for _ in range(size)]

        async def worker(key: int) -> None:
            lock = locks[key % size]
            for _ in range(per_task):
                async with lock:
                    if hold:
                        await asyncio.sleep(0)

    else:
        from ._minimal import MinimalPool

        minimal = MinimalPool([object() for _ in range(size)])

        async def worker(key: int) -> None:
            for _ in range(per_task):
                async with minimal.acquire():
                    if hold:
                        await asyncio.sleep(0)

    if cycles:
        await asyncio.gather(*(worker(k) for k in range(tasks)))


def _count(subject: str, mode: str, cycles: int) -> int:
    tasks, size, _ = MODES[mode]
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, "-m", "pool_benchmarks.instructions", "--child",
         subject, str(tasks), str(size), str(cycles)],
        capture_output=True, text=True, check=True,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pool_benchmarks.instructions",
        description="Instructions per acquire/release cycle (valgrind's callgrind).",
    )
    parser.add_argument("--json", metavar="OUT", help="write the counts to OUT")
    parser.add_argument("--child", nargs=4, metavar=("SUBJECT", "TASKS", "SIZE", "CYCLES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        subject, tasks, size, cycles = args.child
        asyncio.run(_child(subject, int(tasks), int(size), int(cycles)))
        return 0
    if shutil.which("valgrind") is None:
        print("instructions: valgrind is not installed (apt-get install valgrind)",
              file=sys.stderr)
        return 2
    per_cycle: dict[str, dict[str, int]] = {}
    for mode, (_, _, cycles) in MODES.items():
        for subject in SUBJECTS:
            if mode == "fast" and not subject.startswith("pool"):
                continue
            cost = (_count(subject, mode, cycles) - _count(subject, mode, 0)) // cycles
            per_cycle.setdefault(mode, {})[subject] = cost
            print(f"{mode:10} {subject:8} {cost:>8,} instructions per cycle", flush=True)
    if args.json:
        doc = {
            "tool": "pool_benchmarks.instructions",
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "modes": {m: {"tasks": t, "connections": s, "cycles": c}
                      for m, (t, s, c) in MODES.items()},
            "instructions_per_cycle": per_cycle,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
