"""Folders shipped beside the package: ``configs/`` and ``benchmarks/``.

A wheel carries them inside the package (``nestlearn/_configs``, ``nestlearn/_benchmarks``, see
``pyproject.toml``); a source checkout (editable install) has them at the repository root.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[3]


def shipped_dirs(folder: str) -> list[Path]:
    """The installed copy of ``folder`` (if any), then the source checkout's (if any)."""
    dirs = []
    packaged = resources.files("nestlearn") / f"_{folder}"
    if packaged.is_dir():
        dirs.append(Path(str(packaged)))
    if (_REPO_ROOT / folder).is_dir():
        dirs.append(_REPO_ROOT / folder)
    return dirs
