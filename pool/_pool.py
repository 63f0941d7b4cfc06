"""The public face of the pool: configuration in, connections out.

``Pool`` holds the public API and the fast paths, which live in the ledger and
are called straight from here. The parts, each of which reads alone:

* ``_ledger.py``: the one owner of the accounting (synchronous, awaits nothing);
* ``_engine.py``: the I/O (waiting, opening, checks, rollbacks, closes, upkeep);
* ``_waiters.py``: the wait queue, one waiter type per event loop;
* ``_breaker.py``: the circuit breaker;
* ``_diagnosis.py``: holders, call sites, error texts;
* ``_shims.py``: the private-API shortcuts, each with a public fallback;
* ``_handles.py``: what ``acquire()`` and ``transaction()`` return.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

import anyio

from . import _config, _metrics, _registry
from ._acquiring import Flow
from ._driver import Driver, check_driver, load_driver
from ._engine import Engine, Hook, Hooks
from ._errors import ConfigError
from ._handles import Acquire, LaneAcquire, Transaction
from ._ledger import CLOSE_REASONS, OPEN
from ._queue import DEFAULT_LANE, Lane, lanes_from
from ._stats import LaneStats, PoolStats

__all__ = ["Pool", "borrow", "driver_of", "give_back", "lends"]

logger = logging.getLogger("pool")

C = TypeVar("C")
#: the fast acquire builds its handle without a call of Acquire.__init__
_new_object = object.__new__

# Connections a forked child inherited from its parent: see Pool._forget_after_fork.
_INHERITED: Final[list[object]] = []


class Pool(Generic[C]):
    """A connection pool for one database URL.

    Constructing it validates the settings and opens nothing: the first acquire
    connects (lazily, like Prisma), and starts the pool's upkeep (idle expiry,
    lifetime rotation, leak reports) until :meth:`disconnect`. ``async with
    pool:`` connects eagerly and disconnects when the last such block exits.
    Keyword overrides (``connection_limit=5``) win over the URL's parameters.
    ``driver`` plugs in an adapter of your own (any object satisfying
    :class:`pool.Driver`); the URL then only carries pool settings.
    ``password`` is a string, or a callable (sync or async) asked at each
    connect: a token that expires. ``meter_provider`` reports this pool as
    OpenTelemetry metrics (see :func:`pool.instrument`), under ``name``
    (default ``host:port/database``, or the SQLite file's path).

    ``lanes`` shares the pool between workloads: ``{"web": 3, "batch": 1}``
    (weights), or :class:`pool.Lane` values with a ``limit`` on the
    connections a lane may hold at once. While several lanes wait, each
    receives grants in proportion to its weight; inside a lane, the tenants
    (``acquire(tenant=...)``) with waiters take turns, and each tenant's
    waiters are served oldest first. A lane ``"default"`` (weight 1) exists
    unless configured. Without lanes and tenants the queue is strict FIFO.

    >>> db = Pool("postgresql://app@localhost/shop?connection_limit=5")
    >>> async with db.acquire() as conn:   # the driver's own connection
    ...     await conn.fetch("SELECT 1")
    """

    def __init__(
        self,
        url: str,
        /,
        *,
        driver: Driver[C] | None = None,
        configure: Hook | None = None,
        check: Hook | None = None,
        reset: Hook | None = None,
        password: str | Callable[[], Any] | None = None,
        meter_provider: Any = None,
        name: str | None = None,
        lanes: Mapping[str, int | Lane] | None = None,
        **overrides: object,
    ) -> None:
        hooks = Hooks(
            configure=_hook("configure", configure),
            check=_hook("check", check),
            reset=_hook("reset", reset),
        )
        if driver is not None:
            check_driver(driver)
        parsed = _config.parse(url, overrides, any_scheme=driver is not None)
        self._config: Final = parsed.config
        cfg = parsed.config
        if driver is None:
            # The adapter is the only thing that keeps the password.
            driver = load_driver(
                cfg.scheme,
                parsed.driver_url,
                connect_timeout=cfg.connect_timeout,
                socket_timeout=cfg.socket_timeout,
                connect_args=parsed.connect_args,
            )
        if cfg.reset_session and not callable(getattr(driver, "reset_session", None)):
            raise ConfigError(
                "reset_session", True, f"the {driver.scheme} driver has no session reset"
            )
        if password is not None:
            _give_password(driver, password)
        self._driver: Driver[C] = driver
        self._engine: Engine[C] = Engine(
            driver, cfg, _config.secrets_of(parsed.driver_url), hooks
        )
        if lanes is not None:
            self._engine.use_lanes(lanes_from(lanes))
        self._ledger = self._engine.ledger
        self._before_exit: list[Callable[[], Awaitable[object]]] = []
        self._entered = 0
        self._target = _registry.target_of(cfg.scheme, parsed.driver_url)
        if cfg.host_connection_limit is not None:
            self._engine.use_host_budget(self._target, cfg.host_connection_limit)
        self._engine.on_open = self._opened
        self._engine.on_close = self._closed
        if name is not None and not isinstance(name, str):
            raise ConfigError("name", type(name).__name__, "must be a str")
        #: db.client.connection.pool.name: never the password
        self._engine.metrics_name = (
            name if name is not None else _metrics.default_name(cfg.scheme, parsed.driver_url)
        )
        _registry.built(self)
        _metrics.built(self._engine, meter_provider)

    # ------------------------------------------------------------------ public API

    @property
    def config(self) -> _config.PoolConfig:
        """The validated settings (the URL in it has its password redacted)."""
        return self._config

    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool's state and running totals."""
        ledger = self._ledger
        host = self._engine.host
        return PoolStats(
            size=ledger.size,
            idle=len(ledger.idle),
            in_use=len(ledger.lent),
            opening=ledger.opening,
            busy=len(ledger.busy),
            waiting=len(ledger.waiters),
            limit=ledger.limit,
            acquired=ledger.acquired,
            waited=ledger.waited,
            timeouts=ledger.timeouts,
            wait_seconds=ledger.wait_seconds,
            opened=ledger.opened,
            closed=ledger.closed,
            closed_by={r: ledger.closed_by[r] for r in CLOSE_REASONS},
            connect_failures=ledger.connect_failures,
            longest_wait=(
                time.monotonic() - next(iter(ledger.waiters)).started if ledger.waiters else 0.0
            ),
            host_limit=None if host is None else host.limit,
            host_in_use=None if host is None else host.in_use(),
            lanes=self._lane_stats(),
        )

    def _lane_stats(self) -> dict[str, LaneStats]:
        ledger = self._ledger
        lanes = ledger.lanes
        if lanes is None:  # one lane, the default: the whole pool
            return {
                DEFAULT_LANE: LaneStats(
                    waiting=len(ledger.waiters), in_use=len(ledger.lent),
                    acquired=ledger.acquired, weight=1, limit=None,
                )
            }
        return {
            name: LaneStats(
                waiting=lane.waiting, in_use=lane.held, acquired=lane.acquired,
                weight=lane.weight, limit=lane.limit if lane.limit < 1 << 62 else None,
            )
            for name, lane in lanes.by_name.items()
        }

    def acquire(
        self, *, timeout: float | None = None, lane: str | None = None, tenant: Hashable = None
    ) -> Acquire[C]:
        """Borrow a connection: ``async with db.acquire() as conn`` or ``await``.

        With ``await``, give it back with :meth:`release`. Waiters are served
        first-in first-out. ``timeout`` (seconds) overrides ``pool_timeout`` for
        this call; 0 waits forever. ``timeout=None``, the default, means the
        pool's ``pool_timeout`` (10 s unless set), not "wait forever" as in
        asyncpg's ``acquire(timeout=None)``: pass ``timeout=0`` for that. On
        expiry it raises :class:`PoolTimeoutError` (P2024).

        ``lane``: one of the pool's ``lanes`` (default ``"default"``); an
        unknown one raises :class:`ConfigError` here, before any wait.
        ``tenant``: any hashable key; the tenants waiting in a lane take turns.
        """
        if timeout is not None:
            _config.check_seconds("timeout", timeout)
        if lane is None and tenant is None:
            # Acquire.__init__, inlined: a handle on every acquire, and a Python
            # frame for __init__ cost 450 instructions of a ~17,000 fast cycle
            handle: Acquire[C] = _new_object(Acquire)
            handle._engine = self._engine
            handle._ledger = self._ledger
            handle._timeout = timeout
            return handle
        return LaneAcquire(self._engine, timeout, self._engine.flow(lane, tenant))

    async def release(self, conn: C) -> None:
        """Give back a connection taken with ``await db.acquire()``.

        A clean connection goes back with no round trip. One left in a
        transaction is rolled back; a broken or expired one is closed.
        Releasing it twice raises :class:`PoolError`, also once another task
        holds it: a release never frees another holder's lending. A task other
        than the one that acquired it may release it.
        """
        ledger = self._ledger
        if not ledger.give_back(conn, ledger.lease_of(conn)):
            await self._engine.release(conn, None)

    async def fetch(
        self, sql: str, *args: Any, timeout: float | None = None, lane: str | None = None,
        tenant: Hashable = None,
    ) -> list[Any]:
        """Run a query on a pooled connection and return all rows.

        ``timeout`` bounds the query (as asyncpg's does); the wait for a
        connection keeps ``pool_timeout``. ``lane`` and ``tenant``: as for
        :meth:`acquire`, here and in every query helper.
        """
        rows: list[Any] = await self._run(
            self._driver.fetch, sql, args, timeout, self._flow(lane, tenant)
        )
        return rows

    async def fetchrow(
        self, sql: str, *args: Any, timeout: float | None = None, lane: str | None = None,
        tenant: Hashable = None,
    ) -> Any | None:
        """Run a query and return its first row, or None."""
        return await self._run(
            self._driver.fetchrow, sql, args, timeout, self._flow(lane, tenant)
        )

    async def fetchval(
        self, sql: str, *args: Any, timeout: float | None = None, lane: str | None = None,
        tenant: Hashable = None,
    ) -> Any:
        """Run a query and return the first column of its first row."""
        return await self._run(
            self._driver.fetchval, sql, args, timeout, self._flow(lane, tenant)
        )

    async def execute(
        self, sql: str, *args: Any, timeout: float | None = None, lane: str | None = None,
        tenant: Hashable = None,
    ) -> Any:
        """Run a statement; returns what the driver returns (status or row count)."""
        return await self._run(
            self._driver.execute, sql, args, timeout, self._flow(lane, tenant)
        )

    async def executemany(
        self, sql: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None,
        lane: str | None = None, tenant: Hashable = None,
    ) -> None:
        """Run a statement once per argument tuple, all or nothing (as asyncpg's does)."""
        await self._run(self._driver.executemany, sql, args, timeout, self._flow(lane, tenant))

    def _flow(self, lane: str | None, tenant: Hashable) -> Flow | None:
        if lane is None and tenant is None:
            return None
        return self._engine.flow(lane, tenant)

    async def _run(
        self,
        call: Callable[..., Awaitable[Any]],
        sql: str,
        args: Any,
        timeout: float | None,
        flow: Flow | None = None,
    ) -> Any:
        """Acquire, run one driver call, release: the body of the query helpers."""
        if type(sql) is not str:
            raise TypeError(f"sql must be a str, got {type(sql).__name__}")
        if timeout is not None:
            _config.check_seconds("timeout", timeout)
        ledger = self._ledger
        conn = ledger.take_idle() if flow is None else None
        if conn is None:
            conn = await self._engine.acquire(None, flow)
        try:
            result = await (
                call(conn, sql, args) if timeout is None else call(conn, sql, args, timeout)
            )
        except BaseException as exc:
            await self._engine.release(conn, exc)
            raise
        if not ledger.give_back(conn):
            await self._engine.release(conn, None)
        return result

    def transaction(
        self, *, timeout: float | None = None, lane: str | None = None, tenant: Hashable = None
    ) -> Transaction[C]:
        """``async with db.transaction() as conn``: commit on success, roll back on error.

        Cancellation rolls back too: the connection is closed, which makes the
        server discard the transaction. ``lane``, ``tenant``: as for :meth:`acquire`.
        """
        if timeout is not None:
            _config.check_seconds("timeout", timeout)
        return Transaction(self._engine, timeout, self._flow(lane, tenant))

    async def connect(self) -> None:
        """Open one connection now (Prisma's ``$connect``), so a bad URL fails at start-up.

        Does nothing if the pool already holds a connection. A disconnect in
        progress ends first.
        """
        await self._engine.wait_disconnected()
        self._engine.ensure_started()
        if self._ledger.size:
            return
        conn = await self._engine.acquire(None)
        await self._engine.release(conn, None)

    async def resize(self, connection_limit: int) -> None:
        """Change ``connection_limit`` now, without a restart.

        Growing serves the waiters at once (FIFO kept). Shrinking closes idle
        connections first and the rest as they come back, never a held one;
        ``size`` is at most the new limit once the surplus is returned.
        """
        limit = _config.parse_connection_limit(connection_limit)
        await self._engine.resize(limit)

    async def drain(self) -> None:
        """Replace every connection, live (a failover, a credential rotation).

        Idle connections close now, held ones when they come back, checks and
        rollbacks in flight when they end; new ones open as callers need them.
        No caller fails, and FIFO order holds. Returns once the idle ones are
        closed.
        """
        await self._engine.drain()

    async def close(self, *, grace: float = 0.0) -> None:
        """Alias of :meth:`disconnect`, the name asyncpg's, psycopg_pool's and
        SQLAlchemy's users call: the same arguments, the same guarantees.
        """
        # a call, not ``close = disconnect``: a subclass or test double that
        # overrides disconnect() is what close() runs too
        await self.disconnect(grace=grace)

    def on_before_exit(self, callback: Callable[[], Awaitable[object]]) -> None:
        """Register an async callback that :meth:`disconnect` runs first.

        Callbacks run in the order registered, before any connection is closed,
        so they may still use the pool (flush a queue, write a last row). An
        error in one is logged and does not stop the others.
        """
        if not callable(callback):
            raise TypeError(f"callback must be an async callable, got {callback!r}")
        self._before_exit.append(callback)

    async def disconnect(self, *, grace: float = 0.0) -> None:
        """Close every connection (Prisma's ``$disconnect``). Idempotent; never hangs.

        Runs the :meth:`on_before_exit` callbacks, then fails every waiter with
        :class:`PoolClosedError`, closes the idle connections, waits up to
        ``grace`` seconds for held ones to come back, and closes the rest. When
        it returns, every connection the pool opened is closed, whoever held
        it. The pool can be used again afterwards: it reconnects lazily.
        """
        _config.check_seconds("grace", grace)
        # One disconnect at a time, owned by the pool (see Engine.run_disconnect):
        # a second call waits for the first, and a caller cancelled the asyncio
        # way stops waiting without stopping the disconnect half way.
        await self._engine.run_disconnect(lambda: self._disconnect(grace))

    async def _disconnect(self, grace: float) -> None:
        await self._run_before_exit()
        if self._ledger.state is not OPEN:
            return  # a callback's own use ended the pool otherwise (a move to another loop)
        try:
            await self._engine.disconnect(grace)
        finally:
            _registry.closed(self, self._target)
        logger.info("Disconnected the %s pool.", self._driver.scheme)

    async def _run_before_exit(self) -> None:
        bound = self._config.before_exit_timeout or math.inf
        for callback in self._before_exit:
            try:
                with anyio.CancelScope(shield=True), anyio.move_on_after(bound) as scope:
                    await callback()
                if scope.cancelled_caught:
                    logger.warning(
                        "an on_before_exit callback ran past before_exit_timeout=%ss and was "
                        "abandoned: %r",
                        bound,
                        callback,
                    )
            except Exception:
                logger.exception("an on_before_exit callback failed: %r", callback)

    def _opened(self) -> None:
        _registry.opened(self, self._target)

    def _closed(self) -> None:
        _registry.closed(self, self._target)

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connections without closing them.

        They are kept referenced, never collected: collecting an asyncio
        transport unregisters its socket from the event loop's epoll instance,
        which the child shares with its parent, and the parent's next query
        would then wait forever for a reply it is never told about.
        """
        ledger = self._ledger
        if self._engine.host is not None:
            # the inherited slots stay the parent's: our copies close, unlocking nothing
            self._engine.host.forget_after_fork(
                [*ledger.idle, *ledger.lent.values(), *ledger.busy.values()]
            )
        _INHERITED.extend(ledger.forget_after_fork())
        # the parent's disconnect in progress, if any, is not the child's to wait for
        self._engine.forget_after_fork()

    async def __aenter__(self) -> Pool[C]:
        """Connect now; the pool disconnects when the last ``async with`` block exits."""
        self._entered += 1
        try:
            await self.connect()
        except BaseException:
            self._entered -= 1
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._entered -= 1
        if self._entered == 0:
            with anyio.CancelScope(shield=True):
                await self.disconnect()

    def __repr__(self) -> str:
        ledger = self._ledger
        return (
            f"<Pool {self._config.url} [in use {len(ledger.lent)}, idle {len(ledger.idle)}, "
            f"waiting {len(ledger.waiters)}, limit {ledger.limit}]>"
        )


def _give_password(driver: object, password: object) -> None:
    """``password=``: a string, or a callable / async callable asked at each connect."""
    if not (isinstance(password, str) or callable(password)):
        raise ConfigError(
            "password", type(password).__name__, "must be a str, or a callable returning one"
        )
    if not hasattr(driver, "password_provider"):
        raise ConfigError(
            "password",
            "***",
            f"the {getattr(driver, 'scheme', 'given')} driver takes no password",
        )
    provider = password if callable(password) else (lambda: password)
    driver.password_provider = provider


def _hook(name: str, hook: object) -> Hook | None:
    if hook is not None and not callable(hook):
        raise ConfigError(name, hook, "must be an async callable taking the connection")
    return hook


# ---------------------------------------------------------------------- the internal interface
# What the rest of the package (Replicated) may use of a pool; nothing else
# reaches into its attributes.


def lends(pool: Pool[Any], conn: object) -> bool:
    """Is ``conn`` lent by ``pool`` right now?"""
    return id(conn) in pool._ledger.lent


def driver_of(pool: Pool[C]) -> Driver[C]:
    return pool._driver


async def borrow(
    pool: Pool[C], wait_for: float | None, lane: str | None = None, tenant: Hashable = None
) -> C:
    """Acquire from ``pool`` (fast path first), for a handle of another module."""
    flow = pool._flow(lane, tenant)
    conn = pool._ledger.take_idle() if flow is None else None
    if conn is None:
        conn = await pool._engine.acquire(wait_for, flow)
    return conn


async def give_back(pool: Pool[C], conn: C, exc: BaseException | None) -> None:
    """Release to ``pool``, as an ``async with`` block that ended with ``exc`` would."""
    if exc is None and pool._ledger.give_back(conn):
        return
    await pool._engine.release(conn, exc)

