"""The engine: a bounded set of live connections lent fairly to many tasks.

State is kept step by step, never rebuilt by scanning:

* ``_idle``: a deque of idle connections, reused last-in first-out so that the
  surplus ones age out;
* ``_waiters``: an ordered dict used as a FIFO queue with O(1) removal from the
  middle (a cancelled waiter leaves without a scan);
* ``_sleepers``: the waiters that are not opening a connection themselves, so
  that one can be woken in O(1) to open when capacity frees up;
* ``_size``: open plus opening connections, never above the limit.

There is no background task for growth: a waiter that finds spare capacity
opens the connection itself, inside its own ``pool_timeout``, and the finished
connection goes to the *oldest* waiter, which keeps FIFO order strict. This is
what lets the pool connect lazily, like Prisma, with no task group to host.
Growth is a slow start (openings in flight never outnumber open connections),
and an opener served by a released connection first abandons its opening.

On asyncio a waiter awaits a bare future and the waiters on the pool's own
timeout share one loop timer (``_timed``); on trio it waits on an anyio Event
inside a cancel scope. Background maintenance (expiry, leak reports) runs only
in the task group that ``async with pool:`` owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from types import CodeType, FrameType, TracebackType
from typing import Any, Final, Generic, TypeVar

import anyio
import anyio.abc
import sniffio

from . import _config, _registry
from ._driver import Driver, load_driver
from ._errors import (
    ConnectError,
    Holder,
    PoolClosedError,
    PoolError,
    PoolTimeoutError,
    TooManyWaitersError,
)
from ._stats import PoolStats

__all__ = ["Pool"]

logger = logging.getLogger("pool")

C = TypeVar("C")

_PACKAGE_DIR: Final = os.path.dirname(os.path.abspath(__file__))
# this package's source files: a frame from one of them is not the user's call site
_PACKAGE_FILES: Final = frozenset(
    os.path.join(_PACKAGE_DIR, name) for name in os.listdir(_PACKAGE_DIR) if name.endswith(".py")
)
# how long clean-up (a rollback, a graceful close) may take before we give up
# and drop the socket; it runs shielded, so it must be bounded
_CLEANUP_TIMEOUT: Final = 5.0

_JITTER: Final = 0.05
# the circuit breaker's back-off after consecutive connect failures: short, so
# that the pool is back within a second of the server
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 0.5

_CLOSED, _OPEN, _CLOSING = "closed", "open", "closing"

_NO_SCOPE: Final = contextlib.nullcontext()

# Connections a forked child inherited from its parent: see Pool._forget_after_fork.
_INHERITED: list[object] = []


def _format_seconds(value: float) -> str:
    """``10.0`` -> ``"10"``, ``0.25`` -> ``"0.25"``: whole numbers print without ``.0``."""
    return str(int(value)) if value == int(value) else repr(value)


class _Conn:
    """The engine's record of one open connection. Users see only ``raw``."""

    __slots__ = (
        "epoch", "expires_at", "fresh_until", "idle_limit", "idle_since", "leak_reported_for",
        "lent_at", "raw", "site_code", "site_offset", "task",
    )

    def __init__(self, raw: Any, now: float, epoch: int, lifetime: float, max_idle: float) -> None:
        self.raw = raw
        self.idle_since = now
        self.lent_at = now
        # A little random jitter (up to 5% shorter), so that connections opened
        # together do not all expire, and reconnect, at the same moment.
        jitter = 1.0 - random.random() * _JITTER
        self.expires_at = now + lifetime * jitter
        self.idle_limit = max_idle * jitter
        # until when it may be lent with no check: set each time it goes idle
        self.fresh_until = now
        self.epoch = epoch
        # the lent_at of the lending already reported as a leak: reporting keys on
        # it, so that releasing needs no reset (one store less on the fast path)
        self.leak_reported_for = -1.0
        # who holds it, for diagnosis; set when lent
        self.task: object = None
        # where it was acquired: the caller's code and instruction offset (reading
        # f_lineno costs ~300 ns; the line is worked out only for a report)
        self.site_code: CodeType | None = None
        self.site_offset = 0


class _Waiter:
    """One caller waiting in the queue.

    On asyncio it waits on a bare future, and its deadline is a loop timer: an
    anyio cancel scope with a deadline costs about 8 us per wait there, more
    than all the rest of a handoff. On trio it waits on an anyio Event, and the
    caller bounds the wait with a cancel scope.
    """

    __slots__ = (
        "conn", "deadline", "error", "loop", "must_open", "opening", "signal", "timed_out",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.signal: asyncio.Future[None] | anyio.Event = (
            loop.create_future() if loop is not None else anyio.Event()
        )
        self.conn: _Conn | None = None
        self.error: BaseException | None = None
        # capacity was reserved for this waiter to open a connection itself
        self.must_open = False
        self.timed_out = False
        self.deadline = math.inf
        # while it opens a connection: the scope to abort that, if it is served first
        self.opening: anyio.CancelScope | None = None

    def wake(self) -> None:
        if self.opening is not None:
            # Served (or failed) while opening: it needs that connection no more.
            self.opening.cancel()
        signal = self.signal
        if isinstance(signal, anyio.Event):
            signal.set()
        elif not signal.done():  # a cancelled wait cancels its future too
            signal.set_result(None)

    def woken(self) -> bool:
        signal = self.signal
        return signal.is_set() if isinstance(signal, anyio.Event) else signal.done()

    def rearm(self) -> None:
        """Woken for another reason than a connection: wait on a fresh signal."""
        self.signal = self.loop.create_future() if self.loop is not None else anyio.Event()

    async def wait(self) -> None:
        signal = self.signal
        if isinstance(signal, anyio.Event):
            await signal.wait()
            return
        try:
            await signal
        except asyncio.CancelledError:
            # Cancelling the task cancelled the future it awaited; a waiter that
            # goes on waiting (a breaker's back-off ended) needs a live one.
            if signal.cancelled():
                self.signal = signal.get_loop().create_future()
            raise

    def expire(self) -> None:
        """The loop timer's callback: the deadline passed."""
        self.timed_out = True
        self.wake()


def _server_is_gone(exc: BaseException | None) -> bool:
    """Does this connect error show the server itself is down (refused, shutting down)?"""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ConnectionRefusedError):
            return True
        # PostgreSQL's 57P03 (cannot_connect_now): starting up or shutting down
        if getattr(exc, "sqlstate", None) == "57P03":
            return True
        # MySQL's 2003: can't connect to the server
        if getattr(exc, "args", (None,))[:1] == (2003,):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _task_of(library: str) -> Callable[[], object]:
    """A cheap "which task is this" for the running event loop, for diagnosis."""
    if library == "trio":
        import trio

        return trio.lowlevel.current_task
    import asyncio

    # asyncio.current_task() costs ~350 ns on CPython 3.11, a third of a whole
    # fast acquire; the registry it reads is a dict keyed by loop (~50 ns).
    registry = getattr(asyncio.tasks, "_current_tasks", None)
    if isinstance(registry, dict):
        return functools.partial(registry.get, asyncio.get_running_loop())
    return asyncio.current_task


def _checkpoint_if_cancelled_for(library: str) -> Callable[[], Awaitable[None]]:
    """anyio's checkpoint_if_cancelled, with its backend looked up once, not per call.

    The public function finds the backend through sniffio on every call: 60 % of
    its cost, paid on every acquire that waited.
    """
    try:
        from anyio._core._eventloop import get_async_backend

        check: Callable[[], Awaitable[None]] = get_async_backend(library).checkpoint_if_cancelled
    except (ImportError, AttributeError, LookupError):  # moved in some anyio release
        check = anyio.lowlevel.checkpoint_if_cancelled
    return check


def _no_task() -> None:
    return None


def _task_name(task: object) -> str:
    if task is None:
        return "<unknown task>"
    get_name = getattr(task, "get_name", None)
    return str(get_name() if get_name else getattr(task, "name", repr(task)))


def _site_of(rec: _Conn) -> str:
    code = rec.site_code
    if code is None:
        return "<unknown>"
    line = code.co_firstlineno
    for start, end, number in code.co_lines():
        if start <= rec.site_offset < end and number is not None:
            line = number
            break
    return f"{code.co_filename}:{line}"


def _outside_package(frame: FrameType) -> FrameType:
    """The first frame outside this package: the user's call site."""
    while frame.f_code.co_filename in _PACKAGE_FILES and frame.f_back is not None:
        frame = frame.f_back
    return frame


class Pool(Generic[C]):
    """A connection pool for one database URL.

    Constructing it validates the settings and opens nothing: the first acquire
    connects (lazily, like Prisma). ``async with pool:`` connects eagerly and
    disconnects at the end. Keyword overrides (``connection_limit=5``) win over
    the URL's parameters. ``driver`` plugs in an adapter of your own (any object
    satisfying :class:`pool.Driver`); the URL then only carries pool settings.

    >>> db = Pool("postgresql://app@localhost/shop?connection_limit=5")
    >>> async with db.acquire() as conn:   # the driver's own connection
    ...     await conn.fetch("SELECT 1")
    """

    def __init__(
        self, url: str, /, *, driver: Driver[C] | None = None, **overrides: object
    ) -> None:
        parsed = _config.parse(url, overrides, any_scheme=driver is not None)
        self._config: Final = parsed.config
        cfg = parsed.config
        if driver is None:
            # The adapter is the only thing that keeps the password.
            driver = load_driver(
                cfg.scheme,
                parsed.driver_url,
                connect_timeout=cfg.connect_timeout,
                socket_timeout=cfg.socket_timeout,
            )
        self._driver: Driver[C] = driver
        # bound once: the fast paths call these on every acquire and release
        self._is_alive = driver.is_alive
        self._in_transaction = driver.in_transaction
        self._secrets = _config.secrets_of(parsed.driver_url)
        self._limit = cfg.connection_limit
        self._wait_timeout = cfg.pool_timeout or math.inf
        self._max_waiting = cfg.max_waiting
        self._lifetime = cfg.max_connection_lifetime or math.inf
        self._max_idle = cfg.max_idle_connection_lifetime or math.inf
        self._check_after = cfg.health_check_after

        self._state = _CLOSED
        self._epoch = 0
        self._idle: deque[_Conn] = deque()
        self._waiters: OrderedDict[_Waiter, None] = OrderedDict()
        self._sleepers: OrderedDict[_Waiter, None] = OrderedDict()
        self._lent: dict[int, _Conn] = {}
        # connections closed by disconnect() while held, until their holder lets go
        self._orphans: dict[int, _Conn] = {}
        self._size = 0
        self._opening = 0
        self._current_task: Callable[[], object] = _no_task  # set by _start()
        self._checkpoint_if_cancelled: Callable[[], Awaitable[None]] = (
            anyio.lowlevel.checkpoint_if_cancelled
        )
        self._before_exit: list[Callable[[], Awaitable[object]]] = []
        self._drained: anyio.Event | None = None
        self._server_checked = False
        self._is_shared = False
        # circuit breaker: consecutive connect failures, and until when to fail fast
        self._failures = 0
        self._breaker_until = 0.0
        self._last_connect_error: ConnectError | None = None
        self._leak_threshold = cfg.leak_detection_threshold
        self._maintenance: anyio.abc.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by _start() on asyncio
        # asyncio only: the waiters on the pool's own timeout, oldest (= first due)
        # first, and the one timer armed for the oldest of them
        self._timed: OrderedDict[_Waiter, None] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._target = _registry.target_of(cfg.scheme, parsed.driver_url)
        _registry.built(self)

        self._acquired = 0
        self._waited = 0
        self._timeouts = 0
        self._wait_seconds = 0.0
        self._opened = 0
        self._closed = 0

    # ------------------------------------------------------------------ public API

    @property
    def config(self) -> _config.PoolConfig:
        """The validated settings (the URL in it has its password redacted)."""
        return self._config

    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool's state and running totals."""
        idle = len(self._idle)
        return PoolStats(
            size=self._size,
            idle=idle,
            in_use=len(self._lent),
            opening=self._opening,
            waiting=len(self._waiters),
            limit=self._limit,
            acquired=self._acquired,
            waited=self._waited,
            timeouts=self._timeouts,
            wait_seconds=self._wait_seconds,
            opened=self._opened,
            closed=self._closed,
        )

    def acquire(self, *, timeout: float | None = None) -> _Acquire[C]:
        """Borrow a connection: ``async with db.acquire() as conn`` or ``await``.

        With ``await``, give it back with :meth:`release`. Waiters are served
        first-in first-out. ``timeout`` (seconds) overrides ``pool_timeout`` for
        this call; 0 waits forever.
        """
        if timeout is not None:
            _config.check_seconds("timeout", timeout)
        return _Acquire(self, timeout)

    async def release(self, conn: C) -> None:
        """Give back a connection taken with ``await db.acquire()``.

        A clean connection goes back with no round trip. One left in a
        transaction is rolled back; a broken or expired one is closed.
        """
        if not self._give_back(conn):
            await self._release(conn, None)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Run a query on a pooled connection and return all rows."""
        rows: list[Any] = await self._run(self._driver.fetch, sql, args)
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> Any | None:
        """Run a query and return its first row, or None."""
        return await self._run(self._driver.fetchrow, sql, args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """Run a query and return the first column of its first row."""
        return await self._run(self._driver.fetchval, sql, args)

    async def execute(self, sql: str, *args: Any) -> Any:
        """Run a statement; returns what the driver returns (status or row count)."""
        return await self._run(self._driver.execute, sql, args)

    async def _run(
        self,
        call: Callable[[C, str, Sequence[Any]], Awaitable[Any]],
        sql: str,
        args: tuple[Any, ...],
    ) -> Any:
        """Acquire, run one driver call, release: the body of the query helpers."""
        if type(sql) is not str:
            raise TypeError(f"sql must be a str, got {type(sql).__name__}")
        conn = self._take_idle()
        if conn is None:
            conn = await self._acquire(None)
        try:
            result = await call(conn, sql, args)
        except BaseException as exc:
            await self._release(conn, exc)
            raise
        if not self._give_back(conn):
            await self._release(conn, None)
        return result

    def transaction(self, *, timeout: float | None = None) -> _Transaction[C]:
        """``async with db.transaction() as conn``: commit on success, roll back on error.

        Cancellation rolls back too: the connection is closed, which makes the
        server discard the transaction.
        """
        if timeout is not None:
            _config.check_seconds("timeout", timeout)
        return _Transaction(self, timeout)

    async def connect(self) -> None:
        """Open one connection now (Prisma's ``$connect``), so a bad URL fails at start-up.

        Does nothing if the pool already holds a connection.
        """
        if self._state == _OPEN and self._size:
            return
        conn = await self._acquire(None)
        await self._release(conn, None)

    def on_before_exit(self, callback: Callable[[], Awaitable[object]]) -> None:
        """Register an async callback that :meth:`disconnect` runs first.

        Callbacks run in the order registered, before any connection is closed,
        so they may still use the pool (flush a queue, write a last row). An
        error in one is logged and does not stop the others.
        """
        if not callable(callback):
            raise TypeError(f"callback must be an async callable, got {callback!r}")
        self._before_exit.append(callback)

    async def disconnect(self, *, grace: float = 0.0) -> None:
        """Close every connection (Prisma's ``$disconnect``). Idempotent; never hangs.

        Runs the :meth:`on_before_exit` callbacks, then fails every waiter with
        :class:`PoolClosedError`, closes the idle connections, waits up to
        ``grace`` seconds for held ones to come back, and closes the rest. The
        pool can be used again afterwards: it reconnects lazily.
        """
        _config.check_seconds("grace", grace)
        if self._state != _OPEN:
            return
        await self._run_before_exit()
        if self._state != _OPEN:
            return  # a callback disconnected us
        self._state = _CLOSING
        closing = PoolClosedError("the pool was disconnected while this call waited")
        try:
            self._fail_waiters(closing)
            with anyio.CancelScope(shield=True):
                idle = list(self._idle)
                self._idle.clear()
                await self._close_all(idle)
                if self._lent and grace > 0:
                    self._drained = anyio.Event()
                    with anyio.move_on_after(grace):
                        await self._drained.wait()
            # Whoever still holds a connection has had their grace: close it.
            lent = list(self._lent.values())
            self._lent.clear()
            # Their holders may still release them: that must stay harmless.
            self._orphans.update((id(rec.raw), rec) for rec in lent)
            for rec in lent:
                self._driver.terminate(rec.raw)
            self._closed += len(idle) + len(lent)
        finally:
            # A new epoch: an opener still connecting, or a holder releasing a
            # connection we already closed, finds its record stale and leaves
            # the counters alone.
            self._epoch += 1
            self._size = 0
            self._opening = 0
            self._state = _CLOSED
            self._timed.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            _registry.closed(self, self._target)
        logger.info("Disconnected the %s pool.", self._driver.scheme)

    async def _run_before_exit(self) -> None:
        for callback in self._before_exit:
            try:
                with anyio.CancelScope(shield=True):
                    await callback()
            except Exception:
                logger.exception("an on_before_exit callback failed: %r", callback)

    async def _close_all(self, recs: list[_Conn]) -> None:
        """Close gracefully, all at once, within one bound; then drop what is left."""
        if not recs:
            return
        with anyio.move_on_after(_CLEANUP_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for rec in recs:
                    tg.start_soon(self._close_gracefully, rec)
        for rec in recs:
            self._driver.terminate(rec.raw)  # a no-op for those already closed

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connections without closing them.

        They are kept referenced, never collected: collecting an asyncio
        transport unregisters its socket from the event loop's epoll instance,
        which the child shares with its parent, and the parent's next query
        would then wait forever for a reply it is never told about.
        """
        _INHERITED.extend(rec.raw for rec in (*self._idle, *self._lent.values()))
        _INHERITED.extend(rec.raw for rec in self._orphans.values())
        self._idle.clear()
        self._lent.clear()
        self._orphans.clear()
        self._waiters.clear()
        self._sleepers.clear()
        self._timed.clear()
        self._timer = None  # the parent's loop: never touched here
        self._epoch += 1
        self._size = self._opening = 0
        self._state = _CLOSED

    async def __aenter__(self) -> Pool[C]:
        """Connect now, and run the pool's maintenance until the block ends.

        Maintenance closes connections past ``max_idle_connection_lifetime`` or
        ``max_connection_lifetime`` and reports leaks, even when nobody calls
        the pool. It runs in a task group that this block owns.
        """
        await self.connect()
        group = anyio.create_task_group()
        await group.__aenter__()
        group.start_soon(self._maintain)
        self._maintenance = group
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._maintenance = self._maintenance, None
        try:
            if group is not None:
                group.cancel_scope.cancel()
                await group.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True):
                await self.disconnect()

    async def _maintain(self) -> None:
        """Background upkeep, every ``tick`` seconds, for as long as the pool is open."""
        limits = [
            x
            for x in (self._max_idle, self._lifetime, self._leak_threshold or math.inf)
            if x < math.inf
        ]
        tick = min(1.0, max(0.05, min(limits, default=4.0) / 4))
        while True:
            await anyio.sleep(tick)
            if self._state != _OPEN:
                continue
            try:
                expired = self._take_expired()
                if expired:
                    await self._close_all(expired)
                self._report_leaks()
            except Exception:  # upkeep must never take the pool (or its owner) down
                logger.exception("pool maintenance failed; it will run again")

    def _take_expired(self) -> list[_Conn]:
        """Remove the idle connections that expired; they are closed by the caller."""
        now = time.monotonic()
        keep: deque[_Conn] = deque()
        expired: list[_Conn] = []
        for rec in self._idle:
            if (
                now - rec.idle_since >= rec.idle_limit
                or now >= rec.expires_at
                or not self._driver.is_alive(rec.raw)
            ):
                expired.append(rec)
            else:
                keep.append(rec)
        if expired:
            self._idle = keep
            self._size -= len(expired)
            self._closed += len(expired)
            logger.debug("closing %d expired idle connection(s)", len(expired))
            self._wake_openers()
        return expired

    def _report_leaks(self) -> None:
        threshold = self._leak_threshold
        if threshold is None:
            return
        now = time.monotonic()
        for rec in self._lent.values():
            if rec.leak_reported_for != rec.lent_at and now - rec.lent_at > threshold:
                rec.leak_reported_for = rec.lent_at
                logger.warning(
                    "Possible connection leak: %s has held a connection for %.1fs "
                    "(leak_detection_threshold=%s); it was acquired at %s",
                    _task_name(rec.task),
                    now - rec.lent_at,
                    _format_seconds(threshold),
                    _site_of(rec),
                )

    def __repr__(self) -> str:
        return (
            f"<Pool {self._config.url} [in use {len(self._lent)}, idle {len(self._idle)}, "
            f"waiting {len(self._waiters)}, limit {self._limit}]>"
        )

    # ------------------------------------------------------------------ acquire

    def _start(self) -> None:
        """Move from closed to open on first use (the lazy connect)."""
        if self._state == _CLOSING:
            raise PoolClosedError("the pool is disconnecting")
        library = sniffio.current_async_library()
        self._current_task = _task_of(library)
        self._checkpoint_if_cancelled = _checkpoint_if_cancelled_for(library)
        self._loop = asyncio.get_running_loop() if library == "asyncio" else None
        self._state = _OPEN
        self._server_checked = False
        logger.info("Starting a %s pool with %d connections.", self._driver.scheme, self._limit)
        _registry.opened(self, self._target, is_shared=self._is_shared)

    def _take_idle(self) -> C | None:
        """The fast path: an idle connection, nobody waiting. Synchronous: awaits nothing.

        Lends the most recently used idle connection if it can go out with no
        round trip; returns None when the caller must take the careful path.
        Called straight from the public entry points (so the user's frame is
        two levels up), it allocates nothing but the diagnosis it records.
        """
        idle = self._idle
        if not idle or self._waiters or self._state != _OPEN:
            return None
        rec = idle[-1]
        now = time.monotonic()
        if now >= rec.fresh_until or not self._is_alive(rec.raw):
            return None
        idle.pop()
        # _lend(), inlined: this is the hottest line of the pool
        rec.lent_at = now
        rec.task = self._current_task()
        frame = sys._getframe(2)  # the caller of the public entry point: the user
        if frame.f_code.co_filename in _PACKAGE_FILES:
            frame = _outside_package(frame)
        rec.site_code = frame.f_code
        rec.site_offset = frame.f_lasti
        raw: C = rec.raw
        self._lent[id(raw)] = rec
        self._acquired += 1
        return raw

    async def _acquire(self, wait_for: float | None) -> C:
        conn = self._take_idle()
        if conn is not None:
            return conn
        if self._state != _OPEN:
            self._start()
        idle = self._idle
        while idle and not self._waiters:
            rec = idle.pop()
            now = time.monotonic()
            alive = self._is_alive(rec.raw)
            if (
                not alive
                or now >= rec.expires_at
                or now - rec.idle_since >= rec.idle_limit
            ):
                self._discard(rec)
            elif now - rec.idle_since < self._check_after:
                return self._lend(rec, now)
            elif await self._ping(rec):
                # It sat idle long enough to doubt it, and it answered.
                return self._lend(rec, time.monotonic())
        return await self._acquire_slow(wait_for)

    async def _ping(self, rec: _Conn) -> bool:
        """Check a connection that sat idle a while; False (and closed) if it is dead."""
        self._lent[id(rec.raw)] = rec  # counted as in use while we check it
        try:
            with anyio.fail_after(self._config.connect_timeout or _CLEANUP_TIMEOUT):
                await self._driver.ping(rec.raw)
        except Exception:
            # A dead connection is not the caller's problem: close it, try another.
            if self._lent.pop(id(rec.raw), None) is rec:
                self._discard(rec)
            return False
        except BaseException:
            if self._lent.pop(id(rec.raw), None) is rec:
                self._discard(rec)
            raise
        return self._lent.pop(id(rec.raw), None) is rec

    def _lend(self, rec: _Conn, now: float) -> C:
        rec.lent_at = now
        rec.task = self._current_task()
        # The caller's file:line, for diagnosis: two frames up from the entry
        # points that call the fast path; walk out of this package otherwise.
        frame = sys._getframe(2)
        if frame.f_code.co_filename in _PACKAGE_FILES:
            frame = _outside_package(frame)
        rec.site_code = frame.f_code
        rec.site_offset = frame.f_lasti
        self._lent[id(rec.raw)] = rec
        self._acquired += 1
        raw: C = rec.raw
        return raw

    async def _acquire_slow(self, wait_for: float | None) -> C:
        if self._max_waiting and len(self._waiters) >= self._max_waiting:
            # Even a refusal yields once: a caller that retries in a loop must not
            # starve the other tasks of the event loop.
            await anyio.lowlevel.checkpoint()
            raise TooManyWaitersError(
                f"{len(self._waiters)} callers already wait for a connection "
                f"(max_waiting={self._max_waiting}); not queueing another"
            )
        if self._hopeless():
            await anyio.lowlevel.checkpoint()
            raise self._fail_fast_error()
        waiter = _Waiter(self._loop)
        self._waiters[waiter] = None
        if self._size < self._limit and self._may_open():
            self._reserve(waiter)
        else:
            self._sleepers[waiter] = None
        started = time.monotonic()
        wait = self._wait_timeout if wait_for is None else (wait_for or math.inf)
        loop = self._loop
        timer: asyncio.TimerHandle | None = None
        scope: contextlib.AbstractContextManager[Any]
        if loop is not None:
            deadline = waiter.deadline = loop.time() + wait  # = anyio.current_time()
            if wait_for is None and wait < math.inf:
                # The pool's own timeout: such waiters queue in deadline order,
                # so one pool timer on the oldest of them serves them all.
                self._timed[waiter] = None
                if self._timer is None:
                    self._timer = loop.call_at(deadline, self._expire_due)
            elif wait < math.inf:
                timer = loop.call_at(deadline, waiter.expire)
            scope = _NO_SCOPE
        else:
            deadline = anyio.current_time() + wait
            scope = anyio.CancelScope(deadline=deadline)
        with scope:
            try:
                while waiter.conn is None:
                    if waiter.error is not None:
                        raise waiter.error
                    if waiter.timed_out:
                        break
                    if waiter.must_open:
                        await self._open_before(waiter, deadline)
                        if (
                            waiter.conn is None
                            and waiter.error is None
                            and not waiter.timed_out
                            and waiter in self._waiters
                        ):
                            # Its new connection went to an older waiter (or the
                            # opening failed): it waits again, and may be woken to
                            # open again when capacity frees up.
                            waiter.rearm()
                            self._sleepers[waiter] = None
                            self._wake_openers()
                        continue
                    if self._failures and time.monotonic() < self._breaker_until:
                        # The breaker is open, and nothing may wake us when its
                        # back-off ends: look again then (we may be the probe).
                        # After it ends, a probe is in flight: its outcome wakes us.
                        with anyio.move_on_after(self._breaker_until - time.monotonic()):
                            await waiter.wait()
                        if not waiter.woken():
                            self._wake_openers()
                            continue
                    else:
                        await waiter.wait()
                    if waiter.conn is not None:
                        # Cancelled as it was handed the connection? Then it must
                        # pass it on (in the except below), not carry it away.
                        await self._checkpoint_if_cancelled()
                    elif waiter.error is None and not waiter.timed_out:
                        waiter.rearm()  # woken to open a connection
                if waiter.conn is not None:
                    if waiter.must_open:  # served before it began to open
                        self._unreserve(waiter)
                    now = time.monotonic()
                    self._waited += 1
                    self._wait_seconds += now - started
                    return self._lend(waiter.conn, now)
            except BaseException:
                self._abandon(waiter)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                self._timed.pop(waiter, None)
        self._abandon(waiter)
        self._timeouts += 1
        raise self._timeout_error(wait)

    def _expire_due(self) -> None:
        """The pool timer: time out every waiter whose deadline passed, re-arm for the next."""
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        timed = self._timed
        while timed:
            waiter = next(iter(timed))
            if waiter.deadline > now:
                self._timer = loop.call_at(waiter.deadline, self._expire_due)
                return
            timed.popitem(last=False)
            waiter.expire()

    async def _open_before(self, waiter: _Waiter, deadline: float) -> None:
        """Open a connection for ``waiter``, within its pool_timeout."""
        if self._loop is None:
            await self._open(waiter)  # the caller's cancel scope holds the deadline
            return
        with anyio.CancelScope(deadline=deadline) as scope:
            await self._open(waiter)
        if scope.cancelled_caught:
            waiter.timed_out = True

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gives up (timeout, cancellation, error): leave no trace."""
        if waiter.conn is not None:
            # Handed a connection as it gave up: pass it on to the next one.
            rec, waiter.conn = waiter.conn, None
            self._put(rec)
        else:
            self._waiters.pop(waiter, None)
            self._sleepers.pop(waiter, None)
        if waiter.must_open:
            self._unreserve(waiter)

    def _reserve(self, waiter: _Waiter) -> None:
        self._size += 1
        self._opening += 1
        waiter.must_open = True

    def _unreserve(self, waiter: _Waiter) -> None:
        waiter.must_open = False
        self._size -= 1
        self._opening -= 1
        self._wake_openers()

    def _may_open(self) -> bool:
        """Is there spare capacity, and demand not yet covered by an opening?"""
        if self._size >= self._limit or self._opening >= len(self._waiters):
            return False
        if self._failures:
            # The breaker is open: after the back-off, exactly one probe at a time.
            return self._opening == 0 and time.monotonic() >= self._breaker_until
        # Slow start: no more openings in flight than connections already open
        # (at least one), so growth doubles per connect round trip. A spike of
        # quick queries is served by the first connections instead of opening
        # the whole limit; HikariCP and psycopg_pool open one at a time.
        return self._opening < max(1, self._size - self._opening)

    def _hopeless(self) -> bool:
        """Connects keep failing and no connection is out to come back: fail fast."""
        return (
            self._failures > 0
            and not self._lent
            and not self._idle
            and self._opening == 0
            and time.monotonic() < self._breaker_until
        )

    def _fail_fast_error(self) -> ConnectError:
        last = self._last_connect_error
        error = ConnectError(
            f"{last} (failing fast: {self._failures} connect attempt(s) in a row failed; "
            f"the next one is tried in {max(0.0, self._breaker_until - time.monotonic()):.2f}s)"
        )
        error.__cause__ = last.__cause__ if last is not None else None
        return error

    def _wake_openers(self) -> None:
        """Capacity freed up while callers sleep: wake some to open connections."""
        while self._sleepers and self._may_open():
            waiter, _ = self._sleepers.popitem(last=True)
            self._reserve(waiter)
            waiter.wake()
        if self._waiters and self._hopeless():
            self._fail_waiters(self._fail_fast_error())

    def _fail_waiters(self, error: BaseException) -> None:
        for waiter in self._waiters:
            waiter.error = error
            waiter.wake()
        self._waiters.clear()
        self._sleepers.clear()

    async def _open(self, waiter: _Waiter) -> None:
        """Open one connection on the capacity reserved for ``waiter``.

        The new connection goes to the oldest waiter, which may be another one.
        If ``waiter`` is served by a released connection first, the opening is
        abandoned: the queue drains faster than a connection opens, so the pool
        does not need it. That is what bounds growth on a spike of quick
        requests, and why the newest waiter (served last) is the one that opens.
        """
        waiter.must_open = False  # the reservation is ours to settle now
        with anyio.CancelScope() as waiter.opening:
            try:
                await self._open_for(waiter)
            finally:
                waiter.opening = None

    async def _open_for(self, waiter: _Waiter) -> None:
        epoch = self._epoch
        raw: C | None = None
        try:
            with anyio.fail_after(self._config.connect_timeout or math.inf):
                raw = await self._driver.connect()
            if not self._server_checked:
                self._server_checked = True
                await self._check_server_ceiling(raw)
        except BaseException as exc:
            if raw is not None:
                self._driver.terminate(raw)
            if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
                if epoch == self._epoch:
                    self._size -= 1
                    self._opening -= 1
                    self._wake_openers()
                raise
            error = self._connect_error(exc)
            error.__cause__ = exc
            if epoch == self._epoch:
                self._size -= 1
                self._opening -= 1
                self._connect_failed(error, exc)
            raise error from exc
        if epoch != self._epoch or self._state != _OPEN:
            self._driver.terminate(raw)  # the pool was disconnected meanwhile
            return
        if self._failures:
            logger.info("Reconnected to the database after %d failed attempt(s).", self._failures)
            self._failures = 0
        self._opening -= 1
        self._opened += 1
        now = time.monotonic()
        self._put(_Conn(raw, now, epoch, self._lifetime, self._max_idle))
        # One more open connection: the slow start (or a closed breaker) may let
        # more of the callers still waiting open theirs.
        self._wake_openers()

    def _connect_failed(self, error: ConnectError, cause: BaseException) -> None:
        """A connect failed: open the breaker, and retire what the server took with it."""
        now = time.monotonic()
        self._failures += 1
        self._breaker_until = now + min(_BACKOFF_FIRST * 2 ** (self._failures - 1), _BACKOFF_MAX)
        self._last_connect_error = error
        if _server_is_gone(cause):
            # Refused: the server is down or restarting. Every connection opened
            # before now died with it; close the idle ones, and the lent ones when
            # they come back.
            for rec in self._lent.values():
                rec.expires_at = -math.inf  # closed when it comes back
            for rec in self._idle:
                self._driver.terminate(rec.raw)
                self._size -= 1
                self._closed += 1
            self._idle.clear()
        self._wake_openers()
        # Callers already asleep wait with no timer: wake them, so that each
        # looks again when this back-off ends (one of them will be the probe).
        for waiter in self._sleepers:
            waiter.wake()

    async def _check_server_ceiling(self, raw: C) -> None:
        """Once per start: warn when connection_limit alone exceeds the server's ceiling."""
        try:
            with anyio.fail_after(_CLEANUP_TIMEOUT):
                ceiling = await self._driver.server_max_connections(raw)
        except Exception:
            logger.debug("could not read the server's max_connections", exc_info=True)
            return
        if ceiling is not None and self._limit > ceiling:
            logger.warning(
                "connection_limit=%d exceeds the server's max_connections=%d: "
                "the pool can never reach its limit, and will starve other clients. "
                "See pool.recommended_connection_limit().",
                self._limit,
                ceiling,
            )

    # ------------------------------------------------------------------ release

    def _put(self, rec: _Conn, now: float | None = None) -> None:
        """A connection is free: hand it to the oldest waiter, or keep it idle."""
        if self._waiters:
            waiter, _ = self._waiters.popitem(last=False)
            self._sleepers.pop(waiter, None)
            waiter.conn = rec
            waiter.wake()
        else:
            if now is None:
                now = time.monotonic()
            rec.idle_since = now
            fresh = now + self._check_after
            rec.fresh_until = fresh if fresh < rec.expires_at else rec.expires_at
            self._idle.append(rec)

    def _give_back(self, raw: C) -> bool:
        """The fast release: a clean connection goes back with no round trip.

        Synchronous. Returns False, touching nothing, when the careful path
        must decide (unknown connection, in a transaction, broken, expired,
        or the pool is closing).
        """
        lent = self._lent
        key = id(raw)
        rec = lent.get(key)
        if rec is None or self._state != _OPEN:
            return False
        now = time.monotonic()
        if now >= rec.expires_at or not self._is_alive(raw) or self._in_transaction(raw):
            return False
        del lent[key]
        if self._waiters:
            self._put(rec, now)
        else:
            # _put(), inlined for the common case: nobody waits, it goes idle
            rec.idle_since = now
            fresh = now + self._check_after
            rec.fresh_until = fresh if fresh < rec.expires_at else rec.expires_at
            self._idle.append(rec)
        return True

    async def _release(self, raw: C, exc: BaseException | None) -> None:
        rec = self._lent.pop(id(raw), None)
        if rec is None:
            if self._orphans.pop(id(raw), None) is not None:
                return
            raise PoolError("this connection is not lent by this pool (released twice?)")
        rec.task = None
        if rec.epoch != self._epoch:
            return  # closed by disconnect() while it was held
        if self._state == _CLOSING:
            # disconnect() waits for its grace: close this one, tell it when all are back
            with anyio.CancelScope(shield=True):
                await self._close_gracefully(rec)
            self._closed += 1
            if not self._lent and self._drained is not None:
                self._drained.set()
            return
        driver = self._driver
        if exc is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
            # Cancelled mid-use: the connection may be mid-protocol. Closing it
            # is the only safe choice, and the server rolls back for us.
            self._discard(rec)
        elif not driver.is_alive(raw):
            self._discard(rec)
        elif driver.in_transaction(raw):
            await self._rollback_then_put(rec)
        elif rec.expires_at <= time.monotonic():
            self._discard(rec)
        else:
            self._put(rec)

    async def _rollback_then_put(self, rec: _Conn) -> None:
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(_CLEANUP_TIMEOUT):
                    await self._driver.rollback(rec.raw)
            except Exception:
                logger.debug("rollback on release failed; closing the connection", exc_info=True)
                self._discard(rec)
                return
        if rec.epoch == self._epoch:
            self._put(rec)

    def _discard(self, rec: _Conn) -> None:
        """Close a connection that must not be lent again. O(1), awaits nothing."""
        self._driver.terminate(rec.raw)
        if rec.epoch != self._epoch:
            return
        self._size -= 1
        self._closed += 1
        self._wake_openers()

    async def _close_gracefully(self, rec: _Conn) -> None:
        try:
            with anyio.fail_after(_CLEANUP_TIMEOUT):
                await self._driver.close(rec.raw)
        except Exception:
            self._driver.terminate(rec.raw)

    # ------------------------------------------------------------------ errors

    def _holders(self, top: int = 3) -> tuple[Holder, ...]:
        now = time.monotonic()
        # Only on the error path: a sort over the lent connections is fine here.
        longest = sorted(self._lent.values(), key=lambda rec: rec.lent_at)[:top]
        return tuple(
            Holder(
                task=_task_name(rec.task),
                call_site=_site_of(rec),
                held_for=now - rec.lent_at,
            )
            for rec in longest
        )

    def _timeout_error(self, waited: float) -> PoolTimeoutError:
        in_use, idle = len(self._lent), len(self._idle)
        opening, waiting = self._opening, len(self._waiters)
        holders = self._holders()
        message = (
            "Timed out fetching a new connection from the connection pool. "
            f"(Current connection pool timeout: {_format_seconds(waited)}, "
            f"connection limit: {self._limit}) "
            f"Pool state: {in_use} in use, {idle} idle, {opening} opening, "
            f"{waiting} waiting."
        )
        if holders:
            message += " Longest holders: " + "; ".join(str(h) for h in holders) + "."
        return PoolTimeoutError(
            message,
            timeout=waited,
            limit=self._limit,
            in_use=in_use,
            idle=idle,
            opening=opening,
            waiting=waiting,
            holders=holders,
        )

    def _connect_error(self, exc: BaseException) -> ConnectError:
        where = self._config.url.split("://", 1)[-1].rpartition("@")[2].split("/", 1)[0]
        detail = str(exc) or type(exc).__name__
        # A driver may echo its DSN: never let a password through.
        for secret in self._secrets:
            detail = detail.replace(secret, "***")
        return ConnectError(
            f"Can't reach database server at {where or self._config.scheme}: "
            f"{type(exc).__name__}: {detail}"
        )


class _Acquire(Generic[C]):
    """What ``Pool.acquire()`` returns: awaitable, and an async context manager."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: Pool[C], timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: C | None = None

    def __await__(self) -> Any:
        return self._await().__await__()

    async def _await(self) -> C:
        conn = self._pool._take_idle()
        if conn is None:
            conn = await self._pool._acquire(self._timeout)
        return conn

    async def __aenter__(self) -> C:
        pool = self._pool
        conn = pool._take_idle()
        if conn is None:
            conn = await pool._acquire(self._timeout)
        self._conn = conn
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        if exc is None and self._pool._give_back(conn):  # type: ignore[arg-type]
            return
        await self._pool._release(conn, exc)  # type: ignore[arg-type]


class _Transaction(Generic[C]):
    """``async with db.transaction() as conn``."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: Pool[C], timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: C | None = None

    async def __aenter__(self) -> C:
        pool = self._pool
        conn = await pool._acquire(self._timeout)
        try:
            await pool._driver.begin(conn)
        except BaseException as exc:
            await pool._release(conn, exc)
            raise
        self._conn = conn
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, conn = self._pool, self._conn
        self._conn = None
        assert conn is not None
        if exc is None:
            try:
                await pool._driver.commit(conn)
            except BaseException as commit_error:
                await pool._release(conn, commit_error)
                raise
            await pool._release(conn, None)
        else:
            # Any other error: _release rolls back (or closes, for a cancellation).
            await pool._release(conn, exc)

