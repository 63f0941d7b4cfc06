"""The pool's upkeep: idle expiry, lifetime rotation, leak reports, recovery.

It runs whenever the pool is open, lazily opened included, in a task the pool
owns: on asyncio a task the pool holds, cancels and awaits at ``disconnect()``;
on trio a system task. Neither the acquire nor the release path pays for it.
A process that ends without ``disconnect()`` ends it quietly: the event loop
cancels it like any other task (asyncio.run() cancels every task left; trio
cancels its system tasks when the main task returns), and being cancelled by
anyone but :meth:`Upkeep.stop` it closes the pool's connections on its way
out, so that nothing is left to complain and the next loop starts afresh.

It is also where clean-up goes that a caller could not finish: a caller
cancelled the asyncio way (``task.cancel()``, ``wait_for``, ``asyncio.timeout``:
no anyio shield stops those) hands the rest of its work over with
:meth:`Upkeep.finish_later`, and the upkeep finishes it.

Its task holds the pool only through a weak reference: a pool dropped
without ``disconnect()`` on an event loop that was closed without cancelling
its tasks (pytest-asyncio's older per-test loops) must not be kept alive by
that task, which anyio's task-state table keeps alive in turn. The pool is
then collected, and its connections with it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from . import _diagnosis, _hostlimit
from ._conn import BUSY, Conn
from ._state import BROKEN, OPEN

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["Upkeep"]

logger = logging.getLogger("pool")

#: work handed over to the upkeep, and what to do instead if it never runs
#: (the upkeep stopped first): the fallback must leave the ledger whole
Job = tuple[Callable[[], Awaitable[None]], Callable[[], None]]


class Upkeep:
    """One pool's background work, from the pool's start to its disconnect."""

    def __init__(self, engine: Engine[Any]) -> None:
        self._engine = engine
        self._scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self._task: object = None  # the asyncio task, held so it is never collected
        #: work to finish for someone else, and the signal that there is some
        self._pending: deque[Job] = deque()
        self._wakeup: anyio.Event | None = None

    def start(self, library: str) -> None:
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._wakeup = anyio.Event()
        if library == "trio":
            import trio

            trio.lowlevel.spawn_system_task(_run, weakref.ref(self), name="pool upkeep")
        else:
            loop = self._engine.loop
            assert loop is not None
            self._task = loop.create_task(_run(weakref.ref(self)), name="pool upkeep")

    def stop(self) -> None:
        """Ask it to stop (synchronous); :meth:`stopped` waits for that."""
        if self._scope is not None:
            self._scope.cancel()

    async def stopped(self) -> None:
        if self._done is not None:
            await self._done.wait()

    def forget(self) -> None:
        """Drop every reference to the stopped task (or, after a fork, to the parent's)."""
        self._scope = self._done = None
        self._task = None
        self._wakeup = None
        self._pending.clear()  # still BUSY in the ledger, which closes them

    def finish_later(
        self, work: Callable[[], Awaitable[None]], fallback: Callable[[], None]
    ) -> None:
        """Finish ``work`` for a caller that cannot (it was cancelled), in a task of the upkeep.

        ``fallback`` runs at once instead when the upkeep is not running, and
        after ``work`` whatever became of it: it must be a synchronous step that
        does nothing once ``work`` has reported (see :meth:`abandoned`).
        """
        if self._wakeup is None:  # not running: nobody would finish it
            fallback()
            return
        self._pending.append((work, fallback))
        self._wakeup.set()

    def recover_later(self, rec: Conn) -> None:
        """A connection whose holder was cancelled mid-use: recover it in the background."""
        engine = self._engine
        self.finish_later(lambda: engine.tidy(rec, recover=True), lambda: self.abandoned(rec))

    def abandoned(self, rec: Conn) -> None:
        """Work on ``rec`` ended without reporting (cancelled before it could): close it."""
        if rec.state is BUSY:
            self._engine.driver.terminate(rec.raw)
            self._engine.ledger.tidied(rec, False, BROKEN)

    def _tick(self) -> float:
        cfg = self._engine.config
        limits = [
            x
            for x in (
                cfg.max_idle_connection_lifetime,
                cfg.max_connection_lifetime,
                cfg.leak_detection_threshold,
            )
            if x
        ]
        return min(1.0, max(0.05, min(limits, default=4.0) / 4))

    async def once(self) -> None:
        """One round: close expired idle connections, report leaks."""
        engine = self._engine
        ledger = engine.ledger
        expired = ledger.take_expired()
        if expired:
            logger.debug("closing %d expired idle connection(s)", len(expired))
            await engine.close_all(expired)
        threshold = engine.config.leak_detection_threshold
        if threshold is not None and ledger.state is OPEN:
            _diagnosis.report_leaks(ledger.lent.values(), threshold)


async def _run(ref: weakref.ref[Upkeep]) -> None:
    """The upkeep's task. It holds the upkeep (and so the pool) only between awaits."""
    upkeep = ref()
    assert upkeep is not None
    scope, done = upkeep._scope, upkeep._done
    assert scope is not None and done is not None
    tick = upkeep._tick()
    host = upkeep._engine.host  # host_connection_limit's part, held as weakly
    host_ref = weakref.ref(host) if host is not None else None
    del upkeep, host  # from here on, only ``ref``: see the module docstring
    try:
        with scope:
            async with anyio.create_task_group() as tg:
                # No child task in the first step: a task group's child created
                # as the event loop ends (a program that returns right after
                # its first use of the pool, a refused connect()) is cancelled
                # before it ever runs, and anyio leaves its coroutine "never
                # awaited". One checkpoint first: an ending loop cancels us there.
                await anyio.lowlevel.checkpoint()
                tg.start_soon(_finish_all, ref, tg)
                if host_ref is not None:
                    tg.start_soon(_hostlimit.run, host_ref, tg)
                while True:
                    await anyio.sleep(tick)
                    upkeep = ref()
                    if upkeep is None:  # the pool was collected
                        return
                    try:
                        await upkeep.once()
                    except Exception:  # upkeep must never take the pool down
                        logger.exception("pool upkeep failed; it will run again")
                    del upkeep
    finally:
        done.set()
        upkeep = ref()
        if upkeep is not None and not scope.cancel_called and upkeep._scope is scope:
            # Not stopped by disconnect(): the event loop is ending
            # (asyncio.run() cancels what is left, trio.run() its system
            # tasks), or the upkeep died. No disconnect() will come: close
            # every connection now, while the loop still runs.
            upkeep._engine.loop_ended("The event loop this pool ran on ended")


async def _finish_all(ref: weakref.ref[Upkeep], tg: anyio.abc.TaskGroup) -> None:
    """Each piece of work handed over, in a task of its own."""
    while True:
        upkeep = ref()
        wakeup = upkeep._wakeup if upkeep is not None else None
        if wakeup is None:
            return
        del upkeep  # not held while it sleeps
        await wakeup.wait()
        upkeep = ref()
        if upkeep is None or upkeep._wakeup is not wakeup:
            return  # collected, or forgotten (stopped, or the parent's after a fork)
        upkeep._wakeup = anyio.Event()
        while upkeep._pending:
            tg.start_soon(_finish, *upkeep._pending.popleft())
        del upkeep


async def _finish(work: Callable[[], Awaitable[None]], fallback: Callable[[], None]) -> None:
    try:
        await work()
    except BaseException as exc:
        if not _spurious_cancel(exc):
            raise
        # A driver's own cancelled future (asyncpg's cancel-request task)
        # surfacing here: this work failed, nothing more. Propagated, it
        # would end the upkeep, and with it the pool.
        logger.debug("work handed to the upkeep failed", exc_info=True)
    finally:
        fallback()  # a no-op once the work has reported; else it leaves the ledger whole


def _spurious_cancel(exc: BaseException) -> bool:
    """An asyncio CancelledError that no one asked this task for (its cancel count is 0)."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # on trio: no asyncio task
        return False
    return task is not None and task.cancelling() == 0
