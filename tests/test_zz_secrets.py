"""Runs last: the test password appears in nothing the run produced.

tests/conftest.py collects every log record (DEBUG included), the captured
output and failure report of every test, and the reprs and messages tests
hand to the ``seen`` fixture. This test also makes some of its own, so that it
proves something even when run alone.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

import pool
from tests import servers
from tests.conftest import SEEN

pytestmark = pytest.mark.asyncio


async def test_the_password_appears_in_no_output_of_the_run() -> None:
    # Make some output of our own: reprs, a config, a start-up line, a connect error.
    servers.require(servers.POSTGRES_URL, "PostgreSQL")
    db: pool.Pool[Any] = pool.Pool(servers.POSTGRES_URL, connection_limit=2)
    SEEN.extend((repr(db), str(db), repr(db.config), repr(db._driver)))
    async with db:
        SEEN.append(repr(db.stats()))
    refused: pool.Pool[Any] = pool.Pool(
        servers.POSTGRES_URL.replace(":5432/", ":1/"), connect_timeout=1
    )
    with pytest.raises(pool.ConnectError) as info:
        await refused.connect()
    SEEN.extend((str(info.value), repr(info.value), str(info.value.__cause__)))
    try:
        pool.Pool(servers.POSTGRES_URL + "?conection_limit=3")
    except pool.ConfigError as exc:
        SEEN.append(str(exc))
    logging.getLogger("pool").info("collector check %s", db)

    # The collector works: it holds log lines and redacted URLs...
    assert any("Starting a postgresql pool" in text for text in SEEN)
    assert any("postgres:***@" in text for text in SEEN)
    # ... and the password is in none of it.
    leaks = [text for text in SEEN if servers.SECRET in text]
    example = leaks[0][:300].replace(servers.SECRET, "<the password>") if leaks else ""
    assert not leaks, f"{len(leaks)} outputs hold the password, e.g. {example!r}"
