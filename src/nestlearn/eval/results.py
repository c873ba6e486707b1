"""The result files every experiment writes, which ``nestlearn report`` gathers.

``OUT/result.json``::

    {"experiment": "mqar",              # the experiment's name (the report groups by it)
     "nestlearn": "0.1.0", "created": "2025-01-01T12:00:00+0000",
     "args": {...},                     # the parsed command line
     "table": {"headers": [...], "rows": [[...], ...]},   # the summary table
     "figures": ["mqar.png"],           # paths relative to OUT
     "results": [...],                  # the experiment's full numbers (one record per run)
     "summary": {"hope": {"accuracy": {"mean": .., "std": .., "n": 3, "missing": 0,
                                       "values": [...]}}}}   # model -> metric -> over seeds

``OUT/results.md`` holds the same table in markdown (or the experiment's own markdown, which
may hold more tables) with the figures linked below it. Every experiment writes through
:func:`write_result`; ``summary`` holds each headline number over seeds
(:func:`nestlearn.experiments.seeds.spread`), which ``nestlearn experiment suite`` gathers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nestlearn import __version__
from nestlearn.train.report import markdown_table
from nestlearn.utils.io import atomic_write_text

RESULT_FILE = "result.json"
MARKDOWN_FILE = "results.md"


def _plain(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_result(
    out_dir: Path,
    experiment: str,
    *,
    args: Mapping[str, Any],
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    figures: Sequence[str] = (),
    results: Any = None,
    title: str = "",
    markdown: str | None = None,
    summary: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``result.json`` and ``results.md`` into ``out_dir``; return the JSON's path.

    ``markdown`` replaces the rendered table as the body of ``results.md`` (an experiment with
    several tables, e.g. a summary and a matrix); ``result.json`` always holds ``table``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "experiment": experiment,
        "nestlearn": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": dict(args),
        "table": {"headers": list(headers), "rows": [list(r) for r in rows]},
        "figures": list(figures),
        "results": results,
        "summary": dict(summary or {}),
    }
    path = out_dir / RESULT_FILE
    atomic_write_text(path, json.dumps(_plain(record), indent=2, default=str) + "\n")
    if markdown is None:
        shown = [["—" if v is None else v for v in row] for row in rows]
        text = f"# {title or experiment}\n\n" + markdown_table(headers, shown)
    else:
        text = markdown.rstrip("\n") + "\n"
    text += "".join(f"\n![{Path(f).stem}]({f})\n" for f in figures)
    atomic_write_text(out_dir / MARKDOWN_FILE, text)
    return path
