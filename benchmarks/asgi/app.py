"""The ASGI app: ``/db`` and ``/queries`` on whichever pool backs it.

``create_app(subject, url, size)`` builds it; :func:`factory` reads the same
from the environment for ``uvicorn pool_benchmarks.asgi.app:factory --factory``
(``ASGI_BENCH_SUBJECT``, ``ASGI_BENCH_URL``, ``ASGI_BENCH_SIZE``). The pool
opens in the app's lifespan and closes when the server stops.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .backends import backend_for
from .world import ROWS

__all__ = ["DEFAULT_QUERIES", "create_app", "factory"]

#: /queries runs this many queries per request unless ?queries= says otherwise
DEFAULT_QUERIES = 20


def _queries_param(request: Request) -> int:
    # TechEmpower's rule: a bad value is 1, and the count is clamped to 1..500
    try:
        n = int(request.query_params.get("queries", DEFAULT_QUERIES))
    except ValueError:
        n = 1
    return min(max(n, 1), 500)


def create_app(subject: str, url: str, size: int) -> Starlette:
    backend = backend_for(subject, url, size)
    randint = random.randint

    async def db(request: Request) -> JSONResponse:
        row_id, number = await backend.one(randint(1, ROWS))
        return JSONResponse({"id": row_id, "randomNumber": number})

    async def queries(request: Request) -> JSONResponse:
        ids = [randint(1, ROWS) for _ in range(_queries_param(request))]
        rows = await backend.many(ids)
        return JSONResponse([{"id": i, "randomNumber": n} for i, n in rows])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await backend.open()
        try:
            yield
        finally:
            await backend.close()

    app = Starlette(
        routes=[Route("/db", db), Route("/queries", queries)], lifespan=lifespan
    )
    app.state.backend = backend
    return app


def factory() -> Starlette:
    return create_app(
        os.environ["ASGI_BENCH_SUBJECT"],
        os.environ["ASGI_BENCH_URL"],
        int(os.environ.get("ASGI_BENCH_SIZE", "10")),
    )
