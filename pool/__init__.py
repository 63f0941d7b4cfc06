"""pool: an async connection pool engine with Prisma's semantics, on anyio.

>>> import pool
>>> db = pool.Pool("postgresql://app@localhost/shop?connection_limit=5")
>>> async with db:
...     rows = await db.fetch("SELECT 1")
"""

from ._config import PoolConfig, default_connection_limit
from ._driver import Driver
from ._errors import (
    ConfigError,
    ConnectError,
    Holder,
    PoolClosedError,
    PoolError,
    PoolTimeoutError,
    TooManyWaitersError,
)
from ._lifecycle import handle_signals, recommended_connection_limit, shared
from ._metrics import instrument
from ._pool import Pool
from ._queue import Lane
from ._replicated import Replicated, ReplicatedStats
from ._stats import LaneStats, PoolStats

__all__ = [
    "ConfigError",
    "ConnectError",
    "Driver",
    "Holder",
    "Lane",
    "LaneStats",
    "Pool",
    "PoolClosedError",
    "PoolConfig",
    "PoolError",
    "PoolStats",
    "PoolTimeoutError",
    "Replicated",
    "ReplicatedStats",
    "TooManyWaitersError",
    "default_connection_limit",
    "handle_signals",
    "instrument",
    "recommended_connection_limit",
    "shared",
]

for _name in (
    "Pool", "PoolConfig", "Driver", "Lane", "Replicated", "default_connection_limit",
    "handle_signals", "instrument", "recommended_connection_limit", "shared",
):
    globals()[_name].__module__ = "pool"
del _name
