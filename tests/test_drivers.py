"""Conformance of the driver adapters themselves, not of the pool.

Every adapter is held to the same contract (``pool._driver.Driver``) against a
real server: PostgreSQL through asyncpg, MariaDB through aiomysql, and SQLite
in a temporary folder. Each adapter is built the way the engine builds it,
with ``load_driver`` and a URL that carries no pool parameters.
"""

from __future__ import annotations

import importlib
import inspect
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import pytest
import pytest_asyncio

from pool._driver import Driver, load_driver
from pool._errors import ConfigError
from pool_drivers import InvalidParameter
from pool_drivers.sqlite import SQLiteConnection
from tests.servers import MYSQL_URL, POSTGRES_URL, SECRET, require

DRIVERS = [
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
    "sqlite",
]
SERVER_DRIVERS = DRIVERS[:2]

#: each driver's own placeholders for the first and the second argument
PLACEHOLDERS = {
    "postgres": ("$1", "$2"),
    "mysql": ("%s", "%s"),
    "sqlite": ("?", "?"),
}


#: what ``execute`` returns for an INSERT of one row
INSERTED_ONE = {
    "postgres": "INSERT 0 1",  # asyncpg's command tag
    "mysql": 1,  # affected rows
    "sqlite": 1,  # cursor.rowcount
}


def quote_identifier(name: str) -> str:
    """The test's own quoting, to check the driver's against."""
    return '"' + name.replace('"', '""') + '"'


def build(url: str, *, socket_timeout: float | None = None) -> Driver[Any]:
    return load_driver(urlsplit(url).scheme, url, connect_timeout=5, socket_timeout=socket_timeout)


@pytest.fixture(params=DRIVERS)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(name: str, tmp_path: Path) -> str:
    if name == "postgres":
        require(POSTGRES_URL, "PostgreSQL")
        return POSTGRES_URL
    if name == "mysql":
        require(MYSQL_URL, "MariaDB")
        return MYSQL_URL
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def driver(url: str) -> Driver[Any]:
    return build(url)


@pytest_asyncio.fixture
async def conn(driver: Driver[Any]) -> AsyncIterator[Any]:
    conn = await driver.connect()
    try:
        yield conn
    finally:
        await close_or_terminate(driver, conn)


@pytest_asyncio.fixture
async def table(name: str, driver: Driver[Any], conn: Any) -> str:
    # a temporary table: private to the session, so parallel runs never meet
    await driver.execute(
        conn, "CREATE TEMPORARY TABLE t (id INTEGER PRIMARY KEY, label VARCHAR(20))", ()
    )
    return "t"


async def close_or_terminate(driver: Driver[Any], conn: Any) -> None:
    if driver.is_alive(conn):
        await driver.close(conn)
    else:
        driver.terminate(conn)


async def kill_from_another_session(name: str, driver: Driver[Any], conn: Any) -> None:
    """End ``conn``'s session on the server, and wait until it is gone."""
    killer = await driver.connect()
    try:
        if name == "postgres":
            # with a timeout, pg_terminate_backend waits for the backend to exit
            assert await driver.fetchval(
                killer, "SELECT pg_terminate_backend($1, 5000)", [conn.get_server_pid()]
            )
        else:
            thread_id = conn.thread_id()
            await driver.execute(killer, f"KILL {int(thread_id)}", ())
            with anyio.fail_after(5):  # KILL only marks the thread; wait for it to go
                while await driver.fetchval(
                    killer,
                    "SELECT COUNT(*) FROM information_schema.processlist WHERE id = %s",
                    [thread_id],
                ):
                    await anyio.sleep(0.01)
    finally:
        await driver.close(killer)


class TestShape:
    @pytest.mark.parametrize(
        ("module", "adapter"),
        [
            ("pool_drivers.postgres", "PostgresDriver"),
            ("pool_drivers.mysql", "MySQLDriver"),
            ("pool_drivers.sqlite", "SQLiteDriver"),
        ],
    )
    def test_adapter_has_every_method_of_the_protocol(self, module: str, adapter: str) -> None:
        cls = getattr(importlib.import_module(module), adapter)
        assert isinstance(cls.scheme, str)
        for member, spec in vars(Driver).items():
            if member.startswith("_") or not callable(spec):
                continue
            impl = getattr(cls, member)
            assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(spec), member
            assert list(inspect.signature(impl).parameters) == list(
                inspect.signature(spec).parameters
            ), member

    def test_drivers_never_import_the_engine(self) -> None:
        code = (
            "import sys, pool_drivers.postgres, pool_drivers.mysql, pool_drivers.sqlite;"
            "leaked = sorted(m for m in sys.modules if m.split('.')[0] == 'pool');"
            "assert not leaked, leaked"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)

    @pytest.mark.parametrize(
        ("url", "scheme"),
        [
            ("postgresql://h/db", "postgresql"),
            ("postgres://h/db", "postgresql"),
            ("mysql://h/db", "mysql"),
            ("mariadb://h/db", "mysql"),
            ("sqlite:///x.db", "sqlite"),
        ],
    )
    def test_canonical_scheme(self, url: str, scheme: str) -> None:
        assert build(url).scheme == scheme

    @pytest.mark.parametrize(
        "url",
        [
            f"postgresql://app:{SECRET}@db.example:5432/shop?application_name=x",
            f"mysql://app:{SECRET}@db.example/shop",
        ],
        ids=["postgres", "mysql"],  # test ids are printed: none carries the password
    )
    def test_repr_hides_the_password(self, url: str) -> None:
        text = repr(build(url))
        assert SECRET not in text
        assert "app:***@db.example" in text


@pytest.mark.asyncio
class TestConnection:
    async def test_connect_then_close(self, driver: Driver[Any]) -> None:
        conn = await driver.connect()
        assert driver.is_alive(conn)
        assert not driver.in_transaction(conn)
        await driver.ping(conn)
        await driver.close(conn)
        assert not driver.is_alive(conn)

    async def test_terminate_never_raises_even_twice(self, driver: Driver[Any]) -> None:
        conn = await driver.connect()
        driver.terminate(conn)
        assert not driver.is_alive(conn)
        driver.terminate(conn)
        assert not driver.is_alive(conn)

    async def test_ping_on_a_terminated_connection_raises(self, driver: Driver[Any]) -> None:
        conn = await driver.connect()
        driver.terminate(conn)
        with pytest.raises(Exception):  # noqa: B017 - each library has its own error
            await driver.ping(conn)

    async def test_server_max_connections(self, name: str, driver: Driver[Any], conn: Any) -> None:
        limit = await driver.server_max_connections(conn)
        if name == "sqlite":
            assert limit is None
        else:
            assert isinstance(limit, int)
            assert limit > 0


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port where connections are accepted (by the kernel) and never answered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.mark.asyncio
class TestConnectTimeout:
    @pytest.mark.parametrize(
        "url",
        [
            f"postgresql://u:{SECRET}@127.0.0.1:{{port}}/db?sslmode=disable",
            f"mysql://u:{SECRET}@127.0.0.1:{{port}}/db",
        ],
        ids=["postgres", "mysql"],
    )
    async def test_a_silent_server_times_out(self, url: str, silent_port: int) -> None:
        driver = load_driver(
            url.partition(":")[0],
            url.format(port=silent_port),
            connect_timeout=0.2,
            socket_timeout=None,
        )
        with pytest.raises(TimeoutError) as caught:
            await driver.connect()
        assert SECRET not in str(caught.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", SERVER_DRIVERS, indirect=True)
class TestServerKillsTheSession:
    async def test_ping_raises_and_the_connection_is_dead(
        self, name: str, driver: Driver[Any]
    ) -> None:
        conn = await driver.connect()
        try:
            await kill_from_another_session(name, driver, conn)
            # Seen without I/O, from the EOF the event loop received. For
            # asyncpg that may take one more pass of the loop.
            with anyio.fail_after(5):
                while driver.is_alive(conn):
                    await anyio.sleep(0)
            # aiomysql's ping() would reconnect here by default, and succeed
            with pytest.raises(Exception):  # noqa: B017 - each library has its own error
                await driver.ping(conn)
            assert not driver.is_alive(conn)
        finally:
            driver.terminate(conn)


@pytest.mark.asyncio
class TestQueries:
    async def test_placeholders_and_results(
        self, name: str, driver: Driver[Any], conn: Any, table: str
    ) -> None:
        p1, p2 = PLACEHOLDERS[name]
        insert = f"INSERT INTO {table} (id, label) VALUES ({p1}, {p2})"
        assert await driver.execute(conn, insert, [1, "one"]) == INSERTED_ONE[name]
        await driver.execute(conn, insert, (2, "two"))

        rows = await driver.fetch(conn, f"SELECT id, label FROM {table} ORDER BY id", ())
        assert isinstance(rows, list)
        assert [tuple(row) for row in rows] == [(1, "one"), (2, "two")]

        select_one = f"SELECT id, label FROM {table} WHERE id = {p1}"
        row = await driver.fetchrow(conn, select_one, [2])
        assert row is not None
        assert tuple(row) == (2, "two")
        assert await driver.fetchrow(conn, select_one, [3]) is None

        label = f"SELECT label FROM {table} WHERE id = {p1}"
        assert await driver.fetchval(conn, label, [1]) == "one"
        assert await driver.fetchval(conn, label, [3]) is None

    async def test_fetch_of_nothing_is_an_empty_list(
        self, driver: Driver[Any], conn: Any, table: str
    ) -> None:
        assert await driver.fetch(conn, f"SELECT id FROM {table}", []) == []

    async def test_a_failed_query_leaves_the_connection_usable(
        self, driver: Driver[Any], conn: Any
    ) -> None:
        with pytest.raises(Exception):  # noqa: B017 - each library has its own error
            await driver.execute(conn, "SELECT * FROM no_such_table_here", ())
        assert driver.is_alive(conn)
        assert await driver.fetchval(conn, "SELECT 1", ()) == 1


@pytest.mark.asyncio
class TestTransactions:
    async def test_in_transaction_follows_begin_and_commit(
        self, driver: Driver[Any], conn: Any
    ) -> None:
        await driver.begin(conn)
        assert driver.in_transaction(conn)
        await driver.commit(conn)
        assert not driver.in_transaction(conn)

    async def test_in_transaction_follows_begin_and_rollback(
        self, driver: Driver[Any], conn: Any
    ) -> None:
        await driver.begin(conn)
        assert driver.in_transaction(conn)
        await driver.rollback(conn)
        assert not driver.in_transaction(conn)

    async def test_rollback_discards(
        self, name: str, driver: Driver[Any], conn: Any, table: str
    ) -> None:
        p1, p2 = PLACEHOLDERS[name]
        await driver.begin(conn)
        await driver.execute(conn, f"INSERT INTO {table} VALUES ({p1}, {p2})", [1, "gone"])
        assert await driver.fetchval(conn, f"SELECT COUNT(*) FROM {table}", ()) == 1
        await driver.rollback(conn)
        assert await driver.fetchval(conn, f"SELECT COUNT(*) FROM {table}", ()) == 0

    async def test_commit_keeps(
        self, name: str, driver: Driver[Any], conn: Any, table: str
    ) -> None:
        p1, p2 = PLACEHOLDERS[name]
        await driver.begin(conn)
        await driver.execute(conn, f"INSERT INTO {table} VALUES ({p1}, {p2})", [1, "kept"])
        await driver.commit(conn)
        assert await driver.fetchval(conn, f"SELECT label FROM {table}", ()) == "kept"

    async def test_plain_execute_commits_on_its_own(
        self, name: str, driver: Driver[Any], conn: Any, table: str
    ) -> None:
        p1, p2 = PLACEHOLDERS[name]
        await driver.execute(conn, f"INSERT INTO {table} VALUES ({p1}, {p2})", [1, "auto"])
        assert not driver.in_transaction(conn)

    async def test_an_error_inside_a_transaction_keeps_it_open(
        self, driver: Driver[Any], conn: Any
    ) -> None:
        await driver.begin(conn)
        with pytest.raises(Exception):  # noqa: B017 - each library has its own error
            await driver.execute(conn, "SELECT * FROM no_such_table_here", ())
        assert driver.in_transaction(conn)  # open, or failed (PostgreSQL): dirty either way
        await driver.rollback(conn)
        assert not driver.in_transaction(conn)


#: a query that runs far longer than any test timeout, in each dialect
LONG_QUERY = {
    "postgres": "SELECT pg_sleep(30)",
    "mysql": "SELECT SLEEP(30)",
    # pure CPU in the VM: only an interrupt() stops it early
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c"
    " WHERE x < 2000000000) SELECT MAX(x) FROM c",
}


@pytest.mark.asyncio
class TestHelpers:
    async def test_executemany_writes_a_thousand_rows(
        self, name: str, driver: Driver[Any], conn: Any, table: str
    ) -> None:
        p1, p2 = PLACEHOLDERS[name]
        rows = [(i, f"row {i}") for i in range(1000)]
        result = await driver.executemany(
            conn, f"INSERT INTO {table} (id, label) VALUES ({p1}, {p2})", rows
        )
        assert result is None
        assert await driver.fetchval(conn, f"SELECT COUNT(*) FROM {table}", ()) == 1000
        assert await driver.fetchval(conn, f"SELECT label FROM {table} WHERE id = 999", ()) == (
            "row 999"
        )
        assert not driver.in_transaction(conn)

    async def test_executemany_is_all_or_nothing(
        self, name: str, driver: Driver[Any], conn: Any, table: str
    ) -> None:
        p1, p2 = PLACEHOLDERS[name]
        rows = [(1, "a"), (2, "b"), (1, "duplicate key")]
        with pytest.raises(Exception):  # noqa: B017 - each library has its own error
            await driver.executemany(
                conn, f"INSERT INTO {table} (id, label) VALUES ({p1}, {p2})", rows
            )
        assert not driver.in_transaction(conn)
        assert await driver.fetchval(conn, f"SELECT COUNT(*) FROM {table}", ()) == 0

    async def test_executemany_inside_a_transaction_is_part_of_it(
        self, name: str, driver: Driver[Any], conn: Any, table: str
    ) -> None:
        p1, p2 = PLACEHOLDERS[name]
        await driver.begin(conn)
        await driver.executemany(
            conn, f"INSERT INTO {table} (id, label) VALUES ({p1}, {p2})", [(1, "a"), (2, "b")]
        )
        assert driver.in_transaction(conn)
        await driver.rollback(conn)
        assert await driver.fetchval(conn, f"SELECT COUNT(*) FROM {table}", ()) == 0

    @pytest.mark.parametrize("method", ["fetch", "fetchrow", "fetchval", "execute"])
    async def test_timeout_cancels_a_long_query(
        self, name: str, driver: Driver[Any], conn: Any, method: str
    ) -> None:
        with anyio.fail_after(10):  # the query itself would take 30 s or more
            with pytest.raises(TimeoutError):
                await getattr(driver, method)(conn, LONG_QUERY[name], (), timeout=0.2)
        # asyncpg cancels on the server; on MySQL a KILL QUERY stops it;
        # sqlite3 was interrupted
        assert driver.is_alive(conn)
        assert await driver.fetchval(conn, "SELECT 1", ()) == 1

    async def test_timeout_bounds_executemany(
        self, name: str, driver: Driver[Any], conn: Any
    ) -> None:
        sql = {"postgres": "SELECT pg_sleep($1)", "mysql": "SELECT SLEEP(%s)"}.get(name)
        if sql is None:
            # sqlite: a row trigger that loops long, fired once per executemany row
            sql = "INSERT INTO slow VALUES (?)"
            await driver.execute(conn, "CREATE TEMPORARY TABLE slow (x)", ())
            await driver.execute(
                conn,
                "CREATE TEMPORARY TRIGGER slow_down AFTER INSERT ON slow BEGIN "
                f"SELECT * FROM ({LONG_QUERY['sqlite']}); END",
                (),
            )
        with anyio.fail_after(10), pytest.raises(TimeoutError):
            await driver.executemany(conn, sql, [(5,), (5,)], timeout=0.2)
        if driver.is_alive(conn):
            # kept (the statement stopped): the batch's own transaction is not
            assert not driver.in_transaction(conn)

    async def test_a_short_query_within_its_timeout_is_untouched(
        self, driver: Driver[Any], conn: Any
    ) -> None:
        assert await driver.fetchval(conn, "SELECT 1", (), timeout=5) == 1
        assert driver.is_alive(conn)


class TestDeclarations:
    @pytest.mark.parametrize(
        ("module", "adapter", "libraries"),
        [
            ("pool_drivers.postgres", "PostgresDriver", ("asyncio",)),
            ("pool_drivers.mysql", "MySQLDriver", ("asyncio",)),
            ("pool_drivers.sqlite", "SQLiteDriver", ("asyncio", "trio")),
        ],
    )
    def test_async_libraries_and_the_optional_members(
        self, module: str, adapter: str, libraries: tuple[str, ...]
    ) -> None:
        cls = getattr(importlib.import_module(module), adapter)
        assert cls.async_libraries == libraries
        assert callable(cls.host_of)
        assert callable(cls.is_read_only_error)

    def test_module_level_imports_are_declared(self) -> None:
        """pool/ and the drivers sqlite needs import only declared dependencies."""
        import tomllib

        root = Path(__file__).parent.parent
        declared = {
            dep.split(">")[0].split("<")[0].split("=")[0].strip().lower().replace("-", "_")
            for dep in tomllib.loads((root / "pyproject.toml").read_text())["project"][
                "dependencies"
            ]
        }
        stdlib = sys.stdlib_module_names
        files = [*(root / "pool").glob("*.py"), *(root / "drivers").glob("_*.py"),
                 root / "drivers" / "sqlite.py"]
        for path in files:
            for line in path.read_text().splitlines():
                if not line.startswith(("import ", "from ")) or line.startswith("from ."):
                    continue
                top = line.split()[1].split(".")[0]
                if top in ("pool", "pool_drivers", "__future__"):
                    continue
                assert top in stdlib or top in declared, f"{path.name}: {line}"


# (url, the parameter the error must name)
REJECTED = [
    ("postgresql://h/db?sslmode=bogus", "sslmode"),
    ("postgresql://h/db?sslmode=", "sslmode"),
    ("postgresql://h/db?sslrootcert=", "sslrootcert"),
    ("postgresql://h/db?statement_cache_size=-1", "statement_cache_size"),
    ("postgresql://h/db?statement_cache_size=x", "statement_cache_size"),
    ("postgresql://h/db?statement_cache_size=1.5", "statement_cache_size"),
    ("postgresql://h/db?pgbouncer=yes", "pgbouncer"),
    ("postgresql://h/db?pgbouncer=true&statement_cache_size=10", "statement_cache_size"),
    ("postgresql://h/db?pgbouncer=true&schema=app", "schema"),
    ("postgresql://h/db?schema=", "schema"),
    ("postgresql://h/db?schema=a%00b", "schema"),
    ("postgresql://h/db?application_name=a%00b", "application_name"),
    ("postgresql://h/db?schema=a&schema=b", "schema"),
    ("postgresql://h/db?sslmod=require", "sslmod"),
    ("postgresql://h/db?connection_limit=5", "connection_limit"),
    ("postgresql://h:0/db", "port"),
    ("postgresql://h:65536/db", "port"),
    ("postgresql://h:abc/db", "port"),
    ("postgresql://h:/db", "port"),
    ("mysql://h1,h2/db", "host"),
    ("postgresql://[::1/db", "url"),
    ("mysql://h/db?sslmode=verify-full", "sslmode"),
    ("mysql://h/db?charset=klingon", "charset"),
    ("mysql://h/db?application_name=" + "x" * 129, "application_name"),
    ("mysql://h/db?schema=s", "schema"),
    ("mysql://h/db?pgbouncer=true", "pgbouncer"),
    ("mysql://h:99999/db", "port"),
    ("sqlite:///x.db?busy_timeout=-1", "busy_timeout"),
    ("sqlite:///x.db?busy_timeout=abc", "busy_timeout"),
    ("sqlite:///x.db?busy_timeout=nan", "busy_timeout"),
    ("sqlite:///x.db?busy_timeout=inf", "busy_timeout"),
    ("sqlite:///x.db?journal_mode=yolo", "journal_mode"),
    ("sqlite:///:memory:?journal_mode=wal", "journal_mode"),
    ("sqlite:///x.db?mode=ro", "mode"),
    ("sqlite://host/x.db", "url"),
    ("sqlite://", "url"),
]

ACCEPTED = [
    "postgresql://",
    "postgres://h/db",
    "postgresql://u@h",
    "postgresql://u:@h/db",
    "postgresql://[::1]:5432/db",
    "postgresql://h/db?pgbouncer=true&statement_cache_size=0",
    "postgresql://h/db?pgbouncer=false&statement_cache_size=7",
    "postgresql://h/db?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem",
    "postgresql://h/db?application_name=app&options=-c%20geqo%3Doff&schema=s",
    "mysql://h",
    "mariadb://u@h:3307/db",
    "mysql://h/db?sslmode=require&charset=latin1&application_name=app",
    "sqlite:///:memory:",
    "sqlite:///:memory:?journal_mode=off",
    "sqlite:////abs/x.db?busy_timeout=0.5&journal_mode=delete",
]


def create(url: str) -> Any:
    scheme = url.partition(":")[0]  # not urlsplit(): some of these URLs break it
    module = {"postgresql": "postgres", "postgres": "postgres", "mariadb": "mysql"}.get(
        scheme, scheme
    )
    return importlib.import_module(f"pool_drivers.{module}").create(
        url, connect_timeout=5, socket_timeout=None
    )


class TestValidation:
    @pytest.mark.parametrize(("url", "parameter"), REJECTED)
    def test_rejected(self, url: str, parameter: str) -> None:
        with pytest.raises(InvalidParameter) as caught:
            create(url)
        error = caught.value
        assert error.parameter == parameter
        assert str(error) == f"{error.parameter} {error.reason}, got {error.value!r}"

    @pytest.mark.parametrize("url", ACCEPTED)
    def test_accepted(self, url: str) -> None:
        create(url)

    def test_load_driver_reports_a_config_error(self) -> None:
        with pytest.raises(ConfigError) as caught:
            build("postgresql://h/db?statement_cache_size=-1")
        assert caught.value.parameter == "statement_cache_size"
        assert caught.value.value == "-1"

    @pytest.mark.parametrize(
        "url",
        [
            f"postgresql://u:{SECRET}@h:bad/db",
            f"mysql://u:{SECRET}@h,h2/db",
            f"mysql://u:{SECRET}@h/db?nope=1",
            f"mysql://u:{SECRET}@h/db?pasword={SECRET}",
            # unencoded '/', '?' and '#' in the password
            "postgresql://u:Hunter2/s3cr3t-Zq9@h/db",
            "mysql://u:Hunter2?s3cr3t-Zq9@h/db",
            "postgresql://u:Hunter2#s3cr3t-Zq9@h/db",
        ],
        ids=[
            "bad-port",
            "host-list",
            "unknown-parameter",
            "misspelt-password-parameter",
            "slash-in-password",
            "question-mark-in-password",
            "hash-in-password",
        ],
    )
    def test_errors_never_show_the_password(self, url: str) -> None:
        with pytest.raises(InvalidParameter) as caught:
            create(url)
        assert "s3cr3t" not in str(caught.value)
        assert "s3cr3t" not in repr(caught.value.value)


@pytest.mark.asyncio
@pytest.mark.postgres
class TestPostgres:
    @pytest.fixture(autouse=True)
    def _server(self) -> None:
        require(POSTGRES_URL, "PostgreSQL")

    async def test_schema_is_quoted_as_an_identifier(self) -> None:
        admin = build(POSTGRES_URL)
        schema = f'we"ird; DROP {uuid.uuid4().hex[:8]}'
        conn = await admin.connect()
        try:
            await admin.execute(conn, f"CREATE SCHEMA {quote_identifier(schema)}", ())
            driver = build(f"{POSTGRES_URL}?schema={quote(schema, safe='')}")
            inner = await driver.connect()
            try:
                assert await driver.fetchval(inner, "SELECT current_schema()", ()) == schema
                assert await driver.fetchval(inner, "SHOW search_path", ()) == quote_identifier(
                    schema
                )
                await driver.execute(inner, "CREATE TABLE lands_here (x int)", ())
            finally:
                await driver.close(inner)
            assert (
                await admin.fetchval(
                    conn,
                    "SELECT COUNT(*) FROM information_schema.tables"
                    " WHERE table_schema = $1 AND table_name = 'lands_here'",
                    [schema],
                )
                == 1
            )
        finally:
            await admin.execute(
                conn, f"DROP SCHEMA IF EXISTS {quote_identifier(schema)} CASCADE", ()
            )
            await admin.close(conn)

    @pytest.mark.parametrize(
        ("query", "cached"),
        [("", 100), ("?statement_cache_size=5", 5), ("?pgbouncer=true", 0)],
    )
    async def test_statement_cache(self, query: str, cached: int) -> None:
        driver = build(POSTGRES_URL + query)
        assert getattr(driver, "statement_cache_size") == cached  # noqa: B009 - not on the Protocol
        conn = await driver.connect()
        try:
            await driver.fetchval(conn, "SELECT $1::int", [1])
            # asyncpg names the statements it caches, and only named ones are
            # listed here: none at all means nothing PgBouncer could lose.
            prepared = await driver.fetchval(
                conn, "SELECT COUNT(*) FROM pg_prepared_statements", ()
            )
            assert (prepared > 0) == (cached > 0)
        finally:
            await driver.close(conn)

    async def test_application_name_and_options_reach_the_server(self) -> None:
        driver = build(POSTGRES_URL + "?application_name=conformance&options=-c%20geqo%3Doff")
        conn = await driver.connect()
        try:
            assert await driver.fetchval(conn, "SHOW application_name", ()) == "conformance"
            assert await driver.fetchval(conn, "SHOW geqo", ()) == "off"
        finally:
            await driver.close(conn)

    async def test_sslmode_disable_connects(self) -> None:
        driver = build(POSTGRES_URL + "?sslmode=disable")
        conn = await driver.connect()
        try:
            assert (
                await driver.fetchval(
                    conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", ()
                )
                is False
            )
        finally:
            await driver.close(conn)

    async def test_socket_timeout_cancels_the_query_and_keeps_the_connection(self) -> None:
        driver = build(POSTGRES_URL, socket_timeout=0.2)
        conn = await driver.connect()
        try:
            with pytest.raises(TimeoutError):
                await driver.execute(conn, "SELECT pg_sleep(10)", ())
            assert driver.is_alive(conn)
            assert await driver.fetchval(conn, "SELECT 1", ()) == 1
        finally:
            await driver.close(conn)


@pytest.mark.asyncio
@pytest.mark.mysql
class TestMySQL:
    @pytest.fixture(autouse=True)
    def _server(self) -> None:
        require(MYSQL_URL, "MariaDB")

    async def test_server_notes_do_not_become_python_warnings(self) -> None:
        # pytest runs with filterwarnings=error: a warning here would raise
        driver = build(MYSQL_URL)
        conn = await driver.connect()
        try:
            for _ in range(2):  # the second one draws note 1050, "already exists"
                await driver.execute(conn, "CREATE TEMPORARY TABLE IF NOT EXISTS n (x int)", ())
            await driver.execute(conn, "DROP TEMPORARY TABLE IF EXISTS nothing_here", ())
        finally:
            await driver.close(conn)

    async def test_socket_timeout_stops_the_query_and_keeps_the_connection(self) -> None:
        driver = build(MYSQL_URL, socket_timeout=0.2)
        conn = await driver.connect()
        try:
            thread = await driver.fetchval(conn, "SELECT CONNECTION_ID()", ())
            with pytest.raises(TimeoutError, match="KILL QUERY"):
                await driver.fetchval(conn, "SELECT SLEEP(5)", ())
            assert driver.is_clean(conn)  # type: ignore[attr-defined]
            assert await driver.fetchval(conn, "SELECT 1", ()) == 1
            # the same session answers at once: its SLEEP(5) was stopped
            assert await driver.fetchval(conn, "SELECT CONNECTION_ID()", ()) == thread
        finally:
            driver.terminate(conn)

    async def test_socket_timeout_mid_rows_closes_the_connection(self) -> None:
        driver = build(MYSQL_URL, socket_timeout=0.2)
        conn = await driver.connect()
        try:
            with pytest.raises(TimeoutError, match="closed"):
                # rows of 20 kB, one every 10 ms: cut off with rows read
                await driver.fetch(
                    conn, "SELECT REPEAT('x', 20000), SLEEP(0.01) FROM seq_1_to_300", ()
                )
            # the rest of the reply is still on its way: never reused
            assert not driver.is_alive(conn)
        finally:
            driver.terminate(conn)

    async def test_sslmode_require_never_falls_back_to_plain_text(self) -> None:
        pymysql = pytest.importorskip("pymysql")
        driver = build(MYSQL_URL + "?sslmode=require")
        try:
            conn = await driver.connect()
        except pymysql.err.OperationalError as exc:
            # a server without TLS (as scripts/servers starts it): refused
            # before the login is sent
            assert exc.args[0] == 2026
            return
        try:
            cipher = await driver.fetchrow(conn, "SHOW SESSION STATUS LIKE 'Ssl_cipher'", ())
            assert cipher is not None
            assert cipher[1]
        finally:
            await driver.close(conn)

    async def test_percent_signs(self) -> None:
        driver = build(MYSQL_URL)
        conn = await driver.connect()
        try:
            assert await driver.fetchval(conn, "SELECT '100%'", ()) == "100%"
            assert await driver.fetchval(conn, "SELECT CONCAT(%s, '%%')", ["100"]) == "100%"
        finally:
            await driver.close(conn)

    async def test_charset_and_application_name(self) -> None:
        driver = build(MYSQL_URL + "?charset=utf8mb4&application_name=conformance")
        conn = await driver.connect()
        try:
            assert await driver.fetchval(conn, "SELECT @@character_set_client", ()) == "utf8mb4"
            assert await driver.fetchval(conn, "SELECT %s", ["ünï ☃"]) == "ünï ☃"
        finally:
            await driver.close(conn)


@pytest.mark.asyncio
class TestSQLite:
    async def test_memory_database_is_shared_by_one_drivers_connections(self) -> None:
        driver = build("sqlite:///:memory:")
        first, second = await driver.connect(), await driver.connect()
        other = build("sqlite:///:memory:")
        elsewhere = await other.connect()
        try:
            await driver.execute(first, "CREATE TABLE shared (x)", ())
            await driver.execute(first, "INSERT INTO shared VALUES (?)", [42])
            assert await driver.fetchval(second, "SELECT x FROM shared", ()) == 42
            # another create() is another database
            with pytest.raises(Exception, match="no such table"):
                await other.fetchval(elsewhere, "SELECT x FROM shared", ())
        finally:
            for d, c in ((driver, first), (driver, second), (other, elsewhere)):
                await d.close(c)

    async def test_memory_database_lock_conflicts_wait_for_busy_timeout(self) -> None:
        # SQLITE_BUSY ("database is locked") is what busy_timeout retries;
        # shared-cache mode would answer SQLITE_LOCKED ("database table is
        # locked") at once, which no timeout retries.
        driver = build("sqlite:///:memory:?busy_timeout=0")
        holder, blocked = await driver.connect(), await driver.connect()
        try:
            await driver.execute(holder, "CREATE TABLE w (x)", ())
            # read once first: a connection that has to load the schema under
            # the lock reports "no such table" instead
            assert await driver.fetch(blocked, "SELECT x FROM w", ()) == []
            await driver.execute(holder, "BEGIN IMMEDIATE", ())
            with pytest.raises(Exception, match=r"^database is locked$"):
                await driver.execute(blocked, "INSERT INTO w VALUES (1)", ())
            await driver.rollback(holder)
        finally:
            await driver.close(holder)
            await driver.close(blocked)

    async def test_a_writer_waits_for_the_lock(self, tmp_path: Path) -> None:
        driver = build(f"sqlite:///{tmp_path / 'w.db'}")
        holder, waiter = await driver.connect(), await driver.connect()
        try:
            await driver.execute(holder, "CREATE TABLE w (x)", ())
            await driver.execute(holder, "BEGIN IMMEDIATE", ())
            await driver.execute(holder, "INSERT INTO w VALUES (1)", ())
            async with anyio.create_task_group() as tg:
                tg.start_soon(driver.execute, waiter, "INSERT INTO w VALUES (2)", ())
                await anyio.wait_all_tasks_blocked()
                await driver.commit(holder)
            assert await driver.fetchval(holder, "SELECT COUNT(*) FROM w", ()) == 2
        finally:
            await driver.close(holder)
            await driver.close(waiter)

    async def test_files_default_to_wal(self, tmp_path: Path) -> None:
        driver = build(f"sqlite:///{tmp_path / 'j.db'}")
        conn = await driver.connect()
        try:
            assert await driver.fetchval(conn, "PRAGMA journal_mode", ()) == "wal"
        finally:
            await driver.close(conn)
        driver = build(f"sqlite:///{tmp_path / 'k.db'}?journal_mode=delete&busy_timeout=0.25")
        conn = await driver.connect()
        try:
            assert await driver.fetchval(conn, "PRAGMA journal_mode", ()) == "delete"
            assert await driver.fetchval(conn, "PRAGMA busy_timeout", ()) == 250
        finally:
            await driver.close(conn)

    async def test_relative_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        driver = build("sqlite:///relative.db")
        conn = await driver.connect()
        await driver.close(conn)
        assert (tmp_path / "relative.db").exists()

    async def test_the_connection_object(self, tmp_path: Path) -> None:
        driver = build(f"sqlite:///{tmp_path / 'c.db'}")
        conn = await driver.connect()
        assert isinstance(conn, SQLiteConnection)
        assert not conn.closed
        await conn.execute("CREATE TABLE c (x)")
        await conn.execute("BEGIN")
        assert conn.in_transaction
        assert await conn.execute("INSERT INTO c VALUES (?), (?)", 1, 2) == 2
        assert await conn.fetch("SELECT x FROM c ORDER BY x") == [(1,), (2,)]
        assert await conn.fetchrow("SELECT x FROM c WHERE x = ?", 2) == (2,)
        assert await conn.fetchval("SELECT MAX(x) FROM c") == 2
        await conn.execute("COMMIT")
        assert not conn.in_transaction
        assert conn.raw.in_transaction is False
        await conn.close()
        assert conn.closed
        assert not conn.in_transaction


class TestSQLiteOpening:
    def test_many_connections_open_a_new_file_at_once(self, tmp_path: Path) -> None:
        # The first switch to wal takes an exclusive lock, and when several
        # connections race for it SQLite answers "database is locked" at once,
        # without waiting busy_timeout; a pool growing on a new file hit it.
        # Threads with their own event loops, released together by a barrier,
        # make the race likely (the bug showed in about 1 round in 20).
        for attempt in range(20):
            driver = build(f"sqlite:///{tmp_path / f'new{attempt}.db'}")
            start = threading.Barrier(10)
            opened: list[Any] = []
            failed: list[BaseException] = []

            def open_one(
                driver: Driver[Any] = driver,
                start: threading.Barrier = start,
                opened: list[Any] = opened,
                failed: list[BaseException] = failed,
            ) -> None:
                start.wait()
                try:
                    opened.append(anyio.run(driver.connect))
                except BaseException as exc:
                    failed.append(exc)

            threads = [threading.Thread(target=open_one) for _ in range(10)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for conn in opened:
                driver.terminate(conn)
            assert failed == []


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_sqlite_on_both_backends(tmp_path: Path) -> None:
    driver = build(f"sqlite:///{tmp_path / 'both.db'}")
    conn = await driver.connect()
    try:
        await driver.ping(conn)
        await driver.execute(conn, "CREATE TABLE b (x INTEGER)", ())
        await driver.begin(conn)
        await driver.execute(conn, "INSERT INTO b VALUES (?)", [1])
        assert driver.in_transaction(conn)
        await driver.rollback(conn)
        assert not driver.in_transaction(conn)
        assert await driver.fetch(conn, "SELECT x FROM b", ()) == []
    finally:
        await driver.close(conn)
    assert not driver.is_alive(conn)
