"""handle_signals() gives the app its own signal handlers back, however they were installed.

Each scenario runs in a child process (signal handlers are process-wide): it
installs its SIGTERM and SIGINT handlers, enters and leaves
``pool.handle_signals()``, then signals itself and reports which handler ran
and whether it survived. With a signal received inside the block, the pools
disconnect first (their ``on_before_exit`` callbacks run), then the signal is
delivered again to the app's handler.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pool import _shims

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import json, logging, os, signal, sys
    import anyio
    import pool
    from pool import _shims

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    loop_kind, how, scenario, fallback = sys.argv[1:5]
    if fallback == "fallback":  # the loop's handler table is not where we look
        _shims._loop_signal_handlers = "_no_such_table"
    events = []

    def app_handler(signum, *_frame):
        events.append(signal.Signals(signum).name)

    async def until(n):
        with anyio.fail_after(5):
            while len(events) < n:
                await anyio.sleep(0.002)

    async def main():
        for sig in (signal.SIGTERM, signal.SIGINT):
            if how == "loop":
                import asyncio
                asyncio.get_running_loop().add_signal_handler(sig, app_handler, sig)
            else:
                signal.signal(sig, app_handler)
        db = pool.Pool("sqlite:///" + os.environ["POOL_SIG_DB"], connection_limit=1)

        async def last_words():
            events.append("before_exit")

        db.on_before_exit(last_words)
        async with pool.handle_signals(grace=1):
            await db.fetchval("SELECT 1")
            if scenario == "received":
                os.kill(os.getpid(), signal.SIGTERM)
                await until(2)  # the pools disconnect, then the app's handler runs
        if scenario == "left":
            await db.disconnect()  # as the app would; the signal did it otherwise
        print("left the block", flush=True)
        # the second SIGTERM is the one that used to kill the process
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            expected = len(events) + 1
            os.kill(os.getpid(), sig)
            await until(expected)
        print(json.dumps(events), flush=True)

    if loop_kind == "trio":
        anyio.run(main, backend="trio")
    else:
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop_kind == "uvloop"})
    """
)


def run_child(
    tmp_path: Path, loop: str, how: str, scenario: str, fallback: str = "private"
) -> subprocess.CompletedProcess[str]:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    env = {**os.environ, "PYTHONPATH": str(REPO), "POOL_SIG_DB": str(tmp_path / "sig.db")}
    return subprocess.run(
        [sys.executable, "-c", CHILD, loop, how, scenario, fallback],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )


AFTER_THE_BLOCK = ["SIGTERM", "SIGTERM", "SIGINT"]
WAYS = [
    pytest.param("asyncio", "loop", id="asyncio-loop.add_signal_handler"),
    pytest.param("asyncio", "signal", id="asyncio-signal.signal"),
    pytest.param("uvloop", "signal", id="uvloop-signal.signal"),
    pytest.param("trio", "signal", id="trio-signal.signal"),
]


@pytest.mark.parametrize(("loop", "how"), WAYS)
def test_the_apps_handlers_are_back_after_the_block(tmp_path: Path, loop: str, how: str) -> None:
    result = run_child(tmp_path, loop, how, "left")
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert json.loads(result.stdout.splitlines()[-1]) == ["before_exit", *AFTER_THE_BLOCK]


@pytest.mark.parametrize(("loop", "how"), WAYS)
def test_a_received_signal_disconnects_then_goes_to_the_apps_handler(
    tmp_path: Path, loop: str, how: str
) -> None:
    result = run_child(tmp_path, loop, how, "received")
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert json.loads(result.stdout.splitlines()[-1]) == [
        "before_exit", "SIGTERM", *AFTER_THE_BLOCK
    ]


SIGINT_CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    import pool

    async def main():
        db = pool.Pool("sqlite:///" + os.environ["POOL_SIG_DB"], connection_limit=1)

        async def last_words():
            print("before_exit", flush=True)

        db.on_before_exit(last_words)
        async with pool.handle_signals(grace=1):
            await db.fetchval("SELECT 1")
            if sys.argv[1] == "received":
                os.kill(os.getpid(), signal.SIGINT)
                while True:
                    await db.fetchval("SELECT 1")
                    await asyncio.sleep(0.002)
        await db.disconnect()
        print("left the block", flush=True)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            print("cancelled cleanly", flush=True)  # asyncio.run's handler did this
            raise

    asyncio.run(main())
    """
)


class TestAsyncioRunsOwnSigint:
    """asyncio.run installs a SIGINT handler of its own: it is the usual one, and comes back."""

    def run(self, tmp_path: Path, scenario: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO), "POOL_SIG_DB": str(tmp_path / "sig.db")}
        return subprocess.run(
            [sys.executable, "-c", SIGINT_CHILD, scenario],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )

    def test_after_the_block_sigint_cancels_the_main_task_then_interrupts(
        self, tmp_path: Path
    ) -> None:
        result = self.run(tmp_path, "left")
        assert result.stdout.split() == ["before_exit", "left", "the", "block", "cancelled",
                                         "cleanly"], result.stderr
        assert result.returncode == -signal.SIGINT
        assert "KeyboardInterrupt" in result.stderr

    def test_a_received_sigint_disconnects_then_interrupts(self, tmp_path: Path) -> None:
        result = self.run(tmp_path, "received")
        assert result.stdout.split() == ["before_exit"], result.stderr
        assert result.returncode == -signal.SIGINT
        assert "KeyboardInterrupt" in result.stderr
        assert "PoolClosedError" not in result.stderr


class TestFallback:
    """Without the loop's private handler table: signal.getsignal/signal.signal only."""

    @pytest.mark.parametrize("scenario", ["left", "received"])
    def test_a_signal_signal_handler_is_still_restored(
        self, tmp_path: Path, scenario: str
    ) -> None:
        result = run_child(tmp_path, "asyncio", "signal", scenario, "fallback")
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
        events = json.loads(result.stdout.splitlines()[-1])
        assert events[-3:] == AFTER_THE_BLOCK
        assert "WARNING" not in result.stderr

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # uvloop hides its table
    def test_a_loop_handler_that_cannot_be_read_back_is_named_in_a_warning(
        self, tmp_path: Path, loop: str
    ) -> None:
        result = run_child(tmp_path, loop, "loop", "left", "fallback")
        for name in ("SIGTERM", "SIGINT"):
            assert f"{name} had a handler installed with loop.add_signal_handler" in result.stderr
        # not restored as the bare wake-up no-op (the signal silently ignored):
        # it does what it would do with no handler at all
        assert result.returncode == -signal.SIGTERM, (result.stdout, result.stderr)
        assert "left the block" in result.stdout


class TestSaveSignalHandlers:
    """The shim itself, in this process, on a signal nobody else uses."""

    def test_a_loop_handler_comes_back_as_the_same_handle(self) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            ran = asyncio.Event()
            loop.add_signal_handler(signal.SIGUSR1, ran.set)
            handles: dict[int, Any] = getattr(loop, "_signal_handlers")  # noqa: B009
            before = handles[signal.SIGUSR1]
            try:
                restore = _shims.save_signal_handlers([signal.SIGUSR1])
                loop.add_signal_handler(signal.SIGUSR1, print)  # as anyio's receiver does
                loop.remove_signal_handler(signal.SIGUSR1)
                assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
                restore()
                assert handles[signal.SIGUSR1] is before
                os.kill(os.getpid(), signal.SIGUSR1)
                await asyncio.wait_for(ran.wait(), 5)
            finally:
                loop.remove_signal_handler(signal.SIGUSR1)

        asyncio.run(main())

    def test_a_signal_handler_comes_back_through_signal_signal(self) -> None:
        def handler(signum: int, frame: object) -> None:
            pass

        async def main() -> None:
            loop = asyncio.get_running_loop()
            restore = _shims.save_signal_handlers([signal.SIGUSR1])
            loop.add_signal_handler(signal.SIGUSR1, print)
            loop.remove_signal_handler(signal.SIGUSR1)
            restore()
            assert signal.getsignal(signal.SIGUSR1) is handler

        previous = signal.signal(signal.SIGUSR1, handler)
        try:
            asyncio.run(main())
        finally:
            signal.signal(signal.SIGUSR1, previous)

    def test_a_handle_cancelled_meanwhile_stays_gone(self) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR1, print)
            handles: dict[int, Any] = getattr(loop, "_signal_handlers")  # noqa: B009
            restore = _shims.save_signal_handlers([signal.SIGUSR1])
            handles[signal.SIGUSR1].cancel()
            loop.remove_signal_handler(signal.SIGUSR1)
            restore()
            assert signal.SIGUSR1 not in handles

        asyncio.run(main())
