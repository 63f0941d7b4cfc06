"""poolbench, run the way users run it: ``python -m pool_benchmarks`` in a subprocess.

These tests check what the tool prints and writes (the tables, the JSON's
keys per workload and pool, that no password leaks), never how fast anything
is: speed is what the tool reports, not what a test can assert on a shared
machine. Each run is a ``--quick`` one on a few workloads with short timed
runs, so that each test takes a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from pool_benchmarks._workloads import _FifoCheck
from tests import servers

ROOT = Path(__file__).resolve().parent.parent
PEER_MODULES = ("asyncpg", "psycopg", "psycopg_pool", "sqlalchemy", "aiomysql", "aiosqlite")
# what a fresh install without the bench extra lacks
BENCH_EXTRA = (*PEER_MODULES, "tqdm", "matplotlib")

W1_CASES = ("C=1", "C=10", "C=100", "C=1000")
W2_METRICS = {"queries_per_s", "wait_p50", "wait_p99", "wait_max"}
W3_METRICS = {
    "out_of_order", "completions_max_min", "wait_p99", "fifo_ideal", "p99_vs_ideal",
    "cycles_per_s",
}
W4_METRICS = {"late_median", "late_max", "error"}
W5_METRICS = {"seconds", "opened"}


def poolbench(
    *args: str, block: Sequence[str] = (), timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pool_benchmarks *args`` with ``block``'s modules made unimportable."""
    code = (
        "import sys\n"
        f"for name in {tuple(block)!r}:\n"
        "    sys.modules[name] = None\n"
        "from pool_benchmarks.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


def section(stdout: str, wid: str) -> list[str]:
    """The lines of one workload's table, from its title to the next blank line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{wid}  "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def rows(table: list[str]) -> dict[str, str]:
    """Pool name -> its row, for a table whose first column is the pool."""
    found = {}
    for line in table[3:]:
        cells = line.split()
        if cells and not line.startswith("  pool.stats()"):
            found[cells[0]] = line
    return found


def check_figure(entry: dict[str, Any], rounds: int) -> None:
    assert set(entry) >= {"median", "spread", "rounds"}
    assert len(entry["rounds"]) == rounds


Recorder = Callable[[subprocess.CompletedProcess[str]], None]


@pytest.fixture
def record_output(seen: Callable[[object], None]) -> Recorder:
    """Hand a run's output to the run-wide secrets check too."""

    def record(proc: subprocess.CompletedProcess[str]) -> None:
        seen(proc.stdout)
        seen(proc.stderr)

    return record


class TestEmbeddedDefault:
    def test_runs_with_no_server_and_no_bench_extra(
        self, tmp_path: Path, record_output: Recorder
    ) -> None:
        out = tmp_path / "bench.json"
        proc = poolbench(
            "--full", "--quick", "--workload", "W1,W2", "--workload", "W4", "--duration", "0.1",
            "--json", str(out), block=BENCH_EXTRA,
        )
        record_output(proc)
        assert proc.returncode == 0, proc.stderr
        stdout = proc.stdout
        assert "sqlite:///" in stdout and "(SQLite " in stdout
        # the missing extra is a note, not a failure
        assert "tqdm is not installed" in stdout

        w1 = section(stdout, "W1")
        assert re.search(r"C\s+pool\s+cycles/s\s+vs pool\s+vs limit", w1[1])
        for case in W1_CASES:
            assert any(re.match(rf"\s+{case[2:]}\s+pool\s+[\d,]+/s", line) for line in w1)
        assert sum(1 for line in w1 if re.match(r"\s+(\d+\s+)?limit\s+[\d,]+/s", line)) == 4
        assert section(stdout, "W1-stub")

        w2 = rows(section(stdout, "W2"))
        assert set(w2) == {"pool", "limit"}
        assert re.search(r"[\d,]+/s\s+1\.00\S\s+\S+\s+[\d.]+ .s", w2["pool"])
        assert "pool.stats() after its last W2 round: size=10" in stdout

        w4 = rows(section(stdout, "W4"))
        assert set(w4) == {"pool"}  # the raw connections have no timeout to measure
        assert "pool.PoolTimeoutError" in w4["pool"]

        targets = [line for line in stdout.splitlines() if re.match(r"  (met|MISSED|n/a) ", line)]
        assert any(re.search(r"W2\s+>= 95% of the raw-connection limit", t) for t in targets)
        assert any(t.startswith("  n/a") and "no peer ran" in t for t in targets)

        doc = load(out)
        assert doc["meta"]["scheme"] == "sqlite" and doc["meta"]["rounds"] == 1
        assert doc["meta"]["workloads"] == ["W1", "W2", "W4"]
        assert set(doc["pools"]) == {"pool", "limit"}
        assert set(doc["workloads"]) == {"W1", "W1-stub", "W1-bare", "W2", "W4"}
        for wid in ("W1", "W1-stub"):
            cases = doc["workloads"][wid]["cases"]
            assert tuple(cases) == W1_CASES
            for case in cases.values():
                assert set(case) == {"pool", "limit"}
                check_figure(case["pool"]["cycles_per_s"], rounds=1)
        w2_case = doc["workloads"]["W2"]["cases"]["all"]
        assert set(w2_case) == {"pool", "limit"}
        for name in ("pool", "limit"):
            assert set(w2_case[name]) == W2_METRICS
            check_figure(w2_case[name]["queries_per_s"], rounds=1)
        assert set(doc["workloads"]["W4"]["cases"]["all"]["pool"]) >= W4_METRICS
        assert doc["workloads"]["W4"]["cases"]["all"]["pool"]["error"] == [
            "pool.PoolTimeoutError"
        ] * 2
        assert doc["waits"]["W2"]["pool"]["n"] > 0
        assert doc["stats"]["W2"]["limit"] == 10
        assert all(t["met"] in (True, False, None) for t in doc["targets"])

    def test_fairness_and_scaling(self, tmp_path: Path, record_output: Recorder) -> None:
        out = tmp_path / "bench.json"
        proc = poolbench(
            "--full", "--quick", "--workload", "w3,w6,w5", "--duration", "0.1", "--no-progress",
            "--json", str(out),
        )
        record_output(proc)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""  # --no-progress, and nothing else to say
        w3 = rows(section(proc.stdout, "W3"))
        assert set(w3) == {"pool", "limit"}
        w6 = section(proc.stdout, "W6")
        assert any(re.match(r"\s+10,000\s+[\d.]+ .s", line) for line in w6)
        assert "W5 skipped: SQLite has no TCP connection" in proc.stdout

        doc = load(out)
        assert set(doc["workloads"]) == {"W3", "W6"}
        for name in ("pool", "limit"):
            assert set(doc["workloads"]["W3"]["cases"]["all"][name]) >= W3_METRICS
        w6 = doc["workloads"]["W6"]["cases"]
        assert set(w6) == {
            "10 waiters", "1000 waiters", "10000 waiters", "cancel 1000", "cancel 10000",
        }
        for case in w6.values():
            assert set(case) == {"pool", "asyncio"}
        assert w6["cancel 10000"]["pool"]["left_waiting"]["rounds"] == [0.0]
        assert {t["workload"] for t in doc["targets"]} == {"W3", "W6"}

    def test_no_arguments_runs_beside_aiosqlite_and_sqlalchemy(
        self, tmp_path: Path, record_output: Recorder
    ) -> None:
        """The no-argument run's structure, in one short round (its speed is not tested)."""
        pytest.importorskip("aiosqlite")
        pytest.importorskip("sqlalchemy")
        out = tmp_path / "bench.json"
        proc = poolbench("--quick", "--duration", "0.05", "--json", str(out), timeout=60)
        record_output(proc)
        assert proc.returncode == 0, proc.stderr
        stdout = proc.stdout
        assert "(SQLite " in stdout
        default = {"pool", "limit", "aiosqlite/task", "aiosqlite/shared", "sqlalchemy"}
        lfl = {"aiosqlite/task[lfl]", "aiosqlite/shared[lfl]", "sqlalchemy[lfl]"}
        # W1 at C=1 and C=100 only; nothing on the stub driver or bare in this run
        w1 = section(stdout, "W1")
        assert [line.split()[0] for line in w1[3:] if re.match(r"  \d", line)] == ["1", "100"]
        for wid in ("W1-stub", "W1-bare", "W5", "W6"):
            assert not any(line.startswith(f"{wid}  ") for line in stdout.splitlines())
        w2 = rows(section(stdout, "W2"))
        assert set(w2) >= default | lfl
        assert set(rows(section(stdout, "W3"))) >= {"pool", "limit", "sqlalchemy",
                                                    "sqlalchemy[lfl]"}
        assert set(rows(section(stdout, "W4"))) >= {"pool", "sqlalchemy", "sqlalchemy[lfl]"}
        rw = rows(section(stdout, "RW"))
        assert set(rw) >= default | lfl | {"1"}  # "1 writer": the single-writer ceiling
        # pool[reset] is a row either way: measured, or saying this build lacks it
        from pool_benchmarks._peers import supports_reset_session

        if supports_reset_session():
            assert "pool[reset]" in w2 and "n/a" not in w2["pool[reset]"]
        else:
            assert "n/a (not supported by this build)" in w2["pool[reset]"]
        # the closing verdict table, judged on both kinds of rows
        lines = stdout.splitlines()
        head = next(i for i, line in enumerate(lines) if line.startswith("  Verdict"))
        assert "default rows" in lines[head] and "like-for-like rows" in lines[head]
        end = next(i for i in range(head, len(lines)) if not lines[i].strip())
        verdicts = lines[head + 2:end]
        assert any(v.strip().startswith("W1 C=1: >= 5x the fastest peer") for v in verdicts)
        assert any(v.strip().startswith("W2 ahead of every peer") for v in verdicts)
        assert any(v.strip().startswith("RW ") for v in verdicts)
        assert all(re.search(r"\s(met|MISSED|n/a|info) ", v) for v in verdicts)
        assert stdout.rstrip().splitlines()[-1].startswith("(ran ")

        doc = load(out)
        assert doc["meta"]["suite"] == "sqlite-default"
        assert doc["meta"]["command"].startswith("poolbench --quick")
        assert set(doc["workloads"]) == {"W1", "W2", "W3", "W4", "RW"}
        assert {doc["pools"][n]["style"] for n in lfl} == {"lfl"}
        assert {t["style"] for t in doc["targets"]} == {"", "default", "lfl"}

    def test_like_for_like_only(self, record_output: Recorder) -> None:
        pytest.importorskip("aiosqlite")
        proc = poolbench("--quick", "--like-for-like", "--workload", "W2", "--duration", "0.05",
                         "--no-progress")
        record_output(proc)
        assert proc.returncode == 0, proc.stderr
        names = set(rows(section(proc.stdout, "W2")))
        assert {"pool", "limit", "sqlalchemy[lfl]", "aiosqlite/shared[lfl]"} <= names
        assert not names & {"sqlalchemy", "aiosqlite/shared", "aiosqlite/task"}

    def test_bad_arguments(self) -> None:
        proc = poolbench("--workload", "W9")
        assert proc.returncode == 2
        assert "unknown workload 'W9'" in proc.stderr
        proc = poolbench("--url", "oracle://scott:tiger@db/x")
        assert proc.returncode == 2
        assert "tiger" not in proc.stderr + proc.stdout


class TestPostgres:
    def test_quick_run_beside_the_peers(self, tmp_path: Path, record_output: Recorder) -> None:
        servers.require(servers.POSTGRES_URL, "PostgreSQL")
        out, png = tmp_path / "bench.json", tmp_path / "bench.png"
        proc = poolbench(
            "--url", servers.POSTGRES_URL, "--quick", "--workload", "W1,W2,W3,W4,W5",
            "--duration", "0.1", "--size", "4", "--json", str(out), "--plot", str(png),
        )
        record_output(proc)
        assert proc.returncode == 0, proc.stderr
        for text in (proc.stdout, proc.stderr, out.read_text(encoding="utf-8")):
            assert servers.SECRET not in text
        assert "postgres:***@127.0.0.1:5432/test" in proc.stdout
        assert "PostgreSQL " in proc.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        everyone = {
            "pool", "limit", "asyncpg", "psycopg_pool", "sqlalchemy",
            "asyncpg[lfl]", "psycopg_pool[lfl]", "sqlalchemy[lfl]",
        }
        assert set(rows(section(proc.stdout, "W2"))) - {"pool[reset]"} == everyone
        assert set(rows(section(proc.stdout, "W3"))) - {"pool[reset]"} == everyone
        assert set(rows(section(proc.stdout, "W4"))) - {"pool[reset]"} == everyone - {"limit"}
        assert set(rows(section(proc.stdout, "W5"))) - {"pool[reset]"} == everyone
        # peers run with their defaults, and the output says what those do
        assert "BEGIN ... COMMIT" in proc.stdout and "BEGIN ... ROLLBACK" in proc.stdout
        assert "reset batch" in proc.stdout

        doc = load(out)
        assert doc["meta"]["url"] == "postgresql://postgres:***@127.0.0.1:5432/test"
        assert doc["meta"]["size"] == 4 and doc["meta"]["w2_tasks"] == 40
        assert set(doc["pools"]) - {"pool[reset]"} == everyone
        assert all(doc["pools"][name]["role"] == "peer" for name in everyone - {"pool", "limit"})
        for case in doc["workloads"]["W1"]["cases"].values():
            assert set(case) - {"pool[reset]"} == everyone
        for name in everyone:
            assert set(doc["workloads"]["W2"]["cases"]["all"][name]) == W2_METRICS
            assert set(doc["workloads"]["W3"]["cases"]["all"][name]) >= W3_METRICS
            assert set(doc["workloads"]["W5"]["cases"]["all"][name]) == W5_METRICS
        # every pool opened at least one connection through the delaying proxy
        for name in everyone:
            assert doc["workloads"]["W5"]["cases"]["all"][name]["opened"]["median"] >= 1
        assert doc["workloads"]["W4"]["cases"]["all"]["asyncpg"]["error"] == ["TimeoutError"] * 2
        goals = {t["goal"] for t in doc["targets"]}
        assert "C=1: >= 5x the fastest peer's cycles/s (default rows)" in goals
        assert "C=1: >= 5x the fastest peer's cycles/s (like-for-like rows)" in goals
        assert "no more connections opened than the fastest peer" in goals
        assert all(t["met"] is not None for t in doc["targets"])
        # like-for-like asyncpg raised the same error as the default one
        assert doc["workloads"]["W4"]["cases"]["all"]["asyncpg[lfl]"]["error"] == [
            "TimeoutError"
        ] * 2

    def test_a_missing_peer_is_skipped_with_a_note(self, record_output: Recorder) -> None:
        servers.require(servers.POSTGRES_URL, "PostgreSQL")
        proc = poolbench(
            "--url", servers.POSTGRES_URL, "--quick", "--workload", "W4", "--no-progress",
            block=("psycopg_pool",),
        )
        record_output(proc)
        assert proc.returncode == 0, proc.stderr
        assert "skipped   psycopg_pool: not installed (psycopg_pool)" in proc.stdout
        assert "skipped   psycopg_pool[lfl]: not installed (psycopg_pool)" in proc.stdout
        assert set(rows(section(proc.stdout, "W4"))) - {"pool[reset]"} == {
            "pool", "asyncpg", "sqlalchemy", "asyncpg[lfl]", "sqlalchemy[lfl]"
        }

    def test_psycopg_runs_like_for_like_beside_psycopg_pool_alone(
        self, tmp_path: Path, record_output: Recorder
    ) -> None:
        # postgresql+psycopg://: this pool lends psycopg connections, and the
        # peers are those that lend psycopg's too; every row names its driver
        servers.require(servers.POSTGRES_URL, "PostgreSQL")
        url = servers.POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)
        out = tmp_path / "bench.json"
        proc = poolbench(
            "--url", url, "--quick", "--workload", "W1,W2,W3", "--duration", "0.1",
            "--size", "4", "--no-progress", "--json", str(out),
        )
        record_output(proc)
        assert proc.returncode == 0, proc.stderr
        assert servers.SECRET not in proc.stdout + proc.stderr + out.read_text(encoding="utf-8")
        mine = {"pool", "limit", "psycopg_pool", "psycopg_pool[lfl]"}
        assert set(rows(section(proc.stdout, "W2"))) - {"pool[reset]"} == mine
        assert "skipped   asyncpg: lends asyncpg's connections, not psycopg's" in proc.stdout
        doc = load(out)
        assert {name: doc["pools"][name]["driver"] for name in mine} == dict.fromkeys(
            mine, "psycopg"
        )
        assert "Verdict: pool (psycopg)" in proc.stdout
        assert "psycopg_pool[lfl] (psycopg)" in proc.stdout

    def test_an_unreachable_server_fails_fast_without_the_password(self) -> None:
        url = servers.POSTGRES_URL.replace(":5432/", ":1/")
        proc = poolbench("--url", url, "--quick")
        assert proc.returncode == 1
        assert "cannot use postgresql://postgres:***@127.0.0.1:1/test" in proc.stderr
        assert servers.SECRET not in proc.stdout + proc.stderr


class TestMySQL:
    def test_quick_run_beside_aiomysql(self, tmp_path: Path, record_output: Recorder) -> None:
        servers.require(servers.MYSQL_URL, "MariaDB")
        out = tmp_path / "bench.json"
        proc = poolbench(
            "--url", servers.MYSQL_URL, "--quick", "--workload", "W2,W4,W5",
            "--duration", "0.1", "--no-progress", "--json", str(out),
        )
        record_output(proc)
        assert proc.returncode == 0, proc.stderr
        assert servers.SECRET not in proc.stdout + out.read_text(encoding="utf-8")
        mine = {"pool", "limit", "aiomysql", "aiomysql[lfl]"}
        assert set(rows(section(proc.stdout, "W2"))) - {"pool[reset]"} == mine
        doc = load(out)
        assert set(doc["pools"]) - {"pool[reset]"} == mine
        assert set(doc["workloads"]["W5"]["cases"]["all"]) - {"pool[reset]"} == mine

    def test_asyncmy_runs_beside_aiomysql(self, tmp_path: Path, record_output: Recorder) -> None:
        # no pool of asyncmy's among the peers: aiomysql's stays, and says so
        servers.require(servers.MYSQL_URL, "MariaDB")
        url = servers.MYSQL_URL.replace("mysql://", "mysql+asyncmy://", 1)
        out = tmp_path / "bench.json"
        proc = poolbench(
            "--url", url, "--quick", "--workload", "W2", "--duration", "0.1",
            "--no-progress", "--json", str(out),
        )
        record_output(proc)
        assert proc.returncode == 0, proc.stderr
        assert servers.SECRET not in proc.stdout + out.read_text(encoding="utf-8")
        doc = load(out)
        assert set(doc["pools"]) - {"pool[reset]"} == {"pool", "limit", "aiomysql", "aiomysql[lfl]"}
        assert doc["pools"]["pool"]["driver"] == "asyncmy"
        assert doc["pools"]["aiomysql"]["driver"] == "aiomysql"


class TestFifoCheck:
    def test_counts_a_grant_that_jumps_an_older_waiter(self) -> None:
        fifo = _FifoCheck()
        first, second, third = (fifo.take(0) for _ in range(3))
        fifo.granted(0, first)
        fifo.granted(0, third)  # jumps the second
        fifo.granted(0, second)
        assert fifo.out_of_order == 1

    def test_queues_are_ordered_separately(self) -> None:
        fifo = _FifoCheck()
        a0, b0, a1 = fifo.take(0), fifo.take(1), fifo.take(0)
        fifo.granted(1, b0)
        fifo.granted(0, a0)
        fifo.granted(0, a1)
        assert fifo.out_of_order == 0


class TestTargets:
    @staticmethod
    def w1(pool: float, limit: float, peer: float) -> list[Any]:
        from pool_benchmarks._report import Results, targets

        results = Results()
        results.add_pool("pool", "ours", "pool", "")
        results.add_pool("limit", "limit", "limit", "")
        results.add_pool("peer", "peer", "peer", "")
        for name, value in (("pool", pool), ("limit", limit), ("peer", peer)):
            results.add("W1", "C=1", name, {"cycles_per_s": value})
        return [t for t in targets(results) if "fastest peer" in t.goal]

    def test_a_peer_target_above_the_limit_says_so(self) -> None:
        (target,) = self.w1(pool=300_000, limit=400_000, peer=100_000)
        assert target.met is False
        assert "the limit itself is 4" in target.figure  # 4.00x: no pool can reach 5x

    def test_a_reachable_peer_target_names_no_bound(self) -> None:
        (target,) = self.w1(pool=600_000, limit=800_000, peer=100_000)
        assert target.met is True
        assert "limit itself" not in target.figure


class TestCombine:
    def test_targets_are_judged_on_the_median_of_the_runs(self, tmp_path: Path) -> None:
        from pool_benchmarks import combine
        from pool_benchmarks._report import Results, to_json

        paths = []
        for i, (ours, limit) in enumerate([(90.0, 100.0), (96.0, 100.0), (97.0, 100.0)]):
            results = Results()
            results.add_pool("pool", "ours", "pool", "")
            results.add_pool("limit", "limit", "limit", "")
            for r in range(3):  # a run's median is its middle round
                results.add("W2", "", "pool", {"queries_per_s": ours + r - 1})
                results.add("W2", "", "limit", {"queries_per_s": limit})
            path = tmp_path / f"run{i}.json"
            path.write_text(to_json(results))
            paths.append(str(path))
        out = tmp_path / "median.json"
        assert combine.main([*paths, "--json", str(out)]) == 0
        doc = json.loads(out.read_text())
        w2 = next(t for t in doc["targets"] if t["goal"].startswith(">= 95%"))
        assert w2["met"] is True and w2["figure"] == "96.0%"  # the middle run's, not 90 %
        rounds = doc["workloads"]["W2"]["cases"]["all"]["pool"]["queries_per_s"]["rounds"]
        assert rounds == [90.0, 96.0, 97.0]

    def test_refuses_a_file_that_is_not_a_run(self, tmp_path: Path) -> None:
        from pool_benchmarks import combine

        other = tmp_path / "other.json"
        other.write_text('{"tool": "something else"}')
        assert combine.main([str(other)]) == 2


class TestFloorTools:
    """The floor (a minimal pool) and the instruction counter: the code behind README's figures."""

    def test_the_minimal_pool_is_fifo_and_passes_on_a_cancelled_handoff(self) -> None:
        import asyncio

        from pool_benchmarks._minimal import MinimalPool

        async def main() -> list[str]:
            minimal = MinimalPool(["conn"])
            order: list[str] = []
            held = await minimal.take()

            async def wait(name: str) -> None:
                async with minimal.acquire():
                    order.append(name)

            tasks = [asyncio.create_task(wait(n)) for n in ("a", "b", "c")]
            await asyncio.sleep(0)
            minimal.give(held)  # handed to "a"...
            tasks[0].cancel()  # ...cancelled before it runs: "b" gets it
            await asyncio.gather(*tasks, return_exceptions=True)
            assert minimal.idle == ["conn"] and not minimal.waiters
            return order

        assert asyncio.run(main()) == ["b", "c"]

    @pytest.mark.parametrize("subject", ["pool", "lock", "minimal"])
    def test_each_subject_of_the_instruction_count_runs(self, subject: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "pool_benchmarks.instructions", "--child", subject,
             "10", "2", "200"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr

    def test_the_floor_runs_beside_the_limit(self, tmp_path: Path) -> None:
        servers.require(servers.POSTGRES_URL, "PostgreSQL")
        out = tmp_path / "floor.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pool_benchmarks.floor", "--url", servers.POSTGRES_URL,
             "--rounds", "1", "--duration", "0.2", "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        figures = load(out)["figures"]
        assert set(figures) == {"pool", "limit", "minimal"}
        for slot in figures.values():
            assert slot["queries_per_s"][0] > 0 and slot["cpu_us_per_query"][0] > 0
