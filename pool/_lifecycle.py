"""One pool per process, the signal hook, and the published sizing rule."""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from . import _config, _registry
from ._errors import ConfigError
from ._pool import Pool
from ._shims import is_asyncio_runner_sigint, save_signal_handlers

__all__ = ["handle_signals", "recommended_connection_limit", "shared"]

logger = logging.getLogger("pool")


def shared(url: str, /, **overrides: object) -> Pool[Any]:
    """The process's one pool for this target and these settings, built on first call.

    The same URL and settings return the same :class:`Pool` in every
    environment (there is no development-only switch), across
    ``importlib.reload()`` of this package and of the caller. A forked child
    gets a fresh pool and never touches its parent's connections.
    """
    # The hooks are code, not settings: they take part in the key by identity.
    hooks = {name: overrides.pop(name) for name in _HOOKS if name in overrides}
    parsed = _config.parse(url, overrides)  # validates, and normalises URL vs keywords
    # connect_args take part by value where they are plain data (a dict of
    # server_settings built afresh on each call still finds the same pool), by
    # identity otherwise (the same SSLContext shares a pool, another does not).
    extra = _freeze(parsed.connect_args)
    key = (
        parsed.driver_url,
        *dataclasses.astuple(parsed.config),
        extra,
        tuple(
            sorted(
                (name, hook if isinstance(hook, str) else id(hook)) for name, hook in hooks.items()
            )
        ),
    )
    registry = _registry.shared_registry()
    db = registry.get(key)
    if db is None:
        db = Pool(url, **hooks, **overrides)  # type: ignore[arg-type]  # validated above
        _registry.mark_shared(db)
        registry[key] = db
    assert isinstance(db, Pool)
    return db


_HOOKS = ("configure", "check", "reset", "password")


def _freeze(value: object) -> object:
    """A hashable stand-in for ``value``: plain data by value, anything else by identity."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (str, int, float, bool, bytes, type(None))):
        return value
    return ("id", id(value))


def recommended_connection_limit(
    *, instances: int = 1, serverless: bool = False, server_max_connections: int | None = None
) -> int:
    """Prisma's published rule for ``connection_limit``.

    The default pool size (physical cores x 2 + 1) divided by the number of
    application instances; 1 for serverless functions; and never more than the
    server allows once every instance has its share.
    """
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ConfigError("instances", instances, "must be a whole number >= 1")
    if not isinstance(serverless, bool):
        raise ConfigError("serverless", serverless, "must be True or False")
    if server_max_connections is not None and (
        isinstance(server_max_connections, bool)
        or not isinstance(server_max_connections, int)
        or server_max_connections < 1
    ):
        raise ConfigError(
            "server_max_connections", server_max_connections, "must be a whole number >= 1"
        )
    if serverless:
        return 1
    limit = _config.default_connection_limit() // instances
    if server_max_connections is not None:
        limit = min(limit, server_max_connections // instances)
    return max(1, limit)


async def _disconnect_everything(grace: float) -> None:
    pools = _registry.open_pools()
    logger.info("Signal received: disconnecting %d pool(s).", len(pools))
    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            for db in pools:
                tg.start_soon(functools.partial(db.disconnect, grace=grace))


@asynccontextmanager
async def handle_signals(
    *, grace: float = 5.0, signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
) -> AsyncIterator[None]:
    """Opt in: on SIGINT or SIGTERM, shut every open pool down cleanly, then end as usual.

    Wrap your program's main body::

        async with pool.handle_signals():
            await serve()

    When a signal comes, each open pool runs its ``on_before_exit`` callbacks
    and disconnects (held connections get ``grace`` seconds); then the signal is
    delivered again with its usual handler, so the process ends exactly as it
    would have (``KeyboardInterrupt`` for SIGINT, termination for SIGTERM), or
    the app's own handler runs if it had one. The handlers in place when the
    block was entered are back when it ends, whether they were installed with
    ``signal.signal`` or ``loop.add_signal_handler`` (on uvloop, which does not
    let the latter be read back, a WARNING names the signal instead). The
    signals are watched from the moment the block is entered. Must be entered
    in the main thread.
    """
    _config.check_seconds("grace", grace)
    wanted = tuple(signals)

    async def watch(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # anyio's receiver on asyncio removes its loop handlers by leaving
        # SIG_DFL behind, not what was there: the app's own handler would be
        # gone, and its next SIGTERM would kill the process.
        restore = save_signal_handlers(wanted)
        entered = False  # outside the main thread the receiver fails, having changed nothing
        try:
            with anyio.open_signal_receiver(*wanted) as received:
                entered = True
                task_status.started()
                signum = await anext(aiter(received))
                await _disconnect_everything(grace)
        finally:
            if entered:
                restore()  # synchronous: it runs under a cancellation too
        if signum == signal.SIGINT and is_asyncio_runner_sigint(signal.getsignal(signum)):
            # asyncio.run's handler would only cancel the main task, and the
            # block, whose pool calls have just failed with PoolClosedError,
            # would end with that error instead of the KeyboardInterrupt that
            # handler stands for: raise it here, as Python's own handler does.
            raise KeyboardInterrupt
        # Our receiver is gone and the usual handler is back: deliver it again.
        signal.raise_signal(signum)

    async with anyio.create_task_group() as tg:
        # start(), not start_soon(): a signal right after the block is entered
        # already finds the receiver.
        await tg.start(watch)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
