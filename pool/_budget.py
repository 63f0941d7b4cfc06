"""One budget of open connections for a whole machine: ``host_connection_limit``.

Every pool on this machine, in any process, that points at the same target
(driver scheme, hosts, ports, database, user) and sets the same
``host_connection_limit=N`` shares at most N open connections. This is the
only state that crosses processes, and it lives outside the ledger's hot
path: a slot is taken before a connect and given back after a close.

How it is kept, without a daemon:

* **Slots.** The budget is a directory with N files, ``slot-0`` ..
  ``slot-<N-1>``. A slot is held by an exclusive ``flock`` on an open file
  descriptor of its file. The kernel drops the lock when the descriptor is
  closed or its process dies (``kill -9`` included), so a crashed process
  frees its share at once, and a file left behind by a dead process is never
  mistaken for a live holder: only a lock counts, never a file's existence or
  content. The holder writes its pid into the file, for diagnosis only.
* **Members.** Each pool that uses the budget holds one more locked file,
  ``member-<pid>-<serial>``, for as long as it is open, with a small record:
  how many callers wait for a slot, how many connections it holds and has in
  use. A member file whose lock is free belongs to a dead process and is
  removed by whoever finds it. A member is created under a temporary name,
  locked, and only then renamed, so no one ever sees an unlocked member file
  of a live pool.

From the members, each pool works out its fair share (N divided by the pools
with demand: connections in use or callers waiting) and whether another pool
starves (it waits and no slot is free); the pool's upkeep then sheds what it
holds above its share (see ``_engine``).

Everything here is synchronous and cheap (a few system calls on local files in
``/dev/shm`` or the temp directory); none of it runs on the acquire/release
fast path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import tempfile
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BUDGET_DIR_ENV", "HostBudget", "Member", "MemberRecord", "Slot", "budget_root", "fair_share",
]

#: overrides where budgets live (tests, or a host whose /dev/shm is not shared)
BUDGET_DIR_ENV: Final = "POOL_HOST_BUDGET_DIR"

_serial = itertools.count()


def budget_root() -> str:
    """Where budgets live: ``$POOL_HOST_BUDGET_DIR``, else /dev/shm, else the temp dir.

    One directory per user: processes of one user share a budget, and no one
    else can plant files in it.
    """
    override = os.environ.get(BUDGET_DIR_ENV)
    if override:
        return override
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else (
        tempfile.gettempdir()
    )
    return os.path.join(base, f"pool-budget-{os.getuid()}")


def _try_lock(fd: int, shared: bool = False) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """What one pool of the budget last said about itself."""

    pid: int
    #: callers waiting for a slot (the pool found none free)
    starving: int
    #: connections it holds open (idle, in use, opening)
    size: int
    #: connections lent out, or callers waiting: its demand
    demand: int


class Slot:
    """One held slot of a budget: the connection it pays for may stay open."""

    __slots__ = ("_budget", "_fd", "index")

    def __init__(self, fd: int, index: int, budget: HostBudget | None = None) -> None:
        self._fd = fd
        self.index = index
        self._budget = budget

    def release(self) -> None:
        """Give the slot back (idempotent). Call it once the connection is gone."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            # closing the descriptor drops the lock: one system call
            with contextlib.suppress(OSError):
                os.close(fd)
            budget, self._budget = self._budget, None
            if budget is not None:
                budget._freed(self.index)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def __repr__(self) -> str:
        return f"<Slot {self.index} {'held' if self.held else 'released'}>"


class Member:
    """One pool's presence in a budget, from its start to its close."""

    __slots__ = ("_budget", "_fd", "path")

    def __init__(self, budget: HostBudget) -> None:
        self._budget = budget
        directory = budget.directory
        # Locked before it gets the name others look for: a member file that
        # others can see unlocked is always a dead process's.
        fd, temp = tempfile.mkstemp(prefix=".joining-", dir=directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.path = os.path.join(directory, f"member-{os.getpid()}-{next(_serial)}")
            os.rename(temp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._fd = fd
        self.publish(starving=0, size=0, demand=0)

    def publish(self, *, starving: int, size: int, demand: int) -> None:
        """Say how this pool stands (one pwrite; readers see a whole line or the old one)."""
        if self._fd < 0:
            return
        line = f"{os.getpid()} {starving} {size} {demand}\n".encode().ljust(48)
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, line, 0)

    def leave(self) -> None:
        """The pool closed: remove its record (idempotent)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(fd)

    def forget(self) -> None:
        """In a forked child: close the inherited descriptor, keep the parent's record.

        Closing it leaves the parent's lock held (a flock belongs to the open
        file description, which the parent still has open); unlinking the file
        would remove the parent's record.
        """
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def active(self) -> bool:
        return self._fd >= 0

    def others(self) -> list[MemberRecord]:
        """The records of the budget's other live pools (dead ones are removed)."""
        return [rec for path, rec in self._budget.members() if path != self.path]


class HostBudget:
    """The slots and members of one budget: one target, one limit, every process."""

    def __init__(self, target: str, limit: int, root: str | None = None) -> None:
        self.target = target
        self.limit = limit
        digest = hashlib.sha256(f"{target}\0{limit}".encode()).hexdigest()[:24]
        self.directory = os.path.join(root or budget_root(), f"{digest}-{limit}")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        # What the directory is for, for whoever looks at it (no password:
        # the target never has one).
        about = os.path.join(self.directory, "TARGET")
        if not os.path.exists(about):
            with contextlib.suppress(OSError), open(about, "w") as f:
                f.write(f"{target} host_connection_limit={limit}\n")
        #: where the next take() scans from: after this process's last success
        self._next = os.getpid() % limit
        #: slots this budget object holds now: take() never tries to lock them
        self._mine: set[int] = set()
        #: slots this budget object gave back, the latest last: the first guess
        #: of take(), usually still free (a hint only: the lock decides)
        self._hints: list[int] = []
        #: lock attempts so far (one flock each; tests count them)
        self.attempts = 0

    def _freed(self, index: int) -> None:
        self._mine.discard(index)
        hints = self._hints
        if index in hints:
            hints.remove(index)
        hints.append(index)
        if len(hints) > self.limit:
            del hints[0]

    def _slot_path(self, index: int) -> str:
        return os.path.join(self.directory, f"slot-{index}")

    def take(self) -> Slot | None:
        """A free slot, held now; None when all N are held. Never blocks.

        The common case is one lock attempt: first the slot this object gave
        back last (nobody else has usually taken it since), else, on an
        empty budget's fill, the slot after its last success. Only when that
        guess is wrong does it scan the others, skipping the slots it holds
        itself. The guess is never trusted: a slot is held only by the lock
        this call gets, so a dead process's slot is as free as any and a live
        holder's is never taken.
        """
        limit = self.limit
        mine = self._mine
        hints = self._hints
        tried = -1
        while hints:
            index = hints.pop()
            if index not in mine and index < limit:
                tried = index
                slot = self._lock(index)
                if slot is not None:
                    return slot
                break  # another process took it: the other hints are older still
        start = self._next
        for step in range(limit):
            index = (start + step) % limit
            if index == tried or index in mine:
                continue
            slot = self._lock(index)
            if slot is not None:
                return slot
        return None

    def _lock(self, index: int) -> Slot | None:
        fd = os.open(self._slot_path(index), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.attempts += 1
        if not _try_lock(fd):
            os.close(fd)
            return None
        with contextlib.suppress(OSError):
            os.pwrite(fd, f"{os.getpid()}\n".encode().ljust(16), 0)
        self._next = (index + 1) % self.limit
        self._mine.add(index)
        return Slot(fd, index, self)

    def holders(self) -> list[int]:
        """The pids holding slots now, one entry per slot (for error messages)."""
        pids: list[int] = []
        for index in range(self.limit):
            try:
                fd = os.open(self._slot_path(index), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if _try_lock(fd, shared=True):
                    continue  # free (our shared lock goes with the descriptor)
                raw = os.pread(fd, 16, 0).split()
                pids.append(int(raw[0]) if raw and raw[0].isdigit() else -1)
            finally:
                os.close(fd)
        return pids

    def in_use(self) -> int:
        """How many of the N slots are held now, by any process."""
        return len(self.holders())

    def join(self) -> Member:
        return Member(self)

    def members(self) -> list[tuple[str, MemberRecord]]:
        """Every live member's record; a dead process's member file is removed."""
        found: list[tuple[str, MemberRecord]] = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return found
        for name in names:
            if not name.startswith("member-"):
                continue
            path = os.path.join(self.directory, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if _try_lock(fd, shared=True):
                    # Nobody holds it: its process died without leaving. Removing
                    # it is safe: a live member renames its file only once locked.
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    continue
                fields = os.pread(fd, 48, 0).split()
            finally:
                os.close(fd)
            if len(fields) == 4 and all(f.lstrip(b"-").isdigit() for f in fields):
                pid, starving, size, demand = (int(f) for f in fields)
                found.append((path, MemberRecord(pid, starving, size, demand)))
        return found


def fair_share(limit: int, records: list[MemberRecord], own_demand: int) -> int:
    """This pool's share of ``limit``: N divided by the pools with demand (itself included).

    A pool without demand (nothing lent, nobody waiting) has no share: what it
    holds is surplus the moment another pool starves.
    """
    if own_demand <= 0:
        return 0
    pools = 1 + sum(1 for rec in records if rec.demand > 0)
    return max(1, limit // pools)
