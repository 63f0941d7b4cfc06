"""What a run found: the raw figures, the table, the targets, the JSON and the plot.

Every figure is the median over the rounds, shown with its spread: the largest
distance of a round from the median, relative to it (``12,345/s ±3%``).
Ratios are ratios of medians: "vs pool" divides a pool's figure by this
pool's, "vs limit" by the raw-connection limit's.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Results", "Target", "plot", "render", "targets", "to_json"]

# what each workload is, for the table and the JSON
TITLES = {
    "W1": "acquire -> one await while holding -> release, no query",
    "W1-stub": "the same with the stub driver: no server at all (this pool's own overhead)",
    "W1-bare": "acquire -> release with nothing in between, one task (the fast path alone)",
    "W2": "SELECT 1 through the pool, {w2_tasks} tasks on {size} connections",
    "W3": "overload fairness: 200 tasks on 5 connections, each holding ~1 ms",
    "W4": "timeout precision: pool of 2, both held, a third acquire with a 0.2 s timeout",
    "W5": "spike: 50 requests at once on an empty pool, +150 ms to open each connection",
    "W6": "scaling (this pool, stub driver): queued waiters and cancellation",
    "RW": "read/write mix on SQLite, {w2_tasks} tasks on {size} connections",
}

#: what the two kinds of rows mean, for the report and the JSON
STYLES = {
    "default": "each peer with its defaults, as its users get it",
    "lfl": (
        "like-for-like: each peer set up to make the same round trips as this pool "
        "(one per statement; no reset, no BEGIN/COMMIT): names ending in [lfl]"
    ),
}
NA = "n/a (not supported by this build)"


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def spread(values: Sequence[float]) -> float:
    """The largest relative distance of a value from the median (0 for one value)."""
    m = median(values)
    if not values or not _finite(m) or m == 0 or not all(_finite(v) for v in values):
        return math.nan if not values else 0.0
    return max(abs(v - m) for v in values) / abs(m)


@dataclass
class Results:
    """Everything measured, as raw per-round figures."""

    meta: dict[str, Any] = field(default_factory=dict)
    #: name -> {"role", "label", "note", "style", "applies"}, in the order the pools are shown
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: pools listed but not run in this build, and why (shown as rows saying so)
    unavailable: dict[str, str] = field(default_factory=dict)
    #: peers left out, and why
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: workload -> case -> pool -> metric -> one value per round
    figures: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = field(default_factory=dict)
    #: workload -> case -> pool -> what -> one entry per attempt (W4's errors and lateness)
    labels: dict[str, dict[str, dict[str, dict[str, list[str | float]]]]] = field(
        default_factory=dict
    )
    #: workload -> pool -> every acquire wait, in seconds, over all rounds
    waits: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: workload -> this pool's stats() at the end of its last round
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: strings to scrub from anything printed (the URL's password)
    secrets: tuple[str, ...] = ()

    def add_pool(
        self, name: str, role: str, label: str, note: str, *, style: str = "default",
        applies: Sequence[str] = (), driver: str = "",
    ) -> None:
        self.pools.setdefault(name, {
            "role": role, "label": label, "note": note, "style": style, "applies": list(applies),
            "driver": driver,
        })

    def named(self, name: str) -> str:
        """A pool's name with the driver under its connections: ``psycopg_pool (psycopg)``."""
        driver = self.pools.get(name, {}).get("driver", "")
        return f"{name} ({driver})" if driver else name

    def add(self, wid: str, case: str, pool: str, metrics: dict[str, float]) -> None:
        slot = self.figures.setdefault(wid, {}).setdefault(case, {}).setdefault(pool, {})
        for key, value in metrics.items():
            slot.setdefault(key, []).append(float(value))

    def add_labels(
        self, wid: str, case: str, pool: str, key: str, values: Sequence[str | float]
    ) -> None:
        slot = self.labels.setdefault(wid, {}).setdefault(case, {}).setdefault(pool, {})
        slot.setdefault(key, []).extend(values)

    def waits_of(self, wid: str, pool: str) -> list[float]:
        return self.waits.setdefault(wid, {}).setdefault(pool, [])

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def error(self, wid: str, case: str, pool: str, exc: BaseException) -> None:
        where = " ".join(part for part in (wid, case, pool) if part)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = f"{where}: {type(exc).__name__}" + (f": {detail}" if detail else "")
        self.errors.append(self.scrub(text)[:300])

    def values(self, wid: str, case: str, pool: str, metric: str) -> list[float]:
        return self.figures.get(wid, {}).get(case, {}).get(pool, {}).get(metric, [])

    def med(self, wid: str, case: str, pool: str, metric: str) -> float:
        return median(self.values(wid, case, pool, metric))

    def pools_in(self, wid: str, case: str) -> list[str]:
        """The pools with figures for a case, in display order."""
        present = self.figures.get(wid, {}).get(case, {})
        ordered = [name for name in self.pools if name in present]
        return ordered + [name for name in present if name not in ordered]

    def peers(self, style: str | None = None) -> list[str]:
        """The peers' names; with ``style``, only that kind of row."""
        return [
            name for name, info in self.pools.items()
            if info["role"] == "peer" and (style is None or info.get("style") == style)
        ]

    def styles(self) -> list[str]:
        """The kinds of peer rows this run has, default first."""
        present = {info.get("style") for info in self.pools.values() if info["role"] == "peer"}
        return [s for s in ("default", "lfl") if s in present]

    def na_rows(self, wid: str, width: int, *, lead: int = 0) -> list[list[str]]:
        """A row per unavailable pool that would run ``wid``: its name and why."""
        return [
            [""] * lead + [name, why] + [""] * (width - lead - 2)
            for name, why in self.unavailable.items()
            if wid in self.pools.get(name, {}).get("applies", [])
        ]


# ---------------------------------------------------------------------- formatting


def _sig(value: float, digits: int = 3) -> str:
    """``value`` with about ``digits`` significant digits, thousands separated."""
    if not _finite(value):
        return "inf" if math.isinf(value) else "-"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def fmt_spread(values: Sequence[float]) -> str:
    s = spread(values)
    if len(values) < 2 or not _finite(s) or s == 0:
        return ""
    return " ±>999%" if s >= 10 else f" ±{s * 100:.0f}%"


def fmt_rate(values: Sequence[float]) -> str:
    m = median(values)
    return "-" if not _finite(m) else f"{m:,.0f}/s{fmt_spread(values)}"


def fmt_time(seconds: float, *, signed: bool = False) -> str:
    if not _finite(seconds):
        return "-"
    sign = ("+" if seconds >= 0 else "-") if signed else ("-" if seconds < 0 else "")
    x = abs(seconds)
    if x < 1e-3:
        text = f"{_sig(x * 1e6)} µs"
    elif x < 1:
        text = f"{_sig(x * 1e3)} ms"
    else:
        text = f"{_sig(x)} s"
    return sign + text


def fmt_times(values: Sequence[float], *, signed: bool = False) -> str:
    m = median(values)
    return "-" if not _finite(m) else fmt_time(m, signed=signed) + fmt_spread(values)


TIMES = "\u00d7"


def fmt_ratio(value: float) -> str:
    return "-" if not _finite(value) else f"{_sig(value)}{TIMES}"


def fmt_count(values: Sequence[float]) -> str:
    m = median(values)
    if not _finite(m):
        return "-"
    shown = f"{m:,.0f}" if m == int(m) else f"{m:,.1f}"
    return shown + fmt_spread(values)


def _ratio(a: float, b: float) -> float:
    return a / b if _finite(a) and _finite(b) and b else math.nan


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1) -> list[str]:
    """A plain-text table: the first ``left`` columns left-aligned, the rest right-aligned."""
    body = [list(row) for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  " + "   ".join(parts).rstrip()

    return [line(headers), "  " + "-" * (sum(widths) + 3 * (len(widths) - 1)), *map(line, body)]


# ---------------------------------------------------------------------- the sections


def _rate_section(results: Results, wid: str, metric: str, case_title: str) -> list[str]:
    cases = results.figures.get(wid, {})
    rows: list[list[str]] = []
    for case, _ in cases.items():
        ours = results.med(wid, case, "pool", metric)
        limit = results.med(wid, case, "limit", metric)
        for i, name in enumerate(results.pools_in(wid, case)):
            values = results.values(wid, case, name, metric)
            m = median(values)
            rows.append([
                case.removeprefix("C=") if i == 0 else "",
                name,
                fmt_rate(values),
                fmt_ratio(_ratio(m, ours)),
                fmt_ratio(_ratio(m, limit)),
            ])
    rows += results.na_rows(wid, 5, lead=1)
    return _table([case_title, "pool", "cycles/s", "vs pool", "vs limit"], rows, left=2)


def _w2_section(results: Results) -> list[str]:
    rows = []
    ours = results.med("W2", "", "pool", "queries_per_s")
    limit = results.med("W2", "", "limit", "queries_per_s")
    for name in results.pools_in("W2", ""):
        q = results.values("W2", "", name, "queries_per_s")
        rows.append([
            name,
            fmt_rate(q),
            fmt_ratio(_ratio(median(q), ours)),
            fmt_ratio(_ratio(median(q), limit)),
            fmt_times(results.values("W2", "", name, "wait_p50")),
            fmt_times(results.values("W2", "", name, "wait_p99")),
            fmt_times(results.values("W2", "", name, "wait_max")),
        ])
    rows += results.na_rows("W2", 7)
    headers = ["pool", "queries/s", "vs pool", "vs limit", "wait p50", "wait p99", "wait max"]
    return _table(headers, rows)


def _w3_section(results: Results) -> list[str]:
    rows = []
    limit_p99 = results.med("W3", "", "limit", "wait_p99")
    for name in results.pools_in("W3", ""):
        v = results.figures["W3"][""][name]
        out_of_order = v.get("out_of_order", [])
        rows.append([
            name,
            fmt_count([sum(out_of_order)]) + (" in all" if len(out_of_order) > 1 else ""),
            (fmt_ratio(median(v.get("completions_max_min", [])))
             + fmt_spread(v.get("completions_max_min", []))),
            fmt_times(v.get("wait_p99", [])),
            fmt_time(median(v.get("fifo_ideal", []))),
            fmt_ratio(median(v.get("p99_vs_ideal", []))),
            fmt_ratio(_ratio(median(v.get("wait_p99", [])), limit_p99)),
            fmt_rate(v.get("cycles_per_s", [])),
        ])
    headers = [
        "pool", "out-of-FIFO grants", "completions max/min", "wait p99", "FIFO ideal",
        "p99/ideal", "p99 vs limit", "cycles/s",
    ]
    rows += results.na_rows("W3", 8)
    return _table(headers, rows)


def _w4_section(results: Results) -> list[str]:
    rows = []
    for name in results.pools_in("W4", ""):
        kinds = results.labels.get("W4", {}).get("", {}).get(name, {}).get("error", [])
        distinct = sorted({str(k) for k in kinds})
        rows.append([
            name,
            ", ".join(distinct) if distinct else "-",
            # a relative spread means nothing for a figure near zero
            fmt_time(results.med("W4", "", name, "late_median"), signed=True),
            fmt_time(max(results.values("W4", "", name, "late_max"), default=math.nan),
                     signed=True),
            str(len(kinds)),
        ])
    rows += results.na_rows("W4", 5)
    return _table(["pool", "error raised", "late (median)", "late (worst)", "attempts"], rows)


def _w5_section(results: Results) -> list[str]:
    rows = []
    ours = results.med("W5", "", "pool", "seconds")
    limit = results.med("W5", "", "limit", "seconds")
    for name in results.pools_in("W5", ""):
        t = results.values("W5", "", name, "seconds")
        rows.append([
            name,
            fmt_times(t),
            fmt_ratio(_ratio(median(t), ours)),
            fmt_ratio(_ratio(median(t), limit)),
            fmt_count(results.values("W5", "", name, "opened")),
        ])
    return _table(
        ["pool", "time to finish", "vs pool", "vs limit", "connections opened"], rows
    )


def _w6_section(results: Results) -> list[str]:
    cases = results.figures.get("W6", {})
    lines: list[str] = []
    for kind, metric, baseline in (
        ("waiters", "us_per_op", "asyncio.Lock"),
        ("cancel", "us_per_cancel", "bare futures"),
    ):
        chosen = [c for c in cases if kind in c.split()]
        if not chosen:
            continue
        first = chosen[0]
        size_of = {c: int(next(w for w in c.split() if w.isdigit())) for c in chosen}
        rows = []
        for case in chosen:
            row = [f"{size_of[case]:,}"]
            for name in ("pool", "asyncio"):
                v = results.values("W6", case, name, metric)
                row += [
                    fmt_times([x / 1e6 for x in v]),
                    fmt_ratio(_ratio(median(v), results.med("W6", first, name, metric))),
                ]
            if kind == "cancel":
                row.append(fmt_count(results.values("W6", case, "pool", "left_waiting")))
            rows.append(row)
        what = "per handoff" if kind == "waiters" else "per cancel"
        headers = [
            "waiters queued" if kind == "waiters" else "waiters cancelled",
            f"pool {what}", f"vs {size_of[first]:,}",
            f"{baseline} {what}", f"vs {size_of[first]:,}",
        ]
        if kind == "cancel":
            headers.append("pool left waiting")
        if lines:
            lines.append("")
        lines += _table(headers, rows)
    return lines


def _rw_section(results: Results) -> list[str]:
    from ._workloads import ONE_WRITER

    rows = []
    ceiling = results.med("RW", "", ONE_WRITER, "writes_per_s")
    ours = results.med("RW", "", "pool", "ops_per_s")
    for name in results.pools_in("RW", ""):
        ops = results.values("RW", "", name, "ops_per_s")
        w = results.values("RW", "", name, "writes_per_s")
        rows.append([
            name,
            fmt_rate(ops),
            fmt_ratio(_ratio(median(ops), ours)) if name != ONE_WRITER else "",
            fmt_rate(results.values("RW", "", name, "reads_per_s")),
            fmt_rate(w),
            fmt_ratio(_ratio(median(w), ceiling)),
            fmt_times(results.values("RW", "", name, "read_p99")),
            fmt_times(results.values("RW", "", name, "write_p99")),
            fmt_count(results.values("RW", "", name, "errors")),
        ])
    rows += results.na_rows("RW", 9)
    headers = [
        "pool", "ops/s", "vs pool", "reads/s", "writes/s", f"vs {ONE_WRITER}",
        "read p99", "write p99", "failed",
    ]
    return _table(headers, rows)


# ---------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class Target:
    workload: str
    goal: str
    #: True met, False missed, None not measurable in this run
    met: bool | None
    figure: str
    #: which peer rows it was judged on: "default", "lfl", or "" (no peer in it)
    style: str = ""
    #: a figure shown for information: no target was set for it
    info: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "goal": self.goal, "met": self.met,
                "figure": self.figure, "style": self.style, "info": self.info}

    @property
    def mark(self) -> str:
        return "info" if self.info else {True: "met", False: "MISSED", None: "n/a"}[self.met]


def _fastest(
    results: Results, wid: str, case: str, metric: str, *, low: bool, style: str | None = None
) -> tuple[str, float]:
    best_name, best = "", math.nan
    for name in results.peers(style):
        m = results.med(wid, case, name, metric)
        if not _finite(m):
            continue
        if not _finite(best) or (m < best if low else m > best):
            best_name, best = name, m
    return best_name, best


def targets(results: Results) -> list[Target]:
    out: list[Target] = []
    fig = results.figures

    def check(
        wid: str, goal: str, ok: bool | None, figure: str, style: str = "", info: bool = False
    ) -> None:
        out.append(Target(wid, goal, None if info else ok, figure, style, info))

    # the peer targets are judged once per kind of peer row (default, like-for-like)
    styles: list[str | None] = list(results.styles()) or [None]

    def suffix(style: str | None) -> str:
        return {"default": " (default rows)", "lfl": " (like-for-like rows)"}.get(style or "", "")

    w1_cases = [("W1", "C=1"), ("W1", "C=100"), ("W1-bare", "C=1")]
    for wid, case in w1_cases:
        if case not in fig.get(wid, {}):
            continue
        ours = results.med(wid, case, "pool", "cycles_per_s")
        limit = results.med(wid, case, "limit", "cycles_per_s")
        for style in styles:
            peer, best = _fastest(results, wid, case, "cycles_per_s", low=False, style=style)
            r = _ratio(ours, best)
            # The ceiling: raw connections behind a lock each, no pool at all. When
            # even they are not 5x the peer, no pool can be, and the report says so.
            ceiling = _ratio(limit, best)
            bound = (
                f"; the limit itself is {fmt_ratio(ceiling)} {results.named(peer)}"
                if _finite(ceiling) and ceiling < 5 else ""
            )
            check(wid, f"{case}: >= 5x the fastest peer's cycles/s{suffix(style)}",
                  r >= 5 if _finite(r) else None,
                  f"{fmt_ratio(r)} {results.named(peer)} ({_sig(ours)}/s vs {_sig(best)}/s{bound})"
                  if peer else "no peer ran", style or "")
        r = _ratio(ours, limit)
        check(wid, f"{case}: >= 0.5x the raw-connection limit's cycles/s",
              r >= 0.5 if _finite(r) else None,
              f"{fmt_ratio(r)} ({_sig(ours)}/s vs {_sig(limit)}/s)")
    if "W2" in fig:
        ours = results.med("W2", "", "pool", "queries_per_s")
        limit = results.med("W2", "", "limit", "queries_per_s")
        r = _ratio(ours, limit)
        check("W2", ">= 95% of the raw-connection limit's queries/s",
              r >= 0.95 if _finite(r) else None, f"{r * 100:.1f}%" if _finite(r) else "-")
        for style in styles:
            peer, best = _fastest(results, "W2", "", "queries_per_s", low=False, style=style)
            r = _ratio(ours, best)
            check("W2", f"ahead of every peer in queries/s{suffix(style)}",
                  r > 1 if _finite(r) else None,
                  f"{fmt_ratio(r)} {results.named(peer)} ({_sig(ours)}/s vs {_sig(best)}/s)"
                  if peer else "no peer ran", style or "")
    if "W3" in fig:
        ooo = results.values("W3", "", "pool", "out_of_order")
        grants = sum(results.values("W3", "", "pool", "grants"))
        check("W3", "no grant out of FIFO order", sum(ooo) == 0 if ooo else None,
              f"{sum(ooo):,.0f} of {grants:,.0f} grants" if ooo else "-")
        mm = results.med("W3", "", "pool", "completions_max_min")
        check("W3", "max/min per-task completions <= 1.2",
              mm <= 1.2 if not math.isnan(mm) else None, fmt_ratio(mm))
        ours = results.med("W3", "", "pool", "wait_p99")
        limit = results.med("W3", "", "limit", "wait_p99")
        r = _ratio(ours, limit)
        check("W3", "p99 wait <= 1.15x the raw-connection limit's",
              r <= 1.15 if _finite(r) else None,
              f"{fmt_ratio(r)} ({fmt_time(ours)} vs {fmt_time(limit)})")
    if "W4" in fig:
        kinds = results.labels.get("W4", {}).get("", {}).get("pool", {}).get("error", [])
        worst = max(results.values("W4", "", "pool", "late_max"), default=math.nan)
        ok = (bool(kinds) and all(k == "pool.PoolTimeoutError" for k in kinds)
              and _finite(worst) and 0 <= worst <= 0.020)
        check("W4", "PoolTimeoutError, no later than 20 ms after the timeout",
              ok if kinds else None,
              f"worst {fmt_time(worst, signed=True)}; "
              f"{', '.join(sorted({str(k) for k in kinds})) or '-'}")
    if "W5" in fig:
        ours = results.med("W5", "", "pool", "seconds")
        peer, best = _fastest(results, "W5", "", "seconds", low=True)
        figure = (f"{fmt_time(ours)} vs {fmt_time(best)} ({results.named(peer)})"
                  if peer else "no peer ran")
        if peer and ours > best:
            noise = max(spread(results.values("W5", "", "pool", "seconds")),
                        spread(results.values("W5", "", peer, "seconds")))
            if _finite(noise) and ours / best - 1 <= noise:
                figure += (f"; {(ours / best - 1) * 100:.0f}% slower, within the rounds' "
                           f"spread (±{noise * 100:.0f}%)")
        check("W5", "no slower than the fastest peer",
              ours <= best if peer and _finite(ours) else None, figure)
        opened = results.med("W5", "", "pool", "opened")
        peer_opened = results.med("W5", "", peer, "opened") if peer else math.nan
        check("W5", "no more connections opened than the fastest peer",
              opened <= peer_opened if peer and _finite(opened) else None,
              f"{opened:.0f} vs {peer_opened:.0f} ({results.named(peer)})"
              if peer else "no peer ran")
    if "RW" in fig:
        from ._workloads import ONE_WRITER

        ours = results.med("RW", "", "pool", "ops_per_s")
        for style in styles:
            peer, best = _fastest(results, "RW", "", "ops_per_s", low=False, style=style)
            r = _ratio(ours, best)
            check("RW", f"reads+writes/s vs the fastest peer{suffix(style)}", None,
                  f"{fmt_ratio(r)} {results.named(peer)} ({_sig(ours)}/s vs {_sig(best)}/s)"
                  if peer else "no peer ran", style or "", info=True)
        w = results.med("RW", "", "pool", "writes_per_s")
        ceiling = results.med("RW", "", ONE_WRITER, "writes_per_s")
        r = _ratio(w, ceiling)
        failed = sum(results.values("RW", "", "pool", "errors"))
        check("RW", f"this pool's writes/s vs one writer alone ({ONE_WRITER!r})",
              None, f"{fmt_ratio(r)} ({_sig(w)}/s vs {_sig(ceiling)}/s); {failed:.0f} failed",
              info=True)
    if "W6" in fig:
        cases = results.figures["W6"]
        handoff = [c for c in cases if c.endswith("waiters")]
        if len(handoff) >= 2:
            a = results.med("W6", handoff[0], "pool", "us_per_op")
            b = results.med("W6", handoff[-1], "pool", "us_per_op")
            r = _ratio(b, a)
            check("W6", f"cost per op at {handoff[-1]} <= 2x the cost at {handoff[0]}",
                  r <= 2 if _finite(r) else None,
                  f"{fmt_ratio(r)} ({fmt_time(b / 1e6)} vs {fmt_time(a / 1e6)})")
        cancel = [c for c in cases if c.startswith("cancel")]
        if len(cancel) >= 2:
            a = results.med("W6", cancel[0], "pool", "us_per_cancel")
            b = results.med("W6", cancel[-1], "pool", "us_per_cancel")
            left = sum(sum(results.values("W6", c, "pool", "left_waiting")) for c in cancel)
            r = _ratio(b, a)
            check("W6", f"cancelling is O(1) per waiter ({cancel[-1]} <= 2x {cancel[0]})",
                  r <= 2 and left == 0 if _finite(r) else None,
                  f"{fmt_ratio(r)} ({fmt_time(b / 1e6)} vs {fmt_time(a / 1e6)} per waiter)"
                  + (f"; {left:.0f} waiters left behind" if left else ""))
    return out


# ---------------------------------------------------------------------- the whole report


def render(results: Results) -> str:
    meta = results.meta
    lines = [
        f"poolbench: pool {meta.get('pool_version', '?')} beside its peers, "
        f"in one process on {meta.get('backend', 'asyncio')}",
        f"  database  {meta.get('url', '?')}  ({meta.get('server', meta.get('scheme', '?'))})",
        f"  settings  size {meta.get('size')}, {meta.get('rounds')} rounds, "
        f"{meta.get('duration')} s per timed run"
        + (" (--quick)" if meta.get("quick") else ""),
        f"  machine   {meta.get('python', '')}, {meta.get('cpus', '?')} CPUs, "
        f"{meta.get('platform', '')}",
        "  pools     " + "; ".join(
            f"{info['label']} on {info['driver']}" if info.get("driver") else info["label"]
            for info in results.pools.values()
        ),
    ]
    for name, why in results.skipped.items():
        lines.append(f"  skipped   {name}: {why}")
    for name, why in results.unavailable.items():
        lines.append(f"  not run   {name}: {why}")
    lines.append("")
    lines.append(
        "Each figure is the median over the rounds ± the largest distance of a round from it."
    )
    lines.append(
        "'vs pool' and 'vs limit' divide a figure by this pool's and by the limit's "
        "(raw connections, no pool)."
    )
    styles = results.styles()
    if styles:
        lines.append("Two kinds of peer rows; pool and limit count as both:")
        lines += [f"  {style:<8}{STYLES[style]}" for style in styles]

    context = {"size": meta.get("size", "?"), "w2_tasks": meta.get("w2_tasks", "?")}
    sections: list[tuple[str, Callable[[], list[str]]]] = [
        ("W1", lambda: _rate_section(results, "W1", "cycles_per_s", "C")),
        ("W1-stub", lambda: _rate_section(results, "W1-stub", "cycles_per_s", "C")),
        ("W1-bare", lambda: _rate_section(results, "W1-bare", "cycles_per_s", "C")),
        ("W2", lambda: _w2_section(results)),
        ("W3", lambda: _w3_section(results)),
        ("W4", lambda: _w4_section(results)),
        ("W5", lambda: _w5_section(results)),
        ("W6", lambda: _w6_section(results)),
        ("RW", lambda: _rw_section(results)),
    ]
    for wid, build in sections:
        if wid not in results.figures:
            continue
        lines.append("")
        lines.append(f"{wid}  {TITLES[wid].format(**context)}")
        lines += build()
        if wid == "W2" and "W2" in results.stats:
            s = results.stats["W2"]
            lines.append(
                "  pool.stats() after its last W2 round: "
                + ", ".join(f"{k}={_stat(v)}" for k, v in s.items())
            )

    found = targets(results)
    if found:
        lines.append("")
        lines.append("Targets")
        for t in found:
            lines.append(f"  {t.mark:<7}{t.workload:<8}{t.goal}: {t.figure}")

    notes = [info["note"] for info in results.pools.values() if info.get("note")]
    notes += results.notes
    if notes:
        lines.append("")
        lines.append("Notes")
        lines += [f"  - {n}" for n in notes]
    if results.errors:
        lines.append("")
        lines.append("Errors (those measurements are left out)")
        lines += [f"  - {e}" for e in results.errors]
    if found:
        lines.append("")
        lines += verdict(results, found)
    return results.scrub("\n".join(lines))


def _short(t: Target) -> str:
    """A target's verdict in a cell: the mark and the figure's headline."""
    head = t.figure.split(" (")[0].split(";")[0]
    return f"{t.mark} {head}" if len(head) <= 40 else f"{t.mark} {head[:39]}…"


def verdict(results: Results, found: Sequence[Target]) -> list[str]:
    """The short closing table: each target once, judged on each kind of peer row."""
    styles = results.styles()
    columns = styles or ["default"]
    by_goal: dict[tuple[str, str], dict[str, Target]] = {}
    for t in found:
        goal = t.goal
        for style in ("default", "lfl"):
            goal = goal.removesuffix({"default": " (default rows)",
                                      "lfl": " (like-for-like rows)"}[style])
        by_goal.setdefault((t.workload, goal), {})[t.style] = t
    rows = []
    for (wid, goal), judged in by_goal.items():
        if "" in judged:  # no peer in it: one verdict for every kind of row
            cells = [_short(judged[""])] + ["(same: no peer in it)"] * (len(columns) - 1)
        else:
            cells = [_short(judged[c]) if c in judged else "-" for c in columns]
        rows.append([f"{wid} {goal}", *cells])
    names = {"default": "default rows", "lfl": "like-for-like rows"}
    # with no peer rows at all (this pool and the limit alone) there is one kind of verdict
    first = f"Verdict: {results.named('pool')}" if "pool" in results.pools else "Verdict"
    headers = [first, *(names[c] for c in columns)] if styles else [first, "this run"]
    return _table(headers, rows, left=len(headers))


def _stat(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------- JSON


def _histogram(waits: Sequence[float]) -> dict[str, Any]:
    """Counts per log-spaced bin (10 a decade, from 100 ns up), and the percentiles."""
    ordered = sorted(waits)
    edges = [10 ** (e / 10) for e in range(-70, 21)]  # 1e-7 .. 100 s
    counts = [0] * (len(edges) - 1)
    below = 0
    j = 0
    for w in ordered:
        if w < edges[0]:
            below += 1
            continue
        while j < len(counts) - 1 and w >= edges[j + 1]:
            j += 1
        counts[j] += 1

    def pct(q: float) -> float | None:
        if not ordered:
            return None
        return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]

    return {
        "n": len(ordered),
        "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999),
        "max": ordered[-1] if ordered else None,
        "below_first_edge": below,
        "edges": edges,
        "counts": counts,
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, float) and not _finite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(results: Results) -> str:
    workloads: dict[str, Any] = {}
    for wid, cases in results.figures.items():
        entry: dict[str, Any] = {"title": TITLES.get(wid, wid), "cases": {}}
        for case, pools in cases.items():
            entry["cases"][case or "all"] = {
                name: {
                    metric: {"median": median(v), "spread": spread(v), "rounds": v}
                    for metric, v in metrics.items()
                }
                for name, metrics in pools.items()
            }
        for case, labelled in results.labels.get(wid, {}).items():
            for name, labels in labelled.items():
                slot: dict[str, Any] = entry["cases"].setdefault(case or "all", {})
                slot.setdefault(name, {}).update(labels)
        workloads[wid] = entry
    doc = {
        "tool": "poolbench",
        "meta": results.meta,
        "pools": results.pools,
        "skipped": results.skipped,
        "notes": results.notes,
        "workloads": workloads,
        "waits": {
            wid: {name: _histogram(w) for name, w in pools.items() if w}
            for wid, pools in results.waits.items()
        },
        "stats": results.stats,
        "targets": [t.as_dict() for t in targets(results)],
        "errors": results.errors,
    }
    return results.scrub(json.dumps(_clean(doc), indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------- the plot


def plot(results: Results, path: str) -> None:
    """Wait-time distributions (W2, W3) and a bar chart of the ratios, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = [w for w in ("W2", "W3") if any(results.waits.get(w, {}).values())]
    fig = plt.figure(figsize=(15, 10 if dists else 5.5), layout="constrained")
    grid = fig.add_gridspec(2 if dists else 1, max(1, len(dists)))
    colours = {
        name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(results.pools)
    }
    floor = 1e-6
    for i, wid in enumerate(dists):
        ax = fig.add_subplot(grid[0, i])
        for name in results.pools:
            waits = sorted(results.waits.get(wid, {}).get(name, []))
            if not waits:
                continue
            step = max(1, len(waits) // 4000)
            xs = [max(w, floor) * 1e3 for w in waits[::step]] + [max(waits[-1], floor) * 1e3]
            ys = [k * step / len(waits) for k in range(len(xs) - 1)] + [1.0]
            ax.step(xs, ys, where="post", label=name, color=colours[name], linewidth=1.6)
        ax.set_xscale("log")
        ax.set_xlabel("acquire wait (ms, log scale; waits under 1 µs drawn at 1 µs)")
        ax.set_ylabel("fraction of acquires waiting at most this long")
        title = TITLES[wid].format(
            size=results.meta.get("size", "?"), w2_tasks=results.meta.get("w2_tasks", "?")
        )
        ax.set_title(f"{wid}: {title}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=9)

    ax = fig.add_subplot(grid[1, :] if dists else grid[0, 0])
    groups: list[tuple[str, Callable[[str], float]]] = []
    for case in results.figures.get("W1", {}):
        groups.append((f"W1 {case}", _speed(results, "W1", case, "cycles_per_s", high=True)))
    if "W2" in results.figures:
        groups.append(("W2 queries/s", _speed(results, "W2", "", "queries_per_s", high=True)))
    if "W3" in results.figures:
        groups.append(("W3 1/p99 wait", _speed(results, "W3", "", "wait_p99", high=False)))
    if "W5" in results.figures:
        groups.append(("W5 1/time", _speed(results, "W5", "", "seconds", high=False)))
    others = [n for n in results.pools if n != "pool"]
    width = 0.8 / max(1, len(others))
    for j, name in enumerate(others):
        xs, hs = [], []
        for g, (_, ratio_of) in enumerate(groups):
            r = ratio_of(name)
            if _finite(r) and r > 0:
                xs.append(g - 0.4 + width * (j + 0.5))
                hs.append(r)
        bars = ax.bar(xs, hs, width=width * 0.95, label=name, color=colours[name])
        ax.bar_label(bars, labels=[_sig(h, 2) for h in hs], fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.text(len(groups) - 0.5, 1.0, " = pool", va="bottom", ha="right", fontsize=9)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=9)
    ax.set_ylabel("speed relative to this pool (log; above 1 = faster than pool)")
    ax.set_title("Ratios to this pool (median of rounds)", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.suptitle(
        f"poolbench: {results.meta.get('url', '')} - size {results.meta.get('size')}, "
        f"{results.meta.get('rounds')} rounds",
        fontsize=12,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speed(
    results: Results, wid: str, case: str, metric: str, *, high: bool
) -> Callable[[str], float]:
    """name -> its speed relative to this pool (for a time, the inverse ratio)."""
    ours = results.med(wid, case, "pool", metric)

    def ratio_of(name: str) -> float:
        m = results.med(wid, case, name, metric)
        return _ratio(m, ours) if high else _ratio(ours, m)

    return ratio_of
