"""``python -m pool_benchmarks.asgi``: each pool in turn behind the ASGI app, under ``wrk``.

For each subject, in turn: start uvicorn (one worker, uvloop and httptools when
installed) on a free loopback port with the app backed by that pool, warm up,
run ``wrk`` with fixed settings against ``/db`` and then ``/queries``, read
requests/s and the latency percentiles, stop the server. Rounds alternate the
order of the subjects; each figure is the median over the rounds. Prints a
table with ratios to this pool and writes every figure to a JSON file.

The server, ``wrk`` and PostgreSQL share the machine's cores: the settings are
the same for every subject, and the table also shows the server's CPU time per
request, which depends less on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import psutil

from pool._config import redact_url

from .backends import BACKENDS
from .world import ensure_world

__all__ = ["main", "parse_wrk"]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_JSON = Path(__file__).resolve().parents[1] / "results" / "2026-11-29-asgi.json"
ENDPOINTS = ("/db", "/queries")
OURS = "pool"

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms), requests and errors from ``wrk --latency``."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", out, re.M)
    if rps is None or total is None:
        raise ValueError(f"cannot read wrk's output:\n{out}")
    result: dict[str, Any] = {
        "rps": float(rps[1]),
        "requests": int(total[1]),
        "seconds": _ms(total[2]) / 1e3,
    }
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M):
        result[f"p{pct}_ms"] = _ms(value)
    latency = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    if latency is not None:
        result["mean_ms"], result["max_ms"] = _ms(latency[1]), _ms(latency[3])
    if "p50_ms" not in result or "p99_ms" not in result:
        raise ValueError(f"no latency distribution in wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    result["non_2xx"] = int(non2xx[1]) if non2xx else 0
    # wrk prints this line only when one is non-zero. A refused connect is counted as
    # a *write* error (wrk connects without blocking; the refusal shows on the first
    # write), in a tight reconnect loop: against a stopped server these are attempts,
    # tens of thousands a second, not requests. "connect" stays 0 for a refused port.
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    kinds = [int(x) for x in sock.groups()] if sock else [0, 0, 0, 0]
    for kind, n in zip(("connect", "read", "write", "timeout"), kinds, strict=True):
        result[f"{kind}_errors"] = n
    result["socket_errors"] = sum(kinds)
    return result


# ---------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _server_args(port: int) -> list[str]:
    args = [
        sys.executable, "-m", "uvicorn", "pool_benchmarks.asgi.app:factory", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
        "--log-level", "warning", "--lifespan", "on",
    ]
    if importlib.util.find_spec("uvloop") is not None:
        args += ["--loop", "uvloop"]
    if importlib.util.find_spec("httptools") is not None:
        args += ["--http", "httptools"]
    return args


@contextlib.contextmanager
def serve(subject: str, url: str, size: int) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run the app on ``subject`` in a uvicorn process; yield its base URL once it answers."""
    port = _free_port()
    env = {
        **os.environ,
        "ASGI_BENCH_SUBJECT": subject,
        "ASGI_BENCH_URL": url,
        "ASGI_BENCH_SIZE": str(size),
    }
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        _server_args(port), env=env, cwd=root, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"the {subject} server exited ({proc.returncode}):\n{err}")
            try:
                with urllib.request.urlopen(base + "/db", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {subject} server did not answer within 30 s")
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn shuts down: the lifespan closes the pool
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _wrk(target: str, seconds: int, threads: int, connections: int) -> str:
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
        "--timeout", "10s", target,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stdout


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def measure(
    subject: str, url: str, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Start the server on ``subject``, warm it up, load each endpoint, stop it."""
    out: dict[str, dict[str, Any]] = {}
    with serve(subject, url, args.size) as (base, server):
        ps = psutil.Process(server.pid)
        if args.warmup > 0:
            # every connection prepares the statement, the code paths warm up; the
            # /queries run that follows /db is already warm
            _wrk(base + ENDPOINTS[0], args.warmup, args.threads, args.connections)
        for endpoint in ENDPOINTS:
            before = _cpu(ps)
            text = _wrk(base + endpoint, args.duration, args.threads, args.connections)
            cpu = _cpu(ps) - before
            figures = parse_wrk(text)
            figures["server_cpu_s"] = cpu
            figures["wrk_output"] = text
            figures["cpu_us_per_request"] = (
                cpu / figures["requests"] * 1e6 if figures["requests"] else None
            )
            out[endpoint] = figures
    return out


# ---------------------------------------------------------------------- the report

_KEYS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per endpoint: the median of each figure over the rounds, and its spread (±%)."""
    summary: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        entry: dict[str, Any] = {}
        for key in _KEYS:
            values = [r[endpoint][key] for r in rounds if r[endpoint].get(key) is not None]
            if not values:
                continue
            median = statistics.median(values)
            entry[key] = median
            if len(values) > 1 and median:
                entry[f"{key}_spread"] = (max(values) - min(values)) / 2 / median
        entry["errors"] = sum(r[endpoint]["non_2xx"] + r[endpoint]["socket_errors"] for r in rounds)
        summary[endpoint] = entry
    return summary


def _fmt_rps(value: float) -> str:
    return f"{value:,.0f}"


def table(doc: dict[str, Any]) -> str:
    """The markdown table: req/s (and ratio to this pool), p50, p99 and CPU per request."""
    subjects = doc["subjects"]
    ours = subjects.get(OURS, {}).get("summary")
    head = "| subject | rows |"
    rule = "|---|---|"
    for endpoint in ENDPOINTS:
        head += f" `{endpoint}` req/s | vs pool | p50 ms | p99 ms | CPU µs/req |"
        rule += "---:|---:|---:|---:|---:|"
    lines = [head, rule]
    for name, entry in subjects.items():
        style = {"both": "both", "default": "default", "lfl": "like-for-like"}[entry["style"]]
        row = f"| {name} | {style} |"
        for endpoint in ENDPOINTS:
            fig = entry["summary"][endpoint]
            spread = fig.get("rps_spread")
            rps = _fmt_rps(fig["rps"]) + (f" ±{spread:.0%}" if spread is not None else "")
            ratio = f"{fig['rps'] / ours[endpoint]['rps']:.2f}x" if ours else "-"
            cpu = fig.get("cpu_us_per_request")
            row += f" {rps} | {ratio} | {fig['p50_ms']:.1f} | {fig['p99_ms']:.1f} |"
            row += f" {cpu:,.0f} |" if cpu is not None else " - |"
        lines.append(row)
    return "\n".join(lines)


def verdict(doc: dict[str, Any]) -> list[str]:
    """The issue's two claims, each checked on each endpoint."""
    subjects = doc["subjects"]
    if OURS not in subjects:
        return []
    ours = subjects[OURS]["summary"]
    lines = []
    for endpoint in ENDPOINTS:
        lfl = [n for n, e in subjects.items() if e["style"] == "lfl"]
        ratios = {n: ours[endpoint]["rps"] / subjects[n]["summary"][endpoint]["rps"] for n in lfl}
        if ratios:
            worst = min(ratios, key=ratios.__getitem__)
            state = "met" if ratios[worst] >= 1.0 else "missed"
            lines.append(
                f"{endpoint}: req/s at least level with every like-for-like peer: {state} "
                f"(pool / {worst} = {ratios[worst]:.2f}x; "
                + ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items())
                + ")"
            )
        p99 = {n: e["summary"][endpoint]["p99_ms"] for n, e in subjects.items()}
        lowest = min(p99, key=p99.__getitem__)
        state = "met" if lowest == OURS else "missed"
        lines.append(
            f"{endpoint}: the lowest p99 of all: {state} (pool {p99[OURS]:.1f} ms; "
            f"lowest {lowest} {p99[lowest]:.1f} ms)"
        )
    return lines


# ---------------------------------------------------------------------- meta


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _wrk_version() -> str:
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    first = (done.stdout or done.stderr).splitlines()
    return first[0] if first else "?"


async def _server_version(url: str) -> str:
    import pool

    db: pool.Pool[Any] = pool.Pool(url, connection_limit=1)
    async with db:
        return str(await db.fetchval("SHOW server_version"))


def meta(url: str, args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m pool_benchmarks.asgi " + " ".join(argv),
        "url": redact_url(url),
        "size": args.size,
        "rounds": args.rounds,
        "wrk": {
            "threads": args.threads, "connections": args.connections,
            "duration_s": args.duration, "warmup_s": args.warmup, "version": _wrk_version(),
        },
        "server": " ".join(_server_args(0)[1:]).replace("--port 0 ", ""),
        "queries_per_request": {"/db": 1, "/queries": 20},
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg()),
        },
        "versions": {
            p: _version(p)
            for p in (
                "pool", "asyncpg", "psycopg", "psycopg-pool", "SQLAlchemy", "starlette",
                "uvicorn", "uvloop", "httptools",
            )
        },
        "postgresql": anyio.run(_server_version, url),
    }


# ---------------------------------------------------------------------- main


def pooled(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several runs as one: each subject's rounds of every run, summarised again."""
    if len(docs) == 1:
        return docs[0]
    doc: dict[str, Any] = {"meta": docs[0]["meta"], "subjects": {}}
    for one in docs:
        for name, subject in one["subjects"].items():
            slot = doc["subjects"].setdefault(name, {**subject, "rounds": []})
            slot["rounds"] = slot["rounds"] + subject["rounds"]
    for subject in doc["subjects"].values():
        subject["summary"] = summarise(subject["rounds"])
    return doc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pool_benchmarks.asgi", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--url", default=os.environ.get("POOL_ASGI_URL", DEFAULT_URL))
    p.add_argument("--subjects", default=",".join(BACKENDS), help="comma-separated")
    p.add_argument("--size", type=int, default=10, help="connections per pool (10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating order (3)")
    p.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per start (1)")
    p.add_argument("--threads", type=int, default=2, help="wrk -t (2)")
    p.add_argument("--connections", type=int, default=64, help="wrk -c (64)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the figures")
    p.add_argument("--setup-only", action="store_true", help="create and fill world, then stop")
    p.add_argument(
        "--report", type=Path, nargs="+", metavar="JSON",
        help="print the table of earlier runs (several: their rounds pooled); run nothing",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.report is not None:
        done = pooled([json.loads(path.read_text(encoding="utf-8")) for path in args.report])
        print(table(done))
        print()
        print("\n".join(verdict(done)))
        return 0
    url: str = args.url
    filled = anyio.run(ensure_world, url)
    print(f"world: {'created and filled' if filled else 'already there'} ({redact_url(url)})")
    if args.setup_only:
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.subjects.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        print(f"unknown subjects: {', '.join(unknown)}", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {"meta": meta(url, args, argv), "subjects": {}}
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    started = time.monotonic()
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            figures = measure(name, url, args)
            runs[name].append(figures)
            print(
                f"round {r + 1} {name:18}"
                + "".join(
                    f"  {e} {figures[e]['rps']:8,.0f} req/s p99 {figures[e]['p99_ms']:6.1f} ms"
                    for e in ENDPOINTS
                ),
                flush=True,
            )
    doc["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    for name in names:
        cls = BACKENDS[name]
        doc["subjects"][name] = {
            "style": cls.style, "note": cls.note, "rounds": runs[name],
            "summary": summarise(runs[name]),
        }
    print()
    print(table(doc))
    print()
    for line in verdict(doc):
        print(line)
    doc["verdict"] = verdict(doc)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json} ({doc['meta']['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
