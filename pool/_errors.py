"""The error tree: one base, and one leaf for each decision a caller makes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "ConnectError",
    "Holder",
    "PoolClosedError",
    "PoolError",
    "PoolTimeoutError",
    "TooManyWaitersError",
]


class PoolError(Exception):
    """Base class of every error the pool itself raises."""


@dataclass(frozen=True, slots=True)
class Holder:
    """One task holding a connection: who, from where, and for how long."""

    task: str
    call_site: str
    held_for: float

    def __str__(self) -> str:
        return f"{self.task} at {self.call_site}, held for {self.held_for:.3f}s"


class PoolTimeoutError(PoolError, TimeoutError):
    """No connection could be had within ``pool_timeout`` (Prisma's P2024)."""

    code = "P2024"

    def __init__(
        self,
        message: str,
        *,
        timeout: float,
        limit: int,
        in_use: int,
        idle: int,
        opening: int,
        waiting: int,
        holders: tuple[Holder, ...] = (),
        lane: str | None = None,
        tenant: object = None,
    ) -> None:
        super().__init__(message)
        #: the waiter's lane and tenant, in a pool with lanes (else None)
        self.lane = lane
        self.tenant = tenant
        self.timeout = timeout
        self.limit = limit
        self.in_use = in_use
        self.idle = idle
        self.opening = opening
        self.waiting = waiting
        #: the longest holders at the moment of the timeout, longest first
        self.holders = holders


class PoolClosedError(PoolError):
    """The pool is disconnecting or was disconnected while this call waited."""


class TooManyWaitersError(PoolError):
    """``max_waiting`` callers already wait: rejected at once, without waiting."""


class ConnectError(PoolError):
    """A new connection could not be opened. The driver's own error is ``__cause__``.

    ``code`` is Prisma's: ``P1000`` the server refused the credentials (a wrong
    password, an unknown role or user), ``P1003`` the database does not exist
    (or, for SQLite, its file cannot be opened), ``P1002`` the connect timed
    out, ``P1001`` the server could not be reached (the rest).
    """

    #: Prisma's error code; the class default is "can't reach the server"
    code = "P1001"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(PoolError, ValueError):
    """A bad pool or driver parameter. Names the parameter and the bad value."""

    def __init__(self, parameter: str, value: object, reason: str) -> None:
        super().__init__(f"{parameter} {reason}, got {value!r}")
        self.parameter = parameter
        self.value = value
        self.reason = reason


for _cls in (
    PoolError,
    Holder,
    PoolTimeoutError,
    PoolClosedError,
    TooManyWaitersError,
    ConnectError,
    ConfigError,
):
    _cls.__module__ = "pool"
