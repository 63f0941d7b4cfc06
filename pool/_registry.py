"""Process-wide bookkeeping: which pools are open, and the shared ones.

The classic failure this guards against: an app builds its pool in a module
that is re-executed (hot reload, per-request import), so every execution opens
another pool, and the database runs out of connections. ``shared()`` returns one
pool per target and settings for the whole process, and a second non-shared
pool to the same target logs a WARNING.

The shared registry lives on the ``sys`` module, Node's ``globalThis`` here, so
that it survives ``importlib.reload()`` of this package and of the caller.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from typing import Any, Protocol
from urllib.parse import urlsplit

from ._config import PoolConfig

__all__ = [
    "Registered", "built", "closed", "forget_after_fork", "mark_shared",
    "open_pools", "opened", "shared_registry", "target_of",
]

logger = logging.getLogger("pool")

_REGISTRY_ATTR = "_pool_shared_registry"


class Registered(Protocol):
    """What the registry needs of a pool (it never imports the pool module)."""

    @property
    def config(self) -> PoolConfig: ...

    def _forget_after_fork(self) -> None: ...

    async def disconnect(self, *, grace: float = ...) -> None: ...


def shared_registry() -> dict[tuple[Any, ...], Registered]:
    """The process's shared pools; created on first use, kept across reloads."""
    registry: dict[tuple[Any, ...], Registered] | None = getattr(sys, _REGISTRY_ATTR, None)
    if registry is None:
        registry = {}
        setattr(sys, _REGISTRY_ATTR, registry)
    return registry


def target_of(scheme: str, driver_url: str) -> str:
    """What the database sees as one client target: no password, no parameters."""
    parts = urlsplit(driver_url)
    if scheme == "sqlite":
        return f"sqlite://{parts.path}"
    base = scheme.partition("+")[0]  # one database, whichever driver: postgresql+psycopg
    family = {"postgres": "postgresql", "mariadb": "mysql"}.get(base, base)
    # The authority may be libpq's host list (h1:5432,h2:5433), which urlsplit's
    # .port refuses: take it verbatim, less any user info.
    hosts = parts.netloc.rpartition("@")[2]
    return f"{family}://{parts.username or ''}@{hosts}{parts.path}"


# target -> pools that are open now; weak, so a dropped pool stops counting
_open: dict[str, weakref.WeakSet[Registered]] = {}
# every pool ever built in this process, to reset them in a forked child
_all: weakref.WeakSet[Registered] = weakref.WeakSet()


# the pools that shared() built: a second one to their target is no multiplication
_shared: weakref.WeakSet[Registered] = weakref.WeakSet()

# Pools are built and opened in any thread (one event loop per thread), while
# another walks them (open_pools() for a signal handler): every change and walk
# holds this lock, so that no walk meets a set or dict growing under it. Taken
# when a pool is built, opened or closed: never on a hot path.
_lock = threading.Lock()


def built(pool: Registered) -> None:
    with _lock:
        _all.add(pool)


def mark_shared(pool: Registered) -> None:
    with _lock:
        _shared.add(pool)


def opened(pool: Registered, target: str) -> None:
    """Count ``pool`` as open; warn when it multiplies the pools on its target."""
    with _lock:
        pools = _open.setdefault(target, weakref.WeakSet())
        pools.add(pool)
        multiplied = len(pools) > 1 and pool not in _shared
        ceiling = sum(p.config.connection_limit for p in pools) if multiplied else 0
        count = len(pools)
    if multiplied:
        logger.warning(
            "%d pools are now open to %s, with a combined ceiling of %d connections. "
            "Each Pool() holds its own connections: build it once with pool.shared(url) "
            "and reuse it.",
            count,
            pool.config.url.split("?", 1)[0],
            ceiling,
        )


def open_pools() -> list[Registered]:
    with _lock:
        return [pool for pools in _open.values() for pool in pools]


def closed(pool: Registered, target: str) -> None:
    with _lock:
        pools = _open.get(target)
        if pools is not None:
            pools.discard(pool)


def forget_after_fork() -> None:
    """In a forked child: every inherited pool forgets its parent's connections.

    Closing them would close the parent's sessions (they share the sockets), so
    they are dropped without a word to the server. Shared pools start afresh.
    """
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork: it never returns
    for pool in list(_all):
        pool._forget_after_fork()
    _open.clear()
    shared_registry().clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget_after_fork)
