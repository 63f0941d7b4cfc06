"""The ASGI benchmark app (benchmarks/asgi): it serves /db and /queries on each pool.

No speed is measured here: the app runs in-process through httpx's ASGI
transport, its lifespan opening and closing the pool, on the PostgreSQL test
server. The runner's parser of wrk's output is checked on a sample.
"""

from __future__ import annotations

import pytest

from pool_benchmarks.asgi.__main__ import parse_wrk, summarise, table, verdict
from pool_benchmarks.asgi.backends import BACKENDS
from tests import servers

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")


@pytest.mark.postgres
@pytest.mark.asyncio
@pytest.mark.parametrize("subject", list(BACKENDS))
async def test_the_app_serves_db_and_queries(subject: str) -> None:
    pytest.importorskip("asyncpg")
    if subject.startswith(("psycopg_pool", "sqlalchemy")):
        pytest.importorskip(subject.split("[")[0])
    servers.require(servers.POSTGRES_URL, "PostgreSQL")
    from pool_benchmarks.asgi.app import create_app
    from pool_benchmarks.asgi.world import ROWS, ensure_world

    await ensure_world(servers.POSTGRES_URL)
    app = create_app(subject, servers.POSTGRES_URL, 2)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            one = await client.get("/db")
            assert one.status_code == 200
            row = one.json()
            assert set(row) == {"id", "randomNumber"} and 1 <= row["id"] <= ROWS
            many = await client.get("/queries")
            assert many.status_code == 200
            rows = many.json()
            assert len(rows) == 20
            assert all(1 <= r["id"] <= ROWS and 1 <= r["randomNumber"] <= ROWS for r in rows)
            assert len((await client.get("/queries?queries=3")).json()) == 3
            assert len((await client.get("/queries?queries=x")).json()) == 1
        if subject.startswith("pool"):
            stats = app.state.backend.db.stats()
            assert stats.size == 2 and stats.in_use == 0


WRK_SAMPLE = """\
Running 6s test @ http://127.0.0.1:8765/db
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    13.68ms   10.50ms   1.20s    91.99%
    Req/Sec     2.51k     1.57k    6.25k    75.00%
  Latency Distribution
     50%  950.00us
     75%   18.49ms
     90%   22.76ms
     99%    1.10s
  25113 requests in 5.02s, 3.73MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   5006.37
Transfer/sec:    761.60KB
"""
# wrk pads a duration in seconds with a space ("1.10s "): keep that in the sample
WRK_SAMPLE = WRK_SAMPLE.replace("1.10s\n", "1.10s \n")


def test_parse_wrk() -> None:
    got = parse_wrk(WRK_SAMPLE)
    assert got["rps"] == 5006.37 and got["requests"] == 25113
    assert got["seconds"] == pytest.approx(5.02)
    assert got["p50_ms"] == pytest.approx(0.95) and got["p99_ms"] == pytest.approx(1100)
    assert got["p75_ms"] == pytest.approx(18.49)
    assert got["mean_ms"] == pytest.approx(13.68) and got["max_ms"] == pytest.approx(1200)
    assert got["non_2xx"] == 4 and got["socket_errors"] == 3
    assert (got["connect_errors"], got["read_errors"], got["write_errors"]) == (0, 2, 0)
    assert got["timeout_errors"] == 1
    with pytest.raises(ValueError):
        parse_wrk("wrk: connection refused")


# wrk 4.1.0's real output (Debian's) when the server stops 1.5 s into a 4 s run:
# the refused reconnects are counted as write errors, and there are 180,544 of them
WRK_STOPPED = """\
Running 4s test @ http://127.0.0.1:18777/db
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    42.55ms    7.49ms  59.17ms   94.89%
    Req/Sec    75.52     28.36   121.00     54.84%
  Latency Distribution
     50%   43.98ms
     75%   44.04ms
     90%   44.31ms
     99%   48.31ms
  235 requests in 4.10s, 25.93KB read
  Socket errors: connect 0, read 9, write 180544, timeout 0
Requests/sec:     57.26
Transfer/sec:      6.32KB
"""


def test_parse_wrk_stopped_server() -> None:
    got = parse_wrk(WRK_STOPPED)
    assert got["requests"] == 235 and got["non_2xx"] == 0
    assert (got["connect_errors"], got["read_errors"], got["write_errors"]) == (0, 9, 180544)
    assert got["socket_errors"] == 9 + 180544


def test_table_and_verdict() -> None:
    def figures(rps: float, p99: float) -> dict[str, object]:
        one = {**parse_wrk(WRK_SAMPLE), "rps": rps, "p99_ms": p99, "cpu_us_per_request": 80.0}
        return {"/db": one, "/queries": dict(one)}

    doc = {
        "subjects": {
            "pool": {"style": "both", "summary": summarise([figures(100, 5), figures(110, 7)])},
            "asyncpg[lfl]": {"style": "lfl", "summary": summarise([figures(90, 9)])},
            "asyncpg": {"style": "default", "summary": summarise([figures(120, 4)])},
        }
    }
    assert doc["subjects"]["pool"]["summary"]["/db"]["rps"] == 105
    assert doc["subjects"]["pool"]["summary"]["/db"]["rps_spread"] == pytest.approx(5 / 105)
    text = table(doc)
    assert "| pool | both | 105 ±5% | 1.00x |" in text
    assert "| asyncpg | default | 120 | 1.14x |" in text
    lines = verdict(doc)
    assert lines[0].startswith("/db: req/s at least level with every like-for-like peer: met")
    assert lines[1].startswith("/db: the lowest p99 of all: missed") and "asyncpg 4.0" in lines[1]


def test_several_runs_pool_their_rounds() -> None:
    from pool_benchmarks.asgi.__main__ import pooled

    def figures(rps: float) -> dict[str, object]:
        one = {**parse_wrk(WRK_SAMPLE), "rps": rps, "cpu_us_per_request": 80.0}
        return {"/db": one, "/queries": dict(one)}

    def run(*rps: float) -> dict[str, object]:
        rounds = [figures(r) for r in rps]
        return {"meta": {}, "subjects": {"pool": {"style": "both", "rounds": rounds,
                                                  "summary": summarise(rounds)}}}

    doc = pooled([run(100, 200, 300), run(110, 120, 130), run(90, 95, 99)])
    assert len(doc["subjects"]["pool"]["rounds"]) == 9
    assert doc["subjects"]["pool"]["summary"]["/db"]["rps"] == 110  # the median of all nine
