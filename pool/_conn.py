"""The engine's record of one open connection, and the states it moves through.

Every connection is in exactly one state. Only the ledger (``_ledger.py``)
moves a record from one state to another, and it does so in synchronous code,
so no two tasks can ever see a connection in two states at once.
"""

from __future__ import annotations

import random
from types import CodeType
from typing import Any, Final

__all__ = ["BUSY", "CLOSED", "IDLE", "LENT", "Conn"]

#: in the idle deque, ready to be lent
IDLE: Final = "idle"
#: lent to exactly one holder (or handed to a waiter that has not run yet)
LENT: Final = "lent"
#: in the pool's own I/O (a check, a rollback, a graceful close) by exactly one task
BUSY: Final = "busy"
#: closed; never used again
CLOSED: Final = "closed"

# up to 5 % shorter lifetimes, so connections opened together do not all
# expire, and reconnect, at the same moment
_JITTER: Final = 0.05


class Conn:
    """One open connection. Users only ever see ``raw``, the driver's own object."""

    __slots__ = (
        "epoch", "expires_at", "fresh_until", "handed", "host", "idle_limit", "idle_since",
        "leak_reported_for", "lent_at", "raw", "retire_reason", "seat", "site_code",
        "site_offset", "state", "task",
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
        self.idle_limit = max_idle * jitter
        #: until when it may be lent with no check; set each time it goes idle
        self.fresh_until = now
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

    def __repr__(self) -> str:
        return f"<Conn {self.state} epoch={self.epoch} {self.raw!r}>"
