"""Multi-host connecting, libpq style: try each host in turn, keep the first that fits.

Shared by the drivers that accept a host list. The caller supplies how to
connect to one host and how to judge a connection; this module keeps the
order, the per-host reasons, and the clean-up of every connection it does
not hand back (cancellation included).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Host", "NoSuitableHost", "connect_first"]

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class Host:
    """One entry of a host list. ``host`` may be a Unix socket directory."""

    host: str | None
    port: int | None

    def __str__(self) -> str:
        host = self.host or "(default host)"
        if ":" in host and not host.startswith("/"):
            host = f"[{host}]"  # an IPv6 literal
        return host if self.port is None else f"{host}:{self.port}"


class NoSuitableHost(ConnectionError):
    """No host of the list gave a connection that fits: each one's reason is listed.

    A :class:`ConnectionError`, so callers that treat "cannot connect" alike
    need no new case. ``attempts`` holds ``(host, reason)`` pairs in the
    order tried; the reasons never hold the password.
    """

    def __init__(self, wanted: str, attempts: Sequence[tuple[str, str]]) -> None:
        self.wanted = wanted
        self.attempts = tuple(attempts)
        tried = "; ".join(f"{host}: {reason}" for host, reason in self.attempts)
        super().__init__(f"no host gave a {wanted} connection ({tried})")


@dataclass(slots=True)
class _Verdict(Generic[C]):
    conn: C
    reason: str | None  # None: it fits


async def connect_first(
    hosts: Sequence[Host],
    *,
    wanted: str,
    connect: Callable[[Host], Awaitable[C]],
    judge: Callable[[C], Awaitable[str | None]],
    fallback: Callable[[C], Awaitable[bool]] | None,
    discard: Callable[[C], Awaitable[None]],
    terminate: Callable[[C], None],
    describe: Callable[[BaseException], str],
    shuffle: bool = False,
) -> C:
    """Connect to the first of ``hosts`` whose connection ``judge`` accepts.

    ``judge`` returns None when the connection fits, else the reason it does
    not. ``fallback``, if given, says whether a connection that does not fit
    may still be used when no host fits (libpq's prefer-standby); the first
    such one is kept open meanwhile, so the hosts are not dialled twice.
    ``discard`` closes a connection that is not kept (gracefully);
    ``terminate`` is for clean-up on errors and cancellation.
    ``describe`` turns a connect error into a reason. Raises
    :class:`NoSuitableHost` chained to the last error seen.
    """
    order = list(hosts)
    if shuffle:
        random.shuffle(order)  # load_balance_hosts=random: spread the clients
    attempts: list[tuple[str, str]] = []
    last: BaseException | None = None
    spare: C | None = None
    try:
        for host in order:
            try:
                conn = await connect(host)
            except Exception as exc:  # this host failed: on to the next, cancellation aside
                attempts.append((str(host), describe(exc)))
                last = exc
                continue
            try:
                reason = await judge(conn)
                if (
                    reason is not None
                    and spare is None
                    and fallback is not None
                    and await fallback(conn)
                ):
                    spare = conn
                    attempts.append((str(host), reason + "; kept as the fallback"))
                    continue
            except Exception as exc:
                terminate(conn)
                attempts.append((str(host), describe(exc)))
                last = exc
                continue
            except BaseException:
                terminate(conn)
                raise
            if reason is None:
                return conn
            attempts.append((str(host), reason))
            try:
                await discard(conn)
            except Exception:
                terminate(conn)
        if spare is not None:
            kept, spare = spare, None
            return kept
    finally:
        if spare is not None:  # an error or a cancellation: nobody will get it
            terminate(spare)
    raise NoSuitableHost(wanted, attempts) from last
