"""Resumable units of an experiment: one JSON record per (model, seed, ...), computed once.

An experiment that trains several models over several seeds stores each unit's numbers in
``OUT/units/KEY.json`` together with the settings that determine them. Rerunning the same
command reads the stored unit instead of recomputing it, so a long experiment can be
interrupted and resumed, run in pieces (``--models hope`` in one process, ``--models
transformer`` in another, into the same ``OUT``), and finally assembled by the full command,
which then only writes the tables and figures. A stored unit whose settings differ from the
current ones (a changed flag) is recomputed, never reused; a torn or unreadable file likewise.
Writes are atomic (:func:`nestlearn.utils.io.atomic_write_text`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nestlearn.utils.io import atomic_write_text

UNITS_DIR = "units"
# Settings that never change a unit's numbers (where results go, speed, display).
NEUTRAL_ARGS = frozenset(
    {"out", "threads", "device", "no_progress", "seed", "seeds", "seed_list", "n_seeds", "models",
     "fresh", "save_test", "save_samples"}
)  # fmt: skip


def unit_settings(args: Mapping[str, Any] | Any, **extra: Any) -> dict[str, Any]:
    """The settings that determine a unit: ``args`` (a namespace or mapping) less
    :data:`NEUTRAL_ARGS`, plus ``extra`` (the unit's own model, seed, variant...), as plain JSON."""
    items = dict(vars(args)) if not isinstance(args, Mapping) else dict(args)
    settings = {k: v for k, v in items.items() if k not in NEUTRAL_ARGS}
    settings.update(extra)
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def unit_path(out: Path, key: str) -> Path:
    """``OUT/units/KEY.json`` (``key`` made file-name safe)."""
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", key).strip("_") or "unit"
    return Path(out) / UNITS_DIR / f"{safe}.json"


def load_unit(out: Path, key: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored record of unit ``key`` if it exists and was made with ``settings``, else None."""
    path = unit_path(out, key)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("settings") != dict(settings):
        return None
    record = stored.get("record")
    return record if isinstance(record, dict) else None


def run_unit(
    out: Path,
    key: str,
    settings: Mapping[str, Any],
    compute: Callable[[], dict[str, Any]],
    *,
    fresh: bool = False,
) -> dict[str, Any]:
    """``compute()``'s record for unit ``key``, stored under ``OUT/units``; reused when a record
    made with the same ``settings`` exists (``fresh=True`` recomputes it)."""
    if not fresh:
        record = load_unit(out, key, settings)
        if record is not None:
            return {**record, "reused": True}
    record = compute()
    payload = {"key": key, "settings": dict(settings), "record": record}
    atomic_write_text(unit_path(out, key), json.dumps(payload, indent=1, default=str) + "\n")
    return record
