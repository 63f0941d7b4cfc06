"""The engine's side of ``host_connection_limit``: a slot around each connection, fair shares.

``_budget.py`` keeps the machine-wide state (flock slots, member records);
this module ties one pool to it:

* **Before each connect** the opener takes a slot (:meth:`HostLimit.take`),
  inside its waiter's deadline. None free: it polls every ``POLL`` seconds and
  the pool publishes that it starves.
* **After each close** the slot goes back (:meth:`HostLimit.free`), but only
  once the server has dropped the session: the connection's socket was
  duplicated at connect, so after the driver's close (or terminate) this
  module sends FIN on the duplicate and reads it until the server's EOF,
  bounded by ``LINGER``. A driver with ``connect_watching`` shows each socket
  from its TCP connect on (:meth:`Seat.watch`), so a connect abandoned or
  failed mid-handshake, whose backend the server may already list, holds its
  slot the same way; without it, such a slot goes back at once. A MySQL
  server can list a session for a while after the client let go; a slot
  given back before then would let the server's count exceed the budget.
  That wait runs in the upkeep (a close in the ledger is synchronous), or at
  the end of ``disconnect()``.
* **Every** ``TICK`` the upkeep publishes this pool's record and, while
  another pool below its fair share starves with no slot free, sheds what
  this pool holds above its own share: idle connections close at once, lent
  ones are marked to close when released (given back to the host budget
  instead of to this pool's next waiter). A pool at or above its share does
  not take a freed slot while another starves.

Nothing here is on the fast path: ``take_idle`` and ``give_back`` never look.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc

from ._budget import HostBudget, Member, Slot, fair_share
from ._conn import Conn
from ._state import CLOSED_STATE, HOST_BUDGET, OPEN

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["LINGER", "POLL", "TICK", "HostLimit", "Seat", "run"]

logger = logging.getLogger("pool")

#: how often an opener looks for a free slot while none is
POLL: Final = 0.015
#: how often the upkeep publishes this pool's record and sheds its surplus
TICK: Final = 0.1
#: how long a closed connection's slot waits for the server to drop the session
LINGER: Final = 2.0


class Seat:
    """The slot one connection pays with, and duplicates of its socket(s) (none on SQLite).

    Usually one socket. A connect can make more than one (libpq moving to the
    next address, a host of a list that is not the one wanted): each one may
    have a backend on the server, so each is watched until the connect is over.
    """

    __slots__ = ("inodes", "slot", "socks")

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.socks: list[socket.socket] = []
        #: the socket inode of each of ``socks``: one socket is watched once
        self.inodes: list[int] = []

    def watch(self, fd: int) -> None:
        """The driver connected ``fd`` for this seat (its handshake may still run): keep a dup.

        Called by the driver's ``connect_watching``, so that a connect abandoned
        mid-handshake still has a socket to end and to see go (see ``free``).
        """
        try:
            inode = os.fstat(fd).st_ino
            if inode in self.inodes:
                return
            sock = socket.socket(fileno=os.dup(fd))
            sock.setblocking(False)
        except (OSError, ValueError):
            logger.debug("no socket to watch for the host budget", exc_info=True)
            return
        self.socks.append(sock)
        self.inodes.append(inode)

    def keep_only(self, fd: int) -> None:
        """The connect is done, on ``fd``: stop watching its other sockets (ending them).

        The driver closed those already; our duplicate would keep each open, its
        backend waiting for an end of stream that never comes.
        """
        try:
            inode = os.fstat(fd).st_ino
        except OSError:
            inode = -1
        kept: list[socket.socket] = []
        for sock, ino in zip(self.socks, self.inodes, strict=True):
            if ino == inode:
                kept.append(sock)
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            sock.close()
        self.socks = kept
        self.inodes = [inode] if kept else []

    def forget(self) -> None:
        """In a forked child: close our copies, telling neither the server nor the lock.

        ``close()`` of a descriptor drops a flock only when it is the last one
        on its open file description: the parent's stays, and holds the slot.
        """
        socks, self.socks, self.inodes = self.socks, [], []
        for sock in socks:
            # close(), never shutdown(): that would end the parent's session too
            with contextlib.suppress(OSError):
                os.close(sock.detach())
        self.slot.release()


class HostLimit:
    """One pool's part in a machine-wide budget, from its start to its disconnect."""

    def __init__(self, engine: Engine[Any], target: str, limit: int) -> None:
        self.engine = engine
        self.target = target
        self.limit = limit
        # made at the first start: it creates a directory
        self.budget: HostBudget | None = None
        self.member: Member | None = None
        self.socket_of: Callable[[Any], int] | None = getattr(engine.driver, "socket_of", None)
        #: the driver's connect that shows each socket before the handshake ends (optional)
        self.connect_watching: Callable[[Callable[[int], None]], Awaitable[Any]] | None = (
            getattr(engine.driver, "connect_watching", None)
        )
        #: how long the server may still list a session after it closed its socket
        #: (the driver says: MariaDB unlinks the session after closing it)
        self.after_eof = float(getattr(engine.driver, "session_linger", 0.0))
        #: slots this pool holds (for connections open, opening, or closing)
        self.held = 0
        #: this pool's openers looking for a slot now
        self.starving = 0
        #: when an opener of this pool last found no slot (monotonic)
        self.starved_at = -math.inf
        #: after the last tick: another pool below its share starves, and ours
        self.others_starving = False
        self.share = limit
        #: closed connections whose server has not dropped the session yet
        self.pending: deque[tuple[Seat, float]] = deque()
        #: set while the upkeep runs: it waits out ``pending``
        self.wakeup: anyio.Event | None = None

    # ------------------------------------------------------------ life cycle

    def _budget(self) -> HostBudget:
        if self.budget is None:
            self.budget = HostBudget(self.target, self.limit)
        return self.budget

    def join(self) -> None:
        """The pool starts: it becomes a member of the budget."""
        if self.member is None or not self.member.active:
            self.member = self._budget().join()

    def leave(self) -> None:
        """The pool closed (disconnect, or its event loop ended): give back all, leave."""
        self.settle_now()
        if self.member is not None:
            self.member.leave()
            self.member = None
        self.starving = 0
        self.others_starving = False

    def forget_after_fork(self, recs: list[Conn]) -> None:
        """In a forked child: close the inherited descriptors, unlocking nothing."""
        for rec in recs:
            seat, rec.seat = rec.seat, None
            if isinstance(seat, Seat):
                seat.forget()
        while self.pending:
            self.pending.popleft()[0].forget()
        if self.member is not None:
            self.member.forget()
            self.member = None
        self.held = self.starving = 0
        self.others_starving = False
        self.wakeup = None
        self.budget = None  # its take() cursor was the parent's pid's

    # ------------------------------------------------------------ slots

    async def take(self) -> Seat:
        """A slot for one connect; polls while none is free (the caller's scope bounds it)."""
        budget = self._budget()
        waiting = False
        try:
            while True:
                # at or above its share while a pool below its own starves: let that one have it
                if not (self.others_starving and self.held >= self.share):
                    slot = budget.take()
                    if slot is not None:
                        self.held += 1
                        return Seat(slot)
                self.starved_at = time.monotonic()
                if not waiting:
                    waiting = True
                    self.starving += 1
                    self.publish()  # now, not at the next tick: the others shed sooner
                await anyio.sleep(POLL)
        finally:
            if waiting:
                self.starving -= 1
                self.publish()

    def attach(self, seat: Seat, raw: object) -> None:
        """A connection opened on ``seat``: keep a duplicate of its socket, to see it go."""
        if self.socket_of is None:
            return
        try:
            fd = self.socket_of(raw)
        except (OSError, AttributeError, TypeError, ValueError):
            logger.debug("no socket to watch for the host budget", exc_info=True)
            fd = -1
        if fd < 0:
            return
        seat.keep_only(fd)
        if not seat.socks:  # a driver without connect_watching: watched from now on
            seat.watch(fd)

    def closed(self, rec: Conn) -> None:
        """The ledger closed ``rec`` (its ``free_seat``): its slot goes back once it is gone."""
        seat, rec.seat = rec.seat, None
        if isinstance(seat, Seat):
            self.free(seat)

    def free(self, seat: Seat) -> None:
        """A connection on ``seat`` is closed, or its connect abandoned or failed: give the
        slot back once the server let go of every socket the connect made."""
        self.held -= 1
        socks = seat.socks
        if not socks:
            seat.slot.release()
            return
        # Our duplicates keep the sockets open: end them ourselves (after the
        # driver's own close, which sent its goodbye first). A connect cut short
        # mid-handshake has its backend end here too: the server then reads our
        # end of stream, and we its own once the backend exited.
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        if not self.after_eof and _all_gone(seat):
            self._give_back(seat)
            return
        self.pending.append((seat, time.monotonic() + LINGER))
        if self.wakeup is not None:
            self.wakeup.set()
        elif self.engine.ledger.state is CLOSED_STATE:
            self.settle_now()  # no upkeep, no disconnect to wait it out

    @staticmethod
    def _give_back(seat: Seat) -> None:
        socks, seat.socks, seat.inodes = seat.socks, [], []
        for sock in socks:
            sock.close()
        seat.slot.release()

    def settle_now(self) -> None:
        """Wait (blocking, bounded) for every closed session to go, and give the slots back.

        Only where nothing can be awaited: the end of ``disconnect()`` or of
        an event loop; the server answers a FIN at once, so this is short.
        """
        pending = self.pending
        gone: list[Seat] = []
        while pending:
            seat, until = pending[0]
            left = until - time.monotonic()
            waiting = [sock for sock in seat.socks if not _gone(sock)] if left > 0 else []
            if waiting:
                with contextlib.suppress(OSError, ValueError):
                    select.select(waiting, [], [], min(left, 0.05))
                continue
            gone.append(pending.popleft()[0])
        if gone and self.after_eof:
            time.sleep(self.after_eof)  # once, for all of them
        for seat in gone:
            self._give_back(seat)

    async def _linger(self, seat: Seat, until: float) -> None:
        done = False
        try:
            with anyio.move_on_after(max(0.0, until - time.monotonic())):
                for sock in seat.socks:
                    while not _gone(sock):
                        await anyio.wait_readable(sock)
            if self.after_eof:
                await anyio.sleep(self.after_eof)
            done = True
        finally:
            if done:
                self._give_back(seat)
            else:  # the upkeep stopped: disconnect() (or the loop's end) settles it
                self.pending.append((seat, until))

    # ------------------------------------------------------------ fairness

    def publish(self) -> None:
        member = self.member
        if member is not None:
            ledger = self.engine.ledger
            member.publish(
                starving=self.starving,
                size=self.held,
                demand=len(ledger.lent) + len(ledger.waiters),
            )

    def tick(self, tg: anyio.abc.TaskGroup) -> None:
        """Publish this pool's record; shed above its share while another pool starves."""
        member = self.member
        ledger = self.engine.ledger
        if member is None or ledger.state is not OPEN:
            return
        demand = len(ledger.lent) + len(ledger.waiters)
        member.publish(starving=self.starving, size=self.held, demand=demand)
        records = member.others()
        share = fair_share(self.limit, records, demand)
        pools = sum(1 for rec in records if rec.demand > 0) + (demand > 0)
        their_share = max(1, self.limit // max(1, pools))
        starved = any(rec.starving > 0 and rec.size < their_share for rec in records)
        self.share = share
        self.others_starving = starved
        if not starved or self.held <= share:
            return
        budget = self.budget
        if budget is not None and budget.in_use() < self.limit:
            return  # a slot is free: the starving pool takes it at its next look
        surplus = self.held - share - ledger.marked
        closing: list[Conn] = []
        while surplus > 0 and ledger.idle:
            rec = ledger.idle.popleft()  # the longest idle first
            rec.retire_reason = HOST_BUDGET
            ledger._busy(rec)
            closing.append(rec)
            surplus -= 1
        # The rest close as their holders release them: given back to the host
        # budget instead of to this pool's next waiter (a resize's mechanism).
        for rec in list(ledger.lent.values()):
            if surplus <= 0:
                break
            if not rec.retire_reason and not rec.handed:
                ledger._mark(rec, HOST_BUDGET)
                surplus -= 1
        if closing:
            logger.debug(
                "host_connection_limit: another pool starves; closing %d idle connection(s)",
                len(closing),
            )
            tg.start_soon(self.engine.close_all, closing)

    # ------------------------------------------------------------ diagnosis

    def in_use(self) -> int:
        """Slots held now on this machine, by any process."""
        return self._budget().in_use()

    def explain(self, since: float) -> str | None:
        """For a PoolTimeoutError: the host budget, if it is what kept this caller waiting."""
        if self.starved_at < since:
            return None
        holders = self._budget().holders()
        by_pid: dict[int, int] = {}
        for pid in holders:
            by_pid[pid] = by_pid.get(pid, 0) + 1
        who = ", ".join(f"{pid} ({n})" for pid, n in sorted(by_pid.items())) or "none now"
        return (
            f"The machine's host_connection_limit={self.limit} for {self.target} was used up: "
            f"{len(holders)} slot(s) held, by pid(s) {who}."
        )


def _all_gone(seat: Seat) -> bool:
    """Has the server closed every socket of ``seat``? (each one read, none waited for)"""
    gone = [_gone(sock) for sock in seat.socks]  # all read: none left with unread data
    return all(gone)


def _gone(sock: socket.socket) -> bool:
    """Has the server closed its side? Reads (and drops) what it sent; never blocks."""
    while True:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # reset, or already closed: gone either way
        if not data:
            return True


async def run(ref: weakref.ref[HostLimit], tg: anyio.abc.TaskGroup) -> None:
    """The upkeep's part: wait out closed sessions, publish, shed (every TICK).

    Like the upkeep, it holds the pool only between awaits (``ref``), so a pool
    dropped without ``disconnect()`` can still be collected.
    """
    host = ref()
    if host is None:
        return
    wakeup = host.wakeup = anyio.Event()
    del host
    next_tick = time.monotonic() + TICK
    try:
        while True:
            with anyio.move_on_after(max(0.0, next_tick - time.monotonic())):
                await wakeup.wait()
            host = ref()
            if host is None or host.wakeup is not wakeup:
                return  # collected, or forgotten (a fork)
            if wakeup.is_set():
                wakeup = host.wakeup = anyio.Event()
            while host.pending:
                tg.start_soon(host._linger, *host.pending.popleft())
            if time.monotonic() >= next_tick:  # woken for a closed session: keep the pace
                next_tick = time.monotonic() + TICK
                try:
                    host.tick(tg)
                except Exception:  # the budget must never take the pool down
                    logger.exception("host_connection_limit upkeep failed; it will run again")
            del host
    finally:
        host = ref()
        if host is not None and host.wakeup is wakeup:
            host.wakeup = None
