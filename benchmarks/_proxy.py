"""A loopback TCP proxy that makes opening a connection slow (the spike workload).

Every new client connection waits ``delay`` seconds before the proxy connects
it upstream, which is what a distant or busy server costs at connect time;
bytes of an open connection then pass through with no added delay. The proxy
counts the connections it accepted, which is how many connections each pool
opened, whatever the pool itself reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketStream

__all__ = ["DelayProxy", "delay_proxy"]


class DelayProxy:
    """What :func:`delay_proxy` yields: where to connect, and what it saw."""

    def __init__(self, upstream_host: str, upstream_port: int, delay: float) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.delay = delay
        self.host = "127.0.0.1"
        self.port = 0
        #: client connections accepted so far
        self.accepted = 0

    async def _serve(self, client: SocketStream) -> None:
        self.accepted += 1
        async with client:
            await anyio.sleep(self.delay)
            try:
                upstream = await anyio.connect_tcp(self.upstream_host, self.upstream_port)
            except OSError:
                return  # the client sees the connection close, as with a dead server
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(_pipe, client, upstream, tg.cancel_scope)
                tg.start_soon(_pipe, upstream, client, tg.cancel_scope)


async def _pipe(src: ByteStream, dst: ByteStream, scope: anyio.CancelScope) -> None:
    """Copy ``src`` to ``dst`` until either side closes, then end both directions."""
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        async for chunk in src:
            await dst.send(chunk)
    scope.cancel()


@contextlib.asynccontextmanager
async def delay_proxy(
    upstream_host: str, upstream_port: int, *, delay: float
) -> AsyncIterator[DelayProxy]:
    """Run a delaying proxy on 127.0.0.1 (an ephemeral port) for the ``async with`` body."""
    proxy = DelayProxy(upstream_host, upstream_port, delay)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        proxy.port = listener.extra(SocketAttribute.local_port)
        tg.start_soon(listener.serve, proxy._serve)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()
