"""The pool's I/O: its life cycle (start, disconnect, event-loop moves) and the release side.

Nothing here decides who gets which connection: every decision is a
synchronous call into the :class:`~pool._ledger.Ledger`, and every I/O step
reports its outcome back to it, which re-checks the state it finds then. An
I/O step the pool starts on its own behalf runs in a cancel scope the ledger
knows, so that ``disconnect()`` can cut it short. The acquire side is in
``_acquiring.py``, the background upkeep in ``_upkeep.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.lowlevel

from . import _shims
from ._acquiring import CLEANUP_TIMEOUT, Acquiring, Hook, Hooks
from ._config import PoolConfig
from ._conn import BUSY, Conn
from ._driver import Driver, check_runs_on
from ._errors import PoolClosedError, PoolError
from ._hostlimit import HostLimit
from ._ledger import (
    BROKEN,
    CLOSE,
    CLOSED_STATE,
    CLOSING,
    OPEN,
    RECOVER,
    RELEASED,
    RESET_FAILED,
)
from ._upkeep import Upkeep

__all__ = ["CLEANUP_TIMEOUT", "Engine", "Hook", "Hooks"]

logger = logging.getLogger("pool")

C = TypeVar("C")


class Engine(Acquiring[C]):
    """Runs the I/O for one pool; its :class:`Ledger` keeps the books.

    The state and the acquire side are in :class:`~pool._acquiring.Acquiring`;
    here, the life cycle and the release side.
    """

    def __init__(
        self, driver: Driver[C], config: PoolConfig, secrets: tuple[str, ...], hooks: Hooks
    ) -> None:
        super().__init__(driver, config, secrets, hooks)
        self.upkeep = Upkeep(self)
        #: the disconnect in progress: its task (asyncio), or an event set when it ends (trio)
        self.disconnecting: asyncio.Task[None] | anyio.Event | None = None
        #: the id of the task that runs it (its on_before_exit callbacks may disconnect too)
        self.disconnect_runner: int | None = None

    def use_host_budget(self, target: str, limit: int) -> None:
        """Share ``limit`` open connections to ``target`` with every pool on this machine."""
        self.host = HostLimit(self, target, limit)
        self.ledger.free_seat = self.host.closed

    # ------------------------------------------------------------ life cycle

    def start(self, library: str) -> None:
        """Closed to open, on first use (the lazy connect); starts the upkeep."""
        ledger = self.ledger
        if ledger.state is CLOSING:
            raise PoolClosedError("the pool is disconnecting")
        check_runs_on(self.driver, library)
        ledger.tasks, ledger.tasks_key = _shims.task_registry_for(library)
        ledger.current_task = functools.partial(ledger.tasks.get, ledger.tasks_key)
        self.checkpoint_if_cancelled = _shims.checkpoint_if_cancelled_for(library)
        self.cancel_pending = _shims.cancel_pending_for(library)
        self.loop = asyncio.get_running_loop() if library == "asyncio" else None
        if self.loop is not None:
            self.loop_time = _shims.loop_clock(self.loop)
            self.new_future = _shims.future_factory(self.loop)
        else:
            self.loop_time = anyio.current_time
        ledger.deadlines.loop = self.loop
        ledger.state = OPEN
        ledger.lend_thread = threading.get_ident()  # (the fast acquire's test of both)
        self.server_checked = False
        if self.host is not None:
            self.host.join()
        self.upkeep.start(library)
        logger.info(
            "Starting a %s pool with %d connections.", self.driver.scheme, ledger.limit
        )
        self.on_open()

    async def run_disconnect(self, body: Callable[[], Awaitable[None]]) -> None:
        """Run ``body`` (the whole disconnect) once, as the pool's own work; wait for it.

        Every call while one runs waits for that one (a signal handler and the
        app's shutdown: the ``on_before_exit`` callbacks run once). On asyncio
        the body runs in a task the engine holds, so that a caller cancelled
        the asyncio way (``wait_for``, ``asyncio.timeout``, ``task.cancel()``,
        which no anyio shield stops) only stops waiting: the disconnect still
        ends, and the next ``connect()``, ``disconnect()`` or use waits for it.
        On trio a shield stops every cancellation: the first caller runs it.
        """
        # One in progress (not ours: an on_before_exit callback's own call
        # returns at once) ends first; then there is nothing left to do.
        await self.wait_disconnected(shield=True)
        if self.disconnecting is not None or self.ledger.state is not OPEN:
            return  # disconnected (or never opened); or a callback of ours asks
        loop = _shims.running_loop()
        if loop is None:  # trio
            done = self.disconnecting = anyio.Event()
            self.disconnect_runner = anyio.get_current_task().id
            try:
                with anyio.CancelScope(shield=True):
                    await body()
            finally:
                if self.disconnecting is done:
                    self.disconnecting = self.disconnect_runner = None
                done.set()
            return
        self.disconnecting = loop.create_task(self._owned(body), name="pool disconnect")
        await self.wait_disconnected(shield=True)

    async def _owned(self, body: Callable[[], Awaitable[None]]) -> None:
        self.disconnect_runner = anyio.get_current_task().id
        try:
            await body()
        except Exception:
            # nobody may be awaiting this task any more (its caller was cancelled)
            logger.exception("disconnecting the pool failed")
        finally:
            if self.disconnecting is asyncio.current_task():
                self.disconnecting = None
                self.disconnect_runner = None

    def _runs_the_disconnect(self) -> bool:
        return self.disconnect_runner == anyio.get_current_task().id

    async def wait_disconnected(self, *, shield: bool = False) -> None:
        """Return once the disconnect in progress, if any, has closed everything.

        ``shield``: an anyio cancellation does not stop the wait either (an
        asyncio-native one does, but never the disconnect itself).
        """
        pending = self.disconnecting
        if pending is None or self._runs_the_disconnect():
            return
        with anyio.CancelScope(shield=shield):
            if isinstance(pending, asyncio.Task):
                loop = pending.get_loop()
                if loop is not _shims.running_loop():
                    if loop.is_closed() or not loop.is_running():
                        # Its event loop ended before it did: finish its books here.
                        self.disconnecting = self.disconnect_runner = None
                        self.loop_ended("A disconnect was left unfinished by its event loop")
                    return
                await asyncio.shield(pending)
            else:
                await pending.wait()

    async def disconnect(self, grace: float) -> None:
        """Close every connection the pool ever opened, whoever holds it.

        The pool's own I/O in flight (checks, rollbacks, openings) is cut short,
        and the connections it was on are terminated at the end without waiting
        for it: their tasks find them closed when they report. A connection
        still being opened is not open yet; its opener closes it when the
        connect returns, finding the epoch changed. Run through
        :meth:`run_disconnect`, never alone: nothing may stop it half way.
        """
        ledger = self.ledger
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
            if self.host is not None:
                self.host.leave()  # every slot back once its session is gone
            self.upkeep.forget()

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's disconnect in progress, and its upkeep, are not ours."""
        self.disconnecting = None
        self.disconnect_runner = None
        self.upkeep.forget()

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
        """Used from a new event loop (a CLI's asyncio.run per command, a test's loop).

        Only once the old loop has stopped (ended, closed, or not running):
        while it runs, in another thread, its tasks use, wait for and open
        this pool's connections, which belong to it (asyncio's transports are
        bound to their loop), and nothing of it is touched from here.
        """
        old = self.loop
        assert old is not None
        if old.is_running() and not old.is_closed():
            raise PoolError(
                "this pool is in use by an event loop that is still running in another "
                "thread (its connections are still lent on another running event loop, or "
                "idle there); a pool serves one event loop at a time. Create one Pool per "
                "event loop (one per thread), or run this code on that loop "
                "(asyncio.run_coroutine_threadsafe)."
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
        if self.host is not None:
            self.host.leave()
        self.upkeep.forget()
        self.on_close()
        logger.info(
            "%s: dropped its connections; the pool reopens on the next event loop that uses it.",
            why,
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
        # The driver's word on a misuse its holder left behind (SQLite: a call
        # never awaited), asked before any await, so before anyone else holds
        # the connection; raised once the release is done.
        misuse = None if self.release_error is None else self.release_error(raw)
        if action == RELEASED or rec is None:
            pass
        elif action == RECOVER:
            # Never in the cancelled caller: the upkeep recovers it.
            self.upkeep.recover_later(rec)
        elif action == CLOSE:
            with anyio.CancelScope(shield=True):
                await self.close(rec)
        else:
            await self.tidy(rec, recover=False)  # shielded within
        if misuse is not None and exc is None:
            raise misuse

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
        if id(raw) not in self.ledger.lent:
            # Not lent by the pool as it is now (an old holder's connection that
            # disconnect() closed, the pool since reopened): its error says
            # nothing about the connections open today.
            return
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
        handed = False
        # One scope does three jobs (each scope costs microseconds on this
        # path): shielded from the caller's cancellation, bounded, and known to
        # the ledger, so that disconnect() can cut it short.
        scope = anyio.CancelScope(shield=True, deadline=self.now() + CLEANUP_TIMEOUT)
        ledger.scopes.add(scope)
        try:
            with scope:
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
        except BaseException:
            # Out through the shield: the caller was cancelled the asyncio way
            # (task.cancel(), wait_for, asyncio.timeout), mid-round-trip. The
            # upkeep finishes the clean-up (the driver's own recovery first),
            # unless this is the upkeep's own work, ending with its loop.
            handed = not recover and self.hand_over(rec)
            raise
        finally:
            ledger.scopes.discard(scope)
            if not handed:
                ledger.tidied(rec, ok, BROKEN if recover else RESET_FAILED)

    def hand_over(self, rec: Conn) -> bool:
        """Its caller was cancelled mid-I/O on ``rec`` (BUSY): the upkeep brings it back.

        With the driver's own recovery (a statement cut off mid-protocol is
        answered, its transaction rolled back): the connection is reused, not
        reconnected. Without one, False: the caller closes it.
        """
        if self.recover is None or rec.state is not BUSY or self.ledger.state is not OPEN:
            return False
        self.upkeep.recover_later(rec)
        return True

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
