"""TLS: ``sslmode=require`` encrypts every pooled connection (the cluster has ssl on)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import pool
from tests.faults.conftest import FaultDB, new_tag

pytestmark = pytest.mark.anyio

SSL_OF_THIS_SESSION = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg is asyncio only


class TestSslMode:
    @pytest.mark.parametrize(("sslmode", "encrypted"), [("require", True), ("disable", False)])
    async def test_the_session_is_encrypted_as_sslmode_says(
        self, faultdb: FaultDB, seen: Callable[[object], None], sslmode: str, encrypted: bool
    ) -> None:
        db: pool.Pool[Any] = pool.Pool(
            faultdb.pool_url(new_tag(), sslmode=sslmode), connection_limit=2
        )
        seen(db)
        async with db:
            assert await db.fetchval(SSL_OF_THIS_SESSION) is encrypted
            # every connection, not just the first
            a, b = await db.acquire(), await db.acquire()
            for conn in (a, b):
                assert await conn.fetchval(SSL_OF_THIS_SESSION) is encrypted
                await db.release(conn)
