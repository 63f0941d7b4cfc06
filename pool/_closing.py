"""The ledger's life-cycle steps: expiry, resize, drain, failover, disconnect, fork.

Part of the one owner of the pool's state (see ``_ledger.py``): synchronous
steps that take connections out of service. Those to close gracefully come
back ``BUSY``, for the engine to close and report with :meth:`close_done`.
"""

from __future__ import annotations

import math
import time
from typing import Any, TypeVar

from ._conn import BUSY, CLOSED, Conn
from ._state import (
    BROKEN,
    CLOSED_STATE,
    CLOSING,
    DISCONNECT,
    DRAIN,
    FAILOVER,
    OPEN,
    RESIZE,
    LedgerState,
)

__all__ = ["Closing"]

C = TypeVar("C")


class Closing(LedgerState[C]):
    """Taking connections out of service, and the pool's own closing."""

    def retire_host(self, host: str) -> int:
        """Every connection to ``host`` is never lent again: a failover demoted it.

        Idle ones close now; lent and busy ones close when they come back.
        Returns how many were found.
        """
        found = 0
        for rec in (*self.lent.values(), *self.busy.values()):
            if rec.host == host:
                if rec.expires_at != -math.inf:  # not counted twice
                    found += 1
                self._mark(rec, FAILOVER)  # (over a resize's mark: never undone now)
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
        # Those already on their way out (marked, or closing now: an earlier
        # resize's closes still running) leave the size by themselves.
        surplus = self.size - limit - self.marked
        if surplus < 0 and self.doomed:
            # Grown again: the doomed openings first, then held connections an
            # earlier shrink marked, are no longer surplus.
            undo = min(-surplus, self.doomed)
            self.doomed -= undo
            self.marked -= undo
            surplus += undo
        if surplus < 0:
            # Only lent ones: a busy one may be closing already.
            for rec in self.lent.values():
                if surplus >= 0:
                    break
                if rec.retire_reason == RESIZE and rec.expires_at == -math.inf:
                    self._unmark(rec)
                    surplus += 1
        closing: list[Conn] = []
        while surplus > 0 and self.idle:
            rec = self.idle.popleft()  # the longest idle first
            self._mark(rec, RESIZE)  # counted as leaving until close_done()
            self._busy(rec)
            closing.append(rec)
            surplus -= 1
        # Then openings in flight: a connection not lent yet is the cheapest to
        # give up, and a held one is not taken from its holder for one that
        # may never connect. Doomed, they count as leaving; each connection
        # that arrives while some are doomed is closed if surplus still.
        doom = min(surplus, self.opening - self.doomed)
        if doom > 0:
            self.doomed += doom
            self.marked += doom
            surplus -= doom
        # Held ones next, then those in the pool's own I/O, and only then those
        # handed to a waiter that has not run yet, the last handed first: a
        # waiter whose connection is retired before it runs goes back to the
        # head of the queue, and a later-handed waiter keeping its connection
        # would be served before it.
        lent = self.lent.values()
        handed_last_first = [rec for rec in reversed(lent) if rec.handed]
        held = [rec for rec in lent if not rec.handed]
        for rec in (*held, *self.busy.values(), *handed_last_first):
            if surplus <= 0:
                break
            if rec.expires_at != -math.inf:
                self._mark(rec, RESIZE)
                surplus -= 1
        self.wake_openers()
        return closing

    def drain(self) -> list[Conn]:
        """Replace every connection: idle ones now (returned BUSY, to close), the rest when free.

        Waiters keep their place: new connections open for them as the old
        ones close.
        """
        # A connect in flight began before now: open_done() does not lend it.
        self.drains += 1
        for rec in (*self.lent.values(), *self.busy.values()):
            self._mark(rec, DRAIN)
        closing = list(self.idle)
        self.idle.clear()
        for rec in closing:
            self._mark(rec, DRAIN)  # counted as leaving until close_done()
            self._busy(rec)
        return closing

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
            self._mark(rec, self._why_expired(rec, now))  # leaving until close_done()
            self._busy(rec)
        return expired

    def close_done(self, rec: Conn) -> None:
        """A graceful close ended (or gave up and terminated)."""
        if rec.state is not BUSY:
            return
        del self.busy[id(rec.raw)]
        rec.state = CLOSED
        if rec.seat is not None:
            self.free_seat(rec)
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
        self.lend_thread = -1
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
            self._lane_freed(rec)
            rec.state = CLOSED
            self.terminate(rec.raw)
            if rec.seat is not None:
                self.free_seat(rec)
            self.orphans[id(rec.raw)] = rec
        self.closed += len(lent)
        # They leave the size too: disconnect() may still wait for in-flight
        # I/O, and until it ends size == idle + lent + busy + opening holds.
        self.size -= len(lent)
        self.closed_by[DISCONNECT] += len(lent)

    def finish_closing(self) -> None:
        """disconnect() ends: close what outlived its bound, and start a new epoch."""
        for rec in self.busy.values():
            rec.state = CLOSED
            self.terminate(rec.raw)
            if rec.seat is not None:
                self.free_seat(rec)
            self.closed += 1
            self.closed_by[DISCONNECT] += 1
        self.busy.clear()
        # A new epoch: an opening still in flight, or a reservation taken before
        # now, finds its epoch stale and leaves the new counts alone.
        self.epoch += 1
        self.size = 0
        self.opening = 0
        self.marked = self.doomed = 0
        self.state = CLOSED_STATE
        self.lend_thread = -1
        self.deadlines.clear()
        self.drained = None

    def drop_everything(self, error: BaseException) -> None:
        """The event loop the pool ran on has ended: close all at once, no I/O awaited.

        Waiters are failed, every connection is terminated (a holder's release
        of one stays harmless), and a new epoch starts: the pool reopens on
        the next event loop that uses it.
        """
        self.state = CLOSING
        self.lend_thread = -1
        self.fail_waiters(error)
        for scope in self.scopes:
            scope.cancel()
        while self.idle:
            rec = self.idle.pop()
            rec.state = CLOSED
            self.terminate(rec.raw)
            if rec.seat is not None:
                self.free_seat(rec)
            self.closed += 1
            self.closed_by[DISCONNECT] += 1
        self.orphan_lent()
        self.finish_closing()

    def forget_after_fork(self) -> list[Any]:
        """In a forked child: drop the parent's connections without a word to the server."""
        kept = [rec.raw for rec in (*self.idle, *self.lent.values(), *self.busy.values())]
        kept.extend(rec.raw for rec in self.orphans.values())
        for container in (self.idle, self.lent, self.busy, self.orphans, self.deadlines.timed):
            container.clear()
        self.queue.clear()
        if self.lanes is not None:
            self.lanes.reset()
        self.deadlines.timer = None  # the parent's loop: never touched here
        self.scopes.clear()
        self.epoch += 1
        self.size = self.opening = self.marked = self.doomed = 0
        self.state = CLOSED_STATE
        self.lend_thread = -1
        return kept
