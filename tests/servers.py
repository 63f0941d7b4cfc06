"""Where the test servers are, and the rule for when one cannot be reached.

Tests that need a server *fail* when ``CI`` is set and the server is down; on a
developer's machine they skip with the reason. ``scripts/servers`` starts them.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

#: the password every test URL carries; a test asserts it never leaks
SECRET = "Hunter2-s3cr3t-Zq9"

POSTGRES_URL = os.environ.get(
    "POOL_TEST_POSTGRES_URL", f"postgresql://postgres:{SECRET}@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("POOL_TEST_MYSQL_URL", f"mysql://pool_test:{SECRET}@127.0.0.1:3306/test")
# a second login to MariaDB with full rights, for the tests' own look at the server
MYSQL_ADMIN_URL = os.environ.get("POOL_TEST_MYSQL_ADMIN_URL", "mysql://root@127.0.0.1:3306/test")


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2):
            return True
    except OSError:
        return False


def require(url: str, what: str) -> None:
    """Skip (or, under CI, fail) the calling test when ``url`` cannot be reached."""
    if reachable(url):
        return
    where = urlsplit(url).netloc.rpartition("@")[2]
    message = f"{what} is not reachable at {where}; run scripts/servers"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)

REPLICA_URL = os.environ.get(
    "POOL_TEST_REPLICA_URL", f"postgresql://postgres:{SECRET}@127.0.0.1:5433/test"
)
PGBOUNCER_URL = os.environ.get(
    "POOL_TEST_PGBOUNCER_URL", f"postgresql://postgres:{SECRET}@127.0.0.1:6433/test"
)

#: each database's drivers: the URL scheme of each, its default driver first
POSTGRES_SCHEMES = {"asyncpg": "postgresql", "psycopg": "postgresql+psycopg"}
MYSQL_SCHEMES = {"aiomysql": "mysql", "asyncmy": "mysql+asyncmy"}


def with_driver(url: str, driver: str) -> str:
    """``url`` (a default-driver URL) with the scheme of ``driver`` ("asyncpg", "psycopg", ...)."""
    scheme, sep, rest = url.partition("://")
    schemes = POSTGRES_SCHEMES if scheme.startswith("postgres") else MYSQL_SCHEMES
    return f"{schemes[driver]}{sep}{rest}"
