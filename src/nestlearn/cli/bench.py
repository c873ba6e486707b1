"""``nestlearn bench NAME [args]``: run a benchmark from ``benchmarks/`` (``--help`` per bench).

Benchmarks report numbers (JSON, markdown); they are never part of the test suite.
"""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

from nestlearn.errors import ConfigError
from nestlearn.utils.shipped import shipped_dirs

ALIASES = {"train": "train_throughput"}


def benchmark_dirs() -> list[Path]:
    """``benchmarks/`` folders; files starting with ``_`` are helpers, not benchmarks."""
    return shipped_dirs("benchmarks")


def available() -> list[str]:
    return sorted(
        {p.stem for d in benchmark_dirs() for p in d.glob("*.py") if not p.stem.startswith("_")}
    )


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(name, help="run a benchmark (memory, train, ...)", description=__doc__)
    parser.add_argument("benchmark", help="benchmark name, e.g. memory or train")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark")


def run(args: argparse.Namespace) -> int:
    name = ALIASES.get(args.benchmark, args.benchmark)
    for folder in benchmark_dirs():
        path = folder / f"{name}.py"
        if path.is_file():
            module = runpy.run_path(str(path), run_name="nestlearn_bench")
            module["main"](args.args)
            return 0
    raise ConfigError(f"no benchmark '{args.benchmark}'; available: {', '.join(available())}")
