"""The command line: ``poolbench`` / ``python -m pool_benchmarks``."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import anyio

import pool
from pool._config import redact_url, secrets_of

from ._peers import normalise_scheme, subjects_for
from ._report import Results, plot, render, to_json
from ._workloads import ALL_WORKLOADS, W1_TASKS, Plan, Progress, run, units

__all__ = ["main"]

DEFAULT_SIZE = 10
# --full, and any run with --url: every workload, long enough for stable medians
DEFAULT_ROUNDS, QUICK_ROUNDS = 3, 1
DEFAULT_DURATION, QUICK_DURATION = 1.5, 0.25
# the SQLite default (no --url, no --full): this pool beside aiosqlite and SQLAlchemy
# on the workloads users compare, in under a minute on a 2-core machine. Two rounds
# are the fewest that show a spread; 0.5 s per timed run keeps ~35 runs a round in budget.
SQLITE_WORKLOADS = ("W1", "W2", "W3", "W4", "RW")
SQLITE_W1_TASKS = (1, 100)
SQLITE_ROUNDS, SQLITE_DURATION = 2, 0.5

WORKLOAD_NOTES = {
    "W1": (
        "W1: each cycle awaits once while holding the connection (asyncio.sleep(0)), so "
        "that C tasks really contend; every pool and the limit pay that same await."
    ),
    "W3": (
        "W3: a grant is out of FIFO order when an older ticket (taken just before the "
        "acquire) of the same queue still waits; the limit has one queue per connection. "
        "FIFO ideal = (tasks - connections) / the measured completion rate."
    ),
    "W4": "W4: late = time from the acquire call to the error, minus the 0.2 s timeout.",
    "RW": (
        "RW: SQLite lets one writer into a database at a time; its readers do not wait "
        "for it in WAL mode. The writes of every pool queue on that one lock."
    ),
    "W5": (
        "W5: a loopback proxy started by the benchmark delays the start of each new "
        "connection by 150 ms, and counts the connections opened."
    ),
    "W6": (
        "W6: per handoff = a release to the oldest of N queued waiters plus the "
        "releaser's re-acquire at the back (one stub connection); per cancel = "
        "cancelling N queued waiters in random order, divided by N. The baselines run "
        "the same tasks on a bare asyncio.Lock / bare futures: the event loop's own "
        "cost. W6 pauses the cyclic GC while it runs (its passes over 100,000 parked "
        "tasks are the runtime's cost, not the queue's)."
    ),
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolbench",
        description=(
            "Benchmark this connection pool beside its peers and beside the physical "
            "limit (raw connections, no pool), in one process. With no URL it runs on a "
            "temporary SQLite file beside aiosqlite (a connection per task, and one shared "
            "connection) and SQLAlchemy's async engine on aiosqlite, on W1-W4 and a "
            "read/write mix, in under a minute; --full is the long run of every "
            "workload (this pool and the limit). With --url it runs beside asyncpg's pool, "
            "psycopg_pool and SQLAlchemy (PostgreSQL) or aiomysql's pool (MySQL). Peers "
            "appear twice: with their defaults, and like-for-like ([lfl]: the same round "
            "trips as this pool)."
        ),
    )
    parser.add_argument(
        "--url",
        help="database URL (default: $DATABASE_URL, else a temporary SQLite file)",
    )
    parser.add_argument(
        "--size", type=_positive_int, default=DEFAULT_SIZE,
        help=f"pool size N (default {DEFAULT_SIZE})",
    )
    parser.add_argument(
        "--workload", action="append", metavar="W",
        help="workloads to run: W1..W6, RW, comma-separated or repeated (default: W1-W4 "
        "and RW on the SQLite default; W1-W6 with --full or --url)",
    )
    parser.add_argument(
        "--duration", type=_seconds,
        help=f"seconds per timed run (default {DEFAULT_DURATION}; {QUICK_DURATION} with --quick)",
    )
    parser.add_argument(
        "--rounds", type=_positive_int,
        help=f"rounds, pools in alternating order (default {DEFAULT_ROUNDS}; "
        f"{QUICK_ROUNDS} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: one short round")
    parser.add_argument(
        "--full", action="store_true",
        help=f"the long run: every workload, {DEFAULT_ROUNDS} rounds of {DEFAULT_DURATION} s "
        "(on SQLite: this pool and the limit only; about 2.5 minutes)",
    )
    parser.add_argument(
        "--like-for-like", action="store_true",
        help="only like-for-like peer rows (each peer set up to make this pool's round "
        "trips); by default the report has both kinds",
    )
    parser.add_argument(
        "--meter", action="store_true",
        help="add pool[otel]: this pool with an OpenTelemetry SDK meter provider (an "
        "in-memory reader), beside the plain pool; needs pip install 'pool-engine[otel]' "
        "opentelemetry-sdk",
    )
    parser.add_argument("--json", metavar="FILE", help="write every raw figure to FILE")
    parser.add_argument(
        "--plot", metavar="FILE.png",
        help="draw the wait-time distributions and the ratios to FILE.png (matplotlib)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _workloads(
    parser: argparse.ArgumentParser, given: list[str] | None, default: tuple[str, ...]
) -> tuple[str, ...]:
    if not given:
        return default
    chosen: set[str] = set()
    for item in given:
        for part in item.split(","):
            name = part.strip().upper()
            if not name:
                continue
            if name == "ALL":
                chosen.update(ALL_WORKLOADS)
            elif name in ALL_WORKLOADS:
                chosen.add(name)
            else:
                parser.error(f"--workload: unknown workload {part.strip()!r}; "
                             f"choose from {', '.join(ALL_WORKLOADS)}")
    return tuple(w for w in ALL_WORKLOADS if w in chosen)


class _Bar(Progress):
    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total, file=sys.stderr, unit="run", desc="poolbench",
            dynamic_ncols=True, leave=False,
        )

    def update(self, what: str) -> None:
        self._bar.set_postfix_str(what, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


async def _server(url: str) -> str:
    """What the database says it is; raises if it cannot be reached."""
    scheme = normalise_scheme(url)
    if scheme == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    db: pool.Pool[Any] = pool.Pool(url, connection_limit=1)
    async with db:
        if scheme == "postgresql":
            return f"PostgreSQL {await db.fetchval('SHOW server_version')}"
        return f"MySQL/MariaDB {await db.fetchval('SELECT VERSION()')}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    url = args.url or os.environ.get("DATABASE_URL") or ""
    # the SQLite default: no server given and no --full
    sqlite_default = not url and not args.full
    every = tuple(w for w in ALL_WORKLOADS if w != "RW")
    workloads = _workloads(parser, args.workload, SQLITE_WORKLOADS if sqlite_default else every)
    with tempfile.TemporaryDirectory(prefix="poolbench-") as tmp:
        if not url:
            url = "sqlite:///" + os.path.join(tmp, "bench.db")
        given = list(sys.argv[1:] if argv is None else argv)
        return _bench(args, url, workloads, sqlite_default=sqlite_default, argv=given)


def _bench(
    args: argparse.Namespace,
    url: str,
    workloads: tuple[str, ...],
    *,
    sqlite_default: bool,
    argv: list[str],
) -> int:
    shown = redact_url(url)
    secrets = secrets_of(url)
    quick = bool(args.quick)
    long_rounds, long_duration = (
        (SQLITE_ROUNDS, SQLITE_DURATION) if sqlite_default else (DEFAULT_ROUNDS, DEFAULT_DURATION)
    )
    rounds = args.rounds or (QUICK_ROUNDS if quick else long_rounds)
    duration = args.duration or (QUICK_DURATION if quick else long_duration)
    styles = frozenset({"lfl"}) if args.like_for_like else frozenset({"default", "lfl"})
    # --full on SQLite is the long run as it was: this pool and the limit alone
    peers = sqlite_default or normalise_scheme(url) != "sqlite"
    suite = "sqlite-default" if sqlite_default else ("full" if args.full else "server")
    plan = Plan(
        url=url,
        size=args.size,
        workloads=workloads,
        duration=duration,
        rounds=rounds,
        quick=quick,
        w4_attempts=2 if quick else 5,
        # --quick stops at 10,000 waiters: setting up 100,000 takes seconds
        w6_sizes=(10, 1_000, 10_000) if quick else (10, 1_000, 100_000),
        w6_cancel_sizes=(1_000, 10_000) if quick else (1_000, 100_000),
        w6_window=min(duration, 1.0),
        w1_tasks=SQLITE_W1_TASKS if sqlite_default else W1_TASKS,
        w1_extras=not sqlite_default,
        styles=styles,
        peers=peers,
        meter=bool(args.meter),
    )
    if plan.scheme not in ("postgresql", "mysql", "sqlite"):
        print(f"poolbench: unsupported database URL {shown}", file=sys.stderr)
        return 2

    def scrub(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    try:
        server = anyio.run(_server, url, backend="asyncio")
    except (pool.PoolError, OSError) as exc:
        print(scrub(f"poolbench: cannot use {shown}: {exc}"), file=sys.stderr)
        return 1

    results = Results(secrets=secrets)
    results.meta.update(
        url=shown,
        scheme=plan.scheme,
        server=server,
        size=plan.size,
        w2_tasks=plan.w2_tasks,
        rounds=plan.rounds,
        duration=plan.duration,
        quick=quick,
        suite=suite,
        like_for_like_only=bool(args.like_for_like),
        # what produced this run, as typed (the password scrubbed)
        command=" ".join(["poolbench", *(scrub(a) for a in argv)]),
        workloads=list(workloads),
        pool_version=_version("pool"),
        backend="asyncio",
        python=f"{platform.python_implementation()} {platform.python_version()}",
        platform=platform.platform(terse=True),
        cpus=os.cpu_count(),
        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    for wid in workloads:
        if wid in WORKLOAD_NOTES:
            results.note(WORKLOAD_NOTES[wid])

    subjects, _ = subjects_for(url, styles=plan.styles, peers=plan.peers, meter=plan.meter)
    progress: Progress = Progress()
    if not args.no_progress:
        try:
            progress = _Bar(units(plan, subjects))
        except ImportError:
            results.note(
                "tqdm is not installed: no progress bar (pip install 'pool-engine[bench]')."
            )

    started = time.perf_counter()
    try:
        anyio.run(run, plan, results, progress, backend="asyncio")
    except KeyboardInterrupt:
        print("poolbench: interrupted", file=sys.stderr)
        return 130
    finally:
        if isinstance(progress, _Bar):
            progress.close()
    results.meta["elapsed"] = round(time.perf_counter() - started, 1)

    if args.plot:
        try:
            plot(results, args.plot)
        except ImportError:
            results.note(
                "--plot skipped: matplotlib is not installed"
                " (pip install 'pool-engine[bench-full]')."
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(to_json(results))
            f.write("\n")
    print(render(results))
    print(f"\n(ran {results.meta['elapsed']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
