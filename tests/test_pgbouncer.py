"""PgBouncer in transaction mode in front of the test cluster (scripts/servers, port 6433).

Each PostgreSQL driver's prepared statements (asyncpg's statement cache,
psycopg's prepare_threshold) break there; ``pgbouncer=true`` turns them off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

import pool
from tests import servers

pytestmark = pytest.mark.asyncio

TASKS, QUERIES = 200, 20
#: each driver's query of two arguments
SUM = {"asyncpg": "SELECT $1::int + $2::int", "psycopg": "SELECT %s::int + %s::int"}
each_driver = pytest.mark.parametrize("pg_driver", list(servers.POSTGRES_SCHEMES))


def bouncer_url(driver: str, query: str = "") -> str:
    servers.require(servers.PGBOUNCER_URL, "PgBouncer")
    return servers.with_driver(servers.PGBOUNCER_URL, driver) + query


async def hammer(db: pool.Pool[Any], driver: str) -> tuple[int, int, int]:
    """200 tasks x 20 parameterised queries; (ok, errors, wrong answers)."""
    ok = errors = wrong = 0

    async def task(t: int) -> None:
        nonlocal ok, errors, wrong
        for q in range(QUERIES):
            try:
                value = await db.fetchval(SUM[driver], t, q)
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
    @each_driver
    async def test_transaction_mode_gives_zero_errors_with_pgbouncer_true(
        self, pg_driver: str, seen: Callable[[object], None]
    ) -> None:
        db: pool.Pool[Any] = pool.Pool(
            bouncer_url(pg_driver, "?pgbouncer=true"), connection_limit=10
        )
        seen(db)
        async with db:
            ok, errors, wrong = await hammer(db, pg_driver)
        assert (ok, errors, wrong) == (TASKS * QUERIES, 0, 0)

    @each_driver
    async def test_without_the_flag_prepared_statements_break(
        self, pg_driver: str, seen: Callable[[object], None], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """What README reports: prepared statements do not survive transaction mode."""
        db: pool.Pool[Any] = pool.Pool(bouncer_url(pg_driver), connection_limit=10)
        seen(db)
        async with db:
            ok, errors, wrong = await hammer(db, pg_driver)
        with capsys.disabled():
            print(
                f"\nwithout pgbouncer=true ({pg_driver}): {ok} ok, {errors} errors,"
                f" {wrong} wrong answers"
            )
        assert errors + wrong > 0
