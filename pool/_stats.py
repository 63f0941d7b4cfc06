"""A frozen snapshot of a pool's state and running totals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["LaneStats", "PoolStats"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LaneStats:
    """One lane in ``PoolStats.lanes``: its share of the pool now, and its total."""

    #: callers waiting in the lane
    waiting: int
    #: connections lent to the lane now (to a holder, or handed to a waiter about to run)
    in_use: int
    #: connections lent to the lane, in all
    acquired: int
    #: its weight: its share of the grants while several lanes wait
    weight: int
    #: the most connections it may hold at once (None: only the pool's limit)
    limit: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStats:
    """What ``Pool.stats()`` returns. Reading it costs a handful of attribute reads.

    The first five fields describe the pool now; the rest are running totals
    since the pool was built. A cancelled acquire changes none of them.
    """

    #: every connection the pool answers for: ``idle + in_use + opening + busy``;
    #: never above ``limit``
    size: int
    #: open connections waiting in the pool to be lent
    idle: int
    #: connections lent out (to a holder, or handed to a waiter about to run)
    in_use: int
    #: connections being opened right now
    opening: int
    #: connections in the pool's own I/O: a health check, a rollback, a graceful close
    busy: int
    #: callers waiting for a connection
    waiting: int
    #: ``connection_limit``
    limit: int
    #: connections lent, in all
    acquired: int
    #: acquisitions that found no idle connection and waited (for a release or an opening)
    waited: int
    #: acquisitions that ended in ``PoolTimeoutError``
    timeouts: int
    #: total seconds spent waiting by the acquisitions counted in ``waited``
    wait_seconds: float
    #: connections opened, in all
    opened: int
    #: connections closed, in all (expired, broken, or at disconnect)
    closed: int
    #: ``closed`` by why: ``idle_expiry``, ``lifetime``, ``broken``, ``check_failed``,
    #: ``reset_failed``, ``drain``, ``resize``, ``failover``, ``disconnect`` (every key
    #: present, 0 when none)
    closed_by: Mapping[str, int]
    #: connect attempts that failed, in all
    connect_failures: int
    #: how long the oldest caller still waiting has waited, in seconds (0 when none)
    longest_wait: float
    #: ``host_connection_limit``, the machine-wide budget (None when off)
    host_limit: int | None = None
    #: that budget's slots held now, by every process on this machine (None when off)
    host_in_use: int | None = None
    #: per lane (``"default"`` alone in a pool without lanes): waiting, in use, acquired
    lanes: Mapping[str, LaneStats] = field(default_factory=dict)


PoolStats.__module__ = "pool"
LaneStats.__module__ = "pool"
