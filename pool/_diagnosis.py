"""Why the pool ran dry: who holds what, since when, acquired where; the error texts."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from types import FrameType
from typing import Final

from ._conn import Conn
from ._errors import ConnectError, Holder, PoolTimeoutError

__all__ = [
    "PACKAGE_FILES", "connect_error", "format_seconds", "holders", "outside_package",
    "report_leaks", "site_of", "stamp_site", "task_name", "timeout_error",
]

logger = logging.getLogger("pool")

_PACKAGE_DIR: Final = os.path.dirname(os.path.abspath(__file__))
#: this package's source files: a frame from one of them is not the user's call site
PACKAGE_FILES: Final = frozenset(
    os.path.join(_PACKAGE_DIR, name) for name in os.listdir(_PACKAGE_DIR) if name.endswith(".py")
)


def format_seconds(value: float) -> str:
    """``10.0`` -> ``"10"``, ``0.25`` -> ``"0.25"``: whole numbers print without ``.0``."""
    return str(int(value)) if value == int(value) else repr(value)


def task_name(task: object) -> str:
    if task is None:
        return "<unknown task>"
    get_name = getattr(task, "get_name", None)
    return str(get_name() if get_name else getattr(task, "name", repr(task)))


def outside_package(frame: FrameType) -> FrameType:
    """The first frame outside this package: the user's call site."""
    while frame.f_code.co_filename in PACKAGE_FILES and frame.f_back is not None:
        frame = frame.f_back
    return frame


def stamp_site(rec: Conn, depth: int) -> None:
    """Record where ``rec`` was acquired: the first frame outside this package."""
    frame = sys._getframe(depth + 1)
    if frame.f_code.co_filename in PACKAGE_FILES:
        frame = outside_package(frame)
    rec.site_code = frame.f_code
    rec.site_offset = frame.f_lasti


def site_of(rec: Conn) -> str:
    code = rec.site_code
    if code is None:
        return "<unknown>"
    line = code.co_firstlineno
    for start, end, number in code.co_lines():
        if start <= rec.site_offset < end and number is not None:
            line = number
            break
    return f"{code.co_filename}:{line}"


def holders(lent: Iterable[Conn], top: int = 3) -> tuple[Holder, ...]:
    now = time.monotonic()
    # Only on the error path: a sort over the lent connections is fine here.
    longest = sorted(lent, key=lambda rec: rec.lent_at)[:top]
    return tuple(
        Holder(task=task_name(rec.task), call_site=site_of(rec), held_for=now - rec.lent_at)
        for rec in longest
    )


def timeout_error(
    waited: float, *, limit: int, in_use: int, idle: int, opening: int, waiting: int,
    lent: Iterable[Conn],
) -> PoolTimeoutError:
    top = holders(lent)
    message = (
        "Timed out fetching a new connection from the connection pool. "
        f"(Current connection pool timeout: {format_seconds(waited)}, "
        f"connection limit: {limit}) "
        f"Pool state: {in_use} in use, {idle} idle, {opening} opening, {waiting} waiting."
    )
    if top:
        message += " Longest holders: " + "; ".join(str(h) for h in top) + "."
    return PoolTimeoutError(
        message, timeout=waited, limit=limit, in_use=in_use, idle=idle, opening=opening,
        waiting=waiting, holders=top,
    )


def connect_error(
    exc: BaseException,
    *,
    url: str,
    scheme: str,
    secrets: Iterable[str],
    during: str | None = None,
) -> ConnectError:
    where = url.split("://", 1)[-1].rpartition("@")[2].split("/", 1)[0].split("?", 1)[0]
    detail = str(exc) or type(exc).__name__
    # A driver may echo its DSN: never let a password through.
    for secret in secrets:
        detail = detail.replace(secret, "***")
    if during is not None:
        text = f"{during} failed on a new connection to {where or scheme}"
    else:
        text = f"Can't reach database server at {where or scheme}"
    error = ConnectError(f"{text}: {type(exc).__name__}: {detail}")
    error.__cause__ = exc
    return error


def report_leaks(lent: Iterable[Conn], threshold: float) -> None:
    """One WARNING per lending held longer than ``threshold``."""
    now = time.monotonic()
    for rec in lent:
        if rec.leak_reported_for != rec.lent_at and now - rec.lent_at > threshold:
            rec.leak_reported_for = rec.lent_at
            logger.warning(
                "Possible connection leak: %s has held a connection for %.1fs "
                "(leak_detection_threshold=%s); it was acquired at %s",
                task_name(rec.task),
                now - rec.lent_at,
                format_seconds(threshold),
                site_of(rec),
            )
