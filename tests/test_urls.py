"""URL parameters from Prisma and libpq, multi-host PostgreSQL, and connect_args.

Each parameter is shown to have its effect on a real server where the server
can show it; where it cannot (pg_hba here trusts every login), the test also
checks what the driver hands its library.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import asyncpg
import pytest
import pytest_asyncio

import pool
from pool._config import parse, redact_url, secrets_of
from pool._driver import Driver, load_driver
from pool_drivers import InvalidParameter
from pool_drivers._hosts import NoSuitableHost
from tests.servers import (
    MYSQL_ADMIN_URL,
    MYSQL_URL,
    POSTGRES_URL,
    REPLICA_URL,
    SECRET,
    require,
)

pytestmark = pytest.mark.asyncio

PG = urlsplit(POSTGRES_URL)
PG_HOSTPORT = f"{PG.hostname}:{PG.port}"
PG_SOCKET_DIR = "/var/run/postgresql"
MY = urlsplit(MYSQL_URL)
MYSQL_SOCKET = "/run/mysqld/mysqld.sock"


def build(url: str, *, connect_timeout: float = 5, **connect_args: Any) -> Driver[Any]:
    parsed = parse(url, {"connect_args": connect_args} if connect_args else {})
    return load_driver(
        parsed.config.scheme,
        parsed.driver_url,
        connect_timeout=parsed.config.connect_timeout if "connect_timeout" in url
        else connect_timeout,
        socket_timeout=None,
        connect_args=parsed.connect_args,
    )


def pg(query: str = "", *, hosts: str | None = None, userinfo: str = "postgres") -> str:
    """A PostgreSQL test URL with our own host list and query."""
    return f"postgresql://{userinfo}@{hosts or PG_HOSTPORT}/test" + (f"?{query}" if query else "")


@pytest.fixture
def postgres() -> None:
    require(POSTGRES_URL, "PostgreSQL")


@pytest.fixture
def replica(postgres: None) -> None:
    require(REPLICA_URL, "the PostgreSQL replica")


@pytest.fixture
def mysql() -> None:
    require(MYSQL_URL, "MariaDB")


@pytest.fixture
def dead_port() -> int:
    """A local port nobody listens on: connects are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port where connections are accepted (by the kernel) and never answered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


async def one(driver: Driver[Any], sql: str, args: Any = ()) -> Any:
    conn = await driver.connect()
    try:
        return await driver.fetchval(conn, sql, args)
    finally:
        await driver.close(conn)


@pytest_asyncio.fixture
async def pg_role(postgres: None) -> AsyncIterator[str]:
    """A login role with a password, dropped afterwards."""
    role = f"pool_url_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{SECRET}'")
        yield role
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


# --------------------------------------------------------------------------- PostgreSQL


class TestPostgresParameters:
    async def test_host_query_parameter_is_a_unix_socket_directory(self, postgres: None) -> None:
        for url in (
            f"postgresql:///test?host={PG_SOCKET_DIR}&user=postgres",  # libpq's
            # Prisma's
            f"postgresql://postgres@localhost/test?host={quote(PG_SOCKET_DIR, safe='')}",
        ):
            driver = build(url)
            conn = await driver.connect()
            try:
                assert await driver.fetchval(conn, "SELECT inet_server_addr()", ()) is None
                assert driver.host_of(conn) == f"{PG_SOCKET_DIR}:5432"  # type: ignore[attr-defined]
            finally:
                await driver.close(conn)

    async def test_a_pool_accepts_a_url_whose_host_is_a_query_parameter(
        self, postgres: None
    ) -> None:
        db: pool.Pool[Any] = pool.Pool(f"postgresql:///test?host={PG_SOCKET_DIR}&user=postgres")
        async with db:
            assert await db.fetchval("SELECT inet_server_addr()") is None

    async def test_host_and_port_query_parameters_win_over_the_authority(
        self, postgres: None, dead_port: int
    ) -> None:
        driver = build(pg(f"host={PG.hostname}&port={PG.port}", hosts=f"127.0.0.1:{dead_port}"))
        assert await one(driver, "SELECT inet_server_port()") == PG.port

    async def test_user_and_password_as_query_parameters(self, pg_role: str) -> None:
        url = f"postgresql://{PG_HOSTPORT}/test?user={pg_role}&password={SECRET}"
        driver = build(url)
        assert await one(driver, "SELECT current_user") == pg_role
        # pg_hba trusts every login on this machine: check the password is sent
        assert driver._connect_kwargs["password"] == SECRET  # type: ignore[attr-defined]
        assert SECRET not in repr(driver)

    async def test_dbname(self, postgres: None) -> None:
        driver = build(f"postgresql://postgres@{PG_HOSTPORT}?dbname=test")
        assert await one(driver, "SELECT current_database()") == "test"

    async def test_application_name_shows_in_pg_stat_activity(self, postgres: None) -> None:
        name = f"url-test-{uuid.uuid4().hex[:6]}"
        driver = build(pg(f"application_name={name}"))
        conn = await driver.connect()
        try:
            pid = conn.get_server_pid()
            admin = await asyncpg.connect(POSTGRES_URL)
            try:
                shown = await admin.fetchval(
                    "SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid
                )
            finally:
                await admin.close()
            assert shown == name
        finally:
            await driver.close(conn)

    async def test_passfile_supplies_the_password(self, pg_role: str, tmp_path: Any) -> None:
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"*:*:*:{pg_role}:{SECRET}\n")
        passfile.chmod(0o600)
        driver = build(f"postgresql://{pg_role}@{PG_HOSTPORT}/test?passfile={passfile}")
        assert await one(driver, "SELECT current_user") == pg_role
        assert driver._connect_kwargs["passfile"] == str(passfile)  # type: ignore[attr-defined]

    async def test_sslaccept_strict_never_falls_back_to_plain_text(self, postgres: None) -> None:
        # This server has no TLS: strict (certificate verified) must refuse it.
        if await one(build(pg()), "SHOW ssl") == "on":
            pytest.skip("the server has TLS; this checks the no-TLS refusal")
        driver = build(pg("sslaccept=strict"))
        with pytest.raises(Exception, match=r"(?i)ssl|tls"):
            await driver.connect()

    async def test_sslaccept_accept_invalid_certs_with_prefer_connects(
        self, postgres: None
    ) -> None:
        assert await one(build(pg("sslaccept=accept_invalid_certs")), "SELECT 1") == 1

    async def test_sslaccept_builds_the_context_prisma_describes(self) -> None:
        import ssl

        strict = build(pg("sslaccept=strict"))
        ctx = strict._connect_kwargs["ssl"]  # type: ignore[attr-defined]
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        lax = build(pg("sslmode=require&sslaccept=accept_invalid_certs"))
        ctx = lax._connect_kwargs["ssl"]  # type: ignore[attr-defined]
        assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname

    async def test_channel_binding_prefer_connects(self, postgres: None) -> None:
        assert await one(build(pg("channel_binding=prefer")), "SELECT 1") == 1

    async def test_krbsrvname_and_sslcrl_reach_asyncpg(self) -> None:
        driver = build(pg("krbsrvname=postgres&gsslib=gssapi&sslcrl=/c.crl&sslmode=prefer"))
        kwargs = driver._connect_kwargs  # type: ignore[attr-defined]
        assert kwargs["krbsrvname"] == "postgres"
        assert "sslcrl=%2Fc.crl" in kwargs["dsn"]


class TestTargetSessionAttrs:
    @pytest.mark.parametrize(
        ("attrs", "fits"),
        [("any", True), ("read-write", True), ("primary", True),
         ("read-only", False), ("standby", False)],
    )
    async def test_against_the_primary_alone(
        self, postgres: None, attrs: str, fits: bool
    ) -> None:
        driver = build(pg(f"target_session_attrs={attrs}", userinfo=f"postgres:{SECRET}"))
        if fits:
            assert await one(driver, "SELECT 1") == 1
            return
        with pytest.raises(NoSuitableHost) as caught:
            await driver.connect()
        text = str(caught.value)
        assert PG_HOSTPORT in text
        assert f"target_session_attrs={attrs}" in text
        assert ("is not a standby" if attrs == "standby" else "accepts writes") in text
        assert SECRET not in text

    async def test_prefer_standby_falls_back_to_the_primary(self, postgres: None) -> None:
        driver = build(pg("target_session_attrs=prefer-standby"))
        assert await one(driver, "SELECT pg_is_in_recovery()") is False

    @pytest.mark.parametrize(
        ("attrs", "hosts", "lands_on"),
        [
            ("standby", "{p},{r}", "{r}"),
            ("prefer-standby", "{p},{r}", "{r}"),
            ("read-only", "{p},{r}", "{r}"),
            ("primary", "{r},{p}", "{p}"),
            ("read-write", "{r},{p}", "{p}"),
            ("any", "{r},{p}", "{r}"),
        ],
    )
    async def test_with_the_replica(
        self, replica: None, attrs: str, hosts: str, lands_on: str
    ) -> None:
        names = {"p": PG_HOSTPORT, "r": urlsplit(REPLICA_URL).netloc.rpartition("@")[2]}
        driver = build(pg(f"target_session_attrs={attrs}", hosts=hosts.format(**names)))
        conn = await driver.connect()
        try:
            assert driver.host_of(conn) == lands_on.format(**names)  # type: ignore[attr-defined]
            standby = await driver.fetchval(conn, "SELECT pg_is_in_recovery()", ())
            assert standby is (lands_on == "{r}")
        finally:
            await driver.close(conn)

    async def test_a_write_on_the_standby_is_a_read_only_error(self, replica: None) -> None:
        driver = build(REPLICA_URL)
        conn = await driver.connect()
        try:
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError) as caught:
                await driver.execute(conn, "CREATE TABLE never_made (x int)", ())
            assert driver.is_read_only_error(caught.value)  # type: ignore[attr-defined]
        finally:
            await driver.close(conn)

    async def test_load_balance_hosts_random_spreads_connects(self, replica: None) -> None:
        r = urlsplit(REPLICA_URL).netloc.rpartition("@")[2]
        driver = build(pg("load_balance_hosts=random", hosts=f"{PG_HOSTPORT},{r}"))
        seen = set()
        for _ in range(30):  # both hosts, unless 30 coin flips all agree (2^-29)
            conn = await driver.connect()
            seen.add(driver.host_of(conn))  # type: ignore[attr-defined]
            await driver.close(conn)
        assert seen == {PG_HOSTPORT, r}


class TestMultiHost:
    async def test_a_dead_first_host_is_skipped(self, postgres: None, dead_port: int) -> None:
        driver = build(pg(hosts=f"127.0.0.1:{dead_port},{PG_HOSTPORT}"))
        conn = await driver.connect()
        try:
            assert driver.host_of(conn) == PG_HOSTPORT  # type: ignore[attr-defined]
        finally:
            await driver.close(conn)

    async def test_repeated_host_parameters_with_a_port_list(
        self, postgres: None, dead_port: int
    ) -> None:
        driver = build(
            f"postgresql://postgres@/test?host=127.0.0.1&host={PG.hostname}"
            f"&port={dead_port},{PG.port}"
        )
        assert driver.hosts == (f"127.0.0.1:{dead_port}", PG_HOSTPORT)  # type: ignore[attr-defined]
        assert await one(driver, "SELECT inet_server_port()") == PG.port

    async def test_connect_timeout_applies_per_host(
        self, postgres: None, silent_port: int
    ) -> None:
        driver = build(pg(hosts=f"127.0.0.1:{silent_port},{PG_HOSTPORT}"), connect_timeout=0.5)
        started = time.monotonic()
        assert await one(driver, "SELECT 1") == 1
        # the silent host costs its 0.5 s, then the next is tried at once
        assert time.monotonic() - started < 0.5 + 2

    async def test_all_down_names_every_host_and_why(
        self, dead_port: int, silent_port: int, seen: Callable[[object], None]
    ) -> None:
        driver = build(
            pg(hosts=f"127.0.0.1:{dead_port},127.0.0.1:{silent_port}", userinfo=f"u:{SECRET}"),
            connect_timeout=0.3,
        )
        with pytest.raises(NoSuitableHost) as caught:
            await driver.connect()
        seen(caught.value)
        text = str(caught.value)
        assert f"127.0.0.1:{dead_port}: ConnectionRefusedError" in text
        assert f"127.0.0.1:{silent_port}: " in text and "connect_timeout=0.3" in text
        assert [host for host, _ in caught.value.attempts] == [
            f"127.0.0.1:{dead_port}", f"127.0.0.1:{silent_port}"
        ]
        assert SECRET not in text
        assert isinstance(caught.value, ConnectionError)

    async def test_a_pool_reports_all_hosts_in_its_connect_error(
        self, dead_port: int, seen: Callable[[object], None]
    ) -> None:
        # the ?host= form: a host list with ports in the authority still trips
        # the engine's registry (see TestEngineSideGaps)
        url = f"postgresql://u:{SECRET}@/test?host=127.0.0.1,localhost&port={dead_port}"
        db: pool.Pool[Any] = pool.Pool(url)
        with pytest.raises(pool.ConnectError) as caught:
            await db.connect()
        seen(caught.value)
        assert f"127.0.0.1:{dead_port}: ConnectionRefusedError" in str(caught.value)
        assert f"localhost:{dead_port}: " in str(caught.value)
        assert SECRET not in str(caught.value)

    @pytest.mark.postgres
    async def test_single_host_takes_the_plain_path(self) -> None:
        driver = build(pg())
        assert driver._target is None  # type: ignore[attr-defined]  # one asyncpg.connect
        assert driver.hosts == (PG_HOSTPORT,)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- MySQL


@pytest_asyncio.fixture
async def mysql_user(mysql: None) -> AsyncIterator[str]:
    user = f"pool_url_{uuid.uuid4().hex[:8]}"
    admin = build(MYSQL_ADMIN_URL)
    conn = await admin.connect()
    try:
        await admin.execute(conn, f"CREATE USER '{user}'@'%' IDENTIFIED BY '{SECRET}'", ())
        yield user
    finally:
        await admin.execute(conn, f"DROP USER IF EXISTS '{user}'@'%'", ())
        await admin.close(conn)


class TestMySQLParameters:
    async def test_socket(self, mysql: None) -> None:
        url = MYSQL_URL.replace(f"@{MY.hostname}:{MY.port}", "@localhost")
        url += f"?socket={MYSQL_SOCKET}"
        driver = build(url)
        conn = await driver.connect()
        try:
            # a Unix socket login shows as host 'localhost', a TCP one as 'addr:port'
            host = await driver.fetchval(
                conn,
                "SELECT HOST FROM information_schema.processlist WHERE ID = CONNECTION_ID()",
                (),
            )
            assert host == "localhost"
            assert driver.host_of(conn) == MYSQL_SOCKET  # type: ignore[attr-defined]
        finally:
            await driver.close(conn)

    async def test_user_and_password_as_query_parameters(self, mysql_user: str) -> None:
        url = f"mysql://{MY.hostname}:{MY.port}?user={mysql_user}&password={SECRET}"
        assert (await one(build(url), "SELECT CURRENT_USER()")).startswith(mysql_user + "@")
        wrong = build(f"mysql://{MY.hostname}:{MY.port}?user={mysql_user}&password=nope")
        with pytest.raises(Exception, match="Access denied"):
            await wrong.connect()

    async def test_sslaccept_needs_tls(self, mysql: None) -> None:
        pymysql = pytest.importorskip("pymysql")
        for query in ("sslaccept=accept_invalid_certs", "sslaccept=strict"):
            driver = build(MYSQL_URL + "?" + query)
            try:
                conn = await driver.connect()
            except pymysql.err.OperationalError as exc:
                assert exc.args[0] == 2026  # no TLS on this server: refused, not plain text
                continue
            await driver.close(conn)

    async def test_a_write_on_a_read_only_transaction_is_a_read_only_error(
        self, mysql: None
    ) -> None:
        driver = build(MYSQL_URL)
        conn = await driver.connect()
        try:
            await driver.execute(conn, "CREATE TEMPORARY TABLE ro (x int)", ())
            await driver.execute(conn, "CREATE TABLE IF NOT EXISTS pool_url_ro (x int)", ())
            await driver.execute(conn, "START TRANSACTION READ ONLY", ())
            with pytest.raises(Exception) as caught:
                await driver.execute(conn, "INSERT INTO pool_url_ro VALUES (1)", ())
            assert driver.is_read_only_error(caught.value)  # type: ignore[attr-defined]
            await driver.rollback(conn)
        finally:
            await driver.execute(conn, "DROP TABLE IF EXISTS pool_url_ro", ())
            await driver.close(conn)


# --------------------------------------------------------------------------- refused


REFUSED = [
    (pg("sslidentity=/id.p12"), "sslidentity", "sslcert= and sslkey="),
    (pg("channel_binding=require"), "channel_binding", "channel binding"),
    (pg("channel_binding=maybe"), "channel_binding", "must be one of"),
    (pg("sslaccept=lenient"), "sslaccept", "must be one of"),
    (pg("sslaccept=strict&sslmode=prefer"), "sslaccept", "needs TLS"),
    (pg("sslaccept=accept_invalid_certs&sslmode=verify-full"), "sslaccept", "contradicts"),
    (pg("sslaccept=strict&sslrootcert=/no/such.pem"), "sslrootcert", "cannot be loaded"),
    (pg("target_session_attrs=master"), "target_session_attrs", "must be one of"),
    (pg("load_balance_hosts=yes"), "load_balance_hosts", "must be one of"),
    (pg("ssl_min_protocol_version=SSLv3"), "ssl_min_protocol_version", "must be one of"),
    (pg("gsslib=heimdal"), "gsslib", "must be one of"),
    (pg("passfile="), "passfile", "file path"),
    (pg("port=5432,5433", hosts="a,b,c"), "port", "one per host"),
    (pg("host=", hosts="a"), "host", "socket directory"),
    (pg("user=x"), "user", "both"),
    (pg("dbname=other"), "dbname", "both"),
    (pg("sslmod=require"), "sslmod", "did you mean 'sslmode'"),
    (pg("targetsessionattrs=any"), "targetsessionattrs", "did you mean 'target_session_attrs'"),
    ("postgresql://a:1,,b/db", "host", "empty entry"),
    ("postgresql://a:1,b:x/db", "port", "1 to 65535"),
    ("mysql://h/db?sslidentity=/id.p12", "sslidentity", "connect_args"),
    ("mysql://h/db?sslaccept=strict&sslmode=disable", "sslmode", "need TLS"),
    ("mysql://h/db?sslcert=/ca.pem&sslaccept=accept_invalid_certs", "sslaccept", "contradicts"),
    ("mysql://h/db?socket=", "socket", "Unix socket"),
    ("mysql://h/db?sockt=/x", "sockt", "did you mean 'socket'"),
]


class TestRefused:
    @pytest.mark.parametrize(("url", "parameter", "reason"), REFUSED)
    async def test_config_error_names_the_parameter(
        self, url: str, parameter: str, reason: str
    ) -> None:
        with pytest.raises(pool.ConfigError) as caught:
            pool.Pool(url)
        assert caught.value.parameter == parameter
        assert reason in str(caught.value)

    @pytest.mark.parametrize(
        "url",
        [
            pg(f"password={SECRET}&password=x"),
            pg(f"sslpassword={SECRET}&sslpassword=x"),
            f"postgresql://u:x@h/db?password={SECRET}",
            f"mysql://h/db?sslpassword={SECRET}",
            f"mysql://h/db?password={SECRET}&nope=1",
        ],
        ids=["twice", "ssl-twice", "both-ways", "mysql-sslpassword", "beside-a-typo"],
    )
    async def test_no_error_shows_a_query_password(
        self, url: str, seen: Callable[[object], None]
    ) -> None:
        with pytest.raises(pool.ConfigError) as caught:
            pool.Pool(url)
        seen(caught.value)
        assert SECRET not in str(caught.value)
        assert SECRET not in repr(caught.value.value)


# --------------------------------------------------------------------------- redaction


class TestQueryPasswordIsASecret:
    URL = f"postgresql://app@db.example:5432/shop?application_name=x&password={SECRET}"

    async def test_redact_url_and_secrets_of(self) -> None:
        assert SECRET not in redact_url(self.URL)
        assert "password=***" in redact_url(self.URL)
        assert "application_name=x" in redact_url(self.URL)
        assert SECRET in secrets_of(self.URL)
        encoded = "postgresql://h/db?pass%77ord=a%2Fb&sslpassword=c+d"
        assert {"a%2Fb", "a/b", "c+d", "c d"} <= set(secrets_of(encoded))
        assert "a%2Fb" not in redact_url(encoded) and "c+d" not in redact_url(encoded)

    async def test_config_and_driver_reprs(self, seen: Callable[[object], None]) -> None:
        db: pool.Pool[Any] = pool.Pool(self.URL + "&connection_limit=2")
        for text in (repr(db), str(db), repr(db.config), db.config.url, repr(db._driver)):
            seen(text)
            assert SECRET not in text

    async def test_logs_and_connect_errors(
        self, dead_port: int, caplog: pytest.LogCaptureFixture, seen: Callable[[object], None]
    ) -> None:
        caplog.set_level(logging.DEBUG)
        url = f"postgresql://app@127.0.0.1:{dead_port}/shop?password={SECRET}&connect_timeout=1"
        db: pool.Pool[Any] = pool.Pool(url)
        with pytest.raises(pool.ConnectError) as caught:
            await db.connect()
        seen(caught.value)
        assert SECRET not in str(caught.value)
        assert SECRET not in caplog.text

    async def test_a_pool_logs_in_with_it(self, pg_role: str) -> None:
        url = f"postgresql://{PG_HOSTPORT}/test?user={pg_role}&password={SECRET}"
        db: pool.Pool[Any] = pool.Pool(url, connection_limit=1)
        async with db:
            assert await db.fetchval("SELECT current_user") == pg_role


# --------------------------------------------------------------------------- connect_args


class TestConnectArgs:
    async def test_postgres_server_settings_and_record_class(self, postgres: None) -> None:
        class Row(asyncpg.Record):
            pass

        driver = build(
            pg("application_name=ca"), server_settings={"work_mem": "5MB"}, record_class=Row
        )
        conn = await driver.connect()
        try:
            row = await driver.fetchrow(conn, "SHOW work_mem", ())
            assert isinstance(row, Row)
            assert row[0] == "5MB"
            assert await driver.fetchval(conn, "SHOW application_name", ()) == "ca"
        finally:
            await driver.close(conn)

    async def test_sqlite_detect_types(self, tmp_path: Any) -> None:
        import sqlite3

        driver = build(f"sqlite:///{tmp_path / 'c.db'}", detect_types=sqlite3.PARSE_DECLTYPES)
        conn = await driver.connect()
        try:
            await driver.execute(conn, "CREATE TABLE d (x date)", ())
            await driver.execute(conn, "INSERT INTO d VALUES ('2024-01-02')", ())
            import datetime

            # (Python 3.12 deprecates the default date converter; 3.11 is quiet)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                value = await driver.fetchval(conn, "SELECT x FROM d", ())
            assert value == datetime.date(2024, 1, 2)
        finally:
            await driver.close(conn)

    async def test_mysql_init_command(self, mysql: None) -> None:
        driver = build(MYSQL_URL, init_command="SET @pool_url = 42")
        assert await one(driver, "SELECT @pool_url") == 42

    @pytest.mark.parametrize(
        ("url", "args", "named", "reason"),
        [
            (pg(), {"no_such": 1}, "no_such", "record_class"),
            (pg(), {"password": SECRET}, "password", "?password="),
            (pg(), {"command_timeout": 3}, "command_timeout", "socket_timeout"),
            (pg("sslmode=require"), {"ssl": SECRET}, "ssl", "sslmode"),
            (pg("application_name=a"), {"server_settings": {"application_name": SECRET}},
             "server_settings", "'application_name'"),
            ("mysql://h/db", {"autocommit": False}, "autocommit", "relies on it"),
            ("mysql://h/db", {"nope": SECRET}, "nope", "init_command"),
            ("sqlite:///x.db", {"check_same_thread": True}, "check_same_thread", "worker"),
            ("sqlite:///x.db", {"timeout": 1}, "timeout", "busy_timeout"),
            ("sqlite:///x.db", {"nope": 1}, "nope", "detect_types"),
        ],
    )
    async def test_refused_keys_name_the_key_never_the_value(
        self, url: str, args: dict[str, Any], named: str, reason: str,
        seen: Callable[[object], None],
    ) -> None:
        with pytest.raises(pool.ConfigError) as caught:
            build(url, **args)
        seen(caught.value)
        assert caught.value.parameter == "connect_args"
        assert caught.value.value == named
        assert reason in str(caught.value)
        assert SECRET not in str(caught.value)

    async def test_the_keyword_is_checked_by_the_config(self) -> None:
        with pytest.raises(pool.ConfigError, match="connect_args must be a dict"):
            parse(pg(), {"connect_args": [("ssl", True)]})
        with pytest.raises(pool.ConfigError, match="str keys"):
            parse(pg(), {"connect_args": {1: 2}})
        parsed = parse(pg(), {"connect_args": {"record_class": object}})
        assert dict(parsed.connect_args) == {"record_class": object}
        assert "record_class" not in repr(parsed)

    async def test_a_driver_module_without_the_keyword_still_loads(self) -> None:
        # load_driver passes connect_args only when there are some
        load_driver("sqlite", "sqlite:///x.db", connect_timeout=1, socket_timeout=None)

    async def test_pool_passes_connect_args_to_the_driver(self) -> None:
        with pytest.raises(pool.ConfigError):
            pool.Pool("sqlite:///x.db", connect_args={"nope": 1})


class TestEngineSideGaps:
    async def test_a_pool_accepts_a_host_list_with_ports(self) -> None:
        pool.Pool("postgresql://postgres@127.0.0.1:1,127.0.0.1:5432/test")

    async def test_a_pool_accepts_a_host_list_without_ports(self) -> None:
        pool.Pool("postgresql://postgres@h1,h2/test")

    @pytest.mark.parametrize(
        ("module", "libraries"),
        [("postgres", ("asyncio",)), ("mysql", ("asyncio",)), ("sqlite", ("asyncio", "trio"))],
    )
    async def test_async_libraries(self, module: str, libraries: tuple[str, ...]) -> None:
        import importlib

        mod = importlib.import_module(f"pool_drivers.{module}")
        url = {"postgres": "postgresql://h/db", "mysql": "mysql://h/db"}.get(module, "sqlite:///x")
        assert mod.create(url, connect_timeout=1, socket_timeout=None).async_libraries == libraries


async def test_invalid_parameter_is_what_drivers_raise() -> None:
    from pool_drivers.postgres import create

    with pytest.raises(InvalidParameter):
        create("postgresql://h/db?sslidentity=x", connect_timeout=1, socket_timeout=None)
