"""Private APIs of CPython and anyio, each behind a check and a public fallback.

The engine uses two private shortcuts because they are measurably cheaper on
the hot path. Either may move in a newer release: each is verified when a pool
starts, and a shortcut that does not answer like the public call is replaced by
the public call. A newer Python or anyio then loses a little speed, never
correctness nor a holder's name in a report.

``save_signal_handlers`` reads asyncio's table of loop-level signal handlers,
which no public call exposes; without it, it restores what ``signal.getsignal``
reports and warns about the one thing it then cannot put back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import signal
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import anyio
import anyio.lowlevel

__all__ = [
    "TaskRegistry", "cancel_pending_for", "checkpoint_if_cancelled_for", "future_factory",
    "is_asyncio_runner_sigint", "loop_clock", "public_cancel_pending", "running_loop",
    "save_signal_handlers", "task_registry_for",
]

logger = logging.getLogger("pool")

# Where the private names live, looked up when a pool starts (a test swaps
# these for stand-ins of a newer release, without breaking asyncio or anyio).
_asyncio_tasks: object = asyncio.tasks
_anyio_eventloop_module = "anyio._core._eventloop"
_anyio_asyncio_backend = "anyio._backends._asyncio"
_loop_signal_handlers = "_signal_handlers"  # asyncio's BaseSelectorEventLoop (Unix)


class TaskRegistry(Protocol):
    """What :func:`task_registry_for` gives: ``get(key)`` is a task, or None."""

    def get(self, key: Any, /) -> object: ...


class _Asking:
    """A registry stand-in that asks a function (the public calls): slower, always right."""

    __slots__ = ("_ask",)

    def __init__(self, ask: Callable[[], object]) -> None:
        self._ask = ask

    def get(self, key: Any, /) -> object:
        return self._ask()


def task_registry_for(library: str) -> tuple[TaskRegistry, object]:
    """``(registry, key)``: ``registry.get(key)`` is the task the pool's event loop runs now.

    Call it from inside a task of the pool's loop. The answer is about that
    loop, never the caller's: None when asked from another event loop in the
    same thread (the pool's having ended). On trio, None outside a trio run.
    The fast acquire asks on every call: asyncio's own registry, a dict keyed
    by loop, answers in one method call (~40 ns); asyncio.current_task() costs
    ~350 ns on CPython 3.11, a third of a whole fast acquire. CPython 3.14
    keeps the current task elsewhere: verified before it is trusted.
    """
    if library == "trio":
        import trio

        trio_task = trio.lowlevel.current_task

        def current_trio_task() -> object:
            try:
                return trio_task()
            except RuntimeError:  # not in a trio run (another library's loop)
                return None

        return _Asking(current_trio_task), None
    loop = asyncio.get_running_loop()
    registry = getattr(_asyncio_tasks, "_current_tasks", None)
    if isinstance(registry, dict):
        try:
            if registry.get(loop) is asyncio.current_task():
                return registry, loop
        except Exception:  # any surprise: the public call is always right
            pass
    logger.debug("asyncio.tasks._current_tasks is not usable here; using asyncio.current_task")
    return _Asking(functools.partial(asyncio.current_task, loop)), None


def checkpoint_if_cancelled_for(library: str) -> Callable[[], Awaitable[None]]:
    """anyio's checkpoint_if_cancelled, with its backend looked up once, not per call.

    The public function finds the backend through sniffio on every call: 60 % of
    its cost, paid on every acquire that waited.
    """
    try:
        import importlib

        get_async_backend = importlib.import_module(_anyio_eventloop_module).get_async_backend
        check = get_async_backend(library).checkpoint_if_cancelled
        if callable(check):
            return check  # type: ignore[no-any-return]
    except (ImportError, AttributeError, LookupError, TypeError):  # moved in some release
        pass
    logger.debug("anyio's backend lookup moved; using anyio.lowlevel.checkpoint_if_cancelled")
    return anyio.lowlevel.checkpoint_if_cancelled


def public_cancel_pending(task: object) -> bool:
    """Is a cancel scope around the current task cancelled? (anyio's public answer)"""
    return anyio.current_effective_deadline() == -math.inf


def cancel_pending_for(library: str) -> Callable[[object], bool]:
    """asyncio: ``pending(task)``, is a cancel scope around ``task`` (the current one) cancelled?

    A waiter handed a connection resumes without an exception even if its
    cancel scope was cancelled meanwhile (anyio delivers a cancellation only to
    a task whose awaited future is not done yet); it must then pass the
    connection on rather than carry it away. anyio's public ways to ask
    (``checkpoint_if_cancelled``, ``current_effective_deadline``) look the
    task's state up through a WeakKeyDictionary in a Python frame and walk the
    scopes through properties; awaiting ``checkpoint_if_cancelled`` cost about
    7,000 instructions per handoff (callgrind), this synchronous walk over the
    backend's own fields about 2,600. It is verified against the public call
    here, once per pool start; trio keeps ``checkpoint_if_cancelled``.
    """
    if library != "asyncio":
        return public_cancel_pending
    try:
        import importlib

        backend = importlib.import_module(_anyio_asyncio_backend)
        states = backend._task_states.data  # a WeakKeyDictionary's own dict
        probe = anyio.CancelScope()
        fields_there = all(
            hasattr(probe, name) for name in ("_cancel_called", "_shield", "_parent_scope")
        )
        if isinstance(states, dict) and fields_there:
            ref = weakref.ref

            def pending(task: object) -> bool:
                state = states.get(ref(task))
                if state is None:
                    return False  # not an anyio-managed task: no scope around it
                scope = state.cancel_scope
                while scope is not None:
                    if scope._cancel_called:
                        return True
                    if scope._shield:
                        return False
                    scope = scope._parent_scope
                return False

            task = asyncio.current_task()
            if task is not None and pending(task) == public_cancel_pending(task):
                return pending
    except Exception:  # any surprise: the public call is always right
        pass
    logger.debug("anyio's task states are not usable here; using current_effective_deadline")
    return public_cancel_pending


def loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """``loop.time``, or the C function it calls when that is all it does.

    asyncio's own loop reads ``time.monotonic()`` through a Python method;
    calling the function itself saves a frame on every wait. A loop that
    defines its own clock (uvloop) keeps it.
    """
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


def future_factory(loop: asyncio.AbstractEventLoop) -> Callable[[], asyncio.Future[None]]:
    """``loop.create_future``, or the class it instantiates when that is all it does.

    asyncio's own loop creates a future through a Python method: one frame
    per wait saved. A loop with its own futures (uvloop) keeps its method.
    """
    if type(loop).create_future is asyncio.BaseEventLoop.create_future:
        return functools.partial(asyncio.Future, loop=loop)
    return loop.create_future


def _public_running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # on trio: no asyncio loop runs
        return None


#: the running asyncio loop or None, without an exception when there is none.
#: asyncio exports _get_running_loop for event loops' own use (C, ~30 ns);
#: the public get_running_loop raises when there is none.
running_loop: Callable[[], asyncio.AbstractEventLoop | None] = getattr(
    asyncio, "_get_running_loop", _public_running_loop
)


def save_signal_handlers(signals: Iterable[int]) -> Callable[[], None]:
    """How each of ``signals`` is handled now; calling the result puts that back.

    anyio's ``open_signal_receiver`` on asyncio goes through
    ``loop.add_signal_handler``, and its ``remove_signal_handler`` leaves
    ``SIG_DFL`` behind (``default_int_handler`` for SIGINT), whatever was there
    before: the app's own handler is gone and its next SIGTERM kills the
    process. A handler installed with ``signal.signal`` comes back through
    ``signal.signal``. One installed with ``loop.add_signal_handler`` lives in
    the loop's private table of Handle objects (``signal.getsignal`` only shows
    the loop's wake-up no-op): the very ``Handle`` is put back there, after
    ``add_signal_handler`` has redone the public half (the wake-up fd, the
    no-op at the C level). Where that table is not there (uvloop hides it; a
    newer Python may move it), such a handler cannot be put back: it is left as
    anyio left it, with a WARNING, rather than restoring the bare no-op, which
    would silently ignore the signal. Call both in the loop's thread (the main
    thread, where signal handlers are set).
    """
    loop = running_loop()
    table: dict[int, object] | None = None
    if loop is not None:
        found = getattr(loop, _loop_signal_handlers, None)
        if isinstance(found, dict) and all(
            isinstance(h, asyncio.Handle) for h in found.values()
        ):
            table = found
        else:
            logger.debug(
                "the event loop's signal handler table is not readable here; "
                "restoring handlers through signal.signal only"
            )
    saved = [
        (sig, signal.getsignal(sig), None if table is None else table.get(sig))
        for sig in dict.fromkeys(signals)  # each once, in order
    ]

    def restore() -> None:
        for sig, previous, handle in saved:
            if isinstance(handle, asyncio.Handle) and loop is not None:
                if handle.cancelled() or loop.is_closed():
                    continue  # the app removed it meanwhile, or its loop is gone
                loop.add_signal_handler(sig, _placeholder)
                live = getattr(loop, _loop_signal_handlers, None)
                if isinstance(live, dict):
                    live[sig] = handle  # the app's own Handle: its callback, args, context
                continue
            if previous is None:
                continue  # installed from outside Python: nothing we can set back
            if loop is not None and _is_loop_dispatch(previous, loop):
                logger.warning(
                    "%s had a handler installed with loop.add_signal_handler, which this "
                    "event loop (%s) does not let pool.handle_signals() read back; it is "
                    "not restored: install it again after the block",
                    signal.Signals(sig).name,
                    type(loop).__name__,
                )
                continue
            signal.signal(sig, previous)

    return restore


def _placeholder() -> None:
    """Stands in for the app's Handle while ``add_signal_handler`` sets the signal up."""


def _is_loop_dispatch(handler: object, loop: asyncio.AbstractEventLoop) -> bool:
    """Is ``handler`` the loop's own C-level stand-in (asyncio's no-op, uvloop's method)?"""
    if getattr(handler, "__self__", None) is loop:  # uvloop: a bound method of the loop
        return True
    return (  # asyncio's: a module-level no-op, the same for every loop
        getattr(handler, "__module__", None) == "asyncio.unix_events"
        and getattr(handler, "__qualname__", None) == "_sighandler_noop"
    )


def is_asyncio_runner_sigint(handler: object) -> bool:
    """Is ``handler`` the SIGINT handler ``asyncio.run`` installs (``Runner._on_sigint``)?

    It stands for Python's own SIGINT behaviour, not the app's: it cancels the
    main task and raises KeyboardInterrupt once that task ends cancelled. Found
    by name only (no private attribute is read); anything else answers False.
    """
    func = getattr(handler, "func", None)  # a functools.partial binding main_task
    return getattr(func, "__qualname__", None) == "Runner._on_sigint" and getattr(
        func, "__module__", None
    ) == "asyncio.runners"
