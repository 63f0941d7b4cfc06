"""The engine's record of one open connection, and the states it moves through.

Every connection is in exactly one state. Only the ledger (``_ledger.py``)
moves a record from one state to another, and it does so in synchronous code,
so no two tasks can ever see a connection in two states at once.
"""

from __future__ import annotations

import random
import sys
from types import CodeType
from typing import Any, Final

__all__ = ["ANY_LEASE", "BUSY", "CLOSED", "HANDED", "IDLE", "LENT", "Conn"]

#: in the idle deque, ready to be lent
IDLE: Final = "idle"
#: lent to exactly one holder (or handed to a waiter that has not run yet)
LENT: Final = "lent"
#: in the pool's own I/O (a check, a rollback, a graceful close) by exactly one task
BUSY: Final = "busy"
#: closed; never used again
CLOSED: Final = "closed"

#: the lease of a connection handed to a waiter that has not run yet: newer than
#: any a holder can have, so no holder's release matches it
HANDED: Final = sys.maxsize
#: a release that carries no lease (the pool's own helpers, which hold it by
#: construction): no connection's lease is newer than it
ANY_LEASE: Final = sys.maxsize

# up to 5 % shorter lifetimes, so connections opened together do not all
# expire, and reconnect, at the same moment
_JITTER: Final = 0.05


class Conn:
    """One open connection. Users only ever see ``raw``, the driver's own object."""

    __slots__ = (
        "epoch", "expires_at", "fresh_for", "fresh_until", "handed", "host", "idle_limit",
        "idle_since", "lane", "leak_reported_for", "lease", "lent_at", "lifetime_ends", "previous",
        "raw", "retire_reason", "seat", "site_code", "site_offset", "state", "task",
    )

    def __init__(
        self, raw: Any, now: float, epoch: int, lifetime: float, max_idle: float, host: str = ""
    ) -> None:
        self.raw = raw
        #: the server it is on (``host:port``), where the driver tells; for failover
        self.host = host
        #: why it is to be closed when next free ("drain", "resize", "failover"), if marked
        self.retire_reason = ""
        self.state: str = IDLE
        #: handed to a waiter that has not run yet (LENT, but in no one's hands)
        self.handed = False
        #: the pool generation it belongs to: disconnect() starts a new one
        self.epoch = epoch
        self.idle_since = now
        self.lent_at = now
        jitter = 1.0 - random.random() * _JITTER
        self.expires_at = now + lifetime * jitter
        #: its own expiry, kept while a mark (expires_at = -inf) overrides it
        self.lifetime_ends = self.expires_at
        self.idle_limit = max_idle * jitter
        #: until when it may be lent with no check; set each time it goes idle
        self.fresh_until = now
        #: how long after going idle it stays fresh: health_check_after, capped by
        #: its idle limit (an idle-expired connection is never lent unchecked);
        #: set by the ledger when it first takes the connection in
        self.fresh_for = 0.0
        #: the number of its current lending (the ledger's ``acquired`` then): a
        #: release through an older lease (a stale handle) is refused. HANDED
        #: while handed to a waiter that has not run yet.
        self.lease = 0
        #: who held it during the lending before this one: a second release by
        #: that task, once someone else holds it, is refused
        self.previous: object = None
        # the lent_at of the lending already reported as a leak: reporting keys
        # on it, so that a release needs no reset (one store less per release)
        self.leak_reported_for = -1.0
        #: who holds it, for diagnosis; set when lent
        self.task: object = None
        # where it was acquired: the caller's code and instruction offset
        # (reading f_lineno costs ~300 ns; the line is worked out for reports only)
        self.site_code: CodeType | None = None
        self.site_offset = 0
        #: the host budget's slot it holds (host_connection_limit), freed once it is closed
        self.seat: Any = None
        #: the lane it is lent to, in a pool with lanes (a _queue.LaneState), else None
        self.lane: Any = None

    def __repr__(self) -> str:
        return f"<Conn {self.state} epoch={self.epoch} {self.raw!r}>"
