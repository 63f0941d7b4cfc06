"""The wait queue, a component of its own: who is served next, and who opens.

The ledger calls it through a small interface, and never edits its
containers itself:

* :meth:`push` a new waiter at the back, :meth:`push_at` one that arrived
  earlier (it checked an idle connection meanwhile), :meth:`requeue_first` one
  whose handed connection was retired before it ran;
* :meth:`pop` the next waiter to grant a connection to (None: nobody may have
  one now), :meth:`remove` one that gave up, :meth:`clear` them all;
* the "sleepers" role: the waiters not opening a connection themselves
  (:meth:`sleep`, :meth:`sleep_first`, :meth:`next_opener`, the youngest first,
  so that the oldest are never stuck in a connect when a connection frees);
* counts and order through two plain dicts, :attr:`members` (every queued
  waiter, oldest arrival first) and :attr:`sleepers`, which the ledger reads
  (``len``, truth, membership) at no more than a dict's cost: the fast acquire
  asks ``if waiters`` on every call.

Two implementations. :class:`Fifo` is strict first-in first-out: the queue
of every pool without lanes and tenants, at the cost the ledger paid when it
edited the dicts inline. :class:`Lanes` is weighted fair queuing across lanes,
round robin across the tenants with waiters inside a lane, FIFO inside a
tenant. Every method awaits nothing; each is O(1), or O(log n) in the lanes
with waiters for a grant (a heap).

Why virtual time and not deficit round robin: a grant is one unit of service
(service times are unknown when a connection is handed out), and DRR with
unit costs is weighted round robin, which serves a lane ``weight`` grants in a
row: beside ``{"web": 100, "batch": 1}``, a batch waiter waits a whole round
of 100 grants at worst. Start-time fair queuing (a virtual clock that
advances by ``1 / weight`` per grant to a lane, and a lane that starts to wait
again resuming at the clock, never earlier) interleaves the grants evenly,
gives an idle lane's share to the others (work conserving) without letting it
bank credit for later, and needs one heap of the lanes with waiters.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from ._errors import ConfigError
from ._waiters import Waiter

__all__ = ["DEFAULT_LANE", "Fifo", "Lane", "LaneState", "Lanes", "WaitQueue", "lanes_from"]

#: the lane of an acquire without ``lane=``
DEFAULT_LANE: Final = "default"


@dataclass(frozen=True, slots=True)
class Lane:
    """A lane's configuration: ``Pool(url, lanes={"batch": Lane(weight=1, limit=2)})``.

    ``weight`` (a whole number >= 1): the lane's share of the grants while
    several lanes wait, in proportion to the others'. ``limit``: at most this
    many connections lent to the lane at once (None: no cap but the pool's).
    """

    weight: int = 1
    limit: int | None = None

    def __post_init__(self) -> None:
        if type(self.weight) is not int or self.weight < 1:
            raise ConfigError("weight", self.weight, "must be a whole number >= 1")
        if self.limit is not None and (type(self.limit) is not int or self.limit < 1):
            raise ConfigError("limit", self.limit, "must be a whole number >= 1, or None")


def lanes_from(lanes: object) -> dict[str, Lane]:
    """``lanes=`` validated: names to :class:`Lane`, with ``"default"`` unless configured."""
    if not isinstance(lanes, Mapping) or not lanes:
        raise ConfigError("lanes", lanes, "must be a non-empty mapping of lane names to weights")
    out: dict[str, Lane] = {}
    for name, spec in lanes.items():
        if not isinstance(name, str) or not name:
            raise ConfigError("lanes", name, "lane names must be non-empty strings")
        if isinstance(spec, Lane):
            out[name] = spec
        elif type(spec) is int:
            if spec < 1:
                raise ConfigError(f"lanes[{name!r}]", spec, "a weight must be a whole number >= 1")
            out[name] = Lane(weight=spec)
        else:
            raise ConfigError(f"lanes[{name!r}]", spec, "must be a weight (int) or a pool.Lane")
    out.setdefault(DEFAULT_LANE, Lane())
    return out


class WaitQueue:
    """What both queues share: the members, the sleepers, and the sleepers' role."""

    __slots__ = ("members", "sleepers")

    def __init__(self) -> None:
        #: every waiter queued, in arrival order (an ordered dict: O(1) removal)
        self.members: OrderedDict[Waiter, None] = OrderedDict()
        #: the waiters not opening a connection themselves, to wake one in O(1)
        self.sleepers: OrderedDict[Waiter, None] = OrderedDict()

    # the sleepers' role

    def sleep(self, waiter: Waiter) -> None:
        """It waits for a connection, and may be woken to open one."""
        self.sleepers[waiter] = None

    def sleep_first(self, waiter: Waiter) -> None:
        """It sleeps, and is the last to be woken to open (it is first in line)."""
        sleepers = self.sleepers
        sleepers[waiter] = None
        sleepers.move_to_end(waiter, last=False)

    def wake_to_open(self, waiter: Waiter) -> None:
        """It opens a connection itself now: no longer a sleeper."""
        self.sleepers.pop(waiter, None)

    def next_opener(self) -> Waiter:
        """The youngest sleeper, to open a connection (call only if :attr:`sleepers`)."""
        waiter, _ = self.sleepers.popitem(last=True)
        return waiter

    # the queue proper: each implementation's

    def push(self, waiter: Waiter) -> None:
        """Queue ``waiter`` at the back, as a sleeper."""
        raise NotImplementedError

    def push_at(self, waiter: Waiter, arrival: int) -> None:
        """Queue ``waiter``, which arrived at ``arrival``: ahead of younger ones. O(k)."""
        raise NotImplementedError

    def requeue_first(self, waiter: Waiter) -> None:
        """Back at the head: it was granted a connection that was retired before it ran."""
        raise NotImplementedError

    def pop(self) -> Waiter | None:
        """The next waiter to grant a connection to, out of the queue; None if none may."""
        raise NotImplementedError

    def remove(self, waiter: Waiter) -> None:
        """A waiter gives up: out of the queue, wherever it is. O(1)."""
        raise NotImplementedError

    def clear(self) -> None:
        """Everyone leaves (they were failed)."""
        self.members.clear()
        self.sleepers.clear()

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self.members)


def _older_first(queue: OrderedDict[Waiter, None], waiter: Waiter) -> None:
    """Put ``waiter`` in ``queue`` behind the older ones only: O(k) for the k younger."""
    arrival = waiter.arrival
    younger = list(itertools.takewhile(lambda w: w.arrival > arrival, reversed(queue)))
    queue[waiter] = None
    for behind in reversed(younger):
        queue.move_to_end(behind)


def _at_head(queue: OrderedDict[Waiter, None], waiter: Waiter) -> None:
    """At the head, behind the older waiters requeued there before it: O(k) for those."""
    older = list(itertools.takewhile(lambda w: w.arrival < waiter.arrival, queue))
    queue[waiter] = None
    queue.move_to_end(waiter, last=False)
    for ahead in reversed(older):
        queue.move_to_end(ahead, last=False)


class Fifo(WaitQueue):
    """Strict first-in first-out: the oldest waiter is served first."""

    __slots__ = ()

    def push(self, waiter: Waiter) -> None:
        self.members[waiter] = None
        self.sleepers[waiter] = None

    def push_at(self, waiter: Waiter, arrival: int) -> None:
        waiter.arrival = arrival
        _older_first(self.members, waiter)
        self.sleepers[waiter] = None

    def requeue_first(self, waiter: Waiter) -> None:
        _at_head(self.members, waiter)

    def pop(self) -> Waiter | None:
        # (the ledger calls it only with someone queued: no emptiness test here)
        waiter, _ = self.members.popitem(last=False)
        self.sleepers.pop(waiter, None)
        return waiter

    def remove(self, waiter: Waiter) -> None:
        self.members.pop(waiter, None)
        self.sleepers.pop(waiter, None)


class LaneState:
    """One lane's live state: its tenants with waiters, its counts, its virtual time."""

    __slots__ = (
        "acquired", "entry", "held", "limit", "name", "ring", "stride", "tag", "waiting",
        "weight",
    )

    def __init__(self, name: str, lane: Lane) -> None:
        self.name = name
        self.weight = lane.weight
        #: the lane's cap (no cap: a number no pool reaches)
        self.limit = lane.limit if lane.limit is not None else 1 << 62
        #: virtual time a grant to this lane costs: 1 / weight
        self.stride = 1.0 / lane.weight
        #: its virtual start tag: the next grant's place in the schedule
        self.tag = 0.0
        #: the sequence number of its live heap entry, -1 when it has none
        self.entry = -1
        #: tenants with waiters, in turn order: each one's waiters, oldest first
        self.ring: OrderedDict[Hashable, OrderedDict[Waiter, None]] = OrderedDict()
        self.waiting = 0
        #: connections lent (or handed) to the lane now
        self.held = 0
        #: connections lent to the lane, in all
        self.acquired = 0

    def __repr__(self) -> str:
        return f"<Lane {self.name} weight={self.weight} waiting={self.waiting} held={self.held}>"


class Lanes(WaitQueue):
    """Weighted fair queuing across lanes, tenants in turn inside one, FIFO inside a tenant.

    Each waiter carries its lane (a :class:`LaneState`) and its tenant key in
    ``waiter.lane`` and ``waiter.tenant``. A lane is in the heap while it has
    waiters and is under its limit; entries are invalidated lazily (a lane's
    ``entry`` names its one live entry), and the heap is rebuilt when dead
    entries outnumber the lanes, so it stays O(lanes) in size.
    """

    __slots__ = ("by_name", "default", "heap", "seq", "servable", "vnow")

    def __init__(self, lanes: Mapping[str, Lane]) -> None:
        super().__init__()
        self.by_name: dict[str, LaneState] = {
            name: LaneState(name, lane) for name, lane in lanes.items()
        }
        self.default = self.by_name[DEFAULT_LANE]
        self.heap: list[tuple[float, int, LaneState]] = []
        self.seq = 0
        #: the virtual clock: the start tag of the last grant
        self.vnow = 0.0
        #: waiters in lanes under their limit: those a free connection could go
        #: to, the demand worth opening connections for
        self.servable = 0

    def adopt(self, old: WaitQueue) -> None:
        """Take over the waiters of ``old`` (a FIFO): into the default lane, in order."""
        for waiter in old.members:
            waiter.lane = self.default
            waiter.tenant = None
            self.members[waiter] = None
            self._join(waiter, False)
        self.sleepers.update(old.sleepers)

    def lane(self, name: str | None) -> LaneState:
        """The lane named ``name`` (None: the default one); ConfigError if there is none."""
        if name is None:
            return self.default
        state = self.by_name.get(name)
        if state is None:
            raise ConfigError(
                "lane", name, f"is not one of this pool's lanes ({', '.join(self.by_name)})"
            )
        return state

    # ------------------------------------------------------------ scheduling

    def _schedule(self, lane: LaneState) -> None:
        """The lane waits and may be served: give it a heap entry at its start tag."""
        if lane.tag < self.vnow:
            lane.tag = self.vnow  # it was idle: it resumes now, with no banked credit
        self.seq += 1
        lane.entry = self.seq
        heap = self.heap
        heapq.heappush(heap, (lane.tag, self.seq, lane))
        if len(heap) > 2 * len(self.by_name) + 8:
            # dead entries (lanes that emptied or hit their limit) outnumber the live
            live = [item for item in heap if item[2].entry == item[1]]
            heapq.heapify(live)
            self.heap[:] = live

    def _next_lane(self) -> LaneState | None:
        """The servable lane with the smallest start tag, its entry popped; O(log n)."""
        heap = self.heap
        while heap:
            tag, seq, lane = heapq.heappop(heap)
            if lane.entry == seq:
                lane.entry = -1
                self.vnow = tag
                return lane
        return None

    def may_take(self, lane: LaneState) -> bool:
        """May a newcomer of ``lane`` take an idle connection without queueing?

        Only if nobody who could be served waits (no queue-jumping), and its
        lane is under its limit. Waiters of lanes at their limit do not count:
        the connection could not go to them.
        """
        if lane.held >= lane.limit:
            return False
        heap = self.heap
        while heap and heap[0][2].entry != heap[0][1]:
            heapq.heappop(heap)  # dead entries
        return not heap

    def charge(self, lane: LaneState) -> None:
        """A connection is lent (or handed) to ``lane``."""
        lane.held += 1
        if lane.held == lane.limit:
            lane.entry = -1  # at its limit: passed over until one comes back
            self.servable -= lane.waiting

    def freed(self, lane: LaneState) -> None:
        """A connection lent to ``lane`` came back (or was never taken)."""
        lane.held -= 1
        if lane.held == lane.limit - 1:
            self.servable += lane.waiting
        if lane.waiting and lane.entry < 0 and lane.held < lane.limit:
            self._schedule(lane)

    # ------------------------------------------------------------ the queue

    def _join(self, waiter: Waiter, first: bool) -> None:
        lane: LaneState = waiter.lane
        ring = lane.ring
        tenant = waiter.tenant
        queue = ring.get(tenant)
        if queue is None:
            queue = ring[tenant] = OrderedDict()  # a tenant's first waiter: its turn comes last
        if first:
            _at_head(queue, waiter)
            ring.move_to_end(tenant, last=False)
        elif queue and next(reversed(queue)).arrival > waiter.arrival:
            _older_first(queue, waiter)
        else:
            queue[waiter] = None
        lane.waiting += 1
        if lane.held < lane.limit:
            self.servable += 1
            if lane.entry < 0:
                self._schedule(lane)

    def push(self, waiter: Waiter) -> None:
        self.members[waiter] = None
        self.sleepers[waiter] = None
        self._join(waiter, False)

    def push_at(self, waiter: Waiter, arrival: int) -> None:
        waiter.arrival = arrival
        _older_first(self.members, waiter)
        self.sleepers[waiter] = None
        self._join(waiter, False)

    def requeue_first(self, waiter: Waiter) -> None:
        _at_head(self.members, waiter)
        self._join(waiter, True)

    def pop(self) -> Waiter | None:
        lane = self._next_lane()
        if lane is None:
            return None
        ring = lane.ring
        tenant, queue = next(iter(ring.items()))
        waiter, _ = queue.popitem(last=False)
        if queue:
            ring.move_to_end(tenant)  # its turn is over: the next tenant's
        else:
            del ring[tenant]
        lane.waiting -= 1
        self.servable -= 1
        lane.tag += lane.stride
        self.charge(lane)
        if lane.waiting and lane.held < lane.limit:
            self._schedule(lane)
        del self.members[waiter]
        self.sleepers.pop(waiter, None)
        return waiter

    def remove(self, waiter: Waiter) -> None:
        if self.members.pop(waiter, 0) is not None:
            return  # not queued (served, failed, or removed already)
        self.sleepers.pop(waiter, None)
        lane: LaneState = waiter.lane
        ring = lane.ring
        queue = ring[waiter.tenant]
        del queue[waiter]
        if not queue:
            del ring[waiter.tenant]
        lane.waiting -= 1
        if lane.held < lane.limit:
            self.servable -= 1
        if not lane.waiting:
            lane.entry = -1

    def clear(self) -> None:
        super().clear()
        self.heap.clear()
        self.servable = 0
        for lane in self.by_name.values():
            lane.ring.clear()
            lane.waiting = 0
            lane.entry = -1

    def reset(self) -> None:
        """A new epoch (after a fork): nothing held, nobody waiting."""
        self.clear()
        for lane in self.by_name.values():
            lane.held = 0
