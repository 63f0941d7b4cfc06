"""Why the pool ran dry: who holds what, since when, acquired where; the error texts."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from types import CodeType, FrameType
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from ._conn import Conn
from ._errors import ConnectError, Holder, PoolTimeoutError

__all__ = [
    "PACKAGE_FILES", "connect_error", "current_task", "format_seconds", "holders",
    "outside_package",
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


# A frame of code that can await: a coroutine, an async generator, or a
# generator-based coroutine. A task's stack is a chain of them; the first frame
# that is none of these is the event loop's own (the task's step was called from
# there): there is no more user code of this task above it.
_SUSPENDABLE: Final = (
    inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR
    | inspect.CO_GENERATOR
)


def _library_dirs() -> tuple[str, ...]:
    """The source directories of the async libraries (and contextlib): never a user's site."""
    dirs = [os.path.dirname(os.path.abspath(asyncio.__file__)) + os.sep]
    for name in ("anyio", "trio", "sniffio", "uvloop"):
        spec = sys.modules.get(name)
        found = getattr(spec, "__file__", None)
        if found is None:
            try:
                import importlib.util

                found_spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                found_spec = None
            found = found_spec.origin if found_spec is not None else None
        if found:
            dirs.append(os.path.dirname(os.path.abspath(found)) + os.sep)
    return tuple(dirs)


_LIBRARY_DIRS: Final = _library_dirs()
_CONTEXTLIB: Final = os.path.abspath(sys.modules["contextlib"].__file__ or "contextlib.py")
#: filename -> is it asyncio's, anyio's, trio's (or contextlib's)? Filled as met
_LIBRARY_FILE: dict[str, bool] = {}


def _is_library_file(filename: str) -> bool:
    known = _LIBRARY_FILE.get(filename)
    if known is None:
        known = _LIBRARY_FILE[filename] = (
            filename == _CONTEXTLIB or os.path.abspath(filename).startswith(_LIBRARY_DIRS)
        )
    return known


def outside_package(frame: FrameType) -> FrameType:
    """The user's call site: the first frame of the task's own code outside this package.

    Called only when ``frame`` is one of this package's own. Frames of asyncio,
    anyio, trio and contextlib on the way are skipped too (``asyncio.wait_for``
    runs its coroutine inline). A helper scheduled as a task of its own
    (``asyncio.gather(db.fetchval(...))``, ``create_task(db.fetch(...))``,
    ``start_soon(db.execute, ...)``) has no user frame on its stack: the walk
    stops at the first frame that cannot await (the event loop's own, which
    called the task's step) and returns the outermost frame of this package,
    which :func:`site_of` names as that coroutine.
    """
    own = frame
    while True:
        code = frame.f_code
        filename = code.co_filename
        if filename in PACKAGE_FILES:
            own = frame
        elif not code.co_flags & _SUSPENDABLE:
            return own  # the event loop's frame: the task has no user code
        elif not _is_library_file(filename):
            return frame
        back = frame.f_back
        if back is None:
            return own
        frame = back


def stamp_site(rec: Conn, depth: int) -> None:
    """Record where ``rec`` was acquired: the first frame outside this package."""
    frame = sys._getframe(depth + 1)
    if frame.f_code.co_filename in PACKAGE_FILES:
        frame = outside_package(frame)
    rec.site_code = frame.f_code
    rec.site_offset = frame.f_lasti


def site_of(rec: Conn) -> str:
    """``file:line`` of the user's call, or the package's coroutine that ran as its own task."""
    code = rec.site_code
    if code is None:
        return "<unknown>"
    if code.co_filename in PACKAGE_FILES:
        return _own_task_site(code)
    line = code.co_firstlineno
    for start, end, number in code.co_lines():
        if start <= rec.site_offset < end and number is not None:
            line = number
            break
    return f"{code.co_filename}:{line}"


def _own_task_site(code: CodeType) -> str:
    """No user frame was on the stack: the helper was scheduled as a task of its own."""
    return f"{code.co_qualname}() run as its own task"


def current_task() -> object:
    """The running task (asyncio's or trio's), or None: for the error path only."""
    try:
        return asyncio.current_task()
    except RuntimeError:  # no asyncio loop runs in this thread
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return trio.lowlevel.current_task()
        except RuntimeError:
            pass
    return None


#: how a holder that is the waiting task itself is named in the holders
_ITSELF: Final = " (the waiting task itself)"


def holders(lent: Iterable[Conn], top: int = 3, waiting: object = None) -> tuple[Holder, ...]:
    """The ``top`` longest holders, longest first; ``waiting``'s own are marked as such."""
    now = time.monotonic()
    # Only on the error path: a sort over the lent connections is fine here.
    longest = sorted(lent, key=lambda rec: rec.lent_at)[:top]
    return tuple(
        Holder(
            task=task_name(rec.task) + (_ITSELF if waiting is not None and rec.task is waiting
                                        else ""),
            call_site=site_of(rec),
            held_for=now - rec.lent_at,
        )
        for rec in longest
    )


def timeout_error(
    waited: float, *, limit: int, in_use: int, idle: int, opening: int, waiting: int,
    lent: Iterable[Conn], task: object = None, host_budget: str | None = None,
    lane: str | None = None, tenant: object = None, lane_waiting: int = 0,
) -> PoolTimeoutError:
    """P2024, with the pool's state, the longest holders, and a self-deadlock named.

    ``task``: the task that timed out (default: the current one). ``lane``,
    ``tenant``: the waiter's, in a pool with lanes (``lane_waiting``: the
    others still waiting in that lane).
    """
    if task is None:
        task = current_task()
    recs = list(lent)
    top = holders(recs, waiting=task)
    message = (
        "Timed out fetching a new connection from the connection pool. "
        f"(Current connection pool timeout: {format_seconds(waited)}, "
        f"connection limit: {limit}) "
        f"Pool state: {in_use} in use, {idle} idle, {opening} opening, {waiting} waiting."
    )
    if lane is not None:
        message += (
            f" The waiter was in lane {lane!r}"
            + (f", tenant {tenant!r}" if tenant is not None else ", no tenant")
            + f" ({lane_waiting} still waiting in that lane)."
        )
    own = sum(1 for rec in recs if rec.task is task) if task is not None else 0
    if own:
        # A task that acquires while it holds the pool's last connections waits
        # for itself: no timeout makes that succeed. Say so before the holders.
        message += (
            f" A self-deadlock: {own} of the {in_use} connection(s) in use "
            f"{'is' if own == 1 else 'are'} held by the waiting task itself "
            f"({task_name(task)}), which cannot release {'it' if own == 1 else 'them'} "
            "while it waits. Use the connection it already holds (pass it down), or "
            "release it before acquiring again."
        )
    if top:
        message += " Longest holders: " + "; ".join(str(h) for h in top) + "."
    if host_budget:
        message += " " + host_budget
    return PoolTimeoutError(
        message, timeout=waited, limit=limit, in_use=in_use, idle=idle, opening=opening,
        waiting=waiting, holders=top, lane=lane, tenant=tenant,
    )


#: the kind of a connect failure -> Prisma's code
_CONNECT_CODES: Final = {"auth": "P1000", "timeout": "P1002", "database": "P1003"}


def connect_error(
    exc: BaseException,
    *,
    url: str,
    scheme: str,
    secrets: Iterable[str],
    during: str | None = None,
    driver: object = None,
) -> ConnectError:
    """A failed connect as Prisma reports it: P1000, P1001, P1002 or P1003.

    The kind comes from the driver's optional ``classify_connect_error(exc)``
    (``"auth"``, ``"database"``, ``"timeout"`` or None); a ``TimeoutError``
    is a timeout whatever the driver says. ``url`` is the redacted URL; no
    secret reaches the message.
    """
    where, user, database = _target_of(url, scheme)
    detail = str(exc) or type(exc).__name__
    # A driver may echo its DSN: never let a password through.
    for secret in secrets:
        if secret:
            detail = detail.replace(secret, "***")
    code = "P1001"
    if during is not None:
        text = f"{during} failed on a new connection to {where}"
    else:
        kind = _classify(exc, getattr(driver, "classify_connect_error", None))
        code = _CONNECT_CODES.get(kind or "", "P1001")
        if code == "P1000":
            text = (
                f"Authentication failed against database server at {where}, the provided "
                f"database credentials{f' for {user}' if user else ''} are not valid"
            )
        elif code == "P1003":
            text = f"Database {database or '(default)'} does not exist at {where}"
        elif code == "P1002":
            text = f"The database server at {where} was reached but timed out"
        else:
            text = f"Can't reach database server at {where}"
    error = ConnectError(f"{text}: {type(exc).__name__}: {detail}", code=code)
    error.__cause__ = exc
    return error


def _classify(exc: BaseException, classify: Callable[[BaseException], Any] | None) -> str | None:
    if classify is not None:
        try:
            kind = classify(exc)
        except Exception:  # a driver's diagnosis must never hide the error itself
            logger.debug("classify_connect_error failed", exc_info=True)
            kind = None
        if kind in _CONNECT_CODES:
            return str(kind)
    return "timeout" if isinstance(exc, TimeoutError) else None


def _target_of(url: str, scheme: str) -> tuple[str, str, str]:
    """(where, user, database) of a redacted URL, for the messages: never a password."""
    parts = urlsplit(url)
    if scheme == "sqlite":
        path = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
        folder, _, name = path.rpartition("/")
        return (folder or ".") if path else scheme, "", name or path
    query = parse_qs(parts.query)
    where = parts.netloc.rpartition("@")[2] or ",".join(query.get("host", [])) or scheme
    user = unquote(parts.username or "") or (query.get("user") or [""])[0]
    database = unquote(parts.path.lstrip("/")) or (
        query.get("dbname") or query.get("database") or [""]
    )[0]
    return where, user, database


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
