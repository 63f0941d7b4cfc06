"""Judge the targets on the median of several runs.

    python -m pool_benchmarks.combine A.json B.json C.json [--json OUT]

Each run's JSON (``poolbench --json``) holds per-round figures. Here every
figure becomes one value per run, that run's median, and the targets are
judged on the median of those values: "each target met by the median of the
three runs". Counts that a run sums over its rounds (W3's out-of-order grants
and grants) are summed per run; W4's per-attempt lateness is pooled over all
runs, so its worst case is the worst of every run.

``--json OUT`` writes the combined figures (``rounds`` = one value per run).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ._report import Results, median, render, to_json

__all__ = ["combine", "load", "main"]

#: metrics that a run's verdict adds up over its rounds instead of taking a median
SUMMED = frozenset({"out_of_order", "grants"})


def load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    if doc.get("tool") != "poolbench":
        raise ValueError(f"{path}: not a poolbench JSON file")
    return doc


def combine(docs: Sequence[dict[str, Any]], names: Sequence[str]) -> Results:
    """One Results whose every figure has one value per run (see the module's doc)."""
    results = Results()
    first = docs[0]
    results.meta = dict(first.get("meta", {}))
    results.meta["combined"] = list(names)
    results.meta["command"] = "python -m pool_benchmarks.combine " + " ".join(names)
    for doc in docs:
        for name, pool in doc.get("pools", {}).items():
            results.add_pool(name, pool["role"], pool["label"], pool["note"],
                             style=pool.get("style", "default"),
                             applies=pool.get("applies", ()), driver=pool.get("driver", ""))
        results.skipped.update(doc.get("skipped", {}))
        for note in doc.get("notes", []):
            results.note(note)
        results.stats.update(doc.get("stats", {}))
        results.errors.extend(doc.get("errors", []))
        for wid, entry in doc.get("workloads", {}).items():
            for case, pools in entry.get("cases", {}).items():
                key = "" if case == "all" else case
                for name, metrics in pools.items():
                    one_run: dict[str, float] = {}
                    for metric, value in metrics.items():
                        if isinstance(value, dict) and "rounds" in value:
                            rounds = [float(v) for v in value["rounds"]]
                            one_run[metric] = sum(rounds) if metric in SUMMED else median(rounds)
                        elif isinstance(value, list):
                            slot = results.labels.setdefault(wid, {}).setdefault(key, {})
                            slot.setdefault(name, {}).setdefault(metric, []).extend(value)
                    if one_run:
                        results.add(wid, key, name, one_run)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pool_benchmarks.combine",
        description="Judge poolbench's targets on the median of several runs' JSON files.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN.json")
    parser.add_argument("--json", metavar="OUT", help="write the combined figures to OUT")
    args = parser.parse_args(argv)
    try:
        docs = [load(path) for path in args.runs]
    except (OSError, ValueError) as exc:
        print(f"combine: {exc}", file=sys.stderr)
        return 2
    results = combine(docs, args.runs)
    print(f"Median of {len(docs)} runs: {', '.join(args.runs)}")
    print(render(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(to_json(results) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
