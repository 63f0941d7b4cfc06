"""Runs last: the test password appears in nothing the run produced.

tests/conftest.py collects every log record (DEBUG included), the captured
output and failure report of every test, and the reprs and messages tests
hand to the ``seen`` fixture. This test also makes some of its own, on each
server driver (asyncpg, psycopg, aiomysql, asyncmy), so that it proves
something even when run alone.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import pytest

import pool
from tests import servers
from tests.conftest import SEEN

pytestmark = pytest.mark.asyncio

#: (the default driver's URL, the server's name, the pool's scheme, the URL's user)
POSTGRES = (servers.POSTGRES_URL, "PostgreSQL", "postgresql", "postgres")
MYSQL = (servers.MYSQL_URL, "MariaDB", "mysql", "pool_test")


@pytest.mark.parametrize(
    ("server", "driver"),
    [(POSTGRES, "asyncpg"), (POSTGRES, "psycopg"), (MYSQL, "aiomysql"), (MYSQL, "asyncmy")],
    ids=["asyncpg", "psycopg", "aiomysql", "asyncmy"],
)
async def test_the_password_appears_in_no_output_of_the_run(
    server: tuple[str, str, str, str], driver: str
) -> None:
    # Make some output of our own: reprs, a config, a start-up line, a connect error.
    default_url, name, scheme, user = server
    servers.require(default_url, name)
    url = servers.with_driver(default_url, driver)
    db: pool.Pool[Any] = pool.Pool(url, connection_limit=2)
    SEEN.extend((repr(db), str(db), repr(db.config), repr(db._driver)))
    async with db:
        SEEN.append(repr(db.stats()))
    port = urlsplit(url).port
    refused: pool.Pool[Any] = pool.Pool(url.replace(f":{port}/", ":1/"), connect_timeout=1)
    with pytest.raises(pool.ConnectError) as info:
        await refused.connect()
    await refused.disconnect()
    SEEN.extend((str(info.value), repr(info.value), str(info.value.__cause__)))
    try:
        pool.Pool(url + "?conection_limit=3")
    except pool.ConfigError as exc:
        SEEN.append(str(exc))
    logging.getLogger("pool").info("collector check %s", db)

    # The collector works: it holds log lines and redacted URLs...
    assert any(f"Starting a {scheme} pool" in text for text in SEEN)
    assert any(f"{user}:***@" in text for text in SEEN)
    # ... and the password is in none of it.
    leaks = [text for text in SEEN if servers.SECRET in text]
    example = leaks[0][:300].replace(servers.SECRET, "<the password>") if leaks else ""
    assert not leaks, f"{len(leaks)} outputs hold the password, e.g. {example!r}"
