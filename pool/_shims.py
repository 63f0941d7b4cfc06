"""Private APIs of CPython and anyio, each behind a check and a public fallback.

The engine uses two private shortcuts because they are measurably cheaper on
the hot path. Either may move in a newer release: each is verified when a pool
starts, and a shortcut that does not answer like the public call is replaced by
the public call. A newer Python or anyio then loses a little speed, never
correctness nor a holder's name in a report.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel

__all__ = ["checkpoint_if_cancelled_for", "current_task_for", "running_loop"]

logger = logging.getLogger("pool")

# Where the private names live, looked up when a pool starts (a test swaps
# these for stand-ins of a newer release, without breaking asyncio or anyio).
_asyncio_tasks: object = asyncio.tasks
_anyio_eventloop_module = "anyio._core._eventloop"


def current_task_for(library: str) -> Callable[[], object]:
    """A cheap "which task is this", for diagnosis. Call it from inside a task."""
    if library == "trio":
        import trio

        return trio.lowlevel.current_task
    # asyncio.current_task() costs ~350 ns on CPython 3.11, a third of a whole
    # fast acquire; the registry it reads is a dict keyed by loop (~50 ns).
    # CPython 3.14 keeps the current task elsewhere: verify before trusting it.
    loop = asyncio.get_running_loop()
    registry = getattr(_asyncio_tasks, "_current_tasks", None)
    if isinstance(registry, dict):
        fast: Callable[[], object] = functools.partial(registry.get, loop)
        try:
            if fast() is asyncio.current_task():
                return fast
        except Exception:  # any surprise: the public call is always right
            pass
    logger.debug("asyncio.tasks._current_tasks is not usable here; using asyncio.current_task")
    return asyncio.current_task


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
