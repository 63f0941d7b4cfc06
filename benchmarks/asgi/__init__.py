"""This pool and its peers behind a real ASGI app, under an HTTP load generator.

TechEmpower-style endpoints on a Starlette app served by uvicorn (one worker):

- ``/db``: one ``SELECT id, randomnumber FROM world WHERE id = $1`` per request;
- ``/queries``: twenty such queries on one acquired connection per request.

Which pool backs the app is chosen when it starts (:mod:`.backends`); the
runner (``python -m pool_benchmarks.asgi``) starts the server once per subject in
turn, loads it with ``wrk`` and writes a table and a JSON file. The
``world`` table is created and filled once (:mod:`.world`).
"""
