"""The pool's I/O: waiting, opening, checking, rolling back, closing, upkeep.

Nothing here decides who gets which connection: every decision is a
synchronous call into the :class:`~pool._ledger.Ledger`, and every I/O step
reports its outcome back to it, which re-checks the state it finds then. An
I/O step the pool starts on its own behalf runs in a cancel scope the ledger
knows, so that ``disconnect()`` can cut it short and wait for its report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import anyio
import anyio.lowlevel

from . import _diagnosis, _shims
from ._config import PoolConfig
from ._conn import BUSY, LENT, Conn
from ._driver import Driver, check_runs_on
from ._errors import PoolClosedError, PoolError, TooManyWaitersError
from ._ledger import (
    BROKEN,
    CLOSE,
    CLOSED_STATE,
    CLOSING,
    OPEN,
    RECOVER,
    RELEASED,
    RESET_FAILED,
    Ledger,
)
from ._upkeep import Upkeep
from ._waiters import AsyncioWaiter, TrioWaiter, Waiter

__all__ = ["CLEANUP_TIMEOUT", "Engine", "Hook", "Hooks"]

logger = logging.getLogger("pool")

C = TypeVar("C")

#: how long clean-up (a rollback, a graceful close) may take before we give up
#: and drop the socket; it runs shielded, so it must be bounded
CLEANUP_TIMEOUT: Final = 5.0

_NO_SCOPE: Final = contextlib.nullcontext()

#: a connection hook: an async callable given the driver's own connection
Hook = Callable[[Any], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Hooks:
    """psycopg_pool's names: on each new connection, before each lending, on each release."""

    configure: Hook | None = None
    check: Hook | None = None
    reset: Hook | None = None


class Engine(Generic[C]):
    """Runs the I/O for one pool; its :class:`Ledger` keeps the books."""

    def __init__(
        self, driver: Driver[C], config: PoolConfig, secrets: tuple[str, ...], hooks: Hooks
    ) -> None:
        self.driver = driver
        self.config = config
        self.secrets = secrets
        self.hooks = hooks
        self.recover: Callable[[Any], Awaitable[None]] | None = getattr(driver, "recover", None)
        self.reset_session: Callable[[Any], Awaitable[None]] | None = (
            getattr(driver, "reset_session", None) if config.reset_session else None
        )
        self.ledger: Ledger[C] = Ledger(
            limit=config.connection_limit,
            is_alive=driver.is_alive,
            in_transaction=driver.in_transaction,
            terminate=driver.terminate,
            lifetime=config.max_connection_lifetime or math.inf,
            max_idle=config.max_idle_connection_lifetime or math.inf,
            check_after=config.health_check_after,
            tidy_every_release=config.reset_session or hooks.reset is not None,
            check_every_lending=hooks.check is not None,
            can_recover=self.recover is not None,
        )
        self.wait_timeout = config.pool_timeout or math.inf
        self.io_timeout = config.connect_timeout or CLEANUP_TIMEOUT
        # A multi-host URL tries each host within connect_timeout: the whole
        # connect may take that long per host.
        hosts = len(getattr(driver, "hosts", ()) or ()) or 1
        self.connect_timeout = (config.connect_timeout or math.inf) * hosts
        # Failover awareness, where the driver offers it: which server a
        # connection is on, and whether an error says that server is read-only.
        self.host_of: Callable[[Any], str] | None = getattr(driver, "host_of", None)
        self.is_broken_error: Callable[[BaseException], bool] | None = getattr(
            driver, "is_broken_error", None
        )
        wants_primary = getattr(driver, "wants_primary", False)
        self.is_read_only_error: Callable[[BaseException], bool] | None = (
            getattr(driver, "is_read_only_error", None) if wants_primary else None
        )
        self.is_disconnect_error: Callable[[BaseException], bool] | None = (
            getattr(driver, "is_disconnect_error", None) if wants_primary else None
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.checkpoint_if_cancelled: Callable[[], Any] = anyio.lowlevel.checkpoint_if_cancelled
        self.server_checked = False
        self.upkeep = Upkeep(self)
        #: set when the disconnect() in progress has closed everything
        self.disconnected: anyio.Event | None = None
        #: called when the pool opens, and when it closes without disconnect()
        #: (the registry counts it)
        self.on_open: Callable[[], None] = lambda: None
        self.on_close: Callable[[], None] = lambda: None
        #: set when the pool has a meter (pool._metrics): the seconds an acquire
        #: waited in the queue, and a connect took; the fast paths never look
        self.record_wait: Callable[[float], None] | None = None
        self.record_create: Callable[[float], None] | None = None

    # ------------------------------------------------------------ life cycle

    def start(self, library: str) -> None:
        """Closed to open, on first use (the lazy connect); starts the upkeep."""
        ledger = self.ledger
        if ledger.state is CLOSING:
            raise PoolClosedError("the pool is disconnecting")
        check_runs_on(self.driver, library)
        ledger.current_task = _shims.current_task_for(library)
        self.checkpoint_if_cancelled = _shims.checkpoint_if_cancelled_for(library)
        self.loop = asyncio.get_running_loop() if library == "asyncio" else None
        ledger.deadlines.loop = self.loop
        ledger.state = OPEN
        self.server_checked = False
        self.upkeep.start(library)
        logger.info(
            "Starting a %s pool with %d connections.", self.driver.scheme, ledger.limit
        )
        self.on_open()

    async def disconnect(self, grace: float) -> None:
        """Close every connection the pool ever opened, whoever holds it.

        The pool's own I/O in flight (checks, rollbacks, openings) is cut short,
        and the connections it was on are terminated at the end without waiting
        for it: their tasks find them closed when they report. A connection
        still being opened is not open yet; its opener closes it when the
        connect returns, finding the epoch changed.
        """
        ledger = self.ledger
        done = self.disconnected = anyio.Event()
        ledger.drained = anyio.Event()
        idle = ledger.begin_closing(
            PoolClosedError("the pool was disconnected while this call waited")
        )
        self.upkeep.stop()
        try:
            with anyio.CancelScope(shield=True):
                await self.close_all(idle)
                if ledger.lent and grace > 0:
                    with anyio.move_on_after(grace):
                        await ledger.drained.wait()
                ledger.orphan_lent()
                with anyio.move_on_after(CLEANUP_TIMEOUT):
                    await self.upkeep.stopped()
        finally:
            ledger.finish_closing()
            self.upkeep.forget()
            self.disconnected = None
            done.set()

    async def wait_disconnected(self) -> None:
        """Return once the disconnect() in progress, if any, has closed everything."""
        done = self.disconnected
        if done is not None:
            await done.wait()

    # ------------------------------------------------------------ acquire

    def ensure_started(self) -> None:
        """Open on first use, and move to the caller's event loop if it is another one."""
        ledger = self.ledger
        if ledger.state is OPEN:
            if self.loop is None or self.loop is _shims.running_loop():
                return
            self._move_to_this_loop()
        import sniffio

        self.start(sniffio.current_async_library())

    def _move_to_this_loop(self) -> None:
        """Used from a new event loop (a CLI's asyncio.run per command, a test's loop)."""
        old = self.loop
        assert old is not None
        if (self.ledger.lent or self.ledger.busy) and old.is_running() and not old.is_closed():
            raise PoolError(
                "this pool's connections are still lent on another running event loop; "
                "a pool serves one event loop at a time"
            )
        self.loop_ended("the pool is used from a new event loop")

    def loop_ended(self, why: str) -> None:
        """Drop every connection of the old event loop, without awaiting it."""
        if self.ledger.state is CLOSED_STATE:
            return
        self.upkeep.stop()
        self.ledger.drop_everything(
            PoolClosedError("the event loop this call waited on has ended")
        )
        self.upkeep.forget()
        self.on_close()
        logger.info(
            "%s: dropped its connections; the pool reopens on the next event loop that uses it.",
            why,
        )

    async def acquire(self, wait_for: float | None) -> C:
        """The careful acquire: check a doubtful idle connection, or queue."""
        ledger = self.ledger
        loop = self.loop
        if ledger.state is not OPEN or (loop is not None and loop is not _shims.running_loop()):
            self.ensure_started()
        epoch = ledger.epoch
        while ledger.idle:
            rec = ledger.take_for()
            if rec is None:
                break
            if rec.state is LENT:
                raw: C = rec.raw
                return raw
            if await self._check(rec):
                raw = rec.raw
                return raw
            if ledger.epoch != epoch or ledger.state is not OPEN:
                raise PoolClosedError("the pool was disconnected while this call waited")
        return await self._wait(wait_for)

    async def _check(self, rec: Conn) -> bool:
        """Check an idle connection before lending it. True: it is now lent to the caller.

        A ping if it sat idle a while, then the ``check`` hook if there is one,
        all within ``connect_timeout``.
        """
        ledger = self.ledger
        ok = False
        scope = anyio.CancelScope()
        ledger.scopes.add(scope)
        try:
            with scope, anyio.fail_after(self.io_timeout):
                if time.monotonic() - rec.idle_since >= ledger.check_after:
                    await self.driver.ping(rec.raw)
                if self.hooks.check is not None:
                    await self.hooks.check(rec.raw)
                ok = True
        except Exception:
            # A dead connection (or one the check refused) is not the caller's
            # problem: it is closed, and another one tried.
            logger.debug("an idle connection failed its check; closing it", exc_info=True)
        except BaseException:
            ledger.check_done(rec, False)  # cancelled mid-check: its state is unknown
            raise
        finally:
            ledger.scopes.discard(scope)
        return ledger.check_done(rec, ok)

    async def _wait(self, wait_for: float | None) -> C:
        ledger = self.ledger
        max_waiting = self.config.max_waiting
        if max_waiting and len(ledger.waiters) >= max_waiting:
            # Even a refusal yields once: a caller that retries in a loop must not
            # starve the other tasks of the event loop.
            await anyio.lowlevel.checkpoint()
            raise TooManyWaitersError(
                f"{len(ledger.waiters)} callers already wait for a connection "
                f"(max_waiting={max_waiting}); not queueing another"
            )
        if ledger.hopeless():
            await anyio.lowlevel.checkpoint()
            raise ledger.breaker.fail_fast_error()
        loop = self.loop
        waiter: Waiter = AsyncioWaiter(loop) if loop is not None else TrioWaiter()
        started = waiter.started = time.monotonic()
        ledger.enqueue(waiter)
        wait = self.wait_timeout if wait_for is None else (wait_for or math.inf)
        timer: asyncio.TimerHandle | None = None
        scope: contextlib.AbstractContextManager[Any]
        if loop is not None:
            deadline = waiter.deadline = loop.time() + wait  # = anyio.current_time()
            if wait_for is None and wait < math.inf:
                # the pool's own timeout: they queue in deadline order, and one
                # timer on the oldest serves them all (Deadlines.add, inlined)
                deadlines = ledger.deadlines
                deadlines.timed[waiter] = None  # type: ignore[index]  # asyncio's waiter
                if deadlines.timer is None:
                    deadlines.timer = loop.call_at(deadline, deadlines.expire_due)
            elif wait < math.inf:
                timer = loop.call_at(deadline, waiter.expire)
            scope = _NO_SCOPE
        else:
            deadline = anyio.current_time() + wait
            scope = anyio.CancelScope(deadline=deadline)
        with scope:
            try:
                while True:
                    while waiter.conn is None:
                        if waiter.error is not None:
                            raise waiter.error
                        if waiter.timed_out:
                            break
                        if waiter.reserved >= 0:
                            await self._open(waiter, deadline)
                            if (
                                waiter.conn is None
                                and waiter.error is None
                                and not waiter.timed_out
                                and waiter in ledger.waiters
                            ):
                                # Its new connection went to an older waiter (or the
                                # opening was abandoned): it waits again, and may be
                                # woken to open again when capacity frees up.
                                waiter.rearm()
                                ledger.sleepers[waiter] = None
                                ledger.wake_openers()
                            continue
                        breaker = ledger.breaker
                        if breaker.failures and breaker.backing_off():
                            # Nothing may wake us when the back-off ends: look again
                            # then (we may be the probe).
                            with anyio.move_on_after(breaker.remaining()):
                                await waiter.wait()
                            if not waiter.woken():
                                ledger.wake_openers()
                                continue
                        else:
                            await waiter.wait()
                        if waiter.conn is not None:
                            # Cancelled as it was handed the connection? Then it must
                            # pass it on (in the except below), not carry it away.
                            await self.checkpoint_if_cancelled()
                        elif waiter.error is None and not waiter.timed_out:
                            waiter.rearm()  # woken to open a connection
                    if waiter.conn is None:
                        break  # timed out
                    ledger.unreserve(waiter)  # served before it began to open
                    raw = ledger.accept(waiter, started)
                    if raw is not None:
                        if self.record_wait is not None:
                            self.record_wait(time.monotonic() - started)
                        return raw
                    # Handed a connection that a failover retired before this
                    # task ran: it was not lent; the ledger queued us again, first.
            except BaseException:
                ledger.abandon(waiter)
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                if loop is not None:
                    ledger.deadlines.timed.pop(waiter, None)  # type: ignore[arg-type]
        ledger.abandon(waiter)
        ledger.timeouts += 1
        raise _diagnosis.timeout_error(
            wait,
            limit=ledger.limit,
            in_use=len(ledger.lent),
            idle=len(ledger.idle),
            opening=ledger.opening,
            waiting=len(ledger.waiters),
            lent=ledger.lent.values(),
        )

    async def _open(self, waiter: Waiter, deadline: float) -> None:
        """Open a connection on the capacity reserved for ``waiter``.

        The new connection goes to the oldest waiter, which may be another one.
        If ``waiter`` is served by a released connection first, the opening is
        abandoned: the queue drains faster than a connection opens. That is
        what bounds growth on a spike of quick requests.
        """
        ledger = self.ledger
        epoch = ledger.begin_open(waiter)
        began = time.monotonic()
        raw: C | None = None
        ready = False  # connected and configured
        failure: Exception | None = None
        hook_failed = False
        connect_started = connected = 0.0
        # On asyncio the waiter has no cancel scope: this one holds its deadline.
        scope = anyio.CancelScope(deadline=deadline if self.loop is not None else math.inf)
        waiter.opening = scope
        ledger.scopes.add(scope)
        try:
            with scope:
                try:
                    with anyio.fail_after(self.connect_timeout):
                        connect_started = time.monotonic()
                        raw = await self.driver.connect()
                        if self.hooks.configure is not None:
                            hook_failed = True
                            await self.hooks.configure(raw)
                            hook_failed = False
                    connected = time.monotonic()
                    ready = True
                    if not self.server_checked:
                        self.server_checked = True
                        await self._check_server_ceiling(raw)
                except Exception as exc:
                    failure = exc
        except BaseException:
            # the caller was cancelled (on trio: or its deadline passed)
            if raw is not None:
                self.driver.terminate(raw)
            ledger.open_failed(epoch, None)
            raise
        finally:
            waiter.opening = None
            ledger.scopes.discard(scope)
        if not ready:
            if raw is not None:
                self.driver.terminate(raw)  # half set up: never lent
            if failure is None:  # abandoned: served first, pool closing, or its deadline
                ledger.open_failed(epoch, None)
                if self.loop is not None and self.loop.time() >= deadline:
                    waiter.timed_out = True
                return
            error = _diagnosis.connect_error(
                failure,
                url=self.config.url,
                scheme=self.config.scheme,
                secrets=self.secrets,
                during="the configure hook" if hook_failed else None,
            )
            ledger.open_failed(epoch, error, began)
            raise error from failure
        assert raw is not None
        host = ""
        if self.host_of is not None:
            with contextlib.suppress(Exception):
                host = self.host_of(raw)
        if not ledger.open_done(raw, epoch, host):
            self.driver.terminate(raw)  # the pool was disconnected meanwhile
        elif self.record_create is not None:
            self.record_create(connected - connect_started)

    async def _check_server_ceiling(self, raw: C) -> None:
        """Once per start: warn when connection_limit alone exceeds the server's ceiling."""
        try:
            with anyio.fail_after(CLEANUP_TIMEOUT):
                ceiling = await self.driver.server_max_connections(raw)
        except Exception:
            logger.debug("could not read the server's max_connections", exc_info=True)
            return
        limit = self.ledger.limit
        if ceiling is not None and limit > ceiling:
            logger.warning(
                "connection_limit=%d exceeds the server's max_connections=%d: "
                "the pool can never reach its limit, and will starve other clients. "
                "See pool.recommended_connection_limit().",
                limit,
                ceiling,
            )

    # ------------------------------------------------------------ release

    async def release(self, raw: C, exc: BaseException | None) -> None:
        """The careful release: roll back, or close, as the ledger decides."""
        cancelled = broken = False
        if exc is not None:
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            broken = not cancelled and self._broken_by(exc)
            if self.is_read_only_error is not None and self.host_of is not None:
                self._after_error(raw, exc)
        action, rec = self.ledger.release(raw, cancelled, broken)
        if action == RELEASED or rec is None:
            return
        if action == RECOVER:
            # Never in the cancelled caller: the upkeep recovers it.
            self.upkeep.recover_later(rec)
            return
        with anyio.CancelScope(shield=True):
            if action == CLOSE:
                await self.close(rec)
            else:
                await self.tidy(rec, recover=False)

    def _broken_by(self, exc: BaseException) -> bool:
        """Did ``exc`` leave the connection in a state the pool cannot vouch for?

        asyncio reports a connection used from the wrong event loop with a
        RuntimeError about the loop ("attached to a different loop", "Event
        loop is closed"); the driver names its own client-side errors
        (asyncpg's InterfaceError: "another operation is in progress"). Such a
        connection is closed, never lent again. An error of the caller's own
        (a RuntimeError of its logic) leaves the connection as it is.
        """
        if isinstance(exc, RuntimeError) and "loop" in str(exc):
            return True
        judge = self.is_broken_error
        return judge is not None and judge(exc)

    def _after_error(self, raw: C, exc: BaseException) -> None:
        """A query failed on a pool that wants the primary: was it a failover?

        A write refused as read-only (the server was demoted), or a session the
        server ended (a shutdown or a crash: the server is going away): every
        connection to that server is retired at once, so none is lent again;
        new ones open on whichever host is the primary now. Without this, the
        other idle connections to a server that is shutting down look alive
        until the event loop has read each one's FATAL, and are lent in that
        window, to fail their caller's write too. A single backend killed with
        pg_terminate_backend looks the same from here (57P01): its server's
        connections are then reopened, on the same primary. The statement is
        never retried here: the caller decides (nothing is applied twice).
        """
        assert self.is_read_only_error is not None and self.host_of is not None
        try:
            if self.is_read_only_error(exc):
                why = "is read-only now (a failover?)"
            elif self.is_disconnect_error is not None and self.is_disconnect_error(exc):
                why = f"ended a session ({type(exc).__name__}: a shutdown or a crash?)"
            else:
                return
            host = self.host_of(raw)
        except Exception:
            return
        found = self.ledger.retire_host(host)
        if found:
            logger.warning(
                "%s %s: retiring its %d connection(s); new ones go to the current primary",
                host,
                why,
                found,
            )

    async def tidy(self, rec: Conn, *, recover: bool) -> None:
        """Bring a released connection back to a clean session; report it tidied.

        Recovery after a cancellation (the driver's own) comes first, then a
        rollback of an open transaction, the session reset if asked for, and
        the ``reset`` hook: all within one bound. If any fails, it is closed.
        """
        ledger = self.ledger
        driver = self.driver
        raw = rec.raw
        ok = False
        scope = anyio.CancelScope()
        ledger.scopes.add(scope)
        try:
            with scope, anyio.fail_after(CLEANUP_TIMEOUT):
                if recover and self.recover is not None:
                    await self.recover(raw)
                if driver.in_transaction(raw):
                    await driver.rollback(raw)
                if self.reset_session is not None:
                    await self.reset_session(raw)
                if self.hooks.reset is not None:
                    await self.hooks.reset(raw)
                ok = True
        except Exception:
            logger.debug("cleaning a released connection failed; closing it", exc_info=True)
        finally:
            ledger.scopes.discard(scope)
            ledger.tidied(rec, ok, BROKEN if recover else RESET_FAILED)

    async def close(self, rec: Conn) -> None:
        """Close one BUSY connection gracefully, within a bound; report it closed."""
        try:
            try:
                with anyio.fail_after(CLEANUP_TIMEOUT):
                    await self.driver.close(rec.raw)
            except Exception:
                self.driver.terminate(rec.raw)
            except BaseException:
                self.driver.terminate(rec.raw)
                raise
        finally:
            self.ledger.close_done(rec)

    async def resize(self, limit: int) -> None:
        """A new connection_limit, live: the ledger decides, idle surplus closes here."""
        await self.close_all(self.ledger.resize(limit))

    async def drain(self) -> None:
        """Replace every connection: the idle ones close here, the rest when they come back."""
        await self.close_all(self.ledger.drain())

    async def close_all(self, recs: list[Conn]) -> None:
        """Close gracefully, all at once, within one bound; every one is reported."""
        if not recs:
            return
        try:
            with anyio.move_on_after(CLEANUP_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    for rec in recs:
                        tg.start_soon(self.close, rec)
        finally:
            # A close task cancelled before it ever ran (the group was cut short
            # at once) reported nothing: close and report its connection here.
            for rec in recs:
                if rec.state is BUSY:
                    self.driver.terminate(rec.raw)
                    self.ledger.close_done(rec)
