"""A clean install works: every import is declared.

Each test installs the project into a fresh virtual environment with one set
of extras (none, ``[postgres]``, ``[mysql]``) and runs a query through it, so
an import that only ``[all]`` happens to bring (trio brings sniffio, say)
fails here instead of on a user's machine.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.servers import MYSQL_URL, POSTGRES_URL, require

REPO = Path(__file__).resolve().parent.parent

QUERY = """
import anyio, pool, sys
async def main():
    db = pool.Pool(sys.argv[1])
    print(await db.fetchval("SELECT 41 + 1"))
    await db.disconnect()
anyio.run(main)
"""


def install_and_query(tmp_path: Path, extra: str, url: str) -> str:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    target = f"{REPO}[{extra}]" if extra else str(REPO)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", target],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    # -W error: a plain install must import and run without a single warning
    done = subprocess.run(
        [str(python), "-W", "error", "-c", textwrap.dedent(QUERY), url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the checkout: the installed package, not the source tree
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class TestCleanInstall:
    def test_no_extras_runs_sqlite(self, tmp_path: Path) -> None:
        assert install_and_query(tmp_path, "", "sqlite:///:memory:") == "42"

    def test_postgres_extra_alone(self, tmp_path: Path) -> None:
        require(POSTGRES_URL, "PostgreSQL")
        assert install_and_query(tmp_path, "postgres", POSTGRES_URL) == "42"

    def test_mysql_extra_alone(self, tmp_path: Path) -> None:
        require(MYSQL_URL, "MariaDB")
        assert install_and_query(tmp_path, "mysql", MYSQL_URL) == "42"

