"""Run a short load on a pool and print its OpenTelemetry metrics.

    pip install 'pool-engine[postgres,otel]' opentelemetry-sdk
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test python examples/metrics.py

In an application, the reader would be an exporter's (OTLP, Prometheus);
here an in-memory reader collects once, at the end, and the metrics are
printed as a table.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import anyio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import pool

URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def main() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    pool.instrument(provider)  # every pool of the process, built before or after

    db: pool.Pool[Any] = pool.Pool(URL, connection_limit=5, pool_timeout=1, name="shop")

    async def request(i: int) -> None:
        # a tenth of the requests are slow: the queue grows, some wait past pool_timeout
        with contextlib.suppress(pool.PoolTimeoutError):
            await db.fetchval("SELECT pg_sleep($1)", 0.01 if i % 10 else 0.2)

    async with db, anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(request, i)
        await anyio.sleep(0.05)  # mid-load: some requests wait for a connection
        print_metrics(reader, "mid-load")
        # one caller gives up at once: a timeout
        with contextlib.suppress(pool.PoolTimeoutError):
            async with db.acquire(timeout=0.001):
                pass
    print_metrics(reader, "after the load")
    provider.shutdown()


def print_metrics(reader: InMemoryMetricReader, when: str) -> None:
    print(f"--- {when}")
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:  # type: ignore[attr-defined]
                    attrs = dict(point.attributes or {})
                    extra = "".join(
                        f" {k.rsplit('.', 1)[1]}={v}"
                        for k, v in attrs.items()
                        if k != "db.client.connection.pool.name"
                    )
                    name = f"{metric.name}{extra}"
                    if hasattr(point, "value"):
                        shown = f"{point.value}"
                    else:
                        shown = (
                            f"count={point.count} sum={point.sum:.3f} "
                            f"min={point.min * 1000:.2f}ms max={point.max * 1000:.2f}ms"
                        )
                    unit = metric.unit or ""
                    pool_name = attrs.get("db.client.connection.pool.name")
                    print(f"{name:<50} {shown:<48} {unit:<13} pool.name={pool_name}")


if __name__ == "__main__":
    anyio.run(main)
