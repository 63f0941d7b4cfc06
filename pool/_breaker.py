"""The circuit breaker: while connects keep failing, fail fast and probe one at a time."""

from __future__ import annotations

import math
import time
from typing import Final

from ._errors import ConnectError

__all__ = ["Breaker", "server_is_gone"]

# the back-off after consecutive connect failures: short, so that the pool is
# back within a second of the server
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 0.5


class Breaker:
    """Consecutive connect failures, and until when to fail fast.

    The back-off doubles per *round*: a connect that began before the last
    failure was recorded was in flight alongside it (the pool grows several
    connections at once), and its failure is news of the same outage, not a
    further probe. Counting each of them would take the back-off to its
    maximum in one stroke when a server goes away under load.
    """

    __slots__ = ("failures", "last_error", "rounds", "since", "until")

    def __init__(self) -> None:
        self.failures = 0
        self.rounds = 0
        self.until = 0.0
        #: when the back-off was last set (monotonic)
        self.since = -math.inf
        self.last_error: ConnectError | None = None

    def failed(self, error: ConnectError, began: float = math.inf) -> None:
        """A connect that began at ``began`` (monotonic) failed with ``error``."""
        self.failures += 1
        self.last_error = error
        if began < self.since:
            return  # in flight when the last failure was counted: the same round
        self.rounds += 1
        backoff = min(_BACKOFF_FIRST * 2 ** (self.rounds - 1), _BACKOFF_MAX)
        self.since = time.monotonic()
        self.until = self.since + backoff

    def succeeded(self) -> int:
        """Close the breaker; returns how many failures it had seen."""
        failures, self.failures = self.failures, 0
        self.rounds = 0
        self.since = -math.inf
        return failures

    def backing_off(self) -> bool:
        """Open, and its back-off has not ended: no probe may start yet."""
        return self.failures > 0 and time.monotonic() < self.until

    def remaining(self) -> float:
        return max(0.0, self.until - time.monotonic()) if self.failures else 0.0

    def fail_fast_error(self) -> ConnectError:
        last = self.last_error
        error = ConnectError(
            f"{last} (failing fast: {self.failures} connect attempt(s) in a row failed; "
            f"the next one is tried in {self.remaining():.2f}s)",
            code=last.code if last is not None else None,
        )
        error.__cause__ = last.__cause__ if last is not None else None
        return error

    def reset(self) -> None:
        self.failures = self.rounds = 0
        self.until = self.since = -math.inf
        self.last_error = None


def server_is_gone(exc: BaseException | None) -> bool:
    """Does this connect error show the server itself is down (refused, shutting down)?"""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ConnectionRefusedError):
            return True
        # PostgreSQL's 57P03 (cannot_connect_now): starting up or shutting down
        if getattr(exc, "sqlstate", None) == "57P03":
            return True
        # MySQL's 2003: can't connect to the server
        if getattr(exc, "args", (None,))[:1] == (2003,):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
