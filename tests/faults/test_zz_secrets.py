"""Runs last in this folder: nothing the fault suite produced shows the test password.

The global check (tests/test_zz_secrets.py) covers the whole run; this one holds
the fault suite to the same rule when it runs on its own. The server tests'
URLs carry the password (trust auth ignores it), so the reprs, messages and log
lines they produce must all redact it.
"""

from __future__ import annotations

import pytest

from tests import conftest, servers
from tests.faults.conftest import SERVER_TESTS


class TestNoSecretInOutput:
    def test_the_password_appears_nowhere_in_what_the_suite_produced(self) -> None:
        if not SERVER_TESTS:
            pytest.skip("no test of this run used the fault cluster: no password to look for")
        seen = conftest.SEEN
        assert seen, "nothing was collected: the collector did not run"
        assert any("***" in text for text in seen), "no redacted URL was seen: check nothing"
        leaks = [text for text in seen if servers.SECRET in text]
        shown = leaks[0].replace(servers.SECRET, "<the password>")[:300] if leaks else ""
        assert not leaks, f"the password leaked {len(leaks)} time(s), e.g. {shown!r}"
