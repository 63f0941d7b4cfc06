"""``python -m pool_benchmarks.host_budget``: one connection budget for a fleet of workers.

The ASGI app (:mod:`.asgi`, ``/db``: one query per request) behind ``uvicorn
--workers 8`` under ``wrk``, against PostgreSQL, three ways:

- ``budget``: every worker ``connection_limit=10`` and ``host_connection_limit=20``;
- ``hand split``: ``connection_limit`` = 20 / 8 workers, rounded (2), no budget
  (Prisma's arithmetic, done by hand);
- ``no budget``: every worker ``connection_limit=10`` (8 x 10 = 80 possible).

Then, with the budget: a rolling restart (a second fleet of 8 starts and takes
its share of load while the first still runs, then the first stops) and a
``kill -9`` of one worker under load (uvicorn starts a new one).

For each: the server's own peak count of the fleet's sessions
(``pg_stat_activity`` by ``application_name``, sampled every 10 ms), req/s, p99
and failed requests (non-2xx and socket errors, as wrk counts them). The pools
are lazy (``pool[lazy]``): a worker opens connections as its load needs them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from .asgi.__main__ import _free_port, _server_args, parse_wrk

__all__ = ["main"]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
BUDGET = 20
WORKERS = 8
PER_WORKER = 10


class Sampler:
    """The server's count of sessions with one application_name, every 10 ms, in a thread."""

    def __init__(self, url: str, app: str) -> None:
        self.url, self.app = url, app
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.url.replace("postgresql://", "postgres://", 1))
        try:
            while not self._stop.is_set():
                n = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", self.app
                )
                self.peak = max(self.peak, int(n))
                self.samples += 1
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Fleet:
    """A running ``uvicorn --workers N``: its master process and its base URL."""

    def __init__(self, proc: subprocess.Popen[bytes], base: str) -> None:
        self.proc, self.base = proc, base


@contextlib.contextmanager
def fleet(url: str, size: int, workers: int, budget_dir: str) -> Iterator[Fleet]:
    """``uvicorn --workers N`` on the app; yields once /db answers."""
    port = _free_port()
    env = {
        **os.environ, "ASGI_BENCH_SUBJECT": "pool[lazy]", "ASGI_BENCH_URL": url,
        "ASGI_BENCH_SIZE": str(size), "POOL_HOST_BUDGET_DIR": budget_dir,
    }
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [*_server_args(port), "--workers", str(workers)], env=env, cwd=root,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited ({proc.returncode})")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                base + "/db", timeout=2
            ) as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not answer within 60 s")
            time.sleep(0.1)
        # every worker up (uvicorn starts them together; give the last ones a moment)
        while len(psutil.Process(proc.pid).children()) < workers:
            time.sleep(0.1)
        yield Fleet(proc, base)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # graceful: each worker's lifespan disconnects
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wrk(base: str, seconds: float, connections: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "--timeout", "10s",
         base + "/db"],
        stdout=subprocess.PIPE, text=True,
    )


def figures(load: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = load.communicate()
    f = parse_wrk(out)
    return {
        "rps": round(f["rps"]), "p99_ms": f["p99_ms"], "requests": f["requests"],
        "failed": f["non_2xx"] + f["socket_errors"],
    }


def url_for(base: str, app: str, budget: int | None) -> str:
    sep = "&" if "?" in base else "?"
    url = f"{base}{sep}application_name={app}"
    return url + (f"&host_connection_limit={budget}" if budget else "")


def steady(args: argparse.Namespace, name: str, size: int, budget: int | None) -> dict[str, Any]:
    app = f"hb_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory() as budgets, \
            fleet(url_for(args.url, app, budget), size, args.workers, budgets) as running, \
            Sampler(args.url, app) as sampler:
        result = figures(wrk(running.base, args.duration, args.connections))
    out = {"scenario": name, "connection_limit": size, "host_connection_limit": budget,
           "server_peak": sampler.peak, "samples": sampler.samples, **result}
    print(f"{name:34} peak {sampler.peak:3}  {result['rps']:7,} req/s  "
          f"p99 {result['p99_ms']:7.1f} ms  failed {result['failed']}", flush=True)
    return out


def rolling_restart(args: argparse.Namespace) -> dict[str, Any]:
    """Old and new fleets overlap: the new one starts and serves while the old one runs."""
    app = f"hb_{uuid.uuid4().hex[:10]}"
    url = url_for(args.url, app, BUDGET)
    with tempfile.TemporaryDirectory() as budgets, Sampler(args.url, app) as sampler, \
            fleet(url, PER_WORKER, args.workers, budgets) as old:
        load_old = wrk(old.base, args.duration * 2, args.connections)
        time.sleep(args.duration / 2)
        with fleet(url, PER_WORKER, args.workers, budgets) as new:
            load_new = wrk(new.base, args.duration, args.connections)
            time.sleep(args.duration / 2)
            stop(old.proc)  # the old fleet goes while the new one serves
            new_figures = figures(load_new)
        old_figures = figures(load_old)
    # (the old fleet's wrk keeps knocking on a closed port once it stopped: those
    # connect errors are the restart's, not the budget's; counted apart)
    out = {"scenario": "rolling restart (budget 20)", "server_peak": sampler.peak,
           "samples": sampler.samples, "old": old_figures, "new": new_figures}
    print(f"{'rolling restart (budget 20)':34} peak {sampler.peak:3}  new fleet: "
          f"{new_figures['rps']:,} req/s, failed {new_figures['failed']}", flush=True)
    return out


def kill_worker(args: argparse.Namespace) -> dict[str, Any]:
    app = f"hb_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory() as budgets, \
            fleet(url_for(args.url, app, BUDGET), PER_WORKER, args.workers, budgets) as running, \
            Sampler(args.url, app) as sampler:
        load = wrk(running.base, args.duration, args.connections)
        time.sleep(args.duration / 3)
        victim = psutil.Process(running.proc.pid).children()[0]
        victim.send_signal(signal.SIGKILL)
        result = figures(load)
    out = {"scenario": "kill -9 of a worker (budget 20)", "server_peak": sampler.peak,
           "samples": sampler.samples, **result}
    print(f"{'kill -9 of a worker (budget 20)':34} peak {sampler.peak:3}  "
          f"{result['rps']:7,} req/s  p99 {result['p99_ms']:7.1f} ms  failed {result['failed']}",
          flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pool_benchmarks.host_budget", description=__doc__)
    p.add_argument("--url", default=os.environ.get("POOL_BENCH_POSTGRES_URL", DEFAULT_URL))
    p.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run (8)")
    p.add_argument("--connections", type=int, default=64, help="wrk -c (64)")
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    split = max(1, round(BUDGET / args.workers))
    runs = [
        steady(args, f"host_connection_limit={BUDGET}", PER_WORKER, BUDGET),
        steady(args, f"hand split (connection_limit={split})", split, None),
        steady(args, f"no budget ({args.workers} x {PER_WORKER})", PER_WORKER, None),
        rolling_restart(args),
        kill_worker(args),
    ]
    if args.json:
        doc = {
            "tool": "pool_benchmarks.host_budget",
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "cpus": os.cpu_count(),
            "workers": args.workers, "budget": BUDGET, "per_worker": PER_WORKER,
            "wrk": {"connections": args.connections, "threads": 2, "duration_s": args.duration,
                    "endpoint": "/db"},
            "runs": runs,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
