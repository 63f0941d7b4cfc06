"""OpenTelemetry metrics: the semantic conventions for database client connection pools.

Nothing here runs, and OpenTelemetry is not imported, until :func:`instrument`
or ``Pool(..., meter_provider=...)`` asks for it. A pool with no meter runs
exactly the code it ran before: the hot paths (``Ledger.take_idle`` and
``Ledger.give_back``) carry no test for metrics. Instrumenting a pool swaps its
ledger's ``give_back`` and ``release`` for versions that also record the use
time (the ledger swaps ``give_back`` the same way for a reset hook), and sets
the engine's ``record_wait`` / ``record_create``, which only the slow paths
(a wait in the queue, a connect) look at.

The up-down counters and the timeout counter are *observable*: their callbacks
read the ledger when a reader collects, and cost nothing in between.

The instruments (https://opentelemetry.io/docs/specs/semconv/database/database-metrics/),
each with the attribute ``db.client.connection.pool.name``:

========================================== ==================== ===============
``db.client.connection.count``              UpDownCounter (obs.) ``{connection}`` (1)
``db.client.connection.max``                UpDownCounter (obs.) ``{connection}``
``db.client.connection.idle.max``           UpDownCounter (obs.) ``{connection}``
``db.client.connection.idle.min``           UpDownCounter (obs.) ``{connection}``
``db.client.connection.pending_requests``   UpDownCounter (obs.) ``{request}``
``db.client.connection.timeouts``           Counter (obs.)       ``{timeout}``
``db.client.connection.create_time``        Histogram            ``s``
``db.client.connection.wait_time``          Histogram            ``s``
``db.client.connection.use_time``           Histogram            ``s``
``pool.host_budget.limit`` (2)              UpDownCounter (obs.) ``{connection}``
``pool.host_budget.in_use`` (2)             UpDownCounter (obs.) ``{connection}``
========================================== ==================== ===============

(2) only for a pool with ``host_connection_limit``: the machine-wide budget,
and its slots held now by every process (not in the conventions: our own).

(1) with ``db.client.connection.state`` = ``idle`` (idle in the pool) or ``used``
(lent out, or in the pool's own I/O: a check, a rollback, a close).
"""

from __future__ import annotations

import importlib.metadata
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

from ._conn import ANY_LEASE
from ._driver import DISTRIBUTION
from ._errors import ConfigError

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = [
    "GLOBAL", "PoolMetrics", "built", "default_name", "instrument",
    "uninstrument",
]

POOL_NAME: Final = "db.client.connection.pool.name"
STATE: Final = "db.client.connection.state"
#: a pool with lanes: which lane a wait or a pending request is in (our own
#: attribute: the semantic conventions have none for it)
LANE: Final = "pool.lane"

#: seconds; a pool's waits and uses run from microseconds to its pool_timeout
BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
)

_DEFAULT_PORTS: Final = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mariadb": 3306}


def default_name(scheme: str, driver_url: str) -> str:
    """``server.address:server.port/db.namespace``; for SQLite the file's path. No secrets."""
    parts = urlsplit(driver_url)
    if scheme == "sqlite":
        # the path as the driver opens it: sqlite:///app.db is relative, sqlite:////x absolute
        return parts.path[1:] if parts.path.startswith("/") else parts.path or ":memory:"
    query = parse_qs(parts.query)
    hosts = parts.netloc.rpartition("@")[2] or ",".join(query.get("host", [])) or "localhost"
    port = _DEFAULT_PORTS.get(scheme.partition("+")[0])  # postgresql+psycopg: postgresql
    if port is not None:
        # every host of a host list gets its port: "h1:5432,h2:5432"
        hosts = ",".join(
            h if h.startswith("/") or h.rpartition("]")[2].count(":") else f"{h}:{port}"
            for h in hosts.split(",")
        )
    namespace = parts.path.lstrip("/") or (query.get("dbname") or query.get("database") or [""])[0]
    return f"{hosts}/{namespace}"


# ---------------------------------------------------------------------- one meter's instruments


class _Instruments:
    """The instruments of one meter provider, and the pools they report on."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation

        self.provider = provider
        self.pools: weakref.WeakSet[Engine[Any]] = weakref.WeakSet()
        meter = provider.get_meter("pool", _version())
        self._observation = Observation

        def observe(read: Callable[[Any], int]) -> Callable[[CallbackOptions], Iterator[Any]]:
            def callback(options: CallbackOptions) -> Iterator[Any]:
                for engine in self.snapshot():
                    yield Observation(read(engine.ledger), engine.metrics.attributes)  # type: ignore[union-attr]

            return callback

        def count(options: CallbackOptions) -> Iterator[Any]:
            for engine in self.snapshot():
                ledger = engine.ledger
                attrs = engine.metrics.attributes  # type: ignore[union-attr]
                yield Observation(len(ledger.idle), {**attrs, STATE: "idle"})
                yield Observation(len(ledger.lent) + len(ledger.busy), {**attrs, STATE: "used"})

        connection = "{connection}"
        meter.create_observable_up_down_counter(
            "db.client.connection.count", [count], unit=connection,
            description="The number of connections that are currently in state described "
            "by the state attribute",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max", [observe(lambda ledger: ledger.limit)], unit=connection,
            description="The maximum number of open connections allowed",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.max", [observe(lambda ledger: ledger.limit)],
            unit=connection, description="The maximum number of idle open connections allowed",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.min", [observe(lambda ledger: 0)], unit=connection,
            description="The minimum number of idle open connections allowed",
        )
        def pending(options: CallbackOptions) -> Iterator[Any]:
            for engine in self.snapshot():
                ledger = engine.ledger
                attrs = engine.metrics.attributes  # type: ignore[union-attr]
                if ledger.lanes is None:
                    yield Observation(len(ledger.waiters), attrs)
                    continue
                for name, lane in ledger.lanes.by_name.items():  # one point per lane
                    yield Observation(lane.waiting, {**attrs, LANE: name})

        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            [pending], unit="{request}",
            description="The number of current pending requests for an open connection",
        )
        meter.create_observable_counter(
            "db.client.connection.timeouts", [observe(lambda ledger: ledger.timeouts)],
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool",
        )
        def host(read: Callable[[Any], int]) -> Callable[[CallbackOptions], Iterator[Any]]:
            def callback(options: CallbackOptions) -> Iterator[Any]:
                for engine in self.snapshot():  # under the lock, as every callback
                    if engine.host is not None:
                        yield Observation(read(engine.host), engine.metrics.attributes)  # type: ignore[union-attr]

            return callback

        meter.create_observable_up_down_counter(
            "pool.host_budget.limit", [host(lambda budget: budget.limit)], unit=connection,
            description="host_connection_limit: the open connections every pool on this "
            "machine to the same target shares",
        )
        meter.create_observable_up_down_counter(
            "pool.host_budget.in_use", [host(lambda budget: budget.in_use())], unit=connection,
            description="The host budget's slots held now, by every process on this machine",
        )
        self.create_time = _histogram(
            meter, "db.client.connection.create_time",
            "The time it took to create a new connection",
        )
        self.wait_time = _histogram(
            meter, "db.client.connection.wait_time",
            "The time it took to obtain an open connection from the pool",
        )
        self.use_time = _histogram(
            meter, "db.client.connection.use_time",
            "The time between borrowing a connection and returning it to the pool",
        )


    def snapshot(self) -> list[Engine[Any]]:
        """The pools, copied under the lock: the exporter's thread reads while others build."""
        with _LOCK:
            return list(self.pools)


def _histogram(meter: Any, name: str, description: str) -> Any:
    try:  # opentelemetry-api >= 1.23: bucket boundaries in seconds, not the default ms-sized ones
        return meter.create_histogram(
            name, unit="s", description=description,
            explicit_bucket_boundaries_advisory=list(BUCKETS),
        )
    except TypeError:
        return meter.create_histogram(name, unit="s", description=description)


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0"


# ---------------------------------------------------------------------- one pool's recorder


class PoolMetrics:
    """What an instrumented pool records into: its attributes, and every meter's instruments."""

    __slots__ = ("attributes", "by_lane", "sets")

    def __init__(self, name: str) -> None:
        self.attributes: dict[str, str] = {POOL_NAME: name}
        #: the attributes of each lane's waits (built once per lane)
        self.by_lane: dict[str, dict[str, str]] = {}
        self.sets: list[_Instruments] = []

    def wait(self, seconds: float) -> None:
        for ins in self.sets:
            ins.wait_time.record(seconds, self.attributes)

    def wait_in(self, seconds: float, lane: str) -> None:
        """A wait in a pool with lanes: recorded with its lane."""
        attributes = self.by_lane.get(lane)
        if attributes is None:
            attributes = self.by_lane[lane] = {**self.attributes, LANE: lane}
        for ins in self.sets:
            ins.wait_time.record(seconds, attributes)

    def create(self, seconds: float) -> None:
        for ins in self.sets:
            ins.create_time.record(seconds, self.attributes)

    def use(self, seconds: float) -> None:
        for ins in self.sets:
            ins.use_time.record(seconds, self.attributes)


def _install(engine: Engine[Any]) -> PoolMetrics:
    """Swap the pool's release paths for recording ones (once per pool)."""
    metrics = engine.metrics
    if metrics is not None:
        return metrics
    metrics = engine.metrics = PoolMetrics(engine.metrics_name)
    ledger = engine.ledger
    engine.record_wait = metrics.wait
    engine.record_create = metrics.create
    lent = ledger.lent
    give_back = ledger.give_back  # the class's fast release, or _never (a reset hook)
    release = ledger.release
    use = metrics.use
    monotonic = time.monotonic

    def give_back_recorded(raw: Any, lease: int = ANY_LEASE) -> bool:
        rec = lent.get(id(raw))
        if rec is None:
            return False
        lent_at = rec.lent_at
        if give_back(raw, lease):
            use(monotonic() - lent_at)
            return True
        return False

    def release_recorded(raw: Any, cancelled: bool, broken: bool = False) -> Any:
        rec = lent.get(id(raw))
        # Read before the release: a handoff to a waiter inside it lends the
        # same record again and resets lent_at, which would record ~0 s.
        lent_at = rec.lent_at if rec is not None else 0.0
        result = release(raw, cancelled, broken)
        if rec is not None:
            use(monotonic() - lent_at)
        return result

    ledger.give_back = give_back_recorded  # type: ignore[method-assign]
    ledger.release = release_recorded  # type: ignore[method-assign]
    engine.metrics_restore = (give_back, release)
    return metrics


def _uninstall(engine: Engine[Any]) -> None:
    """No meter left: the pool runs its uninstrumented code again."""
    if engine.metrics is None or engine.metrics.sets:
        return
    give_back, release = engine.metrics_restore
    ledger = engine.ledger
    for attr, original in (("give_back", give_back), ("release", release)):
        if getattr(original, "__self__", None) is ledger:
            delattr(ledger, attr)  # the class's own method again
        else:
            setattr(ledger, attr, original)  # what the ledger had swapped in itself
    engine.record_wait = None
    engine.record_create = None
    engine.metrics = None


# ---------------------------------------------------------------------- the process's meters

#: meter provider -> its instruments; the providers given to instrument() are also in GLOBAL
_SETS: dict[int, _Instruments] = {}
GLOBAL: list[_Instruments] = []


def _instruments_for(meter_provider: Any) -> _Instruments:
    if meter_provider is None:
        try:
            from opentelemetry import metrics
        except ImportError as exc:
            raise _missing() from exc
        meter_provider = metrics.get_meter_provider()
    found = _SETS.get(id(meter_provider))
    if found is None or found.provider is not meter_provider:
        try:
            found = _Instruments(meter_provider)
        except ImportError as exc:
            raise _missing() from exc
        _SETS[id(meter_provider)] = found
    return found


def _missing() -> ConfigError:
    return ConfigError(
        "meter_provider", "***", f"needs OpenTelemetry: pip install '{DISTRIBUTION}[otel]'"
    )


#: every pool's engine, so that instrument() reaches the pools built before it
_ENGINES: weakref.WeakSet[Engine[Any]] = weakref.WeakSet()

# Guards every change to, and every walk over, the sets of pools above and in
# _Instruments: a metric reader's exporter collects in a thread of its own
# while Pool() adds to them in another (iterating a set while it grows is a
# RuntimeError). Taken when a pool is built and when a reader collects, never
# on a pool's hot paths. Removals by the garbage collector need no lock: a
# WeakSet defers them while anyone iterates it.
_LOCK = threading.Lock()


def _attach_set(engine: Engine[Any], ins: _Instruments) -> None:
    with _LOCK:
        metrics = _install(engine)
        if ins not in metrics.sets:
            metrics.sets.append(ins)
        ins.pools.add(engine)


def _engines() -> list[Engine[Any]]:
    with _LOCK:
        return list(_ENGINES)


def built(engine: Engine[Any], meter_provider: Any) -> None:
    """A new pool: instrument it for ``Pool(..., meter_provider=mp)`` and for
    every provider given to :func:`instrument`. Costs nothing when there is none."""
    with _LOCK:
        _ENGINES.add(engine)
    if meter_provider is not None:
        ins = _instruments_for(meter_provider)
        engine.own_meter = ins
        _attach_set(engine, ins)
    for ins in GLOBAL:
        _attach_set(engine, ins)


def instrument(meter_provider: Any = None) -> None:
    """Report every pool of the process as OpenTelemetry metrics.

    Registers the semantic-convention instruments for database client
    connection pools (``db.client.connection.count``, ``.max``, ``.idle.max``,
    ``.idle.min``, ``.pending_requests``, ``.timeouts``, ``.create_time``,
    ``.wait_time``, ``.use_time``), each with ``db.client.connection.pool.name``,
    on ``meter_provider`` (the global one, ``opentelemetry.metrics``, when
    None) for the pools built so far and every pool built later. Calling it
    again with the same provider does nothing. Needs ``pip install 'pool-engine[otel]'``
    (``opentelemetry-api``); a pool that is not instrumented pays nothing.
    """
    ins = _instruments_for(meter_provider)
    if ins not in GLOBAL:
        GLOBAL.append(ins)
    for engine in _engines():
        _attach_set(engine, ins)


def uninstrument(meter_provider: Any = None) -> None:
    """Undo :func:`instrument` (every provider when None); pools given their own keep it."""
    drop = list(GLOBAL) if meter_provider is None else [
        ins for ins in GLOBAL if ins.provider is meter_provider
    ]
    for ins in drop:
        GLOBAL.remove(ins)
        for engine in _engines():
            with _LOCK:
                metrics = engine.metrics
                if metrics is not None and ins in metrics.sets and engine.own_meter is not ins:
                    metrics.sets.remove(ins)
                    ins.pools.discard(engine)
                    _uninstall(engine)
