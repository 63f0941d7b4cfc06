"""The workloads (W1-W6), and the runner that alternates the pools over rounds.

Every pool runs the same code: a fresh pool per measurement, built and warmed
by its adapter, then timed. In each round the pools run in another order
(rotated, and reversed every other round), so that no pool always runs first
or last on a machine that warms up or slows down.

All timing is ``time.perf_counter``. Each worker checks the clock itself
rather than waiting to be told to stop: a fast path that never suspends would
otherwise never let a timer task run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import math
import random
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.to_thread

import pool

from ._peers import (
    RW_ROWS,
    Limit,
    Subject,
    normalise_scheme,
    sqlite_path,
    stub_subjects,
    subjects_for,
)
from ._proxy import delay_proxy
from ._report import Results
from ._stub import StubDriver

__all__ = ["ALL_WORKLOADS", "ONE_WRITER", "Plan", "run", "runnable", "units"]

ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "RW")

T = TypeVar("T")
Metrics = dict[str, float]

# fixed by the definitions of the workloads
W1_TASKS = (1, 10, 100, 1000)
W3_TASKS, W3_SIZE, W3_HOLD = 200, 5, 0.001
W4_SIZE, W4_TIMEOUT = 2, 0.2
W5_REQUESTS, W5_DELAY = 50, 0.150
#: RW: the share of the units of work that write
RW_WRITE_SHARE = 0.2
#: RW: the name of the single-writer ceiling's row
ONE_WRITER = "1 writer"
# how long any one measurement may take before it is abandoned (beyond its own length)
GRACE = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What to run. ``url`` holds the password: never print it."""

    url: str
    size: int
    workloads: tuple[str, ...]
    duration: float
    rounds: int
    quick: bool
    w4_attempts: int
    w6_sizes: tuple[int, ...]
    w6_cancel_sizes: tuple[int, ...]
    w6_window: float
    #: W1's task counts, and whether W1 also runs on the stub driver and bare
    w1_tasks: tuple[int, ...] = W1_TASKS
    w1_extras: bool = True
    #: which peer rows: "default" (their defaults) and/or "lfl" (like-for-like)
    styles: frozenset[str] = frozenset({"default", "lfl"})
    #: False: this pool and the limit alone
    peers: bool = True
    #: add pool[otel]: this pool with an OpenTelemetry meter provider installed
    meter: bool = False

    @property
    def scheme(self) -> str:
        return normalise_scheme(self.url)

    @property
    def w2_tasks(self) -> int:
        return 10 * self.size


class Progress:
    """What the runner reports to: a tqdm bar, or nothing."""

    def update(self, what: str) -> None:
        """One measurement is done; ``what`` says which."""


# ---------------------------------------------------------------------- helpers


async def _yield() -> None:
    """The cheapest suspension asyncio has: one trip through the event loop."""
    await asyncio.sleep(0)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _order(subjects: Sequence[T], round_no: int) -> list[T]:
    """Round ``r``: rotated by ``r``, reversed when ``r`` is odd."""
    if not subjects:
        return []
    k = round_no % len(subjects)
    ordered = list(subjects[k:]) + list(subjects[:k])
    return ordered[::-1] if round_no % 2 else ordered


async def _run_all(
    n: int,
    body: Callable[[int], Coroutine[Any, Any, None]],
    spawned: Callable[[], None] | None = None,
) -> None:
    """Run ``body(0) .. body(n - 1)`` as tasks; ``spawned()`` runs once all exist,
    before any has started (so that spawning 1,000 tasks is not timed)."""
    async with anyio.create_task_group() as tg:
        for key in range(n):
            tg.start_soon(body, key)
        if spawned is not None:
            spawned()


async def _close(subject: Subject) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(30):
        await subject.close()


# ---------------------------------------------------------------------- W1


async def w1_cycles(
    subject: Subject, *, size: int, tasks: int, duration: float, hold: bool = True
) -> Metrics:
    """``tasks`` tasks loop acquire -> one await while holding -> release; count cycles.

    With ``hold=False`` (W1-bare) nothing happens between acquire and release:
    the literal cycle, measured with one task.

    The one await while holding (``asyncio.sleep(0)``) is what makes C tasks
    really contend: without it, a pool whose fast path never suspends would
    let one task cycle alone until the end. Every pool, and the raw limit,
    pays the same await.
    """
    await subject.open(size)
    try:
        acquire = subject.acquire
        clock = time.perf_counter
        total = 0
        start = deadline = 0.0

        def go() -> None:
            nonlocal start, deadline
            start = clock()
            deadline = start + duration

        async def worker(key: int) -> None:
            nonlocal total
            n = 0
            while clock() < deadline:
                if hold:
                    async with acquire(key):
                        await _yield()
                else:
                    async with acquire(key):
                        pass
                n += 1
            total += n

        await _run_all(tasks, worker, go)
        elapsed = clock() - start
        return {"cycles_per_s": total / elapsed, "cycles": float(total)}
    finally:
        await _close(subject)


# ---------------------------------------------------------------------- W2


async def w2_select1(
    subject: Subject, *, size: int, tasks: int, duration: float, waits: list[float]
) -> tuple[Metrics, dict[str, Any] | None]:
    """``tasks`` tasks loop acquire -> ``SELECT 1`` -> release; time each acquire."""
    await subject.open(size)
    try:
        acquire, query = subject.acquire, subject.query
        clock = time.perf_counter
        mine: list[float] = []
        record = mine.append
        total = 0
        start = deadline = 0.0

        def go() -> None:
            nonlocal start, deadline
            start = clock()
            deadline = start + duration

        async def worker(key: int) -> None:
            nonlocal total
            n = 0
            while clock() < deadline:
                t0 = clock()
                async with acquire(key) as conn:
                    record(clock() - t0)
                    await query(conn)
                n += 1
            total += n

        await _run_all(tasks, worker, go)
        elapsed = clock() - start
        stats = subject.stats()
        waits.extend(mine)
        mine.sort()
        return {
            "queries_per_s": total / elapsed,
            "wait_p50": _percentile(mine, 0.50),
            "wait_p99": _percentile(mine, 0.99),
            "wait_max": mine[-1] if mine else math.nan,
        }, stats
    finally:
        await _close(subject)


# ---------------------------------------------------------------------- W3


class _FifoCheck:
    """Counts grants out of FIFO order, from a ticket taken just before each acquire.

    A grant is out of order when an older ticket of the same queue is still
    waiting. Tickets of one queue are taken in increasing order, so the oldest
    one waiting is the top of a heap from which granted tickets are dropped
    lazily.
    """

    def __init__(self) -> None:
        self._tickets = itertools.count()
        self._waiting: dict[int, list[int]] = {}
        self._granted: set[int] = set()
        self.out_of_order = 0

    def take(self, queue: int) -> int:
        ticket = next(self._tickets)
        heapq.heappush(self._waiting.setdefault(queue, []), ticket)
        return ticket

    def granted(self, queue: int, ticket: int) -> None:
        heap = self._waiting[queue]
        granted = self._granted
        while heap[0] in granted:
            granted.discard(heapq.heappop(heap))
        if heap[0] == ticket:
            heapq.heappop(heap)
        else:
            self.out_of_order += 1
            granted.add(ticket)


async def w3_fairness(
    subject: Subject, *, tasks: int, size: int, hold: float, duration: float, waits: list[float]
) -> Metrics:
    """Overload: ``tasks`` tasks on ``size`` connections, each holding ~``hold`` seconds."""
    await subject.open(size)
    try:
        acquire = subject.acquire
        clock = time.perf_counter
        fifo = _FifoCheck()
        completions = [0] * tasks
        mine: list[float] = []
        start = deadline = 0.0

        def go() -> None:
            nonlocal start, deadline
            start = clock()
            deadline = start + duration

        async def worker(key: int) -> None:
            queue = subject.queue_of(key)
            while clock() < deadline:
                ticket = fifo.take(queue)
                t0 = clock()
                async with acquire(key):
                    mine.append(clock() - t0)
                    fifo.granted(queue, ticket)
                    await asyncio.sleep(hold)
                completions[key] += 1

        await _run_all(tasks, worker, go)
        elapsed = clock() - start
        waits.extend(mine)
        mine.sort()
        done = sum(completions)
        throughput = done / elapsed
        # Under FIFO every waiter has the other (tasks - size) waiting tasks
        # ahead of it, served at the measured rate: that is the ideal wait.
        ideal = (tasks - size) / throughput if throughput else math.nan
        p99 = _percentile(mine, 0.99)
        least = min(completions)
        return {
            "completions_max_min": max(completions) / least if least else math.inf,
            "completions_min": float(least),
            "completions_max": float(max(completions)),
            "out_of_order": float(fifo.out_of_order),
            "grants": float(len(mine)),
            "wait_p50": _percentile(mine, 0.50),
            "wait_p99": p99,
            "wait_max": mine[-1] if mine else math.nan,
            "fifo_ideal": ideal,
            "p99_vs_ideal": p99 / ideal if ideal else math.nan,
            "cycles_per_s": throughput,
        }
    finally:
        await _close(subject)


# ---------------------------------------------------------------------- W4


def _error_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


async def w4_timeout(
    subject: Subject, *, wait: float, attempts: int
) -> tuple[Metrics, list[str], list[float]]:
    """A pool of 2, both held: how late does a third acquire with a ``wait`` timeout give up?"""
    await subject.open(W4_SIZE, acquire_timeout=wait)
    try:
        lates: list[float] = []
        kinds: list[str] = []
        async with contextlib.AsyncExitStack() as held:
            for key in range(W4_SIZE):
                await held.enter_async_context(subject.acquire(key))
            for _ in range(attempts):
                kind = "none: it lent a connection"
                t0 = time.perf_counter()
                with anyio.move_on_after(wait + 5) as guard:
                    try:
                        async with subject.acquire_timeout(W4_SIZE, wait):
                            pass
                    except Exception as exc:
                        kind = _error_name(exc)
                late = time.perf_counter() - t0 - wait
                if guard.cancelled_caught:
                    kind = f"none: still waiting after {wait + 5:g} s"
                lates.append(late)
                kinds.append(kind)
        return {
            "late_median": statistics.median(lates),
            "late_max": max(lates),
            "late_min": min(lates),
        }, kinds, lates
    finally:
        await _close(subject)


# ---------------------------------------------------------------------- W5


def _via(url: str, host: str, port: int) -> str:
    """``url`` pointed at ``host:port``, credentials kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def w5_spike(
    subject: Subject, *, size: int, requests: int, opened: Callable[[], int]
) -> Metrics:
    """``requests`` acquire -> SELECT 1 -> release at once, on an empty pool."""
    before = opened()
    await subject.open(size, warm=False)
    try:
        acquire, query = subject.acquire, subject.query

        async def request(key: int) -> None:
            async with acquire(key) as conn:
                await query(conn)

        start = time.perf_counter()
        await _run_all(requests, request)
        elapsed = time.perf_counter() - start
        return {"seconds": elapsed, "opened": float(opened() - before)}
    finally:
        await _close(subject)


# ---------------------------------------------------------------------- W6


def _stub_pool(limit: int) -> pool.Pool[Any]:
    return pool.Pool("stub://bench", driver=StubDriver(), connection_limit=limit, pool_timeout=0)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC for W6 (one collection follows, untimed).

    With 100,000 tasks parked, and the exceptions and frames that cancelling
    them creates, the collector's passes grow with the heap: a cost of the
    runtime, the same whatever the pool's queue does. W6 asks about the queue.
    """
    enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.unfreeze()


async def w6_handoff(waiters: int, window: float, *, baseline: bool = False) -> Metrics:
    """Cost of a handoff while ``waiters`` tasks stay queued on one stub connection.

    One handoff: the holder's release goes to the oldest waiter, and the
    releaser queues again at the back. ``baseline`` runs the same tasks on a
    bare ``asyncio.Lock`` instead of the pool: what the event loop alone costs.
    """
    with _gc_paused():
        try:
            return await _handoff(waiters, window, baseline)
        finally:
            gc.collect()


async def _handoff(waiters: int, window: float, baseline: bool) -> Metrics:
    db = _stub_pool(1)
    lock = asyncio.Lock()
    acquire: Callable[[], contextlib.AbstractAsyncContextManager[Any]] = (
        (lambda: lock) if baseline else db.acquire
    )
    stop = False
    started = cycles = 0
    all_started = asyncio.Event()

    async def worker() -> None:
        nonlocal started, cycles
        started += 1
        if started > waiters:
            all_started.set()
        while not stop:
            async with acquire():
                await _yield()
            cycles += 1

    tasks = [asyncio.create_task(worker()) for _ in range(waiters + 1)]
    try:
        with anyio.fail_after(GRACE):
            await all_started.wait()
        await asyncio.sleep(0.01)  # the last one queues
        c0, t0 = cycles, time.perf_counter()
        await asyncio.sleep(window)
        c1, t1 = cycles, time.perf_counter()
    finally:
        stop = True  # each task leaves after its next turn
        await asyncio.gather(*tasks, return_exceptions=True)
        await db.disconnect()
    ops = c1 - c0
    return {"us_per_op": (t1 - t0) / ops * 1e6 if ops else math.inf, "ops": float(ops)}


async def w6_cancel(waiters: int, *, seed: int, baseline: bool = False) -> Metrics:
    """Cost per waiter of cancelling ``waiters`` queued waiters in random order.

    ``baseline`` parks the same tasks on bare asyncio futures instead: what
    the event loop alone costs to cancel and finish a task.
    """
    with _gc_paused():
        try:
            return await _cancel(waiters, seed, baseline)
        finally:
            gc.collect()


async def _cancel(waiters: int, seed: int, baseline: bool) -> Metrics:
    db = _stub_pool(1)
    holder = await db.acquire()
    loop = asyncio.get_running_loop()
    parked = 0
    all_parked = asyncio.Event()

    async def waiter() -> None:
        nonlocal parked
        parked += 1  # and queued: the pool enqueues before it first suspends
        if parked >= waiters:
            all_parked.set()
        if baseline:
            await loop.create_future()
        else:
            async with db.acquire():
                pass

    tasks = [asyncio.create_task(waiter()) for _ in range(waiters)]
    try:
        with anyio.fail_after(GRACE):
            await all_parked.wait()
        await asyncio.sleep(0.01)  # the last one queues
        order = tasks[:]
        random.Random(seed).shuffle(order)
        start = time.perf_counter()
        for task in order:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.perf_counter() - start
        left = db.stats().waiting
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await db.release(holder)
        await db.disconnect()
    return {"us_per_cancel": elapsed / waiters * 1e6, "left_waiting": float(left)}


# ---------------------------------------------------------------------- the runner


def runnable(plan: Plan, subjects: Sequence[Subject], wid: str) -> list[Subject]:
    """The subjects that run workload ``wid``: it applies to them and they are available."""
    return [s for s in subjects if wid in s.applies and s.unavailable is None]


def units(plan: Plan, subjects: Sequence[Subject]) -> int:
    """How many measurements :func:`run` makes (for the progress bar)."""
    per_round = 0
    for wid in plan.workloads:
        n = len(runnable(plan, subjects, wid))
        if wid == "W1":
            per_round += len(plan.w1_tasks) * (n + (2 if plan.w1_extras else 0))
            per_round += n if plan.w1_extras else 0
        elif wid in ("W2", "W3"):
            per_round += n
        elif wid == "W4":
            per_round += sum(1 for s in runnable(plan, subjects, wid) if s.has_timeout)
        elif wid == "W5":
            per_round += n if plan.scheme != "sqlite" else 0
        elif wid == "W6":
            per_round += 2 * (len(plan.w6_sizes) + len(plan.w6_cancel_sizes))
        elif wid == "RW":
            per_round += n + 1 if _rw_path(plan) is not None else 0
    return per_round * plan.rounds


class _Runner:
    def __init__(self, plan: Plan, results: Results, progress: Progress) -> None:
        self.plan = plan
        self.results = results
        self.progress = progress

    async def measure(
        self, wid: str, case: str, name: str, limit: float, body: Callable[[], Awaitable[T]]
    ) -> T | None:
        """Run one measurement, bounded in time; a failure is noted, not fatal."""
        try:
            with anyio.fail_after(limit + GRACE):
                return await body()
        except Exception as exc:
            self.results.error(wid, case, name, exc)
            return None
        finally:
            self.progress.update(f"{wid} {case} {name}".strip())


async def run(plan: Plan, results: Results, progress: Progress) -> None:
    """Run ``plan``, filling ``results``."""
    subjects, skipped = subjects_for(
        plan.url, styles=plan.styles, peers=plan.peers, meter=plan.meter
    )
    results.skipped.update(skipped)
    for subject in subjects:
        applies = [w for w in plan.workloads if w in subject.applies]
        results.add_pool(subject.name, subject.role, subject.label, subject.note,
                         style=subject.style, applies=applies, driver=subject.driver)
        if subject.unavailable is not None:
            results.unavailable[subject.name] = subject.unavailable
    runner = _Runner(plan, results, progress)
    steps = {"W1": _w1, "W2": _w2, "W3": _w3, "W4": _w4, "W5": _w5, "W6": _w6, "RW": _rw}
    for wid in plan.workloads:
        await steps[wid](runner, runnable(plan, subjects, wid))


async def _w1(runner: _Runner, subjects: list[Subject]) -> None:
    plan, results = runner.plan, runner.results
    stubs = stub_subjects()
    groups = [("W1", subjects), ("W1-stub", stubs)] if plan.w1_extras else [("W1", subjects)]
    for r in range(plan.rounds):
        for tasks in plan.w1_tasks:
            case = f"C={tasks}"
            for wid, group in groups:
                for s in _order(group, r):
                    body = partial(
                        w1_cycles, s, size=plan.size, tasks=tasks, duration=plan.duration
                    )
                    m = await runner.measure(wid, case, s.name, plan.duration, body)
                    if m is not None:
                        results.add(wid, case, s.name, m)
        # The literal cycle, with nothing in between, one task: the fast path alone.
        for s in _order(subjects if plan.w1_extras else [], r):
            body = partial(
                w1_cycles, s, size=plan.size, tasks=1, duration=plan.duration, hold=False
            )
            m = await runner.measure("W1-bare", "C=1", s.name, plan.duration, body)
            if m is not None:
                results.add("W1-bare", "C=1", s.name, m)


async def _w2(runner: _Runner, subjects: list[Subject]) -> None:
    plan, results = runner.plan, runner.results
    for r in range(plan.rounds):
        for s in _order(subjects, r):
            body = partial(
                w2_select1, s, size=plan.size, tasks=plan.w2_tasks, duration=plan.duration,
                waits=results.waits_of("W2", s.name),
            )
            out = await runner.measure("W2", "", s.name, plan.duration, body)
            if out is not None:
                metrics, stats = out
                results.add("W2", "", s.name, metrics)
                if stats is not None:
                    results.stats["W2"] = stats


async def _w3(runner: _Runner, subjects: list[Subject]) -> None:
    plan, results = runner.plan, runner.results
    for r in range(plan.rounds):
        for s in _order(subjects, r):
            body = partial(
                w3_fairness, s, tasks=W3_TASKS, size=W3_SIZE, hold=W3_HOLD,
                duration=plan.duration, waits=results.waits_of("W3", s.name),
            )
            m = await runner.measure("W3", "", s.name, plan.duration, body)
            if m is not None:
                results.add("W3", "", s.name, m)


async def _w4(runner: _Runner, subjects: list[Subject]) -> None:
    plan, results = runner.plan, runner.results
    timed = [s for s in subjects if s.has_timeout]
    for r in range(plan.rounds):
        for s in _order(timed, r):
            body = partial(w4_timeout, s, wait=W4_TIMEOUT, attempts=plan.w4_attempts)
            out = await runner.measure(
                "W4", "", s.name, plan.w4_attempts * (W4_TIMEOUT + 5), body
            )
            if out is not None:
                metrics, kinds, lates = out
                results.add("W4", "", s.name, metrics)
                results.add_labels("W4", "", s.name, "error", kinds)
                results.add_labels("W4", "", s.name, "late_each", lates)


async def _w5(runner: _Runner, subjects: list[Subject]) -> None:
    plan, results = runner.plan, runner.results
    if plan.scheme == "sqlite":
        results.note("W5 skipped: SQLite has no TCP connection to delay; run with a server URL.")
        return
    parts = urlsplit(plan.url)
    if not parts.hostname:
        results.note("W5 skipped: the URL names no TCP host to put the delaying proxy before.")
        return
    port = parts.port or {"postgresql": 5432, "mysql": 3306}.get(plan.scheme, 0)
    async with delay_proxy(parts.hostname, port, delay=W5_DELAY) as proxy:
        proxied = _via(plan.url, proxy.host, proxy.port)
        classes = {s.name: type(s) for s in subjects}
        factories: dict[str, Callable[[str], Subject]] = dict(classes)

        def opened() -> int:
            return proxy.accepted

        for r in range(plan.rounds):
            for name in _order(list(classes), r):
                body = partial(
                    w5_spike, factories[name](proxied), size=plan.size, requests=W5_REQUESTS,
                    opened=opened,
                )
                m = await runner.measure("W5", "", name, 10 * W5_DELAY * W5_REQUESTS, body)
                if m is not None:
                    results.add("W5", "", name, m)


async def _w6(runner: _Runner, subjects: list[Subject]) -> None:
    plan, results = runner.plan, runner.results
    for r in range(plan.rounds):
        for waiters in plan.w6_sizes:
            case = f"{waiters} waiters"
            for name, baseline in _order([("pool", False), ("asyncio", True)], r):
                body = partial(w6_handoff, waiters, plan.w6_window, baseline=baseline)
                m = await runner.measure("W6", case, name, plan.w6_window, body)
                if m is not None:
                    results.add("W6", case, name, m)
        for waiters in plan.w6_cancel_sizes:
            case = f"cancel {waiters}"
            for name, baseline in _order([("pool", False), ("asyncio", True)], r):
                body = partial(w6_cancel, waiters, seed=r, baseline=baseline)
                m = await runner.measure("W6", case, name, 0.0, body)
                if m is not None:
                    results.add("W6", case, name, m)


# ---------------------------------------------------------------------- RW


def _rw_path(plan: Plan) -> str | None:
    """The database file RW runs on; None where it cannot run (a server, memory)."""
    return sqlite_path(plan.url) if plan.scheme == "sqlite" else None


def _rw_setup(path: str) -> None:
    """Create and fill ``bench_rw`` once, in WAL mode as the pool's driver opens files."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=wal")
        conn.execute("CREATE TABLE IF NOT EXISTS bench_rw (id INTEGER PRIMARY KEY, v INTEGER)")
        conn.execute("DELETE FROM bench_rw")
        conn.executemany(
            "INSERT INTO bench_rw (id, v) VALUES (?, 0)", [(i,) for i in range(1, RW_ROWS + 1)]
        )
    finally:
        conn.close()


async def rw_mix(
    subject: Subject, *, size: int, tasks: int, duration: float, write_share: float, seed: int
) -> tuple[Metrics, str | None]:
    """``tasks`` tasks loop acquire -> read or update one row -> release.

    A unit of work is an update with probability ``write_share`` (committed
    when it returns), else a read of one row by id. SQLite lets one writer at
    a time into a database (in WAL mode readers never wait for it), so more
    connections raise reads/s but never writes/s past one writer's rate: the
    row named :data:`ONE_WRITER` measures that rate. A unit of work that
    fails (``database is locked`` after ``busy_timeout``) is counted, not
    retried; the first such error is returned.
    """
    await subject.open(size)
    try:
        acquire, read, write = subject.acquire, subject.read, subject.write
        clock = time.perf_counter
        reads = writes = errors = 0
        first_error: str | None = None
        write_lat: list[float] = []
        read_lat: list[float] = []
        start = deadline = 0.0

        def go() -> None:
            nonlocal start, deadline
            start = clock()
            deadline = start + duration

        async def worker(key: int) -> None:
            nonlocal reads, writes, errors, first_error
            rng = random.Random(seed * 100_003 + key)  # the same draws for every subject
            while clock() < deadline:
                row = rng.randrange(RW_ROWS) + 1
                is_write = rng.random() < write_share
                t0 = clock()
                try:
                    async with acquire(key) as conn:
                        await (write if is_write else read)(conn, row)
                except Exception as exc:  # counted: a lock timeout is a result here
                    errors += 1
                    if first_error is None:
                        first_error = f"{_error_name(exc)}: {exc}"
                    continue
                if is_write:
                    writes += 1
                    write_lat.append(clock() - t0)
                else:
                    reads += 1
                    read_lat.append(clock() - t0)

        await _run_all(tasks, worker, go)
        elapsed = clock() - start
        write_lat.sort()
        read_lat.sort()
        return {
            "ops_per_s": (reads + writes) / elapsed,
            "reads_per_s": reads / elapsed,
            "writes_per_s": writes / elapsed,
            "errors": float(errors),
            "read_p99": _percentile(read_lat, 0.99),
            "write_p99": _percentile(write_lat, 0.99),
        }, first_error
    finally:
        await _close(subject)


async def _rw(runner: _Runner, subjects: list[Subject]) -> None:
    plan, results = runner.plan, runner.results
    path = _rw_path(plan)
    if path is None:
        results.note("RW skipped: the read/write mix runs on a SQLite file (the default).")
        return
    await anyio.to_thread.run_sync(_rw_setup, path)
    writer = Limit(plan.url)
    results.add_pool(ONE_WRITER, "limit", "1 writer (one raw connection, one task, writes only)",
                     "", style="both", applies=["RW"])
    results.note(
        f"RW: {plan.w2_tasks} tasks on {plan.size} connections, each unit of work an UPDATE "
        f"of one row ({RW_WRITE_SHARE:.0%}) or a read of one by id; SQLite admits one "
        f"writer at a time, so '{ONE_WRITER}' (one connection writing alone) is the ceiling "
        "for writes/s, whatever the pool."
    )
    for r in range(plan.rounds):
        runs: list[tuple[Subject, str, int, int, float]] = [
            (s, s.name, plan.size, plan.w2_tasks, RW_WRITE_SHARE) for s in subjects
        ]
        runs.append((writer, ONE_WRITER, 1, 1, 1.0))
        for s, name, size, tasks, share in _order(runs, r):
            body = partial(
                rw_mix, s, size=size, tasks=tasks, duration=plan.duration,
                write_share=share, seed=r,
            )
            out = await runner.measure("RW", "", name, plan.duration, body)
            if out is not None:
                metrics, first_error = out
                results.add("RW", "", name, metrics)
                if first_error is not None:
                    results.note(f"RW {name}: first failed unit of work: {first_error}"[:300])
