"""A run's checkpoint folders: naming, the atomic finish, the ``latest`` pointer, pruning, and
the repair of a step caught mid-replacement.

Shared by the single-process checkpoints (:mod:`nestlearn.train.checkpoint`, format 1) and the
sharded ones (:mod:`nestlearn.train.distributed_checkpoint`, format 2): a checkpoint is written
into a hidden temp folder, :func:`finish_checkpoint` hashes and fsyncs every file, writes the
manifest and renames the folder into place (renaming an existing folder of the same step aside
first, never deleting it before the new one is in place), then :func:`publish_checkpoint` moves
``latest`` to it and deletes the checkpoints beyond ``keep_last``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from nestlearn import __version__
from nestlearn.errors import CheckpointError
from nestlearn.train.faults import fault_point
from nestlearn.utils.io import atomic_write_text, fsync_dir, sha256_file

MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def finish_checkpoint(tmp: Path, final: Path, step: int, fmt: int) -> None:
    """Hash and fsync every file of ``tmp`` (subfolders included), write the manifest and rename
    ``tmp`` to ``final`` (replacing a checkpoint of the same step)."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_file(path)
        name = path.relative_to(tmp).as_posix()
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "format": fmt,
        "step": step,
        "nestlearn": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2))
    for folder in sorted({p.parent for p in tmp.rglob("*")}, reverse=True):
        fsync_dir(folder)
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    # Re-writing a step: the old folder stays until the new one is in place (module docstring).
    aside = final.with_name(f".{final.name}{ASIDE}{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    try:
        fault_point("replacing_checkpoint", step)
        os.replace(tmp, final)
    except BaseException:
        if not final.exists():
            os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def publish_checkpoint(final: Path, step: int, keep_last: int) -> None:
    """Point ``latest`` at the completed checkpoint ``final`` and prune older ones."""
    root = final.parent
    fault_point("before_publish", step)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    fault_point("before_prune", step)
    _prune(root, keep_last, protect=final)
    fault_point("after_checkpoint", step)


def _prune(root: Path, keep_last: int, protect: Path) -> None:
    steps = list_checkpoints(root.parent)
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


ASIDE = ".old-"  # ``.step_N.old-PID``: step N's previous folder while it is being replaced


_STEP_NAME = re.compile(r"^\.?step_(\d+)(?:\.old-\d+)?$")


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder's name says (``step_N`` or a ``.step_N.old-PID`` aside)."""
    match = _STEP_NAME.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not named like a checkpoint folder (step_NNNNNNNN)")
    return int(match.group(1))


def clean_leftovers(root: Path) -> None:
    """Before a save (the run's lock held): delete temp folders of interrupted saves; an aside
    whose ``step_N`` is missing (a crash mid-replace) becomes ``step_N`` again, others go."""
    for stale in root.glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob(f".step_*{ASIDE}*"):
        final = root / aside.name[1:].split(ASIDE)[0]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)
            fsync_dir(root)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first (temp folders excluded).

    A step caught between the two renames of a replacement is listed by its aside folder.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = {p.name: p for p in root.glob("step_*") if p.is_dir() and _STEP_NAME.match(p.name)}
    for aside in sorted(root.glob(f".step_*{ASIDE}*")):
        name = aside.name[1:].split(ASIDE)[0]
        if aside.is_dir() and _STEP_NAME.match(aside.name) and name not in found:
            found[name] = aside
    return sorted(found.values(), key=checkpoint_step)
