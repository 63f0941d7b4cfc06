"""URL handling shared by the drivers: strict parameters, and a form safe to print.

Every driver reads its URL with these helpers so that all three agree on the
rules: a parameter given twice is an error, an unknown parameter is an error
(a typo must not pass silently), and no message or ``repr`` ever carries the
password.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, unquote_plus, urlsplit, urlunsplit

from . import InvalidParameter

__all__ = [
    "HIDDEN",
    "credentials",
    "SECRET_PARAMETERS",
    "check_connect_args",
    "check_known",
    "parse_bool",
    "parse_choice",
    "parse_host_port",
    "parse_hosts",
    "parse_nonnegative_int",
    "parse_seconds",
    "query_multi",
    "query_params",
    "redact",
    "split",
    "user_and_password",
]

#: what stands in for a password in everything we print
HIDDEN = "***"

#: query parameters whose values are secrets: hidden wherever the URL is shown
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def split(url: str) -> SplitResult:
    """Split ``url``, refusing the shapes that would put a password in a message.

    A ``/``, ``?``, ``#`` or ``@`` left unencoded in a password moves the rest of
    the password into the host, path, query or fragment, and from there into an
    error message about them. An ``@`` after the authority is the sign of it, so
    we refuse the URL without echoing any of it.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL": a '[' or ']' without its pair
        raise InvalidParameter(
            "url",
            url.partition(":")[0] + "://" + HIDDEN,
            "must have a host that is a name, an IPv4 address or an [IPv6] address",
        ) from None
    keys = (key for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    if "@" in parts.path or "@" in parts.fragment or any("@" in key for key in keys):
        raise InvalidParameter(
            "url",
            parts.scheme + "://" + HIDDEN,
            "must percent-encode '/', '?', '#' and '@' in the user name and password"
            " (as %2F, %3F, %23 and %40)",
        )
    if parts.fragment:
        # A database URL has no use for a fragment; it is most likely a '#'
        # that belonged to a password, so it is not echoed either.
        raise InvalidParameter("url", parts.scheme + "://" + HIDDEN, "must not have a #fragment")
    return parts


def redact(parts: SplitResult) -> str:
    """The URL with its passwords replaced by ``***``.

    That is the one in the user info and the values of ``?password=`` and
    ``?sslpassword=``; the rest of the query is kept as written.
    """
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":" + HIDDEN
    return urlunsplit(
        parts._replace(netloc=userinfo + at + hostinfo, query=redact_query(parts.query))
    )


def redact_query(query: str) -> str:
    """``query`` with the values of :data:`SECRET_PARAMETERS` replaced by ``***``.

    Works on the raw text, piece by piece, so that the other parameters keep
    their spelling, and a percent-encoded name (``pass%77ord``) is caught too.
    """
    if not query:
        return query
    pieces = query.split("&")
    for i, piece in enumerate(pieces):
        key, eq, _ = piece.partition("=")
        if eq and unquote_plus(key) in SECRET_PARAMETERS:
            pieces[i] = key + "=" + HIDDEN
    return "&".join(pieces)


def user_and_password(parts: SplitResult) -> tuple[str | None, str | None]:
    """The percent-decoded user and password; None where the URL has none."""
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def credentials(
    parts: SplitResult, params: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """The user and password, from before the ``@`` or from ``?user=`` / ``?password=``.

    libpq and Prisma take either; giving one twice is refused, the password
    never shown.
    """
    user, password = user_and_password(parts)
    if "user" in params:
        if user is not None:
            raise InvalidParameter(
                "user", params["user"], "is given both before the @ and as ?user="
            )
        user = params["user"] or None
    if "password" in params:
        if password is not None:
            raise InvalidParameter(
                "password", HIDDEN, "is given both before the @ and as ?password="
            )
        password = params["password"]
    return user, password


def parse_host_port(parts: SplitResult) -> tuple[str | None, int | None]:
    """The host (brackets of an IPv6 literal removed) and the port, both optional.

    Parsed by hand rather than with ``SplitResult.port`` so that a bad port is
    reported with the text the user wrote, and a port of 0 is refused too.
    """
    hostinfo = parts.netloc.rpartition("@")[2]
    if hostinfo.startswith("["):
        host, bracket, rest = hostinfo[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise InvalidParameter("host", hostinfo, "must be a name, an IPv4 or an [IPv6] address")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = hostinfo.partition(":")
        if "," in host:
            raise InvalidParameter(
                "host", host, "must be one host; lists of hosts are not supported"
            )
    port: int | None = None
    if port_text:
        if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
            raise InvalidParameter("port", port_text, "must be a whole number from 1 to 65535")
        port = int(port_text)
    elif hostinfo.endswith(":"):
        raise InvalidParameter("port", "", "must be a whole number from 1 to 65535")
    return (unquote(host) or None), port


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise InvalidParameter("port", text, "must be a whole number from 1 to 65535")
    return int(text)


def parse_hosts(parts: SplitResult) -> list[tuple[str | None, int | None]]:
    """libpq's host list: ``host1:port1,host2:port2,[::1]:port3`` in the authority.

    Each entry's host and port are optional; an empty authority is one entry
    with neither. Hosts are percent-decoded, IPv6 brackets removed.
    """
    hostinfo = parts.netloc.rpartition("@")[2]
    hosts: list[tuple[str | None, int | None]] = []
    for entry in hostinfo.split(","):
        if entry.startswith("["):
            host, bracket, rest = entry[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise InvalidParameter(
                    "host", entry, "must be a name, an IPv4 or an [IPv6] address"
                )
            port_text, has_port = rest[1:], bool(rest)
        else:
            host, colon, port_text = entry.partition(":")
            has_port = bool(colon)
        if not host and len(hostinfo.split(",")) > 1:
            raise InvalidParameter("host", hostinfo, "must not have an empty entry in its list")
        hosts.append((unquote(host) or None, _port(port_text) if has_port else None))
    return hosts


def query_multi(parts: SplitResult, repeatable: Collection[str]) -> dict[str, list[str]]:
    """The query parameters, decoded, each with every value it was given.

    Only the names in ``repeatable`` may be given more than once.
    """
    params: dict[str, list[str]] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in params and key not in repeatable:
            shown = HIDDEN if key in SECRET_PARAMETERS else value
            raise InvalidParameter(key, shown, "is given more than once")
        params.setdefault(key, []).append(value)
    return params


def query_params(parts: SplitResult) -> dict[str, str]:
    """The query parameters, decoded; a parameter given twice is an error."""
    params: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in params:
            shown = HIDDEN if key in SECRET_PARAMETERS else value
            raise InvalidParameter(key, shown, "is given more than once")
        params[key] = value
    return params


def check_known(params: Iterable[str], known: Collection[str], driver: str) -> None:
    """Refuse the first parameter that ``driver`` does not know."""
    for key in params:
        if key not in known:
            # The value is not echoed: a misspelt "pasword=" must not leak.
            close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.7)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InvalidParameter(
                key,
                key,
                f"is not a parameter of the {driver} driver ({hint}it knows {', '.join(known)})",
            )


def check_connect_args(
    connect_args: Mapping[str, Any],
    target: Callable[..., Any] | Collection[str],
    managed: Mapping[str, str],
    driver: str,
) -> dict[str, Any]:
    """Validate ``connect_args`` against the keywords ``target`` accepts.

    ``target`` is the library's connect function (its keyword parameters are
    read with :func:`inspect.signature`) or the names themselves. ``managed``
    maps the keywords this module sets itself to the URL parameter that sets
    them; those are refused with a pointer to it. Errors name the key, never
    the value: it may be a password or an ``SSLContext`` holding a key.
    """
    if isinstance(target, Collection):
        names = set(target)
    else:
        names = {
            name
            for name, param in inspect.signature(target).parameters.items()
            if param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
        }
    accepted = sorted(names - set(managed) - {"self", "loop"})
    for key in connect_args:
        if not isinstance(key, str):
            raise InvalidParameter("connect_args", type(key).__name__, "must have str keys")
        if key in managed:
            raise InvalidParameter(
                "connect_args",
                key,
                f"must not set {key!r}: the {driver} driver sets it from the URL"
                f" ({managed[key]})",
            )
        if key not in accepted:
            raise InvalidParameter(
                "connect_args",
                key,
                f"has a key the {driver} driver's connect does not take"
                f" (it takes {', '.join(accepted)})",
            )
    return dict(connect_args)


def parse_bool(name: str, text: str) -> bool:
    if text not in ("true", "false"):
        raise InvalidParameter(name, text, "must be true or false")
    return text == "true"


def parse_choice(name: str, text: str, choices: Collection[str]) -> str:
    if text not in choices:
        raise InvalidParameter(name, text, "must be one of " + ", ".join(choices))
    return text


def parse_nonnegative_int(name: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise InvalidParameter(name, text, "must be a whole number >= 0")
    return int(text)


def parse_seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise InvalidParameter(name, text, "must be a number of seconds >= 0")
    return value
