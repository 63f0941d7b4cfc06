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
from collections.abc import Mapping
from sys import _getframe
from threading import get_ident
from typing import TypeVar

from ._breaker import server_is_gone
from ._closing import Closing
from ._conn import ANY_LEASE, BUSY, HANDED, IDLE, LENT, Conn
from ._diagnosis import PACKAGE_FILES, outside_package, stamp_site
from ._errors import ConnectError, PoolClosedError, PoolError
from ._queue import Lane, Lanes, LaneState
from ._state import (
    BROKEN,
    CHECK_FAILED,
    CLOSE,
    CLOSE_REASONS,
    CLOSED_STATE,
    CLOSING,
    DISCONNECT,
    DRAIN,
    LIFETIME,
    OPEN,
    RECOVER,
    RELEASED,
    RESET_FAILED,
    TIDY,
    _never,
    _none,
)
from ._waiters import Waiter

__all__ = [
    "BROKEN", "CLOSE", "CLOSED_STATE", "CLOSE_REASONS", "CLOSING", "OPEN", "RECOVER", "RELEASED",
    "RESET_FAILED", "TIDY", "Ledger",
]

C = TypeVar("C")

logger = logging.getLogger("pool")


def _running(task: object) -> bool:
    """Is this holder task (asyncio's or trio's) still running? Only asked on a suspect release."""
    done = getattr(task, "done", None)
    if callable(done):
        return not done()
    coro = getattr(task, "coro", None)  # trio: a finished task's coroutine has no frame
    return coro is None or getattr(coro, "cr_frame", None) is not None


class Ledger(Closing[C]):
    """The pool's accounting. Synchronous: not one method here awaits.

    Its state and shared steps are in ``_state.py``, its life-cycle steps in
    ``_closing.py``; here, the lending and the returns.
    """

    # ------------------------------------------------------------ lanes

    def use_lanes(self, lanes: Mapping[str, Lane]) -> Lanes:
        """From now on, the wait queue has lanes (and tenants): a one-way switch.

        At construction (``lanes=``), or at the first acquire that names a
        tenant in a pool without lanes. O(waiting + lent) once: the waiters
        queued so far join the default lane in their order, the connections
        lent so far are counted as the default lane's.
        """
        queue = Lanes(lanes)
        default = queue.default
        queue.adopt(self.queue)
        for rec in self.lent.values():
            rec.lane = default
            queue.charge(default)
        default.acquired = self.acquired
        self.queue = self.lanes = queue
        self.waiters = queue.members
        self.sleepers = queue.sleepers
        # Every acquire and release takes the careful path, which keeps each
        # lane's count; the fast paths stay those of a pool without lanes.
        setattr(self, "take_idle", _none)  # noqa: B010
        setattr(self, "give_back", _never)  # noqa: B010
        return queue

    # ------------------------------------------------------------ the fast paths

    def take_idle(self) -> C | None:
        """An idle connection, nobody waiting, no check due: lend it. Else None.

        Called straight from the public entry points, so the user's frame is
        two levels up.
        """
        idle = self.idle
        # Open, and never lending a connection of the pool's event loop to a
        # task of another (the careful path then says what to do instead): in
        # two cheap halves. The loop's own thread (lend_thread is -1 unless the
        # pool is open; another thread's loop fails it), and below, a task of
        # the pool's loop running now (current_task asks that loop: None from
        # another loop in the same thread, the pool's having ended). asyncio's
        # _get_running_loop would make a getpid() system call.
        if not idle or self.waiters or get_ident() != self.lend_thread:
            return None
        rec = idle[-1]
        now = time.monotonic()
        if now >= rec.fresh_until or not self.is_alive(rec.raw):
            return None
        task = self.tasks.get(self.tasks_key)  # current_task(), inlined: one call less
        if task is None:
            return None
        idle.pop()
        rec.state = LENT
        rec.lent_at = now
        # the lease: the lending's number (a stale handle's release is refused),
        # and the previous holder (its second bare release is refused)
        rec.lease = acquired = self.acquired + 1
        rec.previous = rec.task
        rec.task = task
        frame = _getframe(2)  # the caller of the public entry point: the user
        code = frame.f_code  # (a frame's attributes are its slowest: each read once)
        if code.co_filename in PACKAGE_FILES:
            frame = outside_package(frame)
            code = frame.f_code
        rec.site_code = code
        rec.site_offset = frame.f_lasti
        raw: C = rec.raw
        self.lent[id(raw)] = rec
        self.acquired = acquired
        return raw

    def give_back(self, raw: C, lease: int = ANY_LEASE) -> bool:
        """The fast release: a clean connection goes back with no round trip.

        Returns False, touching nothing, when the careful path must decide
        (unknown connection, in a transaction, broken, expired, pool closing,
        or ``lease`` is older than the connection's: a stale handle, which
        :meth:`check_lease` then refuses).
        """
        lent = self.lent
        key = id(raw)
        rec = lent.get(key)
        if rec is None or rec.lease > lease or self.state is not OPEN:
            return False
        now = time.monotonic()
        if now >= rec.expires_at or not self.is_clean(raw):
            return False
        del lent[key]
        waiters = self.waiters
        if waiters:
            if self.size - self.limit > self.marked:
                self._put(rec, now)  # resized down: _put() closes the surplus
                return True
            # _put(), inlined: the handoff to the oldest waiter (it stays lent).
            # FIFO only (a pool with lanes never takes this fast release): the
            # queue is not empty, pop() returns a waiter.
            # Fifo.pop(), inlined too (one call less per handoff under load):
            # the queue's own dicts, which self.waiters and self.sleepers are
            waiter, _ = waiters.popitem(last=False)
            self.sleepers.pop(waiter, None)
            rec.lent_at = now
            rec.handed = True
            rec.lease = HANDED  # no holder's release matches it until accept()
            lent[key] = rec
            waiter.conn = rec
            waiter.wake()
        else:  # _put(), inlined for the common case: nobody waits, it goes idle
            rec.state = IDLE
            rec.idle_since = now
            fresh = now + rec.fresh_for
            rec.fresh_until = fresh if fresh < rec.expires_at else rec.expires_at
            self.idle.append(rec)
        return True

    def check_lease(self, raw: C, lease: int) -> None:
        """A handle's careful release: refuse it if its lease has ended (a stale handle)."""
        rec = self.lent.get(id(raw))
        if rec is not None and rec.lease != lease:
            raise PoolError(
                "this connection was released through this handle already, and is lent "
                "to another caller now (a stale acquire() handle, or a second release)"
            )

    def lease_of(self, raw: C) -> int:
        """A bare ``release(conn)``: the connection's lease, or PoolError for a misuse.

        Refused: a connection handed to a waiter (nobody holds it), and a second
        release by its previous holder once another task, still running, holds
        it. A release by any other task stays allowed (a connection may be
        released by a task other than the one that acquired it), and so does
        one of a connection whose holder has ended (nobody uses it any more).
        """
        rec = self.lent.get(id(raw))
        if rec is None:
            return ANY_LEASE  # the careful release decides (closed by disconnect, or unknown)
        task = self.current_task()
        if rec.handed or (rec.task is not task and rec.previous is task and _running(rec.task)):
            raise PoolError(
                "this connection was released already, and is lent to another caller "
                "now (released twice?)"
            )
        return rec.lease

    # ------------------------------------------------------------ the slow acquire

    def take_for(self, lane: LaneState | None = None) -> Conn | None:
        """Nobody waits: the newest usable idle connection, LENT, or BUSY if it needs a check.

        Dead and expired ones on the way are closed. None: none is idle, or
        someone waits (then the caller queues behind them). ``lane``: the
        caller's, in a pool with lanes; it is charged for the connection now,
        checked or not, so that concurrent checks never take a lane past its
        limit (:meth:`check_done` gives it back if the check fails).
        """
        idle = self.idle
        if lane is not None:
            lanes: Lanes = self.lanes  # type: ignore[assignment]
            if not (idle and lanes.may_take(lane) and self.state is OPEN):
                return None
            rec = self.take_for()  # (with the lane's waiters only, whom it may pass)
            if rec is not None:
                lanes.charge(lane)
                if rec.state is LENT:
                    rec.lane = lane
                    lane.acquired += 1
            return rec
        while idle and (not self.waiters or self.lanes is not None) and self.state is OPEN:
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

    def check_done(self, rec: Conn, ok: bool, lane: LaneState | None = None) -> bool:
        """A check ended. True: the connection is now lent to the caller that checked it.

        ``lane``: the one :meth:`take_for` charged; given back if it is not lent.
        """
        if lane is None:
            return self._checked(rec, ok)
        if self._checked(rec, ok):
            rec.lane = lane
            lane.acquired += 1
            return True
        self._freed(lane)
        return False

    def uncharge(self, lane: LaneState | None) -> None:
        """The caller that :meth:`take_for` charged ``lane`` for gave the connection up."""
        if lane is not None:
            self._freed(lane)

    def _checked(self, rec: Conn, ok: bool) -> bool:
        if rec.state is not BUSY:
            return False  # disconnect() closed it meanwhile
        del self.busy[id(rec.raw)]
        now = time.monotonic()
        if not ok:
            self._retire(rec, CHECK_FAILED)
            return False
        if (
            rec.epoch != self.epoch
            or self.state is not OPEN
            or (rec.expires_at <= now and not self._still_needed(rec, now))
        ):
            # disconnected, or marked meanwhile (a drain, a failover, a resize)
            self._retire(rec, self._why_expired(rec, now))
            return False
        self._lend(rec, time.monotonic())
        return True

    def _lend(self, rec: Conn, now: float) -> None:
        rec.state = LENT
        rec.lent_at = now
        rec.previous = rec.task
        rec.task = self.current_task()
        stamp_site(rec, 2)
        self.lent[id(rec.raw)] = rec
        self.acquired += 1
        rec.lease = self.acquired

    def arrive(self) -> int:
        """A slow acquire starts: its place in the arrival order, kept if it queues later."""
        self.arrivals += 1
        return self.arrivals

    def enqueue(self, waiter: Waiter) -> None:
        self.arrivals += 1
        waiter.arrival = self.arrivals
        if self.lanes is None:  # Fifo.push(), inlined: the common case under load
            self.waiters[waiter] = None
            self.sleepers[waiter] = None
        else:
            self.queue.push(waiter)
        # may_open()'s first test inlined: a full pool, the common case under load
        if self.size < self.limit and self.opening < len(self.waiters) and self.may_open():
            self.queue.wake_to_open(waiter)
            self.reserve(waiter)

    def enqueue_at(self, waiter: Waiter, arrival: int) -> None:
        """Queue a caller that arrived (``arrival``, from :meth:`arrive`) before it queues.

        It checked an idle connection meanwhile (which failed its check, or was
        retired by a drain, a resize, a failover): the younger callers that
        queued while it checked stay behind it. O(k) for the k of them.
        """
        self.queue.push_at(waiter, arrival)
        if self.size < self.limit and self.opening < len(self.waiters) and self.may_open():
            self.queue.wake_to_open(waiter)
            self.reserve(waiter)

    def accept(self, waiter: Waiter, started: float, task: object) -> C | None:
        """A waiter that was handed a connection runs: lend it, unless the pool closed since.

        None: the connection was retired while the waiter had not run yet (its
        server failed over, see :meth:`retire_host`, or went away): it is
        closed, never lent, and the waiter is back at the head of the queue.
        """
        rec = waiter.conn
        assert rec is not None
        waiter.conn = None
        rec.handed = False
        key = id(rec.raw)
        if self.state is not OPEN or rec.state is not LENT or self.lent.get(key) is not rec:
            self._returned(rec)
            raise PoolClosedError("the pool was disconnected while this call waited")
        if rec.expires_at == -math.inf and not self._still_needed(rec, time.monotonic()):
            del self.lent[key]
            lane, rec.lane = rec.lane, None
            waiter.rearm()
            # Back at the head of the queue: it was served before everyone still
            # waiting. Except the waiters requeued the same way before it, handed
            # a retired connection earlier in the same burst: they are older, and
            # stay ahead (at most connection_limit of them).
            self.queue.requeue_first(waiter)
            # It sleeps, first in line for the next free connection; the
            # youngest sleepers open the replacements (wake_openers), so that the
            # oldest waiter is not the one stuck in a connect when a
            # connection comes back for it.
            self.queue.sleep_first(waiter)
            if lane is not None:
                self._freed(lane)  # (once it is back in line: it may be served first)
            self._retire(rec, rec.retire_reason or LIFETIME)  # (unmarked: its lifetime ended)
            return None
        now = time.monotonic()
        if rec.lane is not None:
            rec.lane.acquired += 1
        self.waited += 1
        self.wait_seconds += now - started
        rec.lent_at = now
        rec.previous = rec.task
        rec.task = task
        # stamp_site(), inlined: the waiter's own call site. It is at least
        # three frames up (here, the engine's acquire, an entry point, then the
        # user's frame): jumping there materialises one frame object, not three.
        try:
            frame = sys._getframe(3)
        except ValueError:  # called from a shallower stack than any entry point makes
            frame = sys._getframe(1)
        if frame.f_code.co_filename in PACKAGE_FILES:
            frame = outside_package(frame)  # past asyncio's frames too (a gather's task)
        rec.site_code = frame.f_code
        rec.site_offset = frame.f_lasti
        self.acquired += 1
        rec.lease = self.acquired
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
            self.queue.remove(waiter)
        self.unreserve(waiter)

    def _returned(self, rec: Conn) -> None:
        """A connection handed to a waiter comes back unused."""
        rec.handed = False
        key = id(rec.raw)
        if rec.state is LENT and self.lent.get(key) is rec:
            del self.lent[key]
            self._lane_freed(rec)
            now = time.monotonic()
            if (
                self.state is OPEN
                and rec.epoch == self.epoch
                and rec.expires_at <= now
                and not self._still_needed(rec, now)
            ):
                # marked meanwhile (a drain, a resize, a failover), or expired: never lent again
                self._retire(rec, self._why_expired(rec, now))
            elif self.state is OPEN and rec.epoch == self.epoch:
                self._put(rec, now)
            else:
                self._retire(rec, DISCONNECT)
                self._check_drained()
        else:
            self.orphans.pop(key, None)  # closed by disconnect() before the waiter ran

    # ------------------------------------------------------------ opening

    def unreserve(self, waiter: Waiter) -> None:
        """Give back the capacity reserved for ``waiter``, if it is of this epoch."""
        if waiter.reserved < 0:
            return
        if waiter.reserved == self.epoch:
            self.size -= 1
            self._opening_ended()
            waiter.reserved = -1
            self.wake_openers()
        waiter.reserved = -1

    def begin_open(self, waiter: Waiter) -> int:
        """The waiter's reservation now belongs to its opening; returns its epoch."""
        epoch, waiter.reserved = waiter.reserved, -1
        return epoch

    def open_done(
        self, raw: C, epoch: int, host: str = "", drains: int = -1, seat: object = None
    ) -> bool:
        """A connect succeeded. False: the caller closes it (the pool closed meanwhile).

        ``drains``: :attr:`drains` when that connect began. A drain since then
        means it may carry what the drain replaces (old credentials): it is
        never lent, and its capacity opens again for the waiters, who keep
        their places.
        """
        if epoch != self.epoch or self.state is not OPEN:
            return False
        failures = self.breaker.succeeded()
        if failures:
            logger.info("Reconnected to the database after %d failed attempt(s).", failures)
        self._opening_ended()  # doomed by a shrink: _put() closes it if surplus still
        self.opened += 1
        if 0 <= drains != self.drains:
            self.closed += 1
            self.closed_by[DRAIN] += 1
            self.size -= 1
            self.wake_openers()
            return False
        now = time.monotonic()
        rec = Conn(raw, now, epoch, self.lifetime, self.max_idle, host)
        rec.fresh_for = min(self.check_after, rec.idle_limit)
        rec.seat = seat  # host_connection_limit's slot: freed when it is closed
        self._put(rec, now)
        # One more open connection: the slow start may let more waiters open.
        self.wake_openers()
        return True

    def open_failed(
        self, epoch: int, error: ConnectError | None, began: float = math.inf
    ) -> None:
        """A connect failed (``error``) or was abandoned (None): free its capacity.

        ``began``: when that connect started (monotonic), for the breaker.
        """
        if epoch != self.epoch:
            return
        self.size -= 1
        self._opening_ended()
        if error is None:
            self.wake_openers()
            return
        self.breaker.failed(error, began)
        self.connect_failures += 1
        if server_is_gone(error.__cause__):
            # Refused: the server is down or restarting. Every connection opened
            # before now died with it: close the idle ones, the lent ones when
            # they come back.
            # Busy ones too: a rollback or a check that ends well on a connection
            # to a server that is gone must not put it back in service.
            for rec in (*self.lent.values(), *self.busy.values()):
                self._mark(rec, BROKEN)
            while self.idle:
                self._retire(self.idle.pop(), BROKEN)
        self.wake_openers()
        # Sleepers wait with no timer: wake them, so that each looks again when
        # this back-off ends (one of them will be the probe).
        for waiter in self.sleepers:
            waiter.wake()

    # ------------------------------------------------------------ release

    def release(self, raw: C, cancelled: bool, broken: bool = False) -> tuple[int, Conn | None]:
        """The careful release decides: back now, tidy (or recover) first, or close."""
        key = id(raw)
        lent = self.lent
        rec = lent.get(key)
        if rec is not None and rec.handed:
            # handed to a waiter that has not run yet: nobody holds it to release it
            raise PoolError("this connection was released already (released twice?)")
        rec = lent.pop(key, None)
        if rec is None:
            if self.orphans.pop(key, None) is not None:
                return RELEASED, None  # disconnect() closed it while it was held
            raise PoolError("this connection is not lent by this pool (released twice?)")
        rec.task = None
        if rec.lane is not None:
            self._lane_freed(rec)
        if self.state is CLOSING:
            # disconnect() waits out its grace: close this one gracefully
            self._busy(rec)
            return CLOSE, rec
        now = time.monotonic()
        if broken or not self.is_alive(raw):
            # broken: it failed in a way that leaves its protocol state unknown
            self._retire(rec, BROKEN)
        elif rec.expires_at <= now and not self._still_needed(rec, now):
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
        if rec.state is not BUSY:
            return  # disconnect() closed it meanwhile
        del self.busy[id(rec.raw)]
        now = time.monotonic()
        if not ok:
            self._retire(rec, failed)
        elif (
            rec.epoch != self.epoch
            or self.state is not OPEN
            or (rec.expires_at <= now and not self._still_needed(rec, now))
        ):
            self._retire(rec, self._why_expired(rec, now))
        else:
            self._put(rec, now)
