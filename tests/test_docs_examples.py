"""Every Python example in README.md and docs/*.md runs, so that none can rot.

Each fenced ```python block is one test. It is compiled with top-level
``await`` allowed; a block that awaits runs as the body of a coroutine under
``asyncio.run``, and a block that does not (one that calls ``anyio.run`` or
``asyncio.run`` itself) is executed as a plain script. Every block runs alone,
in a fresh namespace and a fresh temporary working directory (so
``sqlite:///app.db`` is a new file each time).

What a block needs is read from the block itself: a ``postgresql://`` URL marks
it ``postgres`` and a ``mysql://`` URL marks it ``mysql``; the examples name the
local test servers as written (``postgresql://postgres@localhost/test``,
``mysql://root@localhost/test``), and, as everywhere in the suite, an
unreachable server skips the test, or fails it under ``CI``. A block that is not
meant to run is preceded by an HTML comment ``<!-- no-run: why -->``; those are
counted, and the count is held to a small ceiling.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import require

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]

#: the most blocks the docs may leave unrun: each one is an example nobody checks
MAX_NO_RUN = 6

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")
_NO_RUN = re.compile(r"<!--\s*no-run\b[^>]*-->")
_POSTGRES = re.compile(r"\bpostgres(?:ql)?(?:\+\w+)?://")
_MYSQL = re.compile(r"\b(?:mysql|mariadb)(?:\+\w+)?://")
#: a server the examples name by port (the replica on 5433, PgBouncer on 6433)
_LOCAL_PORT = re.compile(r"@localhost:(\d+)|,localhost:(\d+)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    run: bool

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    """The ```python blocks of one Markdown file, with their no-run marks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, lang, start = match["indent"], match["lang"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        if lang not in ("python", "py"):
            continue
        # the nearest non-blank line above the fence says whether it runs
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        run = not (above >= 0 and _NO_RUN.search(lines[above]))
        found.append(Block(path, start + 1, "\n".join(body) + "\n", run))
    return found


BLOCKS = [block for path in SOURCES for block in _blocks(path)]


def _marks(code: str) -> list[pytest.MarkDecorator]:
    marks = []
    if _POSTGRES.search(code):
        marks.append(pytest.mark.postgres)
    if _MYSQL.search(code):
        marks.append(pytest.mark.mysql)
    return marks


def _servers(code: str) -> dict[int, str]:
    """The local servers a block talks to: port -> what to call it when it is down."""
    ports: dict[int, str] = {}
    if _POSTGRES.search(code):
        ports[5432] = "PostgreSQL"
    if _MYSQL.search(code):
        ports[3306] = "MariaDB/MySQL"
    for match in _LOCAL_PORT.finditer(code):
        port = int(match[1] or match[2])
        ports.setdefault(port, f"the test server on port {port}")
    return ports


def test_docs_have_examples() -> None:
    assert len(BLOCKS) >= 30, [b.id for b in BLOCKS]


def test_few_examples_are_left_unrun() -> None:
    skipped = [block.id for block in BLOCKS if not block.run]
    assert len(skipped) <= MAX_NO_RUN, skipped


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=b.id, marks=_marks(b.code)) for b in BLOCKS if b.run],
)
def test_example_runs(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for port, what in _servers(block.code).items():
        require(f"tcp://127.0.0.1:{port}", what)
    monkeypatch.chdir(tmp_path)
    # the line numbers in a traceback are the Markdown file's
    source = "\n" * block.line + block.code
    code = compile(
        source, str(block.path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True
    )
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    if code.co_flags & inspect.CO_COROUTINE:
        result = eval(code, namespace)
        asyncio.run(result)
    else:
        exec(code, namespace)
