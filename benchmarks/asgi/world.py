"""The ``world`` table: 10,000 rows of (id, randomnumber), created and filled once."""

from __future__ import annotations

import random
from typing import Any

import pool

__all__ = ["ROWS", "ensure_world"]

ROWS = 10_000


async def ensure_world(url: str) -> bool:
    """Create and fill ``world`` unless it already holds its 10,000 rows; True if it did."""
    # on the default driver (asyncpg, $1 placeholders), whichever one the run is about
    url = "postgresql" + url[url.index("://"):] if "+" in url.split("://", 1)[0] else url
    db: pool.Pool[Any] = pool.Pool(url, connection_limit=1)
    async with db:
        await db.execute(
            "CREATE TABLE IF NOT EXISTS world "
            "(id integer PRIMARY KEY, randomnumber integer NOT NULL)"
        )
        count = await db.fetchval("SELECT count(*) FROM world WHERE id BETWEEN 1 AND $1", ROWS)
        if count == ROWS:
            return False
        rng = random.Random(13)
        async with db.transaction() as conn:
            await conn.execute("TRUNCATE world")
            await conn.executemany(
                "INSERT INTO world (id, randomnumber) VALUES ($1, $2)",
                [(i, rng.randint(1, ROWS)) for i in range(1, ROWS + 1)],
            )
        await db.execute("ANALYZE world")
        return True
