"""Checkpoints: a folder per step, written atomically, verified by content hashes.

Layout of ``RUN/checkpoints/step_00000100/``::

    model.safetensors     weights (safetensors: no code is ever unpickled)
    trainer_state.pt      optimizer, scheduler, RNG and loop state; tensors and plain Python
                          values only, loaded with ``torch.load(weights_only=True)``
    config.yaml           the resolved run config
    tokenizer.json        the tokenizer the model was trained with
    manifest.json         format version, step, and the sha256 and size of every file above

Data-parallel runs (``train.parallel=ddp|fsdp``) write sharded checkpoints instead of
``model.safetensors`` (manifest format 2, :mod:`nestlearn.train.distributed_checkpoint`); every
reader here accepts both formats.

Writing: everything goes to a hidden temp folder that is fsynced and then renamed into place, and
only then does ``RUN/checkpoints/latest`` (a one-line text file) move to it. A crash at any moment
leaves the previous checkpoint and pointer intact; a leftover temp folder is never read and is
removed by the next save. Older checkpoints beyond ``keep_last`` are deleted after a successful
save. Reading verifies every hash first, so a truncated or corrupted file is reported by name.

Re-writing a step that exists (resuming from an older checkpoint past a newer one) never deletes
the old folder first: it is renamed aside to ``.step_N.old-PID``, the new one renamed in, and only
then is the aside deleted. A crash between the two renames leaves the aside as the step's
checkpoint: readers list it in place of the missing ``step_N`` and the next save renames it back.
The run folder's lock (:mod:`nestlearn.train.run_lock`) makes the writer the only one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from nestlearn.config.loader import from_dict, read_yaml, save_config
from nestlearn.config.schema import RunConfig
from nestlearn.errors import CheckpointError, NestlearnError, NestlearnWarning
from nestlearn.train.checkpoint_folders import (
    MANIFEST_FILE,
    checkpoint_root,
    clean_leftovers,
    finish_checkpoint,
    list_checkpoints,
    publish_checkpoint,
    step_dir_name,
)
from nestlearn.train.faults import fault_point
from nestlearn.utils.io import sha256_file

FORMAT_VERSION = 1
FORMATS = (1, 2)  # 1: model.safetensors; 2: sharded (DCP) weights and optimizer tensors
DCP_METADATA = "dcp/.metadata"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, as tensors and plain values (``weights_only``-loadable)."""
    np_kind, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_files(
    folder: Path, step: int, model: nn.Module, trainer_state: dict, cfg: RunConfig, tokenizer
) -> None:
    safetensors.torch.save_model(model, str(folder / MODEL_FILE))
    fault_point("during_checkpoint", step)
    torch.save(trainer_state, folder / STATE_FILE)
    save_config(cfg, folder / CONFIG_FILE)
    tokenizer.save(folder / TOKENIZER_FILE)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    trainer_state: dict[str, Any],
    cfg: RunConfig,
    tokenizer,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, prune old ones; return it."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(root)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(tmp, step, model, trainer_state, cfg, tokenizer)
        finish_checkpoint(tmp, final, step, FORMAT_VERSION)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_checkpoint(final, step, keep_last)
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest and every file's size and sha256; return the manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {MANIFEST_FILE}); "
            "point at a run folder or a checkpoints/step_* folder"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{manifest_path} is corrupt ({exc}); use an earlier checkpoint"
        ) from exc
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise CheckpointError(
            f"{path}: checkpoint format {fmt} is not supported by this nestlearn (formats "
            f"{', '.join(map(str, FORMATS))}); use the nestlearn version that wrote it"
        )
    weights = MODEL_FILE if fmt == FORMAT_VERSION else DCP_METADATA
    for name in (weights, STATE_FILE, CONFIG_FILE, TOKENIZER_FILE):
        if name not in files:
            raise CheckpointError(f"{path}: manifest lists no {name}; the checkpoint is incomplete")
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing; use an earlier checkpoint")
        if file.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{path}: {name} is truncated ({file.stat().st_size} of {meta['bytes']} bytes); "
                "use an earlier checkpoint"
            )
        if sha256_file(file) != meta["sha256"]:
            raise CheckpointError(
                f"{path}: {name} is corrupt (sha256 mismatch); use an earlier checkpoint"
            )
    return manifest


def resolve_checkpoint(path: Path) -> Path:
    """A run folder -> its newest *valid* checkpoint; a step folder -> itself (verified).

    Corrupt newer checkpoints of a run are skipped with a warning naming them.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a run folder or a checkpoint folder")
    if (path / MANIFEST_FILE).exists() or path.name.startswith("step_"):
        verify_checkpoint(path)
        return path
    candidates = list_checkpoints(path)
    if not candidates:
        raise CheckpointError(
            f"{path} holds no checkpoints (expected {checkpoint_root(path)}/step_*); "
            "train first, or point at a checkpoint folder"
        )
    problems = []
    for candidate in reversed(candidates):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            warnings.warn(f"skipping corrupt checkpoint: {problem}", NestlearnWarning, stacklevel=2)
        return candidate
    raise CheckpointError(f"no valid checkpoint in {path}: " + " | ".join(problems))


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    config: RunConfig
    tokenizer: Any
    trainer_state: dict[str, Any] | None
    format: int = FORMAT_VERSION  # 2: sharded (DCP) weights and optimizer tensors


def read_checkpoint(path: Path, with_trainer_state: bool = True) -> LoadedCheckpoint:
    """Verify and read a checkpoint's config, tokenizer and (optionally) trainer state."""
    from nestlearn.data import load_tokenizer

    path = resolve_checkpoint(path)
    # resolve_checkpoint has verified every hash; read the manifest without hashing again.
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    try:
        cfg = from_dict(read_yaml(path / CONFIG_FILE))
    except NestlearnError as exc:
        raise CheckpointError(f"{path}/{CONFIG_FILE} is not a valid config: {exc}") from exc
    tokenizer = load_tokenizer(path / TOKENIZER_FILE)
    state = None
    if with_trainer_state:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    fmt = int(manifest["format"])
    return LoadedCheckpoint(path, int(manifest["step"]), cfg, tokenizer, state, fmt)


def load_weights(model: nn.Module, path: Path, device: torch.device | str = "cpu") -> None:
    """Load ``model.safetensors`` strictly; a shape or key mismatch names the first offenders.

    A sharded checkpoint (format 2, no ``model.safetensors``) is read with DCP in this process.
    """
    file = Path(path) / MODEL_FILE
    if not file.exists() and (Path(path) / DCP_METADATA).exists():
        from nestlearn.train.distributed_checkpoint import load_sharded_weights

        load_sharded_weights(model, Path(path))
        model.to(device)
        return
    stored = safetensors.torch.load_file(str(file), device="cpu")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    # Tied weights are stored once by save_model; a missing alias of a stored tensor is fine.
    missing = [k for k in missing if not _is_alias(model, k, stored)]
    wrong = [
        f"{k}: checkpoint {tuple(stored[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(stored) & set(expected))
        if stored[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shape {wrong[:3]}" if wrong else "",
            )
            if part
        )
        raise CheckpointError(
            f"{path}: weights do not match the model config ({details}); "
            "build the model from the checkpoint's own config.yaml"
        )
    # The file is read once: the checked tensors are the ones loaded (aliases share storage).
    model.load_state_dict(stored, strict=False)
    model.to(device)


def _is_alias(model: nn.Module, key: str, stored: dict[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    target = params[key]
    return any(name in stored and other is target for name, other in params.items() if name != key)


def load_model(path: Path, device: torch.device | str = "cpu"):
    """Build the model a checkpoint describes and load its weights (eval mode).

    Returns ``(model, loaded)`` where ``loaded`` carries the config, tokenizer and step.
    """
    from nestlearn.models.registry import build_model

    loaded = read_checkpoint(path, with_trainer_state=False)
    if loaded.config.model.vocab_size < loaded.tokenizer.vocab_size:
        raise CheckpointError(
            f"{loaded.path}: the model's vocab_size ({loaded.config.model.vocab_size}) is smaller "
            f"than its tokenizer's ({loaded.tokenizer.vocab_size}); the checkpoint is inconsistent"
        )
    model = build_model(loaded.config.model)
    load_weights(model, loaded.path)
    return model.to(device).eval(), loaded
