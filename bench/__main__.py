"""python -m bench [NAME ...] [--quick] [--runs N]: run all benchmarks or the named ones."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from bench import compare, e2e, fleet, outbox, query, sources, wire

BENCHMARKS: dict[str, Callable[[bool, int | None], Path]] = {
    wire.NAME: wire.run,
    outbox.NAME: outbox.run,
    sources.NAME: sources.run,
    e2e.NAME: e2e.run,
    query.NAME: query.run,
    compare.NAME: compare.run,
    fleet.NAME: fleet.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run benchmarks; each writes bench/results/<name>.json and prints a table.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs")
    parser.add_argument("--runs", type=int, help="runs per scenario (median is reported)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    for name in args.names or list(BENCHMARKS):
        BENCHMARKS[name](args.quick, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
