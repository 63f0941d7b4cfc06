"""Coming from another pool: its keywords get our name, or why they do not apply.

A user of asyncpg, psycopg_pool, SQLAlchemy or aiomysql passes ``min_size=``
or ``pool_recycle=`` out of habit. Each is a :class:`pool.ConfigError` at
``Pool()`` that names the library it comes from and says what to write here;
``close()`` is there under the name every peer uses; a driver of one's own
plugs in with a URL that carries pool settings only, and a driver that lacks
part of :class:`pool.Driver` fails at ``Pool()``, naming what it lacks.
"""

from __future__ import annotations

import inspect
from typing import Any

import anyio
import pytest

import pool
from pool._config import MIGRATIONS, POOL_PARAMETERS
from pool._driver import REQUIRED_METHODS
from tests.fakedriver import FakeDriver

URL = "sqlite:///:memory:"

# keyword -> (the library it comes from, a piece of the advice that must be there)
HINTS = {
    "min_size": ("asyncpg", "await db.connect() opens one at start"),
    "minsize": ("aiomysql", "await db.connect() opens one at start"),
    "max_size": ("psycopg_pool", "did you mean 'connection_limit'?"),
    "maxsize": ("aiomysql", "did you mean 'connection_limit'?"),
    "pool_size": ("SQLAlchemy", "did you mean 'connection_limit'?"),
    "max_overflow": ("SQLAlchemy", "there is no overflow: connection_limit is the hard ceiling"),
    "timeout": ("psycopg_pool", "did you mean 'pool_timeout'?"),
    "command_timeout": ("asyncpg", "did you mean 'socket_timeout'?"),
    "max_lifetime": ("psycopg_pool", "did you mean 'max_connection_lifetime'?"),
    "pool_recycle": ("SQLAlchemy", "did you mean 'max_connection_lifetime'?"),
    "max_queries": ("asyncpg", "max_connection_lifetime replaces them by age"),
    "max_idle": ("psycopg_pool", "did you mean 'max_idle_connection_lifetime'?"),
    "max_inactive_connection_lifetime": (
        "asyncpg", "did you mean 'max_idle_connection_lifetime'?",
    ),
    "pool_pre_ping": ("SQLAlchemy", "health_check_after=0 pings before every lending"),
    "ssl": ("asyncpg", "connect_args={'ssl': context}"),
    "server_settings": ("asyncpg", "connect_args={'server_settings': {...}}"),
    "init": ("asyncpg", "did you mean 'configure'?"),
    "setup": ("asyncpg", "did you mean 'check'?"),
    "kwargs": ("psycopg_pool", "did you mean 'connect_args'?"),
    "connection_class": ("asyncpg", "connect_args={'connection_class': ...}"),
    "record_class": ("asyncpg", "connect_args={'record_class': ...}"),
    "open": ("psycopg_pool", "Pool() opens nothing"),
    "num_workers": ("psycopg_pool", "there are no worker threads"),
    "reconnect_timeout": ("psycopg_pool", "connects are not retried in the background"),
    "pool_reset_on_return": ("SQLAlchemy", "did you mean 'reset_session'?"),
    "loop": ("asyncpg", "the pool runs on the running event loop"),
}


def test_every_hint_is_tested() -> None:
    assert set(HINTS) == set(MIGRATIONS)


@pytest.mark.parametrize("name", sorted(HINTS))
def test_a_keyword_from_another_pool_says_what_to_use(name: str) -> None:
    library, advice = HINTS[name]
    with pytest.raises(pool.ConfigError) as caught:
        pool.Pool(URL, **{name: 5})
    err = caught.value
    assert err.parameter == name
    message = str(err)
    assert message.startswith(f"{name} is not a pool parameter (from ")
    assert library in message
    assert advice in message


@pytest.mark.parametrize("name", sorted(MIGRATIONS))
def test_every_name_a_hint_points_to_is_one_the_pool_takes(name: str) -> None:
    _, ours, _ = MIGRATIONS[name]
    keywords = set(inspect.signature(pool.Pool).parameters) | {"connect_args"}
    assert ours is None or ours in POOL_PARAMETERS | keywords
    assert name not in POOL_PARAMETERS | keywords


@pytest.mark.parametrize(
    "name", ["min_size", "max_size", "pool_size", "max_overflow", "pool_recycle",
             "pool_pre_ping", "max_lifetime", "max_idle", "max_inactive_connection_lifetime",
             "max_queries"],
)
def test_a_pool_setting_of_another_pool_in_the_url_gets_the_hint_too(name: str) -> None:
    # (in a URL, ?ssl= or ?timeout= may be a driver's own parameter: those are
    # the driver's to judge, but these name a pool setting in every library)
    with pytest.raises(pool.ConfigError, match="is not a pool parameter \\(from ") as caught:
        pool.Pool(f"postgresql://app@db.example/shop?{name}=5")
    assert caught.value.parameter == name


def test_a_misspelling_still_gets_a_did_you_mean() -> None:
    with pytest.raises(pool.ConfigError, match="did you mean 'connection_limit'"):
        pool.Pool(URL, conection_limit=3)


class TestClose:
    """``close()``: the name asyncpg's, psycopg_pool's and SQLAlchemy's users call."""

    def test_close_takes_what_disconnect_takes(self) -> None:
        assert inspect.signature(pool.Pool.close) == inspect.signature(pool.Pool.disconnect)
        assert "disconnect" in (pool.Pool.close.__doc__ or "")

    @pytest.mark.anyio
    async def test_close_closes_every_connection_and_the_pool_reopens(self) -> None:
        driver = FakeDriver()
        db = pool.Pool("fake://x?connection_limit=2", driver=driver)
        async with db.acquire(), db.acquire():
            pass
        assert db.stats().size == 2
        await db.close()
        assert db.stats().size == 0
        assert driver.connects == len(driver.closed)
        assert await db.fetchval("SELECT 1") is not None  # lazily open again
        await db.close(grace=0.1)
        assert driver.connects == len(driver.closed)

    @pytest.mark.anyio
    async def test_close_runs_what_a_subclass_made_of_disconnect(self) -> None:
        seen: list[float] = []

        class Double(pool.Pool[Any]):
            async def disconnect(self, *, grace: float = 0.0) -> None:
                seen.append(grace)
                await super().disconnect(grace=grace)

        db = Double("fake://x", driver=FakeDriver())
        await db.close(grace=0.5)
        assert seen == [0.5]

    def test_acquire_documents_what_timeout_none_means(self) -> None:
        doc = pool.Pool.acquire.__doc__ or ""
        assert "pool_timeout" in doc and "timeout=0" in doc


class TestCustomDriver:
    @pytest.mark.anyio
    @pytest.mark.parametrize(
        "url",
        ["postgresql://?connection_limit=3", "mysql://?connection_limit=3",
         "mariadb://?connection_limit=3", "anything://?connection_limit=3"],
    )
    async def test_the_url_may_carry_pool_settings_only(self, url: str) -> None:
        driver = FakeDriver()
        db = pool.Pool(url, driver=driver)
        assert db.config.connection_limit == 3
        async with db:
            assert await db.fetchval("SELECT 1") is not None
        assert driver.connects == len(driver.closed)

    def test_without_a_driver_the_url_still_needs_a_host(self) -> None:
        with pytest.raises(pool.ConfigError, match="names no host"):
            pool.Pool("postgresql://?connection_limit=3")

    def test_pool_settings_in_the_url_are_still_checked(self) -> None:
        with pytest.raises(pool.ConfigError, match="connection_limit"):
            pool.Pool("postgresql://?connection_limit=abc", driver=FakeDriver())

    @pytest.mark.parametrize("missing", REQUIRED_METHODS)
    def test_a_driver_missing_a_method_is_a_config_error_naming_it(self, missing: str) -> None:
        members = {
            name: getattr(FakeDriver, name) for name in REQUIRED_METHODS if name != missing
        }
        Partial = type("PartialDriver", (), {"scheme": "partial", **members})
        with pytest.raises(pool.ConfigError) as caught:
            pool.Pool("partial://?connection_limit=1", driver=Partial())
        err = caught.value
        assert err.parameter == "driver"
        assert err.value == "PartialDriver"
        assert f"it has no {missing}" in str(err)
        assert "pool.Driver" in str(err)

    def test_every_missing_method_is_named_at_once(self) -> None:
        class Bare:
            scheme = "bare"

            async def connect(self) -> object:
                return object()

        with pytest.raises(pool.ConfigError) as caught:
            pool.Pool("bare://", driver=Bare())
        for name in REQUIRED_METHODS:
            if name != "connect":
                assert name in caught.value.reason

    def test_a_driver_without_a_scheme_is_named_too(self) -> None:
        members = {name: getattr(FakeDriver, name) for name in REQUIRED_METHODS}
        NoScheme = type("NoScheme", (), members)
        with pytest.raises(pool.ConfigError, match=r"it has no scheme \(a str\)"):
            pool.Pool("x://", driver=NoScheme())

    def test_a_driver_class_instead_of_an_instance_is_a_config_error(self) -> None:
        with pytest.raises(pool.ConfigError, match=r"not a class: pass FakeDriver\(\.\.\.\)"):
            pool.Pool("fake://x", driver=FakeDriver)  # type: ignore[arg-type]

    def test_optional_members_may_be_absent(self) -> None:
        # executemany, server_max_connections, is_clean, host_of ...: asked for
        # with getattr, or only when used
        members = {name: getattr(FakeDriver, name) for name in REQUIRED_METHODS}
        Minimal = type("Minimal", (), {"scheme": "minimal", **members})
        driver: Any = Minimal()
        db = pool.Pool("minimal://", driver=driver)
        assert db.config.scheme == "minimal"

    @pytest.mark.anyio
    async def test_a_minimal_driver_serves_queries(self) -> None:
        # FakeDriver's methods on a class with nothing else: what the engine
        # calls without asking first is exactly REQUIRED_METHODS (and scheme)
        members = {name: getattr(FakeDriver, name) for name in REQUIRED_METHODS}
        own = {"__init__": FakeDriver.__init__, "_run": FakeDriver._run}  # its helpers
        Minimal = type("Minimal", (), {"scheme": "minimal", **own, **members})
        db = pool.Pool("minimal://?connection_limit=2", driver=Minimal())
        async with db:
            async with db.transaction() as conn:
                assert conn is not None
            assert await db.fetchval("SELECT 1") is not None
        with anyio.fail_after(5):
            await db.close()
