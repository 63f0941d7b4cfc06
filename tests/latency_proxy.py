"""A loopback TCP relay that delays every byte, and every end of stream, by the same time.

Unlike ``benchmarks/_proxy.py`` (which delays only the upstream connect and
then closes both sides at once), this one behaves like a long wire: each
direction carries its bytes *and its half-close* ``delay`` seconds late, and
the client's side is closed only after the server's side has ended. So when a
client sees EOF through it, the server really has closed its socket: what the
host budget relies on to give a slot back (a PostgreSQL backend leaves
``pg_stat_activity`` before it closes its socket). A handshake through it takes
a few round trips of ``2 * delay``, a window in which a test can abandon
connects whose backend the server already lists.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator

import anyio
from anyio.abc import SocketAttribute, SocketStream

__all__ = ["LatencyProxy", "latency_proxy"]


class LatencyProxy:
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
            try:
                upstream = await anyio.connect_tcp(self.upstream_host, self.upstream_port)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(self._direction, client, upstream)
                # the client's side closes (``async with client``) only once this
                # direction has carried the server's EOF to it
                tg.start_soon(self._direction, upstream, client)

    async def _direction(self, src: SocketStream, dst: SocketStream) -> None:
        """Carry ``src`` to ``dst``, each chunk and the final EOF ``delay`` late, in order."""
        send, receive = anyio.create_memory_object_stream[tuple[float, bytes]](math.inf)

        async def read() -> None:
            async with send:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError,
                                         OSError):
                    async for chunk in src:
                        await send.send((time.monotonic() + self.delay, chunk))
                # end of stream (or a reset): b"" stands for it, carried as late as a byte
                await send.send((time.monotonic() + self.delay, b""))

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            async with receive:
                async for due, chunk in receive:
                    # the modelled wire latency, not an ordering of test events
                    await anyio.sleep(max(0.0, due - time.monotonic()))
                    with contextlib.suppress(anyio.BrokenResourceError,
                                             anyio.ClosedResourceError, OSError):
                        if chunk:
                            await dst.send(chunk)
                        else:
                            await dst.send_eof()
                    if not chunk:
                        break


@contextlib.asynccontextmanager
async def latency_proxy(
    upstream_host: str, upstream_port: int, *, delay: float
) -> AsyncIterator[LatencyProxy]:
    """Run a latency relay on 127.0.0.1 (an ephemeral port) for the ``async with`` body."""
    proxy = LatencyProxy(upstream_host, upstream_port, delay)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        proxy.port = listener.extra(SocketAttribute.local_port)
        tg.start_soon(listener.serve, proxy._serve)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()
