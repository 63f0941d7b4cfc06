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
and failed requests (non-2xx and socket errors, as wrk counts them, by kind).
The pools are lazy (``pool[lazy]``): a worker opens connections as its load
needs them.

What wrk (4.1) reports, and how it is counted here: a refused connect is a
*write* error (its connect does not block; the refusal shows on the first
write), and wrk reconnects at once, so a wrk left on a stopped server counts
tens of thousands of them a second: attempts, not requests. A server that
closes a connection gives a *read* error. So the failures are split by when
and where they happen:

- rolling restart: the old fleet's load runs in two wrk runs, ``up`` (until the
  old fleet is told to stop: every failure there is the pool's or the
  budget's) and ``stopping`` (started on the old fleet just before it is
  stopped and left knocking on it: its socket errors are the restart's; a
  non-2xx or a timeout there still came from a live server and counts as a
  failure while up). The new fleet is up all along: all its failures count.
- ``kill -9``: the victim is the worker holding the most client connections
  (uvicorn's first child is multiprocessing's resource tracker, not a worker).
  The client connections the victim held just before the kill are
  counted (from the kernel, psutil); that many lost connections (read, write,
  connect errors) are the kill's, the requests routed to the killed worker;
  any more, and every non-2xx and timeout, are failures while up.
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

    def __init__(self, proc: subprocess.Popen[bytes], base: str, port: int) -> None:
        self.proc, self.base, self.port = proc, base, port


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
        while len(serving(proc.pid, port)) < workers:
            time.sleep(0.1)
        yield Fleet(proc, base, port)
    finally:
        stop(proc)


def serving(master: int, port: int) -> list[psutil.Process]:
    """uvicorn's worker processes: its children listening on ``port``.

    Not just its children: the first of those is multiprocessing's resource
    tracker, which serves nothing (an earlier version killed it as "a worker").
    """
    found = []
    for child in psutil.Process(master).children():
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in child.net_connections(kind="tcp")):
                found.append(child)
    return found


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
        "errors": {"non_2xx": f["non_2xx"], **{
            kind: f[f"{kind}_errors"] for kind in ("connect", "read", "write", "timeout")}},
    }


def interrupt(load: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """SIGINT: wrk stops and prints what it saw so far (requests in flight are not counted)."""
    load.send_signal(signal.SIGINT)
    return load


def client_connections(pid: int, port: int, local: bool) -> int:
    """Established TCP connections of ``pid`` whose local (or remote) port is ``port``."""
    n = 0
    for c in psutil.Process(pid).net_connections(kind="tcp"):
        end = c.laddr if local else c.raddr
        if c.status == psutil.CONN_ESTABLISHED and end and end.port == port:
            n += 1
    return n


def wait_connected(load: subprocess.Popen[str], port: int, connections: int) -> None:
    """Until wrk holds most of its connections to ``port`` (it refuses to start on a closed one)."""
    deadline = time.monotonic() + 5
    while client_connections(load.pid, port, local=False) < connections // 2:
        if load.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("wrk did not connect to the old fleet before its stop")
        time.sleep(0.005)


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
        started = time.monotonic()
        time.sleep(args.duration / 2)
        with fleet(url, PER_WORKER, args.workers, budgets) as new:
            load_new = wrk(new.base, args.duration, args.connections)
            time.sleep(args.duration / 2)
            # the old fleet goes while the new one serves: what its clients saw while
            # it was up, then a wrk that keeps knocking on it through and after its stop
            old_up = figures(interrupt(load_old))
            rest = max(1.0, args.duration * 2 - (time.monotonic() - started))
            knock = wrk(old.base, rest, args.connections)
            wait_connected(knock, old.port, args.connections)
            stop(old.proc)
            new_figures = figures(load_new)
        old_stopping = figures(knock)
    e = old_stopping["errors"]
    old_figures = {
        "up": old_up, "stopping": old_stopping,
        "failed_while_up": old_up["failed"] + e["non_2xx"] + e["timeout"],
        "errors_from_the_stop": e["connect"] + e["read"] + e["write"],
    }
    out = {"scenario": "rolling restart (budget 20)", "server_peak": sampler.peak,
           "samples": sampler.samples, "old": old_figures,
           "new": {**new_figures, "failed_while_up": new_figures["failed"]}}
    print(f"{'rolling restart (budget 20)':34} peak {sampler.peak:3}  new fleet: "
          f"{new_figures['rps']:,} req/s, failed {new_figures['failed']}; old fleet: failed "
          f"while up {old_figures['failed_while_up']}, errors from its stop "
          f"{old_figures['errors_from_the_stop']:,}", flush=True)
    return out


def kill_worker(args: argparse.Namespace) -> dict[str, Any]:
    app = f"hb_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory() as budgets, \
            fleet(url_for(args.url, app, BUDGET), PER_WORKER, args.workers, budgets) as running, \
            Sampler(args.url, app) as sampler:
        load = wrk(running.base, args.duration, args.connections)
        time.sleep(args.duration / 3)
        # the worker holding the most client connections (a worker, not the tracker)
        held, victim = max(
            ((client_connections(w.pid, running.port, local=True), w)
             for w in serving(running.proc.pid, running.port)),
            key=lambda pair: pair[0],
        )
        victim.send_signal(signal.SIGKILL)
        result = figures(load)
    e = result["errors"]
    lost = e["connect"] + e["read"] + e["write"]
    out = {"scenario": "kill -9 of a worker (budget 20)", "server_peak": sampler.peak,
           "samples": sampler.samples, **result, "killed_pid": victim.pid,
           "killed_worker_connections": held,
           "failed_on_killed_worker": min(lost, held),
           "failed_while_up": e["non_2xx"] + e["timeout"] + max(0, lost - held)}
    print(f"{'kill -9 of a worker (budget 20)':34} peak {sampler.peak:3}  "
          f"{result['rps']:7,} req/s  p99 {result['p99_ms']:7.1f} ms  failed {result['failed']} "
          f"({out['failed_on_killed_worker']} on the killed worker's {held} connections, "
          f"{out['failed_while_up']} while up)", flush=True)
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
