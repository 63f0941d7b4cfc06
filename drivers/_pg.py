"""What the two PostgreSQL drivers (asyncpg, psycopg) read alike from a URL.

No driver library is imported here, so that a psycopg user needs no asyncpg
and the other way round. Each driver adds its own parameters and turns the
result into its library's connect arguments.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote

from . import InvalidParameter
from ._hosts import Host
from ._url import (
    check_known,
    credentials,
    parse_bool,
    parse_choice,
    parse_hosts,
    query_multi,
    split,
)

__all__ = [
    "DISCONNECT_SQLSTATES",
    "READ_ONLY_SQLSTATE",
    "RESET_SESSION",
    "PgURL",
    "is_disconnect_sqlstate",
    "parse_pg_url",
    "quote_identifier",
]

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SSLACCEPT = ("strict", "accept_invalid_certs")
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
CHANNEL_BINDING = ("disable", "prefer", "require")
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
LOAD_BALANCE_HOSTS = ("disable", "random")
GSSLIBS = ("gssapi", "sspi")
FILE_PARAMS = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile")

#: SQLSTATE read_only_sql_transaction: a write reached a read-only session
READ_ONLY_SQLSTATE = "25006"
#: admin_shutdown (a fast shutdown, or pg_terminate_backend), crash_shutdown,
#: cannot_connect_now: the server ended the session
DISCONNECT_SQLSTATES = ("57P01", "57P02", "57P03")

#: DISCARD ALL less DEALLOCATE ALL: one simple-query batch, one round trip. Both
#: drivers keep a client-side table of prepared statements that DISCARD ALL would
#: pull out from under them.
RESET_SESSION = (
    "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; "
    "SELECT pg_advisory_unlock_all(); CLOSE ALL; DISCARD TEMP; DISCARD SEQUENCES;"
)


def quote_identifier(name: str) -> str:
    """``name`` as a PostgreSQL identifier: double-quoted, inner quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


def is_disconnect_sqlstate(sqlstate: object) -> bool:
    """Class 08 (connection exception) or 57P01-57P03: the server ended the session."""
    return isinstance(sqlstate, str) and (
        sqlstate.startswith("08") or sqlstate in DISCONNECT_SQLSTATES
    )


@dataclass
class PgURL:
    """A PostgreSQL URL read and checked; what is left is each driver's own."""

    parts: SplitResult
    #: every parameter with its first value (only ``host`` may repeat)
    params: dict[str, str]
    hosts: list[Host]
    user: str | None
    password: str | None
    database: str
    #: None: one host and no session check (the plain connect)
    target: str | None
    load_balance: bool
    pgbouncer: bool
    #: search_path (quoted), application_name, options: the startup settings
    settings: dict[str, str] = field(default_factory=dict)


def parse_pg_url(url: str, known: Collection[str], driver: str) -> PgURL:
    """Split and check ``url`` with the rules both PostgreSQL drivers share."""
    parts = split(url)
    multi = query_multi(parts, repeatable=("host",))
    check_known(multi, known, driver)
    params = {name: values[0] for name, values in multi.items()}

    hosts = hosts_of(parse_hosts(parts), multi)
    user, password = credentials(parts, params)
    database = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if "dbname" in params:
        if database:
            raise InvalidParameter(
                "dbname", params["dbname"], "is given both as the path and as ?dbname="
            )
        database = params["dbname"]

    choices = {"sslmode": SSLMODES, "sslaccept": SSLACCEPT, "channel_binding": CHANNEL_BINDING}
    for name, allowed in choices.items():
        if name in params:
            parse_choice(name, params[name], allowed)
    for name in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        if name in params:
            parse_choice(name, params[name], TLS_VERSIONS)
    if "gsslib" in params:
        parse_choice("gsslib", params["gsslib"], GSSLIBS)
    for name in FILE_PARAMS:
        if name in params and not params[name]:
            raise InvalidParameter(name, "", "must be a file path")
    if "sslidentity" in params:
        raise InvalidParameter(
            "sslidentity",
            params["sslidentity"],
            "is a PKCS#12 bundle, which Python's ssl module cannot load; split it with"
            " `openssl pkcs12 -in id.p12 -clcerts -nokeys -out client.crt` and"
            " `openssl pkcs12 -in id.p12 -nocerts -out client.key`, then pass sslcert="
            " and sslkey= (and sslpassword= if the key is encrypted)",
        )

    target = None
    if "target_session_attrs" in params:
        target = parse_choice(
            "target_session_attrs", params["target_session_attrs"], TARGET_SESSION_ATTRS
        )
    load_balance = (
        parse_choice("load_balance_hosts", params["load_balance_hosts"], LOAD_BALANCE_HOSTS)
        == "random"
        if "load_balance_hosts" in params
        else False
    )
    if len(hosts) > 1 and target is None:
        target = "any"  # a list is tried host by host
    pgbouncer = parse_bool("pgbouncer", params["pgbouncer"]) if "pgbouncer" in params else False

    settings: dict[str, str] = {}
    if "schema" in params:
        schema = params["schema"]
        if not schema or "\0" in schema:
            raise InvalidParameter("schema", schema, "must be a non-empty name without NUL")
        if pgbouncer:
            # PgBouncer (1.18 in transaction mode) cannot carry a search_path startup
            # parameter to the server: it refuses it, or drops it without a word when
            # listed in ignore_startup_parameters. Either way the schema would not hold.
            raise InvalidParameter(
                "schema",
                schema,
                "cannot be honoured with pgbouncer=true (PgBouncer does not pass a "
                "search_path to the server); qualify table names, or set the role's "
                "search_path with ALTER ROLE ... SET search_path",
            )
        settings["search_path"] = quote_identifier(schema)
    for name in ("application_name", "options"):
        if name in params:
            if "\0" in params[name]:
                # the startup packet is NUL-separated
                raise InvalidParameter(name, params[name], "must not contain NUL")
            settings[name] = params[name]

    sslmode = params.get("sslmode")
    if params.get("sslaccept") == "strict" and sslmode in ("disable", "allow", "prefer"):
        raise InvalidParameter(
            "sslaccept",
            "strict",
            f"verifies the server's certificate, so it needs TLS; sslmode={sslmode} makes"
            " TLS optional (use sslmode=require, or leave sslmode out)",
        )
    if params.get("sslaccept") == "accept_invalid_certs" and (
        sslmode in ("verify-ca", "verify-full") or "sslrootcert" in params
    ):
        raise InvalidParameter(
            "sslaccept",
            "accept_invalid_certs",
            "contradicts sslmode=verify-ca/verify-full and sslrootcert, which verify"
            " the server's certificate",
        )
    return PgURL(
        parts=parts,
        params=params,
        hosts=hosts,
        user=user,
        password=password,
        database=database,
        target=target,
        load_balance=load_balance,
        pgbouncer=pgbouncer,
        settings=settings,
    )


def hosts_of(
    authority: list[tuple[str | None, int | None]], params: Mapping[str, list[str]]
) -> list[Host]:
    """The host list: the query's ``host``/``port`` win over the authority's (libpq)."""
    names: list[str | None] = [h for h, _ in authority]
    ports: list[int | None] = [p for _, p in authority]
    if "host" in params:
        names = []
        for value in params["host"]:
            for name in value.split(","):
                if not name or "\0" in name:
                    raise InvalidParameter(
                        "host", value, "must be a host name, an IP address or a socket directory"
                    )
                names.append(name)
        if len(set(ports)) == 1:
            ports = ports[:1] * len(names)  # Prisma: the authority's port for ?host=
        elif len(ports) != len(names):
            raise InvalidParameter(
                "port", ",".join(str(p or "") for p in ports), "must be one port or one per host"
            )
    if "port" in params:
        if len(params["port"]) > 1:
            raise InvalidParameter("port", params["port"][1], "is given more than once")
        texts = params["port"][0].split(",")
        given = [_port_of(t) if t else None for t in texts]
        if len(given) == 1:
            ports = given * len(names)
        elif len(given) == len(names):
            ports = given
        else:
            raise InvalidParameter(
                "port", params["port"][0], f"must be one port or one per host ({len(names)})"
            )
    return [Host(n, p) for n, p in zip(names, ports, strict=True)]


def _port_of(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise InvalidParameter("port", text, "must be a whole number from 1 to 65535")
    return int(text)
