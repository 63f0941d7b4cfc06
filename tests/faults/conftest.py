"""The fault suite's cluster: a throwaway PostgreSQL that tests may stop, kill and restart.

``scripts/faultdb`` owns it (127.0.0.1:5434, trust auth, ssl on). The session
fixture initialises and starts it once; the ``faultdb`` fixture hands it to one
test, and starts it again afterwards if that test stopped or killed it. As with
``tests.servers.require``, an unavailable cluster skips the test on a developer's
machine and fails it under CI.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psutil
import pytest

from tests import servers

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "faultdb"
CLUSTER_NAME = "pool-faultdb"  # scripts/faultdb puts it in the server's process titles
#: trust auth ignores the password; it is there so that the secrets checks cover this suite
URL = f"postgresql://postgres:{servers.SECRET}@127.0.0.1:5434/test"

#: the tests that got the cluster (the secrets check needs one with a password to redact)
SERVER_TESTS: list[str] = []


def unavailable(message: str) -> None:
    """Fail under CI, skip elsewhere: the rule of ``tests.servers.require``."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def new_tag() -> str:
    """An application_name that tells one test's connections apart on the server."""
    return f"faults_{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class FaultDB:
    """The throwaway cluster, driven through ``scripts/faultdb``."""

    #: not in the repr: pytest prints a failing test's arguments, this one included
    url: str = field(repr=False)

    def __repr__(self) -> str:
        return f"FaultDB({self.url.replace(servers.SECRET, '***')})"

    def run(self, command: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), command], capture_output=True, text=True, timeout=timeout, check=False
        )

    def _must(self, command: str) -> None:
        result = self.run(command)
        assert result.returncode == 0, f"scripts/faultdb {command} failed: {result.stderr}"

    def start(self) -> None:
        """Start the server; returns once it accepts connections."""
        self._must("start")

    def stop(self) -> None:
        """A fast shutdown: sessions are terminated, the server exits."""
        self._must("stop")

    def kill(self) -> None:
        """kill -9 of the postmaster, like a crash."""
        self._must("kill")

    def is_running(self) -> bool:
        return self.run("status").returncode == 0

    def wait_until_gone(self, timeout: float = 10.0) -> None:
        """After a kill: until no process of the cluster is left (its backends exit too)."""
        deadline = time.monotonic() + timeout
        while any(
            " ".join(p.info["cmdline"] or ()).startswith(f"postgres: {CLUSTER_NAME}:")
            for p in psutil.process_iter(["cmdline"])
        ):
            assert time.monotonic() < deadline, "the killed cluster's processes do not exit"
            time.sleep(0.005)

    def pool_url(self, tag: str, driver: str = "asyncpg", **params: object) -> str:
        """The URL for a test's pool: its connections carry ``tag`` as application_name.

        ``driver`` picks the PostgreSQL driver (``asyncpg``, ``psycopg``) by the scheme.
        """
        query = urlencode({"application_name": tag, **params})
        return servers.with_driver(f"{self.url}?{query}", driver)


@pytest.fixture(params=list(servers.POSTGRES_SCHEMES))
def pg_driver(request: pytest.FixtureRequest) -> str:
    """Each PostgreSQL driver in turn: the fault tests hold for all of them."""
    return str(request.param)


def placeholder(driver: str) -> str:
    """The first argument's placeholder in ``driver``'s SQL."""
    return "%s" if driver == "psycopg" else "$1"


def backend_pid(conn: Any) -> int:
    """The backend pid of a lent connection, as its driver knows it (no round trip)."""
    if hasattr(conn, "get_server_pid"):  # asyncpg
        return int(conn.get_server_pid())
    return int(conn.info.backend_pid)  # psycopg


@pytest.fixture(scope="session")
def faultdb_cluster() -> FaultDB:
    db = FaultDB(URL)
    if not SCRIPT.exists():
        unavailable(f"{SCRIPT.relative_to(REPO)} is missing: the fault cluster cannot be made")
    for command in ("init", "start"):
        result = db.run(command)
        if result.returncode != 0:
            unavailable(f"scripts/faultdb {command} failed: {result.stderr.strip()[-500:]}")
    return db


@pytest.fixture
def faultdb(faultdb_cluster: FaultDB, request: pytest.FixtureRequest) -> Iterator[FaultDB]:
    """The cluster, up; started again after the test if the test left it down."""
    if not faultdb_cluster.is_running():
        # an earlier run was interrupted mid-outage
        result = faultdb_cluster.run("start")
        if result.returncode != 0:
            unavailable(f"scripts/faultdb start failed: {result.stderr.strip()[-500:]}")
    servers.require(faultdb_cluster.url, "the fault-test PostgreSQL cluster")
    SERVER_TESTS.append(request.node.nodeid)
    try:
        yield faultdb_cluster
    finally:
        if not faultdb_cluster.is_running():
            faultdb_cluster.start()
