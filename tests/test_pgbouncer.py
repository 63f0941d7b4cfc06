"""PgBouncer in transaction mode in front of the test cluster (scripts/servers, port 6433)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

import pool
from tests import servers

pytestmark = pytest.mark.asyncio

TASKS, QUERIES = 200, 20


async def hammer(db: pool.Pool[Any]) -> tuple[int, int, int]:
    """200 tasks x 20 parameterised queries; (ok, errors, wrong answers)."""
    ok = errors = wrong = 0

    async def task(t: int) -> None:
        nonlocal ok, errors, wrong
        for q in range(QUERIES):
            try:
                value = await db.fetchval("SELECT $1::int + $2::int", t, q)
            except Exception:
                errors += 1
            else:
                if value == t + q:
                    ok += 1
                else:
                    wrong += 1

    async with anyio.create_task_group() as tg:
        for t in range(TASKS):
            tg.start_soon(task, t)
    return ok, errors, wrong


class TestPgBouncer:
    async def test_transaction_mode_gives_zero_errors_with_pgbouncer_true(
        self, seen: Callable[[object], None]
    ) -> None:
        servers.require(servers.PGBOUNCER_URL, "PgBouncer")
        db: pool.Pool[Any] = pool.Pool(
            servers.PGBOUNCER_URL + "?pgbouncer=true", connection_limit=10
        )
        seen(db)
        async with db:
            ok, errors, wrong = await hammer(db)
        assert (ok, errors, wrong) == (TASKS * QUERIES, 0, 0)

    async def test_without_the_flag_prepared_statements_break(
        self, seen: Callable[[object], None], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """What README reports: asyncpg's statement cache does not survive transaction mode."""
        servers.require(servers.PGBOUNCER_URL, "PgBouncer")
        db: pool.Pool[Any] = pool.Pool(servers.PGBOUNCER_URL, connection_limit=10)
        seen(db)
        async with db:
            ok, errors, wrong = await hammer(db)
        with capsys.disabled():
            print(f"\nwithout pgbouncer=true: {ok} ok, {errors} errors, {wrong} wrong answers")
        assert errors + wrong > 0
