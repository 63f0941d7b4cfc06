"""The pool's upkeep: idle expiry, lifetime rotation, leak reports, recovery.

It runs whenever the pool is open, lazily opened included, in a task the pool
owns: on asyncio a task the pool holds, cancels and awaits at ``disconnect()``;
on trio a system task. Neither the acquire nor the release path pays for it.
A process that ends without ``disconnect()`` ends it quietly: the event loop
cancels it like any other task (asyncio.run() cancels every task left; trio
cancels its system tasks when the main task returns), and being cancelled by
anyone but :meth:`Upkeep.stop` it closes the pool's connections on its way
out, so that nothing is left to complain and the next loop starts afresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from . import _diagnosis
from ._conn import BUSY, Conn
from ._state import BROKEN, OPEN

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["Upkeep"]

logger = logging.getLogger("pool")


class Upkeep:
    """One pool's background work, from the pool's start to its disconnect."""

    def __init__(self, engine: Engine[Any]) -> None:
        self._engine = engine
        self._scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self._task: object = None  # the asyncio task, held so it is never collected
        #: connections to recover, and the signal that there are some
        self._pending: deque[Conn] = deque()
        self._wakeup: anyio.Event | None = None

    def start(self, library: str) -> None:
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._wakeup = anyio.Event()
        if library == "trio":
            import trio

            trio.lowlevel.spawn_system_task(self._run, name="pool upkeep")
        else:
            loop = self._engine.loop
            assert loop is not None
            self._task = loop.create_task(self._run(), name="pool upkeep")

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

    def recover_later(self, rec: Conn) -> None:
        """A connection whose holder was cancelled mid-use: recover it in the background."""
        if self._wakeup is None:  # not running: nobody would recover it
            self._engine.driver.terminate(rec.raw)
            self._engine.ledger.tidied(rec, False, BROKEN)
            return
        self._pending.append(rec)
        self._wakeup.set()

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

    async def _run(self) -> None:
        scope, done = self._scope, self._done
        assert scope is not None and done is not None
        try:
            with scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._recover_all, tg)
                    tick = self._tick()
                    while True:
                        await anyio.sleep(tick)
                        try:
                            await self.once()
                        except Exception:  # upkeep must never take the pool down
                            logger.exception("pool upkeep failed; it will run again")
        finally:
            done.set()
            if not scope.cancel_called and self._scope is scope:
                # Not stopped by disconnect(): the event loop is ending
                # (asyncio.run() cancels what is left, trio.run() its system
                # tasks), or the upkeep died. No disconnect() will come: close
                # every connection now, while the loop still runs.
                self._engine.loop_ended("The event loop this pool ran on ended")

    async def _recover_all(self, tg: anyio.abc.TaskGroup) -> None:
        """Each connection handed over for recovery, in a task of its own."""
        while self._wakeup is not None:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            while self._pending:
                tg.start_soon(self._recover, self._pending.popleft())

    async def _recover(self, rec: Conn) -> None:
        try:
            await self._engine.tidy(rec, recover=True)
        except BaseException as exc:
            if not _spurious_cancel(exc):
                raise
            # A driver's own cancelled future (asyncpg's cancel-request task)
            # surfacing here: this connection failed to recover, nothing more.
            # Propagated, it would end the upkeep, and with it the pool.
            logger.debug("recovering a connection failed; closing it", exc_info=True)
        finally:
            if rec.state is BUSY:  # cancelled before tidy() could report
                self._engine.driver.terminate(rec.raw)
                self._engine.ledger.tidied(rec, False, BROKEN)

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


def _spurious_cancel(exc: BaseException) -> bool:
    """An asyncio CancelledError that no one asked this task for (its cancel count is 0)."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # on trio: no asyncio task
        return False
    return task is not None and task.cancelling() == 0
