"""The ledger's state, and the small steps every part of it shares.

The ledger (``_ledger.py``) is one component in three files, each of which
reads alone: this one holds the state and the steps shared by the others
(hand a free connection on, close one, mark one, open capacity for waiters);
``_closing.py`` the life-cycle steps (expiry, drain, resize, failover,
disconnect, fork); ``_ledger.py`` the lending and the returns. None of them
awaits: every method is one synchronous step.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import anyio

from ._breaker import Breaker
from ._conn import BUSY, CLOSED, HANDED, IDLE, LENT, Conn
from ._queue import Fifo, Lanes, LaneState, WaitQueue
from ._shims import TaskRegistry
from ._waiters import Deadlines, Waiter

__all__ = [
    "BROKEN", "CHECK_FAILED", "CLOSE", "CLOSED_STATE", "CLOSE_REASONS", "CLOSING", "DISCONNECT",
    "DRAIN", "FAILOVER", "HOST_BUDGET", "IDLE_EXPIRY", "LIFETIME", "OPEN", "RECOVER", "RELEASED",
    "RESET_FAILED", "RESIZE", "TIDY", "LedgerState",
]

C = TypeVar("C")

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
#: given back to the machine's host_connection_limit, for a pool that starves
HOST_BUDGET: Final = "host_budget"
CLOSE_REASONS: Final = (
    IDLE_EXPIRY, LIFETIME, BROKEN, CHECK_FAILED, RESET_FAILED, DRAIN, RESIZE, FAILOVER, DISCONNECT,
    HOST_BUDGET,
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


_NO_TASKS: dict[object, object] = {}  # (never written: get() is None for any key)


def _never(raw: object, lease: int = 0) -> bool:
    return False


def _none() -> None:
    return None


def _no_seat(rec: Conn) -> None:
    return None


class LedgerState(Generic[C]):
    """The accounting's state, and the steps shared by all of the ledger."""

    def __init__(
        self,
        *,
        limit: int,
        is_alive: Callable[[Any], bool],
        in_transaction: Callable[[Any], bool],
        is_clean: Callable[[Any], bool] | None = None,
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
        #: alive and not in a transaction: it may go back with no round trip
        self.is_clean: Callable[[Any], bool] = is_clean or (
            lambda raw: is_alive(raw) and not in_transaction(raw)
        )
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
        #: the wait queue (see _queue.py): every edit of it goes through its methods
        self.queue: WaitQueue = Fifo()
        #: the same queue when it has lanes (None: strict FIFO, and the fast paths)
        self.lanes: Lanes | None = None
        #: the queue's waiters, oldest first, and its sleepers (the waiters not
        #: opening a connection themselves): read here (len, truth, membership)
        #: as plain dicts, as cheaply as before the queue was a component
        self.waiters = self.queue.members
        self.sleepers = self.queue.sleepers
        self.deadlines = Deadlines()
        #: waiters queued so far: each one's arrival number (FIFO order when requeued)
        self.arrivals = 0
        self.size = 0
        self.opening = 0
        #: lent or busy connections marked to close when next free (a drain, a
        #: resize, a failover), and the doomed openings: a shrink closes only
        #: the surplus they leave
        self.marked = 0
        #: openings in flight a shrink counted as surplus (in ``marked`` too):
        #: the next openings to end, however they end, consume them; one that
        #: succeeds is then closed if it is surplus still (see _put)
        self.doomed = 0
        #: drains so far: a connect that began before the last one is never lent
        self.drains = 0
        #: the cancel scopes of in-flight I/O, for disconnect() to cut short
        self.scopes: set[anyio.CancelScope] = set()
        #: set when the last lent connection comes back during disconnect's grace
        self.drained: anyio.Event | None = None
        self.breaker = Breaker()
        #: the current task of the pool's event loop, None when that loop runs
        #: none: ``tasks.get(tasks_key)``, or ``current_task()`` (the same, as a
        #: call); see _shims.task_registry_for
        self.tasks: TaskRegistry = _NO_TASKS
        self.tasks_key: object = None
        self.current_task: Callable[[], object] = _no_task
        #: the thread that loop runs in while the pool is OPEN, else -1: the
        #: fast acquire's one test of both (set with every change of state)
        self.lend_thread = -1
        self.acquired = 0
        self.waited = 0
        self.timeouts = 0
        self.wait_seconds = 0.0
        self.opened = 0
        self.closed = 0
        #: closed connections by why: what an operator tunes lifetimes by
        self.closed_by: Counter[str] = Counter()
        self.connect_failures = 0
        #: a closed connection's host budget slot goes back (set when
        #: host_connection_limit is on; called only for a record with a seat)
        self.free_seat: Callable[[Conn], None] = _no_seat

    # ------------------------------------------------------------ shared steps

    def _put(self, rec: Conn, now: float) -> None:
        """A free connection: hand it to the oldest waiter, or keep it idle."""
        if self.size - self.limit > self.marked:
            # Resized down: the surplus closes as it comes back. Not this one if
            # the connections already marked to close cover the surplus: closing
            # it too would shrink the pool below its limit, and reopen.
            self._retire(rec, rec.retire_reason or RESIZE)
            return
        if self.waiters:
            waiter = self.queue.pop()
            if waiter is None:  # lanes: every waiter's lane is at its limit
                self._keep_idle(rec, now)
                return
            if self.lanes is not None:
                rec.lane = waiter.lane  # charged to it by pop(): it frees it when it leaves
            rec.state = LENT
            rec.lent_at = now
            rec.handed = True
            rec.lease = HANDED  # no holder's release matches it until accept()
            self.lent[id(rec.raw)] = rec
            waiter.conn = rec
            waiter.wake()
        else:
            self._keep_idle(rec, now)

    def _keep_idle(self, rec: Conn, now: float) -> None:
        rec.state = IDLE
        rec.idle_since = now
        fresh = now + rec.fresh_for
        rec.fresh_until = fresh if fresh < rec.expires_at else rec.expires_at
        self.idle.append(rec)

    def _lane_freed(self, rec: Conn) -> None:
        """``rec`` leaves the lent: its lane, if any, holds one connection less."""
        lane = rec.lane
        if lane is not None:
            rec.lane = None
            self._freed(lane)

    def _freed(self, lane: LaneState) -> None:
        """``lane`` holds one connection less: if that lifts its limit, serve its waiters."""
        lanes: Lanes = self.lanes  # type: ignore[assignment]  # (a lane: the pool has lanes)
        lanes.freed(lane)
        if not lanes.servable:
            return
        if not self.idle:
            # Its waiters are demand again: there may be room to open for them
            # (they were not counted while their lane was at its limit).
            self.wake_openers()
            return
        # Its waiters were passed over while connections sat idle (their lane
        # was at its limit): now they may have them. A fresh one is handed on
        # as a release hands it; a doubtful one (idle past health_check_after,
        # or every lending checked by a hook) would need a check that only an
        # acquiring caller runs: it is closed, and a waiter opens a new one.
        now = time.monotonic()
        while self.idle and lanes.servable and self.state is OPEN:
            rec = self.idle.pop()
            if self.check_every_lending or now >= rec.fresh_until or not self.is_alive(rec.raw):
                self._retire(rec, IDLE_EXPIRY)
            else:
                self._put(rec, now)

    def _busy(self, rec: Conn) -> None:
        rec.state = BUSY
        self.busy[id(rec.raw)] = rec

    def _retire(self, rec: Conn, reason: str) -> None:
        """Close a connection that must not be lent again, at once. O(1)."""
        rec.state = CLOSED
        self.terminate(rec.raw)
        if rec.seat is not None:
            self.free_seat(rec)
        if rec.epoch != self.epoch:
            return
        if rec.expires_at == -math.inf:
            self.marked -= 1
        self.closed += 1
        self.closed_by[reason] += 1
        if self.state is not CLOSED_STATE:
            self.size -= 1
            self.wake_openers()

    def _check_drained(self) -> None:
        if not self.lent and self.drained is not None:
            self.drained.set()

    def _mark(self, rec: Conn, reason: str) -> None:
        """Close ``rec`` when next free, not before (a fast release sees it expired).

        Also for a connection on its way out now (an idle one a resize, a drain
        or the upkeep closes): until its close is reported it is still in
        ``size``, and a resize or a release must count it as leaving.
        """
        # A resize's mark is the only one undone (the pool grew again, or others
        # left first): any other reason overrides it, so that undoing it never
        # keeps a connection a drain or a failover retired.
        if not rec.retire_reason or rec.retire_reason == RESIZE:
            rec.retire_reason = reason
        if rec.expires_at != -math.inf:
            rec.expires_at = -math.inf
            self.marked += 1

    def _unmark(self, rec: Conn) -> None:
        """Undo a resize's mark: the pool grew again, the connection is no longer surplus."""
        rec.retire_reason = ""
        rec.expires_at = rec.lifetime_ends
        self.marked -= 1

    def _still_needed(self, rec: Conn, now: float) -> bool:
        """A connection a resize marked comes back: is it surplus still? O(1).

        Others may have left the size since the mark (an opening failed, a
        connection broke): then closing this one too would shrink the pool
        below its limit. Not surplus: the mark is undone, and True if its own
        lifetime has not ended either.
        """
        if (
            rec.retire_reason == RESIZE
            and rec.expires_at == -math.inf
            and rec.epoch == self.epoch
            and self.size - self.limit < self.marked
        ):
            self._unmark(rec)
            return now < rec.expires_at
        return False

    @staticmethod
    def _why_expired(rec: Conn, now: float) -> str:
        if rec.retire_reason:
            return rec.retire_reason
        if now >= rec.expires_at:
            return LIFETIME
        return IDLE_EXPIRY

    def may_open(self) -> bool:
        """Is there spare capacity, and demand not yet covered by an opening?"""
        if self.size >= self.limit or self.opening >= len(self.waiters):
            return False
        if self.lanes is not None and self.opening >= self.lanes.servable:
            return False  # the rest wait in lanes at their limit: a connection would idle
        if self.breaker.failures:
            # The breaker is open: after the back-off, exactly one probe at a time.
            return self.opening == 0 and time.monotonic() >= self.breaker.until
        # Slow start: no more openings in flight than connections already open
        # (at least one), so growth doubles per connect round trip. A spike of
        # quick queries is served by the first connections instead of opening
        # the whole limit; HikariCP and psycopg_pool open one at a time.
        return self.opening < max(1, self.size - self.opening)

    def _opening_ended(self) -> None:
        """An opening ended (connected, failed or abandoned): it consumes a doom, if any."""
        self.opening -= 1
        if self.doomed:
            self.doomed -= 1
            self.marked -= 1

    def reserve(self, waiter: Waiter) -> None:
        self.size += 1
        self.opening += 1
        waiter.reserved = self.epoch

    def wake_openers(self) -> None:
        """Capacity freed up while callers sleep: wake some to open connections."""
        while self.sleepers and self.may_open():
            waiter = self.queue.next_opener()
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
        self.queue.clear()
