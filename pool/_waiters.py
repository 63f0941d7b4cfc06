"""The wait queue: one waiter type per event loop, FIFO with O(1) removal, one timer.

A waiter is one caller that found no idle connection. It is handed a
connection (``conn``), failed (``error``), timed out, or woken to open a
connection itself on capacity reserved for it (``reserved``).

On asyncio a waiter awaits a bare future and the waiters on the pool's own
timeout share one loop timer (:class:`Deadlines`): an anyio cancel scope with a
deadline costs about 8 us per wait there, more than all the rest of a handoff.
On trio a waiter waits on an anyio Event, inside a cancel scope of its caller.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import Hashable

    from ._conn import Conn
    from ._queue import LaneState

__all__ = ["AsyncioWaiter", "Deadlines", "TrioWaiter", "Waiter"]


class _WaiterBase:
    __slots__ = (
        "arrival", "conn", "deadline", "error", "lane", "opening", "reserved", "started",
        "tenant", "timed_out",
    )

    # Set only in a pool with lanes (see _queue.Lanes), before it queues: a
    # FIFO pool's waiters never carry them, and pay not even a store for them.
    #: its lane
    lane: LaneState
    #: its tenant's key within the lane (None: the lane's anonymous tenant)
    tenant: Hashable

    def __init__(self) -> None:
        self.conn: Conn | None = None
        self.error: BaseException | None = None
        #: the epoch whose capacity was reserved for this waiter to open a
        #: connection itself, or -1: a reservation from before a disconnect is void
        self.reserved = -1
        self.timed_out = False
        self.deadline = math.inf
        #: when it began to wait (time.monotonic()), for stats().longest_wait
        self.started = 0.0
        #: while it opens a connection: the scope to abort that, if served first
        self.opening: anyio.CancelScope | None = None
        #: its place in the arrival order (set when it first queues)
        self.arrival = 0

    def _abort_opening(self) -> None:
        if self.opening is not None:
            # Served (or failed) while opening: it needs that connection no more.
            self.opening.cancel()

    def expire(self) -> None:
        """The deadline passed."""
        self.timed_out = True
        self.wake()

    def wake(self) -> None:
        raise NotImplementedError


class AsyncioWaiter(_WaiterBase):
    __slots__ = ("future", "new_future")

    def __init__(self, new_future: Callable[[], asyncio.Future[None]]) -> None:
        # every field set here, not through the base: one call less per wait
        self.conn: Conn | None = None
        self.error: BaseException | None = None
        self.reserved = -1
        self.timed_out = False
        self.deadline = math.inf
        self.started = 0.0
        self.opening: anyio.CancelScope | None = None
        self.arrival = 0
        #: the loop's create_future, or what it calls (see _shims.future_factory)
        self.new_future = new_future
        self.future: asyncio.Future[None] = new_future()

    def wake(self) -> None:
        if self.opening is not None:
            # Served (or failed) while opening: it needs that connection no more.
            self.opening.cancel()
        if not self.future.done():  # a cancelled wait cancels its future too
            self.future.set_result(None)

    def woken(self) -> bool:
        return self.future.done()

    def rearm(self) -> None:
        """Woken for another reason than a connection: wait on a fresh signal."""
        self.future = self.new_future()

    async def wait(self) -> None:
        future = self.future
        try:
            await future
        except asyncio.CancelledError:
            # Cancelling the task cancelled the future it awaited; a waiter that
            # goes on waiting (a breaker's back-off ended) needs a live one.
            if future.cancelled():
                self.future = self.new_future()
            raise


class TrioWaiter(_WaiterBase):
    __slots__ = ("event",)

    def __init__(self) -> None:
        super().__init__()
        self.event = anyio.Event()

    def wake(self) -> None:
        self._abort_opening()
        self.event.set()

    def woken(self) -> bool:
        return self.event.is_set()

    def rearm(self) -> None:
        self.event = anyio.Event()

    async def wait(self) -> None:
        await self.event.wait()


Waiter = AsyncioWaiter | TrioWaiter


class Deadlines:
    """asyncio only: the waiters on the pool's own timeout, and one timer for them all.

    They queue in arrival order, which is deadline order (they share one
    timeout), so one timer on the oldest serves them all: O(1) per waiter.
    The slow acquire adds to ``timed`` (and arms ``timer``) and removes from
    it inline: it does so on every wait that the pool's own timeout bounds.
    """

    __slots__ = ("loop", "timed", "timer")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timed: OrderedDict[AsyncioWaiter, None] = OrderedDict()
        self.timer: asyncio.TimerHandle | None = None

    def clear(self) -> None:
        self.timed.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def expire_due(self) -> None:
        self.timer = None
        loop = self.loop
        if loop is None:
            return
        now = loop.time()
        timed = self.timed
        while timed:
            waiter = next(iter(timed))
            if waiter.deadline > now:
                self.timer = loop.call_at(waiter.deadline, self.expire_due)
                return
            timed.popitem(last=False)
            waiter.expire()
