"""The engine's state, and its acquire side: checking, waiting, opening.

Part of the engine (``_engine.py`` adds the life cycle and the release side).
Nothing here decides who gets which connection: each step is a call into the
ledger, and each I/O step reports back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import anyio
import anyio.lowlevel

from . import _diagnosis, _shims
from ._config import PoolConfig
from ._conn import LENT, Conn
from ._driver import Driver
from ._errors import ConfigError, PoolClosedError, TooManyWaitersError
from ._ledger import (
    CLOSING,
    OPEN,
    Ledger,
)
from ._metrics import PoolMetrics
from ._queue import DEFAULT_LANE, Lane, Lanes, LaneState
from ._waiters import AsyncioWaiter, TrioWaiter, Waiter

if TYPE_CHECKING:
    from ._hostlimit import HostLimit, Seat

__all__ = ["CLEANUP_TIMEOUT", "Acquiring", "Flow", "Hook", "Hooks"]

logger = logging.getLogger("pool")

C = TypeVar("C")

#: how long clean-up (a rollback, a graceful close) may take before we give up
#: and drop the socket; it runs shielded, so it must be bounded
CLEANUP_TIMEOUT: Final = 5.0

#: a connection hook: an async callable given the driver's own connection
Hook = Callable[[Any], Awaitable[object]]

#: an acquire's lane and tenant, resolved (see Acquiring.flow)
Flow = tuple[LaneState, Hashable]


@dataclass(frozen=True, slots=True)
class Hooks:
    """psycopg_pool's names: on each new connection, before each lending, on each release."""

    configure: Hook | None = None
    check: Hook | None = None
    reset: Hook | None = None


def _last(timed: Any) -> Any:
    """The newest of the waiters on the shared timer: O(1)."""
    return next(reversed(timed))


class Acquiring(Generic[C]):
    """The engine's state, and the careful acquire."""

    def __init__(
        self, driver: Driver[C], config: PoolConfig, secrets: tuple[str, ...], hooks: Hooks
    ) -> None:
        self.driver = driver
        self.config = config
        self.secrets = secrets
        self.hooks = hooks
        self.recover: Callable[[Any], Awaitable[None]] | None = getattr(driver, "recover", None)
        self.release_error: Callable[[Any], BaseException | None] | None = getattr(
            driver, "release_error", None
        )
        self.reset_session: Callable[[Any], Awaitable[None]] | None = (
            getattr(driver, "reset_session", None) if config.reset_session else None
        )
        self.ledger: Ledger[C] = Ledger(
            limit=config.connection_limit,
            is_alive=driver.is_alive,
            in_transaction=driver.in_transaction,
            is_clean=getattr(driver, "is_clean", None),
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
        #: the asyncio loop's clock, as cheaply as it can be read (see _shims.loop_clock)
        self.loop_time: Callable[[], float] = anyio.current_time
        #: the asyncio loop's future factory (see _shims.future_factory)
        self.new_future: Callable[[], asyncio.Future[None]] = asyncio.Future
        self.checkpoint_if_cancelled: Callable[[], Any] = anyio.lowlevel.checkpoint_if_cancelled
        #: asyncio: is a cancel scope around this task cancelled? (see _shims)
        self.cancel_pending: Callable[[object], bool] = _shims.public_cancel_pending
        self.server_checked = False
        # OpenTelemetry, when installed for this pool (see _metrics.py): its
        # name, its instruments, and the ledger's own methods it swapped out
        self.metrics_name = ""
        self.metrics: PoolMetrics | None = None
        self.metrics_restore: tuple[Any, Any] = (None, None)
        self.own_meter: object = None
        #: called when the pool opens, and when it closes without disconnect()
        #: (the registry counts it)
        self.on_open: Callable[[], None] = lambda: None
        self.on_close: Callable[[], None] = lambda: None
        #: set when the pool has a meter (pool._metrics): the seconds an acquire
        #: waited in the queue, and a connect took; the fast paths never look
        self.record_wait: Callable[[float], None] | None = None
        self.record_create: Callable[[float], None] | None = None
        #: host_connection_limit's slots and shares (None: off, and nothing is paid for it)
        self.host: HostLimit | None = None

    def ensure_started(self) -> None:
        """Open on first use (the life cycle's: see :class:`~pool._engine.Engine`)."""
        raise NotImplementedError

    async def wait_disconnected(self, *, shield: bool = False) -> None:
        """Until the disconnect in progress ends (the life cycle's)."""
        raise NotImplementedError

    def hand_over(self, rec: Conn) -> bool:
        """A caller cancelled mid-I/O on ``rec``: the upkeep finishes it. False: it cannot."""
        raise NotImplementedError

    def now(self) -> float:
        """The event loop's clock (a cancel scope's deadline is on it): cheap on asyncio."""
        return self.loop_time()

    # ------------------------------------------------------------ acquire

    async def acquire(self, wait_for: float | None, flow: Flow | None = None) -> C:
        """The careful acquire: check a doubtful idle connection, or queue.

        One frame from the entry point to the wait: every frame between a
        waiter and its future costs a resumption per handoff. On asyncio a
        waiter awaits a bare future and the pool's own timeout is one shared
        loop timer (see _waiters.Deadlines); on trio each wait has its own
        cancel scope with the waiter's deadline. ``flow``: the caller's lane
        and tenant (see :meth:`flow`), in a pool with lanes.
        """
        ledger = self.ledger
        loop = self.loop
        wait = self.wait_timeout if wait_for is None else (wait_for or math.inf)
        spent = 0.0  # waiting for a disconnect in progress: pool_timeout bounds that too
        if ledger.state is not OPEN or (loop is not None and loop is not _shims.running_loop()):
            if ledger.state is CLOSING:
                # Reopen once the disconnect in progress ends; pool_timeout bounds
                # this wait too, as it bounds the rest of the acquire.
                started = time.monotonic()
                with anyio.move_on_after(None if wait == math.inf else wait):
                    await self.wait_disconnected()
                if ledger.state is CLOSING:
                    ledger.timeouts += 1
                    raise self._timeout_error(wait, started)
                spent = time.monotonic() - started
            self.ensure_started()
            loop = self.loop
        # pool_timeout bounds the whole acquire, the checks of idle connections included
        deadline = self.now() + wait - spent
        arrival = 0
        lane: LaneState | None = None
        tenant: Hashable = None
        if ledger.lanes is not None:
            lane, tenant = flow if flow is not None else (ledger.lanes.default, None)
        if ledger.idle:
            epoch = ledger.epoch
            # Its place in line is taken now: if the connection it checks is
            # retired meanwhile, it queues ahead of whoever queued since.
            arrival = ledger.arrive()
            while ledger.idle:
                rec = ledger.take_for(lane)
                if rec is None:
                    break
                if rec.state is LENT:
                    raw: C = rec.raw
                    return raw
                if await self._check(rec, deadline, lane):
                    raw = rec.raw
                    return raw
                if ledger.epoch != epoch or ledger.state is not OPEN:
                    raise PoolClosedError("the pool was disconnected while this call waited")
                if self.now() >= deadline:
                    # the check ran into the deadline (it was cut short: closed)
                    ledger.timeouts += 1
                    raise self._timeout_error(wait, time.monotonic())
        # Nothing idle for us: queue.
        max_waiting = self.config.max_waiting
        if max_waiting and len(ledger.waiters) >= max_waiting:
            # Even a refusal yields once: a caller that retries in a loop must not
            # starve the other tasks of the event loop.
            await anyio.lowlevel.checkpoint()
            raise TooManyWaitersError(
                f"{len(ledger.waiters)} callers already wait for a connection "
                f"(max_waiting={max_waiting}); not queueing another"
            )
        if ledger.breaker.failures and ledger.hopeless():
            await anyio.lowlevel.checkpoint()
            raise ledger.breaker.fail_fast_error()
        waiter: Waiter = AsyncioWaiter(self.new_future) if loop is not None else TrioWaiter()
        started = waiter.started = time.monotonic()
        if lane is not None:
            waiter.lane = lane
            waiter.tenant = tenant
        if arrival:
            ledger.enqueue_at(waiter, arrival)
        else:
            ledger.enqueue(waiter)
        timer: asyncio.TimerHandle | None = None
        if loop is not None:
            waiter.deadline = deadline
            deadlines = ledger.deadlines
            if (
                wait_for is None
                and wait < math.inf
                and not (arrival and deadlines.timed and _last(deadlines.timed).deadline > deadline)
            ):
                # the pool's own timeout: they queue in deadline order, and one
                # timer on the oldest serves them all (see Deadlines)
                deadlines.timed[waiter] = None  # type: ignore[index]  # asyncio's waiter
                if deadlines.timer is None:
                    deadlines.timer = loop.call_at(deadline, deadlines.expire_due)
            elif wait < math.inf:
                # its own timer: another timeout, or it queued ahead of younger
                # waiters (after a check), out of the shared timer's order
                timer = loop.call_at(deadline, waiter.expire)
        task: object = None
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
                            ledger.queue.sleep(waiter)
                            ledger.wake_openers()
                        continue
                    breaker = ledger.breaker
                    if breaker.failures and breaker.backing_off():
                        # Nothing may wake us when the back-off ends: look again
                        # then (we may be the probe).
                        until = min(deadline, self.now() + breaker.remaining())
                        with anyio.CancelScope(deadline=until):
                            await waiter.wait()
                        if not waiter.woken():
                            if loop is None and self.now() >= deadline:
                                waiter.timed_out = True  # on asyncio, the timer says so
                            ledger.wake_openers()
                            continue
                    elif loop is not None:
                        # the bare future itself: no frame of waiter.wait() in between
                        await waiter.future  # type: ignore[union-attr]
                    else:
                        with anyio.CancelScope(deadline=deadline):
                            await waiter.wait()
                        if not waiter.woken():
                            waiter.timed_out = True
                            break
                    if waiter.conn is not None:
                        # Cancelled as it was handed the connection? Then it must
                        # pass it on (in the except below), not carry it away.
                        # asyncio delivers a task.cancel() at the await above;
                        # a cancelled anyio scope waits for the next checkpoint.
                        task = ledger.current_task()
                        if loop is None:
                            await self.checkpoint_if_cancelled()
                        elif self.cancel_pending(task):
                            await anyio.lowlevel.checkpoint()
                    elif waiter.error is None and not waiter.timed_out:
                        waiter.rearm()  # woken to open a connection
                if waiter.conn is None:
                    break  # timed out
                if waiter.reserved >= 0:
                    ledger.unreserve(waiter)  # served before it began to open
                if task is None:  # served by its own opening: it did not wait on its future
                    task = ledger.current_task()
                accepted = ledger.accept(waiter, started, task)
                if accepted is not None:
                    if self.record_wait is not None:
                        if lane is None:
                            self.record_wait(time.monotonic() - started)
                        elif self.metrics is not None:
                            self.metrics.wait_in(time.monotonic() - started, lane.name)
                    return accepted
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
        raise self._timeout_error(wait, started, waiter)

    def flow(self, lane: str | None, tenant: Hashable) -> Flow | None:
        """An acquire's ``lane=`` and ``tenant=``, resolved now: ConfigError for an unknown lane.

        None: neither given, nor needed (a pool without lanes, and no tenant),
        so the caller takes the plain FIFO paths. The first tenant in a pool
        without lanes switches its queue to lanes (one default lane), for good.
        """
        lanes = self.ledger.lanes
        if lanes is None:
            if lane is not None and lane != DEFAULT_LANE:
                raise ConfigError(
                    "lane", lane, "is not one of this pool's lanes (it has none: pass lanes=)"
                )
            if tenant is None:
                return None
            lanes = self.use_lanes({DEFAULT_LANE: Lane()})
        if tenant is not None:
            try:
                hash(tenant)
            except TypeError:
                raise ConfigError("tenant", tenant, "must be hashable (a str, an int)") from None
        return lanes.lane(lane), tenant

    def use_lanes(self, lanes: Mapping[str, Lane]) -> Lanes:
        """Switch the ledger's queue to lanes (see :meth:`Ledger.use_lanes`)."""
        queue = self.ledger.use_lanes(lanes)
        if self.metrics is not None:
            # The metrics wrapped the fast release they found, and restore it when
            # the last meter goes: from now on that is the ledger's careful one.
            self.metrics_restore = (self.ledger.give_back, self.metrics_restore[1])
        return queue

    def _timeout_error(
        self, wait: float, started: float, waiter: Waiter | None = None
    ) -> BaseException:
        """P2024 for a wait that began at ``started`` (monotonic), by ``waiter`` if known."""
        ledger = self.ledger
        lane: str | None = None
        tenant: object = None
        lane_waiting = 0
        if ledger.lanes is not None and waiter is not None and hasattr(waiter, "lane"):
            lane, tenant, lane_waiting = waiter.lane.name, waiter.tenant, waiter.lane.waiting
        return _diagnosis.timeout_error(
            wait,
            limit=ledger.limit,
            in_use=len(ledger.lent),
            idle=len(ledger.idle),
            opening=ledger.opening,
            waiting=len(ledger.waiters),
            lent=ledger.lent.values(),
            host_budget=None if self.host is None else self.host.explain(started),
            lane=lane,
            tenant=tenant,
            lane_waiting=lane_waiting,
        )

    async def _check(
        self, rec: Conn, deadline: float = math.inf, lane: LaneState | None = None
    ) -> bool:
        """Check an idle connection before lending it. True: it is now lent to the caller.

        A ping if it sat idle a while, then the ``check`` hook if there is one,
        all within ``connect_timeout`` and the acquire's ``deadline``.
        """
        ledger = self.ledger
        ok = False
        # bounded, and known to the ledger so that disconnect() can cut it short
        scope = anyio.CancelScope(deadline=min(self.now() + self.io_timeout, deadline))
        ledger.scopes.add(scope)
        try:
            with scope:
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
            # Cancelled mid-check (its caller's scope, or the asyncio way): its
            # protocol state is unknown. The upkeep brings it back (the driver's
            # own recovery), or it is closed.
            if not self.hand_over(rec):
                ledger.check_done(rec, False, lane)
            else:
                ledger.uncharge(lane)
            raise
        finally:
            ledger.scopes.discard(scope)
        return ledger.check_done(rec, ok, lane)

    async def _open(self, waiter: Waiter, deadline: float) -> None:
        """Open a connection on the capacity reserved for ``waiter``.

        The new connection goes to the oldest waiter, which may be another one.
        If ``waiter`` is served by a released connection first, the opening is
        abandoned: the queue drains faster than a connection opens. That is
        what bounds growth on a spike of quick requests.
        """
        ledger = self.ledger
        epoch = ledger.begin_open(waiter)
        drains = ledger.drains  # a drain from now on replaces this connection too
        began = time.monotonic()
        raw: C | None = None
        ready = False  # connected and configured
        failure: Exception | None = None
        hook_failed = False
        connect_started = connected = 0.0
        host = self.host
        seat: Seat | None = None
        watching = None if host is None else host.connect_watching
        # The waiter has no cancel scope of its own around this: this one holds its deadline.
        scope = anyio.CancelScope(deadline=deadline)
        waiter.opening = scope
        ledger.scopes.add(scope)
        try:
            with scope:
                try:
                    if host is not None:
                        # a slot of the machine's budget first, within this waiter's deadline
                        seat = await host.take()
                    with anyio.fail_after(self.connect_timeout):
                        connect_started = time.monotonic()
                        if seat is not None and watching is not None:
                            # each socket is watched from its TCP connect on: cut
                            # short mid-handshake, its backend is still seen go
                            raw = await watching(seat.watch)
                        else:
                            raw = await self.driver.connect()
                        if seat is not None:
                            host.attach(seat, raw)  # type: ignore[union-attr]
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
            if seat is not None:
                host.free(seat)  # type: ignore[union-attr]
            ledger.open_failed(epoch, None)
            raise
        finally:
            waiter.opening = None
            ledger.scopes.discard(scope)
        if not ready:
            if raw is not None:
                self.driver.terminate(raw)  # half set up: never lent
            if seat is not None:
                host.free(seat)  # type: ignore[union-attr]
            if failure is None:  # abandoned: served first, pool closing, or its deadline
                ledger.open_failed(epoch, None)
                if self.now() >= deadline:
                    waiter.timed_out = True
                return
            error = _diagnosis.connect_error(
                failure,
                url=self.config.url,
                scheme=self.config.scheme,
                secrets=self.secrets,
                during="the configure hook" if hook_failed else None,
                driver=self.driver,
            )
            ledger.open_failed(epoch, error, began)
            raise error from failure
        assert raw is not None
        server = ""
        if self.host_of is not None:
            with contextlib.suppress(Exception):
                server = self.host_of(raw)
        if not ledger.open_done(raw, epoch, server, drains, seat):
            self.driver.terminate(raw)  # the pool was disconnected (or drained) meanwhile
            if seat is not None:
                host.free(seat)  # type: ignore[union-attr]
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
