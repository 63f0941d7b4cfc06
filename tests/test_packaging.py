"""The package as users get it: its name, one namespace, editable installs mypy sees.

A wheel is built once per session from a copy of the checkout's tracked files
(what a fresh clone holds: no stale build/ can leak into it), with pip, which
every venv has: a missing tool fails these tests, it does not skip them.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from pool._driver import DISTRIBUTION

REPO = Path(__file__).resolve().parent.parent
PYPI_LIST = Path("/work/.library/env/packages/pypi.tsv")
#: the import names the repository's folders install as
INSTALLED_AS = {"pool": "pool", "drivers": "pool_drivers", "benchmarks": "pool_benchmarks"}

#: a dotted module path in a string (not a file path, not a sentence's last word)
MODULE_PATH = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+(:\w+)?$")

_SCRATCH = Path(tempfile.mkdtemp(prefix="pool-packaging-"))


@pytest.fixture(scope="module", autouse=True)
def _scratch_cleanup() -> object:
    yield
    shutil.rmtree(_SCRATCH, ignore_errors=True)


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, check=False,
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@functools.cache
def clone() -> Path:
    """The checkout's tracked files (with their edits), as a fresh clone would have them."""
    target = _SCRATCH / "clone"
    names = _run("git", "ls-files", "-z", cwd=REPO).split("\0")
    for name in filter(None, names):
        source = REPO / name
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            dest.symlink_to(os.readlink(source))
        elif source.exists():  # (a file deleted in the work tree but not yet in git)
            shutil.copy2(source, dest)
    return target


@functools.cache
def wheel() -> Path:
    out = _SCRATCH / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, clone())
    (built,) = out.glob("*.whl")
    return built


def fresh_venv(name: str) -> Path:
    """A venv with nothing of ours in it, that sees this one's packages after its own.

    Its dependencies (anyio, psutil, sniffio) come from the running venv, so no
    index is asked (tests/test_install.py installs them the slow, real way):
    what is under test is our package's layout, installed by pip alone.
    """
    venv = _SCRATCH / name
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    here = "\n".join(p for p in sys.path if p.endswith("site-packages"))
    (Path(site) / "_deps_from_the_test_venv.pth").write_text(here + "\n")
    return python


def pip_into(python: Path, *args: str | Path) -> None:
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", *args)


@functools.cache
def installed() -> Path:
    """A fresh venv with the wheel installed (no extras): its python."""
    python = fresh_venv("venv")
    pip_into(python, wheel())
    return python


@functools.cache
def editable_install() -> Path:
    """A fresh venv with the clone installed editable, as scripts/test does: its python."""
    python = fresh_venv("editable")
    pip_into(python, "--config-settings", "editable_mode=strict", "-e", clone())
    return python


class TestTheName:
    def test_pyproject_names_the_distribution_the_hints_name(self) -> None:
        project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
        assert project["name"] == DISTRIBUTION == "pool-engine"
        # the extras refer to themselves by that name too
        for extra in project["optional-dependencies"].values():
            for dep in extra:
                assert not dep.startswith("pool["), dep

    def test_the_name_is_not_taken_on_pypi(self) -> None:
        if not PYPI_LIST.exists():
            pytest.skip(f"no list of PyPI's names at {PYPI_LIST}")

        def norm(name: str) -> str:
            return name.lower().replace("_", "-").replace(".", "-")

        with PYPI_LIST.open(encoding="utf-8") as f:
            taken = {norm(line.split("\t", 1)[0]) for line in f}
        assert "pool" in taken  # the list is the one we think it is
        assert norm(DISTRIBUTION) not in taken

    def test_no_source_imports_the_old_top_level_names(self) -> None:
        # From the checkout's root, `import drivers` would still work (the
        # folder is there), so only a look at the source catches a leftover.
        bad = []
        for folder in ("pool", "drivers", "benchmarks", "tests", "examples"):
            for path in (REPO / folder).rglob("*.py"):
                for node in ast.walk(ast.parse(path.read_text(), str(path))):
                    names: list[str] = []
                    if isinstance(node, ast.Import):
                        names = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and not node.level:
                        names = [node.module or ""]
                    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                        # a module named in a string: import_module("drivers.x"),
                        # "-m benchmarks.floor", ``benchmarks.asgi.app:factory``
                        words = (w.strip("`'\"(),;") for w in node.value.split())
                        names = [w.partition(":")[0] for w in words if MODULE_PATH.match(w)]
                    for name in names:
                        if name.split(".")[0] in ("drivers", "benchmarks"):
                            bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
        assert not bad, bad


class TestTheWheel:
    def test_every_top_level_name_starts_with_pool(self) -> None:
        with zipfile.ZipFile(wheel()) as whl:
            tops = {name.split("/")[0] for name in whl.namelist()}
        modules = {t for t in tops if not t.endswith(".dist-info")}
        assert modules == set(INSTALLED_AS.values())
        assert all(t.startswith("pool") for t in tops), tops

    def test_it_ships_every_module_and_the_type_markers(self) -> None:
        with zipfile.ZipFile(wheel()) as whl:
            names = set(whl.namelist())
            meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
            metadata = whl.read(meta).decode()
            entry = whl.read(meta.replace("METADATA", "entry_points.txt")).decode()
        for folder, package in INSTALLED_AS.items():
            for path in (REPO / folder).rglob("*.py"):
                assert f"{package}/{path.relative_to(REPO / folder).as_posix()}" in names
        assert {"pool/py.typed", "pool_drivers/py.typed"} <= names
        assert f"Name: {DISTRIBUTION}\n" in metadata
        assert "Requires-Python: >=3.11" in metadata
        assert "License :: OSI Approved :: MIT License" in metadata
        assert "poolbench = pool_benchmarks.__main__:main" in entry


USER_APP = """
import sys, anyio, pool
import drivers, benchmarks  # the project's own, not ours

async def main() -> None:
    async with pool.Pool(f"sqlite:///{sys.argv[1]}?connection_limit=2") as db:
        await db.execute("CREATE TABLE t (x INTEGER)")
        await db.execute("INSERT INTO t VALUES (?)", 41)
        print(await db.fetchval("SELECT x + 1 FROM t"), drivers.MINE, benchmarks.MINE)

anyio.run(main)
"""


def user_project(tmp_path: Path) -> Path:
    """An application with its own drivers/ and benchmarks/ packages."""
    for package in ("drivers", "benchmarks"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"MINE = 'own {package}'\n")
    (tmp_path / "app.py").write_text(USER_APP)
    return tmp_path


class TestAFreshInstall:
    def test_a_user_project_with_its_own_drivers_and_benchmarks_runs_a_query(
        self, tmp_path: Path
    ) -> None:
        project = user_project(tmp_path)
        out = _run(installed(), "-W", "error", "app.py", tmp_path / "app.db", cwd=project)
        assert out.split() == ["42", "own", "drivers", "own", "benchmarks"]

    def test_the_console_script_is_there(self, tmp_path: Path) -> None:
        poolbench = installed().parent / "poolbench"
        assert "--quick" in _run(poolbench, "--help", cwd=tmp_path)


TYPED_USER = """
import pool
import pool_drivers.sqlite

reveal_type(pool.Pool)
reveal_type(pool_drivers.sqlite.SQLiteConnection)
"""


class TestAnEditableInstall:
    """``pip install -e .`` as scripts/test runs it (strict mode)."""

    @pytest.fixture
    def editable(self) -> Path:
        return editable_install()

    def test_mypy_strict_on_a_user_file_finds_pool(self, editable: Path, tmp_path: Path) -> None:
        (tmp_path / "user.py").write_text(TYPED_USER)
        proc = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
             "--python-executable", str(editable), "user.py"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Cannot find implementation" not in proc.stdout
        assert 'Revealed type is "def [C] (' in proc.stdout
        assert "pool._pool.Pool[C" in proc.stdout
        assert "pool_drivers.sqlite.SQLiteConnection" in proc.stdout

    def test_the_mapped_names_import_from_the_checkout_and_edits_are_live(
        self, editable: Path, tmp_path: Path
    ) -> None:
        source = clone() / "drivers" / "sqlite.py"
        original = source.read_text()
        source.write_text(original + "\nEDITED_IN_PLACE = True\n")
        try:
            out = _run(
                editable, "-c",
                "import pool_drivers.sqlite as m, os; "
                "print(os.path.realpath(m.__file__), m.EDITED_IN_PLACE)",
                cwd=tmp_path,
            )
        finally:
            source.write_text(original)
        path, edited = out.split()
        assert Path(path) == source.resolve()
        assert edited == "True"

    def test_a_user_project_with_its_own_drivers_runs_a_query(
        self, editable: Path, tmp_path: Path
    ) -> None:
        project = user_project(tmp_path)
        out = _run(editable, "-W", "error", "app.py", tmp_path / "app.db", cwd=project)
        assert out.split() == ["42", "own", "drivers", "own", "benchmarks"]


def test_python_dash_m_pool_benchmarks_runs_from_the_checkout() -> None:
    assert "--quick" in _run(sys.executable, "-m", "pool_benchmarks", "--help", cwd=REPO)
