"""Failover on a real two-node cluster: a switchover, a crash, the old primary back as a standby.

``scripts/hacluster`` runs a primary on 5440 and a streaming hot standby on
5441. Each test resets it to that state first (bounded), then fails it over
under a pool built from a multi-host URL with ``target_session_attrs=read-write``.
Every scenario runs twice: on plain asyncio and on uvloop; the writes through
a switchover and a crash run on psycopg too (on asyncio). Under CI a cluster
that cannot be built fails the tests; elsewhere it skips them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

import pool
from tests.faults import hacluster as ha
from tests.faults.conftest import SERVER_TESTS, unavailable
from tests.faults.helpers import is_driver_error

#: the bound on a reset of the cluster to its known state
RESET_BOUND = 30.0


@pytest.fixture(scope="module")
def cluster() -> ha.HACluster:
    c = ha.HACluster()
    try:
        c.must("init", timeout=120)
    except ha.Unavailable as exc:
        unavailable(f"the failover cluster cannot be built: {exc}")
    return c


@pytest.fixture
def fresh(cluster: ha.HACluster, request: pytest.FixtureRequest) -> ha.HACluster:
    """The cluster in its known state: primary on 5440, standby on 5441, streaming."""
    try:
        took = cluster.reset()
    except ha.Unavailable as exc:
        unavailable(f"the failover cluster cannot be reset: {exc}")
    assert took < RESET_BOUND, f"the reset took {took:.1f}s"
    SERVER_TESTS.append(request.node.nodeid)
    return cluster


@pytest.fixture(params=ha.LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


#: the writes through a failover: asyncpg on each loop, and psycopg (asyncio only)
each_write_run = pytest.mark.parametrize(
    ("loop", "pg_driver"),
    [*((loop, "asyncpg") for loop in ha.LOOPS), ("asyncio", "psycopg")],
    ids=[*ha.LOOPS, "psycopg-asyncio"],
)


def check_failures(run: ha.WriteRun) -> None:
    """Only the driver's errors or ConnectError; nothing waited out pool_timeout."""
    for w in run.writes:
        if w.error is None:
            continue
        assert not isinstance(w.error, pool.PoolTimeoutError), f"waited out: {w.error}"
        assert isinstance(w.error, pool.ConnectError) or is_driver_error(w.error), repr(w.error)
        assert w.ended - w.started < 5.0, f"a call took {w.ended - w.started:.2f}s: {w.error!r}"


def check_no_lending_to_the_old_primary(run: ha.WriteRun) -> None:
    late = run.lent_to_old_after_failure
    assert not late, (
        f"{len(late)} connection(s) to the old primary {run.failover.old} lent after the first "
        f"write there failed, e.g. {late[0]}"
    )


def check_pool_on_the_new_primary(run: ha.WriteRun) -> None:
    s = run.stats
    assert (s.in_use, s.waiting, s.opening) == (0, 0, 0), s
    assert run.server_count == s.size, f"server sees {run.server_count}, pool holds {s.size}"
    # every write after the first on the new primary went there
    first = run.first_new_success
    after = [w for w in run.acked if w.ended > first]
    assert after and all(w.server_port == run.failover.new for w in after)


class TestFailover:
    @each_write_run
    def test_switchover_loses_no_acknowledged_write_and_resumes_within_a_second(
        self, fresh: ha.HACluster, loop: str, pg_driver: str, seen: Callable[[object], None]
    ) -> None:
        run = ha.run_on(loop, lambda: ha.writes_through_failover(
            fresh, "switchover", loop, driver=pg_driver, seen=seen
        ))
        print(f"\nswitchover on {loop} ({pg_driver}): {run.summary()}")
        assert run.failover.script_seconds < 2.0, "the switchover itself took too long"
        assert len(run.acked) > 1000
        assert not run.lost, f"{len(run.lost)} acknowledged write(s) missing on the new primary"
        assert run.duplicates == 0
        check_failures(run)
        check_no_lending_to_the_old_primary(run)
        assert run.unavailability <= 1.0, run.summary()
        check_pool_on_the_new_primary(run)

    @each_write_run
    def test_crash_resumes_within_a_second_of_the_promotion(
        self, fresh: ha.HACluster, loop: str, pg_driver: str, seen: Callable[[object], None]
    ) -> None:
        run = ha.run_on(loop, lambda: ha.writes_through_failover(
            fresh, "crash", loop, driver=pg_driver, seen=seen
        ))
        # Replication is asynchronous: a write acknowledged by the killed primary
        # just before the kill may never have reached the standby. Reported, not judged.
        print(f"\ncrash on {loop} ({pg_driver}): {run.summary()}")
        assert len(run.acked) > 1000
        assert run.duplicates == 0
        check_failures(run)
        check_no_lending_to_the_old_primary(run)
        assert run.resumed_after_promotion <= 1.0, run.summary()
        check_pool_on_the_new_primary(run)

    def test_old_primary_rebuilt_as_a_standby_serves_reads_within_replica_retry_after(
        self, fresh: ha.HACluster, loop: str, seen: Callable[[object], None]
    ) -> None:
        retry_after = 1.0
        fresh.failover("switchover")  # 5440 stopped, 5441 the primary
        tag = ha.new_tag()

        async def main() -> tuple[list[tuple[float, int]], float, int]:
            rp = pool.Replicated(
                ha.multi_url(tag),
                replicas=[ha.node_url(ha.FIRST, application_name=tag, connect_timeout=1)],
                replica_retry_after=retry_after,
            )
            seen(rp)
            reads: list[tuple[float, int]] = []
            stop = asyncio.Event()

            async def reader() -> None:
                while not stop.is_set():
                    port = await rp.fetchval("SELECT inet_server_port()")
                    reads.append((time.time(), int(port)))
                    await asyncio.sleep(0.01)

            async with rp:
                tasks = [asyncio.create_task(reader()) for _ in range(5)]
                try:
                    await asyncio.sleep(0.3)
                    accepting = await asyncio.to_thread(fresh.rebuild)
                    assert accepting is not None
                    deadline = time.monotonic() + retry_after + 3.0
                    while time.monotonic() < deadline and not any(
                        p == ha.FIRST and t >= accepting for t, p in reads
                    ):
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.2)
                finally:
                    stop.set()
                    await asyncio.gather(*tasks)
                # the write side still goes to the primary
                primary_port = await rp.primary().fetchval("SELECT inet_server_port()")
            return reads, accepting, int(primary_port)

        reads, accepting, primary_port = ha.run_on(loop, main)
        before = [p for t, p in reads if t < accepting]
        assert before and set(before) == {ha.SECOND}, "reads before the rebuild: the primary"
        first = min((t for t, p in reads if p == ha.FIRST), default=None)
        assert first is not None, "no read reached the rebuilt standby"
        delay = first - accepting
        print(f"\nrebuilt standby on {loop}: first read there {delay * 1000:.0f} ms after it "
              f"accepted connections (replica_retry_after={retry_after}s)")
        # Each read takes a few ms; a read that failed just before the node accepted
        # marked it down for replica_retry_after from then.
        assert delay <= retry_after + 0.1
        assert primary_port == ha.SECOND

    def test_multi_host_url_skips_a_down_host_and_names_every_host_when_all_are_down(
        self, fresh: ha.HACluster, loop: str, seen: Callable[[object], None]
    ) -> None:
        fresh.failover("switchover")  # 5440 stopped (refuses), 5441 the primary
        tag = ha.new_tag()
        timeout = 1.0

        async def main() -> dict[str, Any]:
            out: dict[str, Any] = {}
            with ha.silent_port() as silent:
                # first host refuses: the second at once
                for name, first in (("refused", ha.FIRST), ("silent", silent)):
                    db: pool.Pool[Any] = pool.Pool(
                        ha.multi_url(tag, hosts=(first, ha.SECOND), connect_timeout=timeout)
                    )
                    seen(db)
                    started = time.monotonic()
                    try:
                        port = await db.fetchval("SELECT inet_server_port()")
                    finally:
                        await db.disconnect()
                    out[name] = (time.monotonic() - started, int(port))
                # all down: one refuses, one never answers, one is closed
                closed = ha.closed_port()
                db = pool.Pool(
                    ha.multi_url(tag, hosts=(ha.FIRST, silent, closed), connect_timeout=timeout)
                )
                seen(db)
                started = time.monotonic()
                try:
                    with pytest.raises(pool.ConnectError) as caught:
                        await db.connect()
                finally:
                    await db.disconnect()
                out["all_down"] = (time.monotonic() - started, caught.value, silent, closed)
            return out

        out = ha.run_on(loop, main)
        refused_took, refused_port = out["refused"]
        silent_took, silent_port = out["silent"]
        print(f"\nmulti-host on {loop}: first host refused: {refused_took * 1000:.0f} ms; "
              f"first host silent: {silent_took * 1000:.0f} ms (connect_timeout={timeout}s)")
        assert refused_port == silent_port == ha.SECOND
        assert refused_took < 0.5
        # the silent host is given up after connect_timeout, the next one answers at once
        assert timeout <= silent_took < timeout + 0.5
        took, error, silent, closed = out["all_down"]
        seen(error)
        message = str(error)
        for port in (ha.FIRST, silent, closed):
            assert f"127.0.0.1:{port}" in message, message
        assert "connect_timeout" in message or "TimeoutError" in message, message
        assert took < 3 * timeout + 1.0
