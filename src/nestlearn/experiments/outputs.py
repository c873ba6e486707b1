"""What every experiment leaves in its output folder: ``result.json``, ``table.md``, figures.

``result.json`` is ``{"experiment": NAME, ...}`` so that a report command can gather the results
of many runs; ``table.md`` is the same numbers for a person. Both are written atomically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nestlearn.utils.io import atomic_write_text

RESULT_FILE = "result.json"
TABLE_FILE = "table.md"


def json_ready(value: Any) -> Any:
    """``value`` with NaN/inf floats as ``None`` (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_result(out_dir: Path, experiment: str, record: dict[str, Any]) -> Path:
    """Write ``{"experiment": experiment, **record}`` to ``out_dir/result.json`` (returned)."""
    path = Path(out_dir) / RESULT_FILE
    text = json.dumps(json_ready({"experiment": experiment, **record}), indent=2) + "\n"
    atomic_write_text(path, text)
    return path


def write_table(out_dir: Path, text: str) -> Path:
    path = Path(out_dir) / TABLE_FILE
    atomic_write_text(path, text)
    return path


def save_figure(path: Path, draw: Callable[[Any], None], size: tuple[float, float]) -> Path:
    """Create a matplotlib figure (Agg backend), let ``draw(fig)`` fill it, save it atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = plt.figure(figsize=size, dpi=120)
    try:
        draw(fig)
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp)
    finally:
        plt.close(fig)
    tmp.replace(path)
    return path
