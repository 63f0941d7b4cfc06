"""Settings: URL parameters, keyword overrides, defaults and every way to get them wrong."""

from __future__ import annotations

import psutil
import pytest

import pool
from pool._config import parse
from tests.fakedriver import FakeDriver

BASE = "postgresql://app:pw@127.0.0.1:5432/shop"

# (url, overrides, the parameter the error must name)
BAD_INPUTS: list[tuple[str, dict[str, object], str]] = [
    ("", {}, "url"),
    ("   ", {}, "url"),
    ("redis://127.0.0.1:6379/0", {}, "url"),
    ("http://example/db", {}, "url"),
    ("127.0.0.1:5432/shop", {}, "url"),
    ("postgresql://", {}, "url"),
    ("postgresql://127.0.0.1:99999/shop", {}, "url"),
    ("postgresql://127.0.0.1:port/shop", {}, "url"),
    (BASE + "?connection_limit=abc", {}, "connection_limit"),
    (BASE + "?connection_limit=-3", {}, "connection_limit"),
    (BASE + "?connection_limit=0", {}, "connection_limit"),
    (BASE + "?connection_limit=2.5", {}, "connection_limit"),
    (BASE + "?connection_limit=NaN", {}, "connection_limit"),
    (BASE + "?connection_limit=99999999999999999999", {}, "connection_limit"),
    (BASE + "?connection_limit=", {}, "connection_limit"),
    (BASE + "?connection_limit=5&connection_limit=6", {}, "connection_limit"),
    (BASE + "?pool_timeout=abc", {}, "pool_timeout"),
    (BASE + "?pool_timeout=-1", {}, "pool_timeout"),
    (BASE + "?pool_timeout=nan", {}, "pool_timeout"),
    (BASE + "?pool_timeout=inf", {}, "pool_timeout"),
    (BASE + "?pool_timeout=1e12", {}, "pool_timeout"),
    (BASE + "?connect_timeout=-0.5", {}, "connect_timeout"),
    (BASE + "?socket_timeout=soon", {}, "socket_timeout"),
    (BASE + "?max_connection_lifetime=-1", {}, "max_connection_lifetime"),
    (BASE + "?max_idle_connection_lifetime=forever", {}, "max_idle_connection_lifetime"),
    (BASE + "?max_waiting=-1", {}, "max_waiting"),
    (BASE + "?max_waiting=1.5", {}, "max_waiting"),
    (BASE + "?conection_limit=5", {}, "conection_limit"),
    (BASE + "?pool_timout=5", {}, "pool_timout"),
    (BASE + "?connection_limt=5", {}, "connection_limt"),
    (BASE, {"connection_limit": "x"}, "connection_limit"),
    (BASE, {"connection_limit": 0}, "connection_limit"),
    (BASE, {"connection_limit": 7.0}, "connection_limit"),
    (BASE, {"connection_limit": True}, "connection_limit"),
    (BASE, {"pool_timeout": float("nan")}, "pool_timeout"),
    (BASE, {"pool_timeout": [1]}, "pool_timeout"),
    (BASE, {"pool_timout": 3}, "pool_timout"),
    (BASE, {"pool_size": 3}, "pool_size"),
    ("mysql://root@127.0.0.1:3306/test?max_waiting=many", {}, "max_waiting"),
    ("sqlite:///tmp/x.db?connection_limit=-1", {}, "connection_limit"),
]


class TestBadInputs:
    def test_the_table_is_large_enough(self) -> None:
        assert len(BAD_INPUTS) >= 25

    @pytest.mark.parametrize(("url", "overrides", "parameter"), BAD_INPUTS)
    def test_each_bad_input_is_a_config_error_naming_the_parameter(
        self, url: str, overrides: dict[str, object], parameter: str
    ) -> None:
        with pytest.raises(pool.ConfigError) as info:
            pool.Pool(url, **overrides)
        err = info.value
        assert isinstance(err, ValueError)
        assert err.parameter == parameter
        assert str(err).startswith(parameter)
        assert "pw@" not in str(err)

    @pytest.mark.parametrize(
        ("name", "suggestion"),
        [("conection_limit", "connection_limit"), ("pool_timout", "pool_timeout"),
         ("max_idle_conection_lifetime", "max_idle_connection_lifetime"),
         ("pool_size", "connection_limit")],
    )
    def test_misspelling_suggests_the_right_name(self, name: str, suggestion: str) -> None:
        with pytest.raises(pool.ConfigError, match=f"did you mean '{suggestion}'"):
            pool.Pool(f"{BASE}?{name}=3")

    def test_a_url_that_is_not_a_string_is_a_type_error(self) -> None:
        with pytest.raises(TypeError):
            pool.Pool(None)  # type: ignore[arg-type]


class TestDefaults:
    def test_default_connection_limit_is_physical_cores_times_two_plus_one(self) -> None:
        physical = psutil.cpu_count(logical=False) or psutil.cpu_count()
        assert pool.default_connection_limit() == physical * 2 + 1

    def test_a_pool_without_a_limit_uses_the_default(self) -> None:
        db = pool.Pool("fake://x", driver=FakeDriver())
        assert db.config.connection_limit == pool.default_connection_limit()
        assert db.stats().limit == pool.default_connection_limit()

    def test_prisma_defaults(self) -> None:
        cfg = parse(BASE, {}).config
        assert cfg.pool_timeout == 10
        assert cfg.connect_timeout == 5
        assert cfg.socket_timeout is None
        assert cfg.max_connection_lifetime is None
        assert cfg.max_idle_connection_lifetime == 300
        assert cfg.max_waiting == 0


class TestUrl:
    def test_pool_parameters_are_removed_before_the_driver(self) -> None:
        parsed = parse(BASE + "?connection_limit=4&sslmode=disable&pool_timeout=2", {})
        assert parsed.driver_url == "postgresql://app:pw@127.0.0.1:5432/shop?sslmode=disable"
        assert parsed.config.connection_limit == 4
        assert parsed.config.pool_timeout == 2

    def test_keywords_win_over_the_url(self) -> None:
        cfg = parse(BASE + "?connection_limit=4", {"connection_limit": 6}).config
        assert cfg.connection_limit == 6

    def test_zero_means_none_for_optional_timeouts(self) -> None:
        cfg = parse(BASE + "?connect_timeout=0&max_idle_connection_lifetime=0", {}).config
        assert cfg.connect_timeout is None
        assert cfg.max_idle_connection_lifetime is None

    def test_config_repr_has_no_password(self) -> None:
        cfg = parse(BASE, {}).config
        assert "pw" not in repr(cfg).replace("pool_timeout", "")
        assert cfg.url == "postgresql://app:***@127.0.0.1:5432/shop"

    def test_schemes_are_case_insensitive_and_aliased(self) -> None:
        assert parse("POSTGRES://h/db", {}).config.scheme == "postgres"
        assert parse("mariadb://h/db", {}).config.scheme == "mariadb"


class TestPublicSurface:
    def test_all_names_import_and_say_they_are_from_pool(self) -> None:
        for name in pool.__all__:
            obj = getattr(pool, name)
            assert getattr(obj, "__module__", "pool") == "pool", name

    def test_nothing_public_is_missing_from_all(self) -> None:
        public = {n for n in vars(pool) if not n.startswith("_")}
        assert public == set(pool.__all__)


class TestDriverLoading:
    def test_importing_pool_imports_no_driver_library(self) -> None:
        import subprocess
        import sys

        code = (
            "import sys, pool; "
            "loaded = [m for m in ('asyncpg', 'aiomysql', 'pymysql', 'pool_drivers.postgres', "
            "'pool_drivers.mysql') if m in sys.modules]; "
            "pool.Pool('sqlite:///x.db'); "
            "loaded += [m for m in ('asyncpg', 'aiomysql') if m in sys.modules]; "
            "print(loaded)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]"

    def test_a_missing_driver_package_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import sys

        monkeypatch.setitem(sys.modules, "asyncpg", None)  # as if not installed
        monkeypatch.delitem(sys.modules, "pool_drivers.postgres", raising=False)
        with pytest.raises(pool.ConfigError, match=r"pip install 'pool-engine\[postgres\]'"):
            pool.Pool("postgresql://app@127.0.0.1/shop")
