"""Pool settings: read from the URL (Prisma's names), overridden by keywords, validated once.

Everything a user can get wrong is caught here, at construction, with a
:class:`ConfigError` that names the parameter and the bad value. The pool's own
parameters are removed from the URL; what is left goes to the driver.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlencode, urlsplit

import psutil

from ._driver import SUPPORTED_SCHEMES
from ._errors import ConfigError

__all__ = [
    "PoolConfig", "check_seconds", "default_connection_limit", "parse", "redact_url",
    "secrets_of",
]

#: no pool may hold more connections than this; a larger value is a typo
MAX_CONNECTION_LIMIT = 10_000
#: a day; a longer timeout is almost always milliseconds passed as seconds
MAX_SECONDS = 86_400.0


def default_connection_limit() -> int:
    """Prisma's default pool size: physical CPU cores x 2 + 1.

    Falls back to the logical count where the physical one is unknown.
    """
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1
    return cores * 2 + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """The validated settings of one pool. Times are in seconds.

    ``pool_timeout == 0`` waits forever; ``0`` (or ``None``) for any other
    timeout or lifetime means "none".
    """

    #: the URL with its password replaced by ``***`` (safe to print)
    url: str
    scheme: str
    connection_limit: int
    pool_timeout: float
    connect_timeout: float | None
    socket_timeout: float | None
    max_connection_lifetime: float | None
    max_idle_connection_lifetime: float | None
    max_waiting: int
    #: an idle connection unused for longer than this is pinged before it is lent
    health_check_after: float
    #: a connection held longer than this logs one WARNING (None = off)
    leak_detection_threshold: float | None
    #: every release restores the session (the driver's reset: RESET ALL and
    #: friends on PostgreSQL, COM_RESET_CONNECTION on MySQL)
    reset_session: bool = False
    #: how long each ``on_before_exit`` callback may run (None = no bound)
    before_exit_timeout: float | None = 5.0
    #: open connections shared by every pool on this machine, in any process, to
    #: the same target with the same value (None = off; see ``pool._budget``)
    host_connection_limit: int | None = None


#: query parameters whose values are secrets (libpq's ?password=, ?sslpassword=)
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def _secret_pieces(query: str) -> list[tuple[int, str]]:
    """(index, raw value) of each ``&``-piece of ``query`` that holds a secret."""
    found = []
    for i, piece in enumerate(query.split("&")):
        key, eq, value = piece.partition("=")
        if eq and unquote_plus(key) in SECRET_PARAMETERS:
            found.append((i, value))
    return found


def redact_url(url: str) -> str:
    """``url`` with its passwords replaced by ``***``. Never raises.

    Both the user info's and those given as ``?password=``/``?sslpassword=``.
    """
    try:
        parts = urlsplit(url)
        secret_pieces = _secret_pieces(parts.query)
        if parts.password is None and not secret_pieces:
            return url
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            user = quote(parts.username or "", safe="")
            parts = parts._replace(netloc=f"{user}:***@{host}")
        if secret_pieces:
            pieces = parts.query.split("&")
            for i, _ in secret_pieces:
                pieces[i] = pieces[i].partition("=")[0] + "=***"
            parts = parts._replace(query="&".join(pieces))
        # by hand, not urlunsplit(): that would turn sqlite:////abs into sqlite://abs
        head = f"{parts.scheme}://{parts.netloc}{parts.path}"
        return (
            head
            + (f"?{parts.query}" if parts.query else "")
            + (f"#{parts.fragment}" if parts.fragment else "")
        )
    except ValueError:
        # Unparseable: keep the scheme, hide everything that may hold a secret.
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"


def secrets_of(url: str) -> tuple[str, ...]:
    """Every password in ``url``, as written and as decoded, to scrub from messages.

    The user info's, and the values of ``?password=`` and ``?sslpassword=``.
    """
    try:
        parts = urlsplit(url)
        raw = parts.netloc.rpartition("@")[0].partition(":")[2]
        found = {raw, parts.password or ""}
        for _, value in _secret_pieces(parts.query):
            found.update((value, unquote(value), unquote_plus(value)))
    except ValueError:
        return ()
    return tuple(s for s in found if s)


# --------------------------------------------------------------------------- values


def check_seconds(name: str, value: object) -> float:
    """An argument in seconds: a real number from 0 to a day, else ConfigError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_SECONDS
    ):
        raise ConfigError(name, value, f"must be a number of seconds from 0 to {MAX_SECONDS:.0f}")
    return float(value)


def _seconds(*, none_when_zero: bool) -> Callable[[str, object], float | None]:
    def parse_seconds(name: str, raw: object) -> float | None:
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            raise ConfigError(name, raw, "must be a number of seconds")
        if isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise ConfigError(name, raw, "must be a number of seconds") from None
        else:
            value = float(raw)
        if math.isnan(value) or math.isinf(value):
            raise ConfigError(name, raw, "must be a finite number of seconds")
        if value < 0:
            raise ConfigError(name, raw, "must be >= 0 seconds")
        if value > MAX_SECONDS:
            raise ConfigError(name, raw, f"must be at most {MAX_SECONDS:.0f} seconds (a day)")
        if value == 0 and none_when_zero:
            return None
        return value

    return parse_seconds


def _whole(minimum: int, maximum: int) -> Callable[[str, object], int]:
    def parse_whole(name: str, raw: object) -> int:
        if isinstance(raw, bool):
            raise ConfigError(name, raw, f"must be a whole number >= {minimum}")
        if isinstance(raw, str):
            if not re.fullmatch(r"\+?[0-9]+", raw.strip()):
                raise ConfigError(name, raw, f"must be a whole number >= {minimum}")
            value = int(raw)
        elif isinstance(raw, int):
            value = raw
        else:
            raise ConfigError(name, raw, f"must be a whole number >= {minimum}")
        if value < minimum:
            raise ConfigError(name, raw, f"must be a whole number >= {minimum}")
        if value > maximum:
            raise ConfigError(name, raw, f"must be at most {maximum}")
        return value

    return parse_whole


def _parse_host_limit(name: str, raw: object) -> int:
    """A whole number >= 1, or ``auto``: Prisma's default for the whole machine."""
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return default_connection_limit()
    try:
        return _whole(1, MAX_CONNECTION_LIMIT)(name, raw)
    except ConfigError:
        raise ConfigError(name, raw, "must be a whole number >= 1, or auto") from None


def _parse_bool(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(raw, str) and raw.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(name, raw, "must be true or false")


_PARSERS: dict[str, Callable[[str, object], object]] = {
    "connection_limit": _whole(1, MAX_CONNECTION_LIMIT),
    "pool_timeout": _seconds(none_when_zero=False),
    "connect_timeout": _seconds(none_when_zero=True),
    "socket_timeout": _seconds(none_when_zero=True),
    "max_connection_lifetime": _seconds(none_when_zero=True),
    "max_idle_connection_lifetime": _seconds(none_when_zero=True),
    "max_waiting": _whole(0, 100_000_000),
    "health_check_after": _seconds(none_when_zero=False),
    "leak_detection_threshold": _seconds(none_when_zero=True),
    "reset_session": _parse_bool,
    "before_exit_timeout": _seconds(none_when_zero=True),
    "host_connection_limit": _parse_host_limit,
}

_DEFAULTS: dict[str, object] = {
    "pool_timeout": 10.0,
    "connect_timeout": 5.0,
    "socket_timeout": None,
    "max_connection_lifetime": None,
    "max_idle_connection_lifetime": 300.0,
    "max_waiting": 0,
    # HikariCP trusts a connection used in the last 500 ms without a check; we
    # use 1 s, because a lent connection that turns out dead costs the caller an
    # error, while a ping costs one round trip only on the slow path.
    "health_check_after": 1.0,
    "leak_detection_threshold": None,
    # off, like psycopg_pool, HikariCP and Prisma: a release then costs no
    # round trip. asyncpg's pool resets on every release.
    "reset_session": False,
    # a before-exit callback that hangs must not hang disconnect()
    "before_exit_timeout": 5.0,
    # off: a pool without it does exactly what it did before it existed
    "host_connection_limit": None,
}

POOL_PARAMETERS = frozenset(_PARSERS)


def parse_connection_limit(value: object) -> int:
    """Validate a connection_limit given at run time (``Pool.resize``)."""
    limit = _PARSERS["connection_limit"]("connection_limit", value)
    assert isinstance(limit, int)
    return limit

# Names that other pools use for the same settings: a user coming from them gets
# pointed at ours instead of having the parameter passed to the driver.
_ALIASES = {
    "pool_size": "connection_limit",
    "max_size": "connection_limit",
    "maxsize": "connection_limit",
    "max_connections": "connection_limit",
    "pool_max": "connection_limit",
    "timeout": "pool_timeout",
    "acquire_timeout": "pool_timeout",
}

_LAZY = "the pool opens lazily and keeps no minimum; await db.connect() opens one at start"
_LIMIT = "connection_limit is the most connections the pool opens"
_LIFETIME = "a connection older than max_connection_lifetime seconds is replaced"
_IDLE = "a connection idle longer than max_idle_connection_lifetime seconds (default 300) is closed"

#: The keywords a user of asyncpg, psycopg_pool, SQLAlchemy or aiomysql passes
#: out of habit: (the libraries that use it, our name for it or None, what to
#: know). The docs' migration pages hold the same mapping.
MIGRATIONS: Mapping[str, tuple[str, str | None, str]] = MappingProxyType({
    "min_size": ("asyncpg, psycopg_pool", None, _LAZY),
    "minsize": ("aiomysql", None, _LAZY),
    "max_size": ("asyncpg, psycopg_pool", "connection_limit", _LIMIT),
    "maxsize": ("aiomysql", "connection_limit", _LIMIT),
    "pool_size": ("SQLAlchemy", "connection_limit", _LIMIT + "; there is no overflow"),
    "max_overflow": (
        "SQLAlchemy", None,
        "there is no overflow: connection_limit is the hard ceiling"
        " (set it to pool_size + max_overflow)",
    ),
    "timeout": (
        "psycopg_pool, asyncpg's acquire()", "pool_timeout",
        "the seconds an acquire waits (default 10; 0 waits forever)",
    ),
    "command_timeout": (
        "asyncpg", "socket_timeout",
        "every query's limit in seconds; timeout= on one call sets that call's"
        " (db.fetch(sql, timeout=5))",
    ),
    "max_lifetime": ("psycopg_pool", "max_connection_lifetime", _LIFETIME),
    "pool_recycle": ("SQLAlchemy, aiomysql", "max_connection_lifetime", _LIFETIME),
    "max_queries": (
        "asyncpg", None,
        "connections are not retired by a count of queries; max_connection_lifetime"
        " replaces them by age",
    ),
    "max_idle": ("psycopg_pool", "max_idle_connection_lifetime", _IDLE),
    "max_inactive_connection_lifetime": ("asyncpg", "max_idle_connection_lifetime", _IDLE),
    "pool_pre_ping": (
        "SQLAlchemy", None,
        "it is always on: a connection idle over health_check_after seconds (default 1)"
        " is pinged before it is lent; health_check_after=0 pings before every lending",
    ),
    "ssl": (
        "asyncpg, aiomysql", None,
        "TLS is set in the URL (?sslmode=require, ?sslrootcert=...), or pass"
        " connect_args={'ssl': context} with an ssl.SSLContext",
    ),
    "server_settings": (
        "asyncpg", None,
        "pass connect_args={'server_settings': {...}}, or run SET in a configure= hook",
    ),
    "init": ("asyncpg", "configure", "an async callable run on each new connection"),
    "setup": ("asyncpg", "check", "an async callable run on a connection before it is lent"),
    "kwargs": ("psycopg_pool", "connect_args", "a dict of the driver's connect keywords"),
    "connection_class": (
        "asyncpg", None, "pass it to the driver: connect_args={'connection_class': ...}",
    ),
    "record_class": ("asyncpg", None, "pass it to the driver: connect_args={'record_class': ...}"),
    "open": ("psycopg_pool", None, "Pool() opens nothing; await db.connect(), or async with db:"),
    "num_workers": (
        "psycopg_pool", None,
        "there are no worker threads: connections open in the tasks that need them",
    ),
    "reconnect_timeout": (
        "psycopg_pool", None,
        "connects are not retried in the background: each acquire that needs a"
        " connection opens one (connect_timeout per attempt), and after repeated"
        " failures acquires fail fast for a short back-off",
    ),
    "pool_reset_on_return": (
        "SQLAlchemy", "reset_session",
        "an open transaction is always rolled back on release; reset_session=true"
        " also resets the session state",
    ),
    "loop": ("asyncpg, aiomysql", None, "the pool runs on the running event loop"),
})

#: the ones that name a pool setting in every library, so that a URL query
#: parameter of that name is an error too (the rest may be a driver's parameter
#: in a URL: ?ssl=, ?timeout= are the driver's to judge)
_POOL_ONLY = frozenset({
    "min_size", "minsize", "max_size", "maxsize", "pool_size", "max_overflow", "max_lifetime",
    "pool_recycle", "max_queries", "max_idle", "max_inactive_connection_lifetime",
    "pool_pre_ping", "num_workers", "reconnect_timeout", "pool_reset_on_return",
})


def _suggest(name: str) -> str | None:
    if name in _ALIASES:
        return _ALIASES[name]
    close = difflib.get_close_matches(name.lower(), POOL_PARAMETERS, n=1, cutoff=0.75)
    return close[0] if close else None


def _unknown(name: str, value: object) -> ConfigError:
    migration = MIGRATIONS.get(name)
    if migration is not None:
        library, ours, note = migration
        if ours is None:
            reason = f"is not a pool parameter (from {library}): {note}"
        else:
            reason = f"is not a pool parameter (from {library}); did you mean {ours!r}? {note}"
        return ConfigError(name, value, reason)
    hint = _suggest(name)
    reason = "is not a pool parameter"
    if hint:
        reason += f"; did you mean {hint!r}?"
    return ConfigError(name, value, reason)


# --------------------------------------------------------------------------- the URL


#: the keyword that carries what a URL cannot (an SSLContext, server_settings, ...)
CONNECT_ARGS = "connect_args"

_NO_ARGS: Mapping[str, Any] = MappingProxyType({})

# Where the host may be a query parameter instead (libpq's and Prisma's
# ?host=/var/run/postgresql, Prisma's MySQL ?socket=), an empty authority is fine.
_HOST_PARAMETERS = {
    "postgresql": "host",
    "postgres": "host",
    "mysql": "socket",
    "mariadb": "socket",
    # the same databases through another driver (SQLAlchemy's scheme+driver)
    "postgresql+asyncpg": "host",
    "postgres+asyncpg": "host",
    "postgresql+psycopg": "host",
    "postgres+psycopg": "host",
    "mysql+asyncmy": "socket",
    "mariadb+asyncmy": "socket",
}


@dataclass(frozen=True, slots=True)
class Parsed:
    config: PoolConfig
    #: what the driver receives: the URL less the pool's parameters (holds the password)
    driver_url: str
    #: ``Pool(..., connect_args=...)``, checked to be a str-keyed mapping; for
    #: ``load_driver(connect_args=...)``. Never shown: it may hold secrets.
    connect_args: Mapping[str, Any] = field(default_factory=lambda: _NO_ARGS, repr=False)


def _connect_args(value: object) -> Mapping[str, Any]:
    """Validate the ``connect_args`` keyword: a mapping with str keys (values unseen)."""
    if value is None:
        return _NO_ARGS
    if not isinstance(value, Mapping):
        raise ConfigError(CONNECT_ARGS, type(value).__name__, "must be a dict of keyword arguments")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(CONNECT_ARGS, repr(key), "must have str keys")
    # a read-only copy: later changes to the caller's dict cannot reach the driver
    return MappingProxyType(dict(value))


def parse(url: object, overrides: Mapping[str, object], *, any_scheme: bool = False) -> Parsed:
    """Validate ``url`` and ``overrides`` into a :class:`PoolConfig`.

    ``any_scheme``: the caller brings its own driver, so any scheme goes, and
    the URL may carry pool settings only (``postgresql://?connection_limit=3``):
    the driver, not the URL, knows where the server is.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    shown = redact_url(url)
    if not url.strip():
        raise ConfigError("url", url, "must be a database URL such as postgresql://user@host/db")
    try:
        parts = urlsplit(url.strip())
        if "," not in parts.netloc.rpartition("@")[2]:
            # a host list (libpq's h1:p1,h2:p2) is the driver's to read
            parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError("url", shown, f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if not scheme or "://" not in url:
        raise ConfigError("url", shown, "must start with a scheme such as postgresql://")
    if scheme not in SUPPORTED_SCHEMES and not any_scheme:
        raise ConfigError(
            "url",
            shown,
            f"has an unsupported scheme {scheme!r}; use one of {', '.join(SUPPORTED_SCHEMES)}",
        )
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError("url", shown, "has a malformed query string") from None
    if (
        not any_scheme
        and scheme in SUPPORTED_SCHEMES
        and scheme != "sqlite"
        and not parts.hostname
        and not any(name == _HOST_PARAMETERS.get(scheme) for name, _ in pairs)
    ):
        raise ConfigError("url", shown, "names no host")

    seen: set[str] = set()
    pool_values: dict[str, object] = {}
    driver_pairs: list[tuple[str, str]] = []
    for name, value in pairs:
        if name in seen and name in POOL_PARAMETERS:
            # (a driver parameter given twice is the driver's to judge: libpq
            # repeats ?host=, and a repeated ?password= must not be echoed here)
            raise ConfigError(name, value, "is given more than once in the URL")
        seen.add(name)
        if name in POOL_PARAMETERS:
            pool_values[name] = value
        elif name in _POOL_ONLY or _suggest(name) is not None:
            raise _unknown(name, value)
        else:
            driver_pairs.append((name, value))

    connect_args = _NO_ARGS
    for name, override in overrides.items():
        if name == CONNECT_ARGS:
            connect_args = _connect_args(override)
            continue
        if name not in POOL_PARAMETERS:
            raise _unknown(name, override)
        pool_values[name] = override  # keywords win over the URL

    values: dict[str, object] = {}
    for name, parser in _PARSERS.items():
        if name in pool_values and pool_values[name] is not None:
            values[name] = parser(name, pool_values[name])
        elif name == "connection_limit":
            values[name] = default_connection_limit()
        else:
            values[name] = _DEFAULTS[name]

    # Rebuilt by hand: urlunsplit() would turn sqlite:////abs/path into sqlite://abs/path.
    head = url.strip().partition("?")[0].partition("#")[0]
    driver_url = scheme + head[len(scheme) :]
    if driver_pairs:
        driver_url += "?" + urlencode(driver_pairs)
    config = PoolConfig(url=redact_url(driver_url), scheme=scheme, **values)  # type: ignore[arg-type]
    return Parsed(config=config, driver_url=driver_url, connect_args=connect_args)
