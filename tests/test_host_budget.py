"""The machine-wide slot budget (pool/_budget.py) across real processes.

Subprocesses, not threads: flock locks belong to open file descriptions, and
what must hold is that a process killed with SIGKILL frees its share at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pool._budget import HostBudget, MemberRecord, fair_share

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pool._budget import HostBudget
    budget = HostBudget(sys.argv[1], int(sys.argv[2]), root=sys.argv[3])
    slots = [budget.take() for _ in range(int(sys.argv[4]))]
    member = budget.join()
    member.publish(starving=int(sys.argv[5]), size=len(slots), demand=len(slots))
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def holder(tmp_path):
    """Starts processes that hold slots; each is killed and reaped at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(limit: int, count: int, starving: int = 0) -> subprocess.Popen[str]:
        proc = _holder(tmp_path, limit, count, starving)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _holder(tmp_path, limit: int, count: int, starving: int = 0) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, "sqlite:///t.db", str(limit), str(tmp_path), str(count),
         str(starving)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


class TestSlots:
    def test_at_most_n_slots_are_held(self, tmp_path):
        budget = HostBudget("postgresql://app@db/shop", 3, root=str(tmp_path))
        slots = [budget.take() for _ in range(3)]
        assert all(slot is not None for slot in slots)
        assert budget.take() is None
        assert budget.in_use() == 3
        assert budget.holders() == [os.getpid()] * 3
        freed = slots[1]
        assert freed is not None
        freed.release()
        freed.release()  # idempotent
        assert budget.in_use() == 2
        again = budget.take()
        assert again is not None and again.index == freed.index

    def test_other_targets_and_limits_have_budgets_of_their_own(self, tmp_path):
        a = HostBudget("postgresql://app@db/shop", 1, root=str(tmp_path))
        b = HostBudget("postgresql://app@db/other", 1, root=str(tmp_path))
        c = HostBudget("postgresql://app@db/shop", 2, root=str(tmp_path))
        assert a.take() is not None
        assert a.take() is None
        assert b.take() is not None
        assert c.take() is not None

    def test_slots_are_shared_by_processes(self, tmp_path, holder):
        proc = holder(4, 3)
        budget = HostBudget("sqlite:///t.db", 4, root=str(tmp_path))
        assert budget.holders().count(proc.pid) == 3
        mine = budget.take()
        assert mine is not None
        assert budget.take() is None

    def test_a_killed_process_frees_its_share_at_once(self, tmp_path, holder):
        proc = holder(2, 2)
        budget = HostBudget("sqlite:///t.db", 2, root=str(tmp_path))
        assert budget.take() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # the kernel dropped the locks with the process: no timeout, no cleanup
        deadline = time.monotonic() + 1.0
        while budget.in_use() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert budget.in_use() == 0
        # and the files it left, with its pid inside, are not taken for a holder
        assert os.path.exists(os.path.join(budget.directory, "slot-0"))
        assert budget.take() is not None and budget.take() is not None


class TestMembers:
    def test_live_members_are_seen_and_dead_ones_removed(self, tmp_path, holder):
        proc = holder(4, 1, starving=2)
        budget = HostBudget("sqlite:///t.db", 4, root=str(tmp_path))
        me = budget.join()
        try:
            others = me.others()
            assert others == [MemberRecord(proc.pid, 2, 1, 1)]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert me.others() == []
            names = os.listdir(budget.directory)
            assert not [n for n in names if n.startswith("member-") and str(proc.pid) in n]
        finally:
            me.leave()
        assert not [n for n in os.listdir(budget.directory) if n.startswith("member-")]

    def test_publish_is_read_back(self, tmp_path):
        budget = HostBudget("sqlite:///t.db", 4, root=str(tmp_path))
        a, b = budget.join(), budget.join()
        a.publish(starving=1, size=0, demand=1)
        assert b.others() == [MemberRecord(os.getpid(), 1, 0, 1)]
        a.leave()
        a.leave()
        assert b.others() == []
        b.leave()


@pytest.mark.parametrize(
    ("limit", "others", "own", "share"),
    [
        (20, [], 1, 20),
        (20, [MemberRecord(1, 0, 5, 5)], 1, 10),
        (20, [MemberRecord(1, 0, 5, 0)], 1, 20),  # an idle pool has no demand
        (20, [MemberRecord(i, 0, 1, 1) for i in range(7)], 3, 2),
        (3, [MemberRecord(i, 0, 1, 1) for i in range(7)], 3, 1),  # never 0 with demand
        (20, [MemberRecord(1, 1, 0, 1)], 0, 0),  # no demand: no share
    ],
)
def test_fair_share(limit, others, own, share):
    assert fair_share(limit, others, own) == share


class TestOneLockPerConnect:
    """The issue's "at most one lock operation per connect": take() tries the slot it gave
    back last first, and scans only when another process took that one."""

    def test_steady_churn_costs_one_lock_attempt(self, tmp_path, holder):
        other = holder(8, 4)  # another process holds half the budget
        budget = HostBudget("sqlite:///t.db", 8, root=str(tmp_path))
        held = [budget.take() for _ in range(3)]  # the fill may try the other's slots
        assert all(slot is not None for slot in held)
        before = budget.attempts
        for i in range(100):  # a connection closed, another opened: 100 times
            slot = held[i % 3]
            assert slot is not None
            slot.release()
            held[i % 3] = budget.take()
            assert held[i % 3] is not None
        assert budget.attempts - before == 100
        assert sorted(budget.holders()).count(other.pid) == 4
        assert budget.in_use() == 7

    def test_a_wrong_hint_falls_back_to_the_scan(self, tmp_path):
        # two budget objects lock like two processes: flock belongs to the open file
        a = HostBudget("sqlite:///t.db", 3, root=str(tmp_path))
        b = HostBudget("sqlite:///t.db", 3, root=str(tmp_path))
        first, second = a.take(), a.take()
        assert first is not None and second is not None
        first.release()  # a's hint: first.index
        taken = [b.take(), b.take()]  # b gets both free slots, first.index among them
        assert all(slot is not None for slot in taken)
        assert first.index in {slot.index for slot in taken if slot is not None}
        assert a.take() is None  # the hint was wrong, and the scan found nothing free
        other = next(slot for slot in taken if slot is not None and slot.index != first.index)
        other.release()
        got = a.take()
        assert got is not None and got.index == other.index  # found by the scan
        assert b.holders().count(os.getpid()) == 3

    def test_pool_reconnects_with_one_lock_attempt_each(self, tmp_path, holder, monkeypatch):
        import anyio

        import pool
        from pool._budget import BUDGET_DIR_ENV
        from pool._registry import target_of

        monkeypatch.setenv(BUDGET_DIR_ENV, str(tmp_path))
        url = f"sqlite:///{tmp_path / 'churn.db'}"
        other = subprocess.Popen(
            [sys.executable, "-c", HOLDER, target_of("sqlite", url), "6",
             str(tmp_path), "3", "0"],
            stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        try:
            assert other.stdout is not None and other.stdout.readline().strip() == "ready"

            async def main() -> tuple[int, int]:
                db = pool.Pool(url, host_connection_limit=6, connection_limit=3)
                try:
                    async def three() -> None:
                        gate = anyio.Event()
                        async with anyio.create_task_group() as tg:
                            for _ in range(3):
                                tg.start_soon(hold, gate)
                            with anyio.fail_after(5):
                                while db.stats().in_use < 3:
                                    await anyio.sleep(0.001)
                            gate.set()

                    async def hold(gate: anyio.Event) -> None:
                        async with db.acquire():
                            await gate.wait()

                    await three()  # the first fill
                    budget = db._engine.host.budget
                    assert budget is not None
                    before, opened = budget.attempts, db.stats().opened
                    for _ in range(20):
                        await db.drain()  # the three close
                        await three()  # and three open again
                    assert db.stats().host_in_use == 6
                    return budget.attempts - before, db.stats().opened - opened
                finally:
                    await db.disconnect()

            attempts, opened = anyio.run(main)
            assert opened == 60
            assert attempts == opened
        finally:
            other.kill()
            other.wait()
            assert other.stdout is not None
            other.stdout.close()
