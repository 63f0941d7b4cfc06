from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

#: every piece of text the run produced that a user could see: log records,
#: captured stdout/stderr, failure reports, reprs and messages the tests saw.
#: tests/test_zz_secrets.py searches it for the test password.
SEEN: list[str] = []


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            SEEN.append(self.format(record))
        except Exception:  # a record that cannot format is not our concern here
            SEEN.append(str(record.msg))


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger().addHandler(_Collector())
    # Debug records too: a secret must not hide in the quiet ones either.
    logging.getLogger("pool").setLevel(logging.DEBUG)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    SEEN.extend((report.longreprtext, report.capstdout, report.capstderr, report.caplog))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The secrets test reads what every other test produced: it runs last.
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_zz_secrets.py"))


@pytest.fixture
def seen() -> Callable[[object], None]:
    """Record a repr or message a test produced, for the secrets check."""

    def record(obj: object) -> None:
        SEEN.append(obj if isinstance(obj, str) else f"{obj!r} {obj}")

    return record


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
