"""The one owner of the pool's state: who gets which connection, and every count.

Every change to the idle deque, the lent and busy sets, the wait queue, size,
opening and the epoch happens here, in small synchronous methods that await
nothing, so no other task can interleave with one. All I/O (connect, ping,
rollback, close) happens outside, in ``_engine.py``: an I/O step starts with a
call here that moves the connection to ``BUSY`` (owned by exactly one task),
and ends with a report back here, which re-checks the state it finds *then*.
After any await the pool may have been disconnected, reopened or resized: the
reports compare the connection's epoch and state with the ledger's, never a
reference taken before the await.

The shape is httpcore's single "assign" method and psycopg_pool's two-step
handoff: a connection handed to a waiter stays counted as lent, and the waiter
accepts it when it runs (:meth:`Ledger.accept`), which fails if the pool was
disconnected in between. That is what lets ``disconnect()`` find every
connection, including one handed to a task that has not run yet.

Invariant, true between any two steps: ``size == len(idle) + len(lent) +
len(busy) + opening <= limit``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import anyio

from ._breaker import Breaker, server_is_gone
from ._conn import BUSY, CLOSED, IDLE, LENT, Conn
from ._diagnosis import PACKAGE_FILES, outside_package, stamp_site
from ._errors import ConnectError, PoolClosedError, PoolError
from ._waiters import Deadlines, Waiter

__all__ = ["CLOSED_STATE", "CLOSING", "OPEN", "Ledger"]

C = TypeVar("C")

logger = logging.getLogger("pool")

# why a connection was closed, for stats().closed_by
IDLE_EXPIRY: Final = "idle_expiry"
LIFETIME: Final = "lifetime"
BROKEN: Final = "broken"
CHECK_FAILED: Final = "check_failed"
RESET_FAILED: Final = "reset_failed"
DRAIN: Final = "drain"
RESIZE: Final = "resize"
FAILOVER: Final = "failover"
DISCONNECT: Final = "disconnect"
CLOSE_REASONS: Final = (
    IDLE_EXPIRY, LIFETIME, BROKEN, CHECK_FAILED, RESET_FAILED, DRAIN, RESIZE, FAILOVER, DISCONNECT,
)

OPEN: Final = "open"
CLOSING: Final = "closing"
CLOSED_STATE: Final = "closed"

# what the slow release must do once the ledger has decided
RELEASED: Final = 0  # nothing more: it went back (or was closed at once)
TIDY: Final = 1  # roll back and/or reset the session, then report with tidied()
CLOSE: Final = 2  # close gracefully, then report with close_done()
RECOVER: Final = 3  # cancelled mid-use: the upkeep recovers it, then reports with tidied()


def _no_task() -> None:
    return None


def _never(raw: object) -> bool:
    return False


def _none() -> None:
    return None


class Ledger(Generic[C]):
    """The pool's accounting. Synchronous: not one method here awaits."""

    def __init__(
        self,
        *,
        limit: int,
        is_alive: Callable[[Any], bool],
        in_transaction: Callable[[Any], bool],
        terminate: Callable[[Any], None],
        lifetime: float,
        max_idle: float,
        check_after: float,
        tidy_every_release: bool = False,
        check_every_lending: bool = False,
        can_recover: bool = False,
    ) -> None:
        self.limit = limit
        self.is_alive = is_alive
        self.in_transaction = in_transaction
        self.terminate = terminate
        self.lifetime = lifetime
        self.max_idle = max_idle
        self.check_after = check_after
        #: a reset runs on every release (reset_session, a reset hook)
        self.tidy_every_release = tidy_every_release
        #: a check hook runs before every lending of an idle connection
        self.check_every_lending = check_every_lending
        #: the driver can bring back a connection whose holder was cancelled mid-use
        self.can_recover = can_recover
        if tidy_every_release:
            # Every release needs I/O: the fast release never applies. Swapped
            # here, once, so that the fast path of a pool without hooks pays
            # not even a flag test for them.
            setattr(self, "give_back", _never)  # noqa: B010
        if check_every_lending:
            setattr(self, "take_idle", _none)  # noqa: B010
        self.state: str = CLOSED_STATE
        self.epoch = 0
        # The containers below are never replaced, only changed in place: a
        # reference to one taken anywhere stays the live one.
        self.idle: deque[Conn] = deque()
        #: lent to a holder, or handed to a waiter that has not run yet; by id(raw)
        self.lent: dict[int, Conn] = {}
        #: in the pool's own I/O (check, rollback, graceful close); by id(raw)
        self.busy: dict[int, Conn] = {}
        #: closed by disconnect() while held: their holders may still release them
        self.orphans: dict[int, Conn] = {}
        #: FIFO of waiters (an ordered dict: O(1) removal from the middle)
        self.waiters: OrderedDict[Waiter, None] = OrderedDict()
        #: the waiters not opening a connection themselves, to wake one in O(1)
        self.sleepers: OrderedDict[Waiter, None] = OrderedDict()
        self.deadlines = Deadlines()
        self.size = 0
        self.opening = 0
        #: lent or busy connections marked to close when next free (a drain, a
        #: resize, a failover): a shrink closes only the surplus they leave
        self.marked = 0
        #: I/O steps started and not yet reported (any epoch)
        self.inflight = 0
        #: the cancel scopes of in-flight I/O, for disconnect() to cut short
        self.scopes: set[anyio.CancelScope] = set()
        #: set when the last lent connection comes back during disconnect's grace
        self.drained: anyio.Event | None = None
        self.breaker = Breaker()
        self.current_task: Callable[[], object] = _no_task
        self.acquired = 0
        self.waited = 0
        self.timeouts = 0
        self.wait_seconds = 0.0
        self.opened = 0
        self.closed = 0
        #: closed connections by why: what an operator tunes lifetimes by
        self.closed_by: Counter[str] = Counter()
        self.connect_failures = 0

    # ------------------------------------------------------------ the fast paths

    def take_idle(self) -> C | None:
        """An idle connection, nobody waiting, no check due: lend it. Else None.

        Called straight from the public entry points, so the user's frame is
        two levels up.
        """
        idle = self.idle
        if not idle or self.waiters or self.state is not OPEN:
            return None
        rec = idle[-1]
        now = time.monotonic()
        if now >= rec.fresh_until or not self.is_alive(rec.raw):
            return None
        idle.pop()
        rec.state = LENT
        rec.lent_at = now
        rec.task = self.current_task()
        frame = sys._getframe(2)  # the caller of the public entry point: the user
        if frame.f_code.co_filename in PACKAGE_FILES:
            frame = outside_package(frame)
        rec.site_code = frame.f_code
        rec.site_offset = frame.f_lasti
        raw: C = rec.raw
        self.lent[id(raw)] = rec
        self.acquired += 1
        return raw

    def give_back(self, raw: C) -> bool:
        """The fast release: a clean connection goes back with no round trip.

        Returns False, touching nothing, when the careful path must decide
        (unknown connection, in a transaction, broken, expired, pool closing).
        """
        lent = self.lent
        key = id(raw)
        rec = lent.get(key)
        if rec is None or self.state is not OPEN:
            return False
        now = time.monotonic()
        if now >= rec.expires_at or not self.is_alive(raw) or self.in_transaction(raw):
            return False
        del lent[key]
        if self.waiters:
            self._put(rec, now)
        else:  # _put(), inlined for the common case: nobody waits, it goes idle
            rec.state = IDLE
            rec.idle_since = now
            fresh = now + self.check_after
            rec.fresh_until = fresh if fresh < rec.expires_at else rec.expires_at
            self.idle.append(rec)
        return True

    # ------------------------------------------------------------ the slow acquire

    def take_for(self) -> Conn | None:
        """Nobody waits: the newest usable idle connection, LENT, or BUSY if it needs a check.

        Dead and expired ones on the way are closed. None: none is idle, or
        someone waits (then the caller queues behind them).
        """
        idle = self.idle
        while idle and not self.waiters and self.state is OPEN:
            rec = idle.pop()
            now = time.monotonic()
            if (
                not self.is_alive(rec.raw)
                or now >= rec.expires_at
                or now - rec.idle_since >= rec.idle_limit
            ):
                self._retire(rec, self._why_expired(rec, now))
                continue
            if now - rec.idle_since < self.check_after and not self.check_every_lending:
                self._lend(rec, now)
                return rec
            # It sat idle long enough to doubt it: the caller checks it first.
            self._busy(rec)
            return rec
        return None

    def check_done(self, rec: Conn, ok: bool) -> bool:
        """A check ended. True: the connection is now lent to the caller that checked it."""
        self._io_done()
        if rec.state is not BUSY:
            return False  # disconnect() closed it meanwhile
        del self.busy[id(rec.raw)]
        now = time.monotonic()
        if not ok:
            self._retire(rec, CHECK_FAILED)
            return False
        if rec.epoch != self.epoch or self.state is not OPEN or rec.expires_at <= now:
            # disconnected, or marked meanwhile (a drain, a failover)
            self._retire(rec, self._why_expired(rec, now))
            return False
        self._lend(rec, time.monotonic())
        return True

    def _lend(self, rec: Conn, now: float) -> None:
        rec.state = LENT
        rec.lent_at = now
        rec.task = self.current_task()
        stamp_site(rec, 2)
        self.lent[id(rec.raw)] = rec
        self.acquired += 1

    def enqueue(self, waiter: Waiter) -> None:
        self.waiters[waiter] = None
        if self.may_open():
            self.reserve(waiter)
        else:
            self.sleepers[waiter] = None

    def accept(self, waiter: Waiter, started: float) -> C | None:
        """A waiter that was handed a connection runs: lend it, unless the pool closed since.

        None: the connection was retired while the waiter had not run yet (its
        server failed over, see :meth:`retire_host`, or went away): it is
        closed, never lent, and the waiter is back at the head of the queue.
        """
        rec = waiter.conn
        assert rec is not None
        waiter.conn = None
        key = id(rec.raw)
        if self.state is not OPEN or rec.state is not LENT or self.lent.get(key) is not rec:
            self._returned(rec)
            raise PoolClosedError("the pool was disconnected while this call waited")
        if rec.expires_at == -math.inf:
            del self.lent[key]
            waiter.rearm()
            self.waiters[waiter] = None
            self.waiters.move_to_end(waiter, last=False)  # it was first in line
            if self.may_open():
                self.reserve(waiter)
            else:
                self.sleepers[waiter] = None
            self._retire(rec, rec.retire_reason or FAILOVER)
            return None
        now = time.monotonic()
        self.waited += 1
        self.wait_seconds += now - started
        rec.lent_at = now
        rec.task = self.current_task()
        frame = sys._getframe(2)  # stamp_site(), inlined: the waiter's own call site
        while frame.f_code.co_filename in PACKAGE_FILES and frame.f_back is not None:
            frame = frame.f_back
        rec.site_code = frame.f_code
        rec.site_offset = frame.f_lasti
        self.acquired += 1
        raw: C = rec.raw
        return raw

    def abandon(self, waiter: Waiter) -> None:
        """A waiter gives up (timeout, cancellation, error): leave no trace."""
        rec = waiter.conn
        if rec is not None:
            # Handed a connection as it gave up: pass it on to the next one.
            waiter.conn = None
            self._returned(rec)
        else:
            self.waiters.pop(waiter, None)
            self.sleepers.pop(waiter, None)
        self.unreserve(waiter)

    def _returned(self, rec: Conn) -> None:
        """A connection handed to a waiter comes back unused."""
        key = id(rec.raw)
        if rec.state is LENT and self.lent.get(key) is rec:
            del self.lent[key]
            now = time.monotonic()
            if self.state is OPEN and rec.epoch == self.epoch and rec.expires_at <= now:
                # marked meanwhile (a drain, a resize, a failover), or expired: never lent again
                self._retire(rec, self._why_expired(rec, now))
            elif self.state is OPEN and rec.epoch == self.epoch:
                self._put(rec, now)
            else:
                self._retire(rec, DISCONNECT)
                self._check_drained()
        else:
            self.orphans.pop(key, None)  # closed by disconnect() before the waiter ran

    # ------------------------------------------------------------ capacity and growth

    def may_open(self) -> bool:
        """Is there spare capacity, and demand not yet covered by an opening?"""
        if self.size >= self.limit or self.opening >= len(self.waiters):
            return False
        if self.breaker.failures:
            # The breaker is open: after the back-off, exactly one probe at a time.
            return self.opening == 0 and time.monotonic() >= self.breaker.until
        # Slow start: no more openings in flight than connections already open
        # (at least one), so growth doubles per connect round trip. A spike of
        # quick queries is served by the first connections instead of opening
        # the whole limit; HikariCP and psycopg_pool open one at a time.
        return self.opening < max(1, self.size - self.opening)

    def reserve(self, waiter: Waiter) -> None:
        self.size += 1
        self.opening += 1
        waiter.reserved = self.epoch

    def unreserve(self, waiter: Waiter) -> None:
        """Give back the capacity reserved for ``waiter``, if it is of this epoch."""
        if waiter.reserved < 0:
            return
        if waiter.reserved == self.epoch:
            self.size -= 1
            self.opening -= 1
            waiter.reserved = -1
            self.wake_openers()
        waiter.reserved = -1

    def begin_open(self, waiter: Waiter) -> int:
        """The waiter's reservation now belongs to its opening; returns its epoch."""
        epoch, waiter.reserved = waiter.reserved, -1
        self.inflight += 1
        return epoch

    def open_done(self, raw: C, epoch: int, host: str = "") -> bool:
        """A connect succeeded. False: the pool closed meanwhile, and the caller closes it."""
        self._io_done()
        if epoch != self.epoch or self.state is not OPEN:
            return False
        failures = self.breaker.succeeded()
        if failures:
            logger.info("Reconnected to the database after %d failed attempt(s).", failures)
        self.opening -= 1
        self.opened += 1
        now = time.monotonic()
        self._put(Conn(raw, now, epoch, self.lifetime, self.max_idle, host), now)
        # One more open connection: the slow start may let more waiters open.
        self.wake_openers()
        return True

    def open_failed(
        self, epoch: int, error: ConnectError | None, began: float = math.inf
    ) -> None:
        """A connect failed (``error``) or was abandoned (None): free its capacity.

        ``began``: when that connect started (monotonic), for the breaker.
        """
        self._io_done()
        if epoch != self.epoch:
            return
        self.size -= 1
        self.opening -= 1
        if error is None:
            self.wake_openers()
            return
        self.breaker.failed(error, began)
        self.connect_failures += 1
        if server_is_gone(error.__cause__):
            # Refused: the server is down or restarting. Every connection opened
            # before now died with it: close the idle ones, the lent ones when
            # they come back.
            for rec in self.lent.values():
                self._mark(rec, BROKEN)
            while self.idle:
                self._retire(self.idle.pop(), BROKEN)
        self.wake_openers()
        # Sleepers wait with no timer: wake them, so that each looks again when
        # this back-off ends (one of them will be the probe).
        for waiter in self.sleepers:
            waiter.wake()

    def wake_openers(self) -> None:
        """Capacity freed up while callers sleep: wake some to open connections."""
        while self.sleepers and self.may_open():
            waiter, _ = self.sleepers.popitem(last=True)
            self.reserve(waiter)
            waiter.wake()
        if self.waiters and self.hopeless():
            self.fail_waiters(self.breaker.fail_fast_error())

    def hopeless(self) -> bool:
        """Connects keep failing and no connection is out to come back: fail fast."""
        return (
            self.breaker.failures > 0
            and not self.lent
            and not self.idle
            and not self.busy
            and self.opening == 0
            and time.monotonic() < self.breaker.until
        )

    def fail_waiters(self, error: BaseException) -> None:
        for waiter in self.waiters:
            waiter.error = error
            waiter.wake()
        self.waiters.clear()
        self.sleepers.clear()

    # ------------------------------------------------------------ release

    def release(self, raw: C, cancelled: bool, broken: bool = False) -> tuple[int, Conn | None]:
        """The careful release decides: back now, tidy (or recover) first, or close."""
        key = id(raw)
        rec = self.lent.pop(key, None)
        if rec is None:
            if self.orphans.pop(key, None) is not None:
                return RELEASED, None  # disconnect() closed it while it was held
            raise PoolError("this connection is not lent by this pool (released twice?)")
        rec.task = None
        if self.state is CLOSING:
            # disconnect() waits out its grace: close this one gracefully
            self._busy(rec)
            return CLOSE, rec
        now = time.monotonic()
        if broken or not self.is_alive(raw):
            # broken: it failed in a way that leaves its protocol state unknown
            self._retire(rec, BROKEN)
        elif rec.expires_at <= now:
            self._retire(rec, self._why_expired(rec, now))
        elif cancelled:
            # Cancelled mid-use, the connection may be mid-protocol: never lent
            # again as it is. The driver recovers it (the upkeep does that, not
            # the cancelled caller), or it is closed and the server rolls back.
            if not self.can_recover:
                self._retire(rec, BROKEN)
                return RELEASED, None
            self._busy(rec)
            return RECOVER, rec
        elif self.tidy_every_release or self.in_transaction(raw):
            self._busy(rec)
            return TIDY, rec
        else:
            self._put(rec, now)
        return RELEASED, None

    def tidied(self, rec: Conn, ok: bool, failed: str = RESET_FAILED) -> None:
        """A rollback, session reset or recovery ended: idle (or handed on) again, or closed.

        ``failed`` is the reason counted when it did not succeed.
        """
        self._io_done()
        if rec.state is not BUSY:
            return  # disconnect() closed it meanwhile
        del self.busy[id(rec.raw)]
        now = time.monotonic()
        if not ok:
            self._retire(rec, failed)
        elif rec.epoch != self.epoch or self.state is not OPEN or rec.expires_at <= now:
            self._retire(rec, self._why_expired(rec, now))
        else:
            self._put(rec, now)

    def retire_host(self, host: str) -> int:
        """Every connection to ``host`` is never lent again: a failover demoted it.

        Idle ones close now; lent and busy ones close when they come back.
        Returns how many were found.
        """
        found = 0
        for rec in (*self.lent.values(), *self.busy.values()):
            if rec.host == host and rec.expires_at != -math.inf:  # not counted twice
                self._mark(rec, FAILOVER)
                found += 1
        stale = [rec for rec in self.idle if rec.host == host]
        if stale:
            keep = [rec for rec in self.idle if rec.host != host]
            self.idle.clear()
            self.idle.extend(keep)
            for rec in stale:
                self._retire(rec, FAILOVER)
        return found + len(stale)

    def resize(self, limit: int) -> list[Conn]:
        """A new ``connection_limit``, now. Returns idle connections to close (BUSY).

        Growing lets the waiters open at once. Shrinking closes idle
        connections first, then marks as many lent (and busy) ones as are
        still too many, so each is closed when it comes back: never a held one.
        """
        self.limit = limit
        surplus = self.size - limit
        closing: list[Conn] = []
        while surplus > 0 and self.idle:
            rec = self.idle.popleft()  # the longest idle first
            rec.retire_reason = RESIZE
            self._busy(rec)
            closing.append(rec)
            surplus -= 1
        for rec in (*self.lent.values(), *self.busy.values()):
            if surplus <= 0:
                break
            if not rec.retire_reason:
                self._mark(rec, RESIZE)
                surplus -= 1
        self.wake_openers()
        return closing

    def drain(self) -> list[Conn]:
        """Replace every connection: idle ones now (returned BUSY, to close), the rest when free.

        Waiters keep their place: new connections open for them as the old
        ones close.
        """
        for rec in (*self.lent.values(), *self.busy.values()):
            self._mark(rec, DRAIN)
        closing = list(self.idle)
        self.idle.clear()
        for rec in closing:
            rec.retire_reason = DRAIN
            self._busy(rec)
        return closing

    def _mark(self, rec: Conn, reason: str) -> None:
        """Close ``rec`` when next free, not before (a fast release sees it expired)."""
        rec.retire_reason = rec.retire_reason or reason
        if rec.expires_at != -math.inf:
            rec.expires_at = -math.inf
            self.marked += 1

    @staticmethod
    def _why_expired(rec: Conn, now: float) -> str:
        if rec.retire_reason:
            return rec.retire_reason
        if now >= rec.expires_at:
            return LIFETIME
        return IDLE_EXPIRY

    # ------------------------------------------------------------ closing

    def take_expired(self) -> list[Conn]:
        """Upkeep: take the idle connections past their idle or total lifetime.

        Dead ones are closed at once; the expired ones come back BUSY, for the
        caller to close gracefully and report with :meth:`close_done`.
        """
        if self.state is not OPEN or not self.idle:
            return []
        now = time.monotonic()
        keep: list[Conn] = []
        expired: list[Conn] = []
        dead: list[Conn] = []
        for rec in self.idle:
            if not self.is_alive(rec.raw):
                dead.append(rec)
            elif now - rec.idle_since >= rec.idle_limit or now >= rec.expires_at:
                expired.append(rec)
            else:
                keep.append(rec)
        if not expired and not dead:
            return []
        self.idle.clear()
        self.idle.extend(keep)
        for rec in dead:
            self._retire(rec, BROKEN)
        for rec in expired:
            rec.retire_reason = self._why_expired(rec, now)
            self._busy(rec)
        return expired

    def close_done(self, rec: Conn) -> None:
        """A graceful close ended (or gave up and terminated)."""
        self._io_done()
        if rec.state is not BUSY:
            return
        del self.busy[id(rec.raw)]
        rec.state = CLOSED
        if rec.expires_at == -math.inf and rec.epoch == self.epoch:
            self.marked -= 1
        self.closed += 1
        self.closed_by[rec.retire_reason or DISCONNECT] += 1
        if rec.epoch == self.epoch and self.state is not CLOSED_STATE:
            self.size -= 1
            self.wake_openers()
        self._check_drained()

    def begin_closing(self, error: BaseException) -> list[Conn]:
        """disconnect() starts: fail the waiters, cut in-flight I/O short, take the idle ones."""
        self.state = CLOSING
        self.fail_waiters(error)
        for scope in self.scopes:
            scope.cancel()
        idle = list(self.idle)
        self.idle.clear()
        for rec in idle:
            self._busy(rec)
        return idle

    def orphan_lent(self) -> None:
        """Whoever still holds a connection has had their grace: close it now."""
        lent = list(self.lent.values())
        self.lent.clear()
        for rec in lent:
            rec.state = CLOSED
            self.terminate(rec.raw)
            self.orphans[id(rec.raw)] = rec
        self.closed += len(lent)
        self.closed_by[DISCONNECT] += len(lent)

    def finish_closing(self) -> None:
        """disconnect() ends: close what outlived its bound, and start a new epoch."""
        for rec in self.busy.values():
            rec.state = CLOSED
            self.terminate(rec.raw)
            self.closed += 1
            self.closed_by[DISCONNECT] += 1
        self.busy.clear()
        # A new epoch: an opening still in flight, or a reservation taken before
        # now, finds its epoch stale and leaves the new counts alone.
        self.epoch += 1
        self.size = 0
        self.opening = 0
        self.marked = 0
        self.state = CLOSED_STATE
        self.deadlines.clear()
        self.drained = None

    def drop_everything(self, error: BaseException) -> None:
        """The event loop the pool ran on has ended: close all at once, no I/O awaited.

        Waiters are failed, every connection is terminated (a holder's release
        of one stays harmless), and a new epoch starts: the pool reopens on
        the next event loop that uses it.
        """
        self.state = CLOSING
        self.fail_waiters(error)
        for scope in self.scopes:
            scope.cancel()
        while self.idle:
            rec = self.idle.pop()
            rec.state = CLOSED
            self.terminate(rec.raw)
            self.closed += 1
            self.closed_by[DISCONNECT] += 1
        self.orphan_lent()
        self.finish_closing()

    def forget_after_fork(self) -> list[Any]:
        """In a forked child: drop the parent's connections without a word to the server."""
        kept = [rec.raw for rec in (*self.idle, *self.lent.values(), *self.busy.values())]
        kept.extend(rec.raw for rec in self.orphans.values())
        for container in (self.idle, self.lent, self.busy, self.orphans, self.waiters,
                          self.sleepers, self.deadlines.timed):
            container.clear()
        self.deadlines.timer = None  # the parent's loop: never touched here
        self.scopes.clear()
        self.epoch += 1
        self.size = self.opening = self.inflight = self.marked = 0
        self.state = CLOSED_STATE
        return kept

    # ------------------------------------------------------------ helpers

    def _put(self, rec: Conn, now: float) -> None:
        """A free connection: hand it to the oldest waiter, or keep it idle."""
        if self.size - self.limit > self.marked:
            # Resized down: the surplus closes as it comes back. Not this one if
            # the connections already marked to close cover the surplus: closing
            # it too would shrink the pool below its limit, and reopen.
            self._retire(rec, rec.retire_reason or RESIZE)
            return
        waiters = self.waiters
        if waiters:
            waiter, _ = waiters.popitem(last=False)
            self.sleepers.pop(waiter, None)
            rec.state = LENT
            rec.lent_at = now
            self.lent[id(rec.raw)] = rec
            waiter.conn = rec
            waiter.wake()
        else:
            rec.state = IDLE
            rec.idle_since = now
            fresh = now + self.check_after
            rec.fresh_until = fresh if fresh < rec.expires_at else rec.expires_at
            self.idle.append(rec)

    def _busy(self, rec: Conn) -> None:
        rec.state = BUSY
        self.busy[id(rec.raw)] = rec
        self.inflight += 1

    def _retire(self, rec: Conn, reason: str) -> None:
        """Close a connection that must not be lent again, at once. O(1)."""
        rec.state = CLOSED
        self.terminate(rec.raw)
        if rec.epoch != self.epoch:
            return
        if rec.expires_at == -math.inf:
            self.marked -= 1
        self.closed += 1
        self.closed_by[reason] += 1
        if self.state is not CLOSED_STATE:
            self.size -= 1
            self.wake_openers()

    def _io_done(self) -> None:
        self.inflight -= 1

    def _check_drained(self) -> None:
        if not self.lent and self.drained is not None:
            self.drained.set()
