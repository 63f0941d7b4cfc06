"""poolbench: this pool beside its peers, on the same workloads, in one process.

Run it as ``poolbench`` or ``python -m pool_benchmarks``::

    poolbench                                   # SQLite: + aiosqlite, SQLAlchemy; < 1 min
    poolbench --full                            # SQLite: every workload, this pool only
    poolbench --url postgresql://app@db/bench   # + asyncpg, psycopg_pool, SQLAlchemy
    poolbench --url mysql://root@db/bench       # + aiomysql
    poolbench --like-for-like                   # only peers making this pool's round trips
    poolbench --quick --json out.json --plot out.png

The method is HikariCP's: the same workloads run on every pool, in alternating
order over several rounds; each figure is the median with its spread, and the
results are ratios (to this pool, and to the physical limit: raw connections
with no pool at all). See ``python -m pool_benchmarks --help``.
"""
