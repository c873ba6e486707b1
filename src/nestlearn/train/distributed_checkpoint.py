"""Sharded checkpoints of data-parallel runs (``torch.distributed.checkpoint``, DCP).

Layout of ``RUN/checkpoints/step_00000100/`` (manifest format 2)::

    dcp/.metadata, dcp/__R_0.distcp   DCP: every rank writes its shards of the model weights, the
                                      optimizer's tensors and the level-step accumulators
    trainer_state.pt                  the rest (rank 0): scheduler, RNG, loop state, and the
                                      optimizer's state dict with each tensor replaced by a
                                      reference ``{"__dcp__": key, "shape", "dtype"}``
    config.yaml, tokenizer.json, manifest.json   as in format 1 (:mod:`.checkpoint`)

DCP keys: ``model.<name>`` (the model's state dict, without ``module.`` prefixes), ``optim.<path>``
(the path of a tensor in ``optimizer.state_dict()``, e.g. ``optim.parts.matrix.state.3.m``) and
``levels.<name>``. DCP stores each tensor with its global shape and the offsets of the saved
shards, so a checkpoint loads into any world size and either mode, or into one process without
a process group. Writing is atomic like format 1: all ranks write into a hidden temp folder,
rank 0 adds the other files and the manifest (hashes of every file, shards included), fsyncs and
renames it into place. Reading verifies the hashes first, and DCP's pickled ``.metadata`` is read
with an unpickler that admits only DCP's own metadata classes (no code is unpickled).
"""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nestlearn.config.schema import RunConfig
from nestlearn.errors import CheckpointError
from nestlearn.optim.newton_schulz import is_dtensor, shard_like
from nestlearn.train.checkpoint_folders import (
    checkpoint_root,
    clean_leftovers,
    finish_checkpoint,
    publish_checkpoint,
    step_dir_name,
)
from nestlearn.train.distributed import DistEnv

DCP_DIR = "dcp"
SHARDED_FORMAT = 2
MARK = "__dcp__"


def split_tensors(tree: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(skeleton, tensors)``: the tree with every tensor replaced by a reference to its key in
    ``tensors`` (``prefix.path.to.it``); plain values are kept."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, torch.Tensor):
            key = ".".join(path)
            tensors[key] = node
            dtype = str(node.dtype).removeprefix("torch.")
            return {MARK: key, "shape": list(node.shape), "dtype": dtype}
        if isinstance(node, dict):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, (*path, str(i))) for i, v in enumerate(node))
        return node

    return walk(tree, (prefix,)), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(skeleton, dict):
        if MARK in skeleton:
            return tensors[skeleton[MARK]]
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(join_tensors(v, tensors) for v in skeleton)
    return skeleton


def _marks(skeleton: Any) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if isinstance(skeleton, dict):
        if MARK in skeleton:
            return {skeleton[MARK]: skeleton}
        for v in skeleton.values():
            found.update(_marks(v))
    elif isinstance(skeleton, (list, tuple)):
        for v in skeleton:
            found.update(_marks(v))
    return found


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    levels: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    cfg: RunConfig,
    tokenizer,
    keep_last: int,
    env: DistEnv,
) -> Path:
    """Collective (every rank calls it): write checkpoint ``step`` of ``run_dir`` atomically
    (module docstring), point ``latest`` at it and prune; return its folder. ``trainer_state``
    holds no optimizer or level-step state (they go to DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from nestlearn.config.loader import save_config
    from nestlearn.train.faults import fault_point

    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-sharded"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        clean_leftovers(root)
        tmp.mkdir()
    env.barrier()
    skeleton, optim_tensors = split_tensors(optimizer.state_dict(), "optimizer")
    state = {"model": model_state(model), "optim": optim_tensors, "levels": dict(levels)}
    error: BaseException | None = None
    try:
        with warnings.catch_warnings():
            # Without a process group (one process) DCP warns that it saves alone: intended.
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.save(state, storage_writer=FileSystemWriter(str(tmp / DCP_DIR)))
    except Exception as exc:  # every rank must reach the agreement below
        error = exc
    (failed,) = env.any(error is not None)
    if env.is_main and not failed:
        try:
            fault_point("during_checkpoint", step)
            torch.save({**trainer_state, "optimizer": skeleton}, tmp / "trainer_state.pt")
            save_config(cfg, tmp / "config.yaml")
            tokenizer.save(tmp / "tokenizer.json")
            finish_checkpoint(tmp, final, step, SHARDED_FORMAT)
            publish_checkpoint(final, step, keep_last)
        except Exception as exc:
            error = exc
    (failed,) = env.any(error is not None)
    if failed:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise CheckpointError(f"writing {final} failed on another rank (see its log)")
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch.Size, dtypes, layouts and paths; nothing callable
    beyond those (a crafted ``.metadata`` cannot run code)."""

    def find_class(self, module: str, name: str) -> Any:
        import pathlib

        import torch.distributed.checkpoint.metadata as meta

        if module == meta.__name__ and isinstance(getattr(meta, name, None), type):
            return getattr(meta, name)
        if (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
            from torch.distributed.checkpoint.filesystem import _StorageInfo

            return _StorageInfo
        if module == "torch":
            value = getattr(torch, name, None)
            if value is torch.Size or isinstance(value, (torch.dtype, torch.layout)):
                return value
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        if module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath"):
            return getattr(pathlib, name)
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        raise CheckpointError(
            f"DCP metadata refers to {module}.{name}, which nestlearn does not unpickle; "
            "the checkpoint was not written by nestlearn (or by an incompatible torch)"
        )


def read_metadata(folder: Path) -> Any:
    """DCP's ``.metadata`` of ``folder``, unpickled safely (:class:`_MetadataUnpickler`)."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(Path(folder) / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{folder}/.metadata is not DCP metadata; the checkpoint is corrupt")
    return metadata


def _reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def dcp_load(state: dict[str, Any], checkpoint: Path) -> None:
    """Fill ``state`` (nested dicts of tensors, DTensors reshard) in place from ``checkpoint``;
    without a process group this is a single-process load."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    no_dist = not (dist.is_available() and dist.is_initialized())
    read_metadata(Path(checkpoint) / DCP_DIR)  # a refused or corrupt file fails here, clearly
    try:
        with warnings.catch_warnings():
            # DCP warns that it loads in a single process when no group exists: that is intended.
            warnings.filterwarnings(
                "ignore", message=".*assuming the intent is to load in a single"
            )
            dcp.load(state, storage_reader=_reader(Path(checkpoint) / DCP_DIR), no_dist=no_dist)
    except Exception as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise CheckpointError(
            f"{checkpoint}: the sharded checkpoint does not match this model/optimizer "
            f"({lines[-1][:300]}); resume with the checkpoint's own config"
        ) from exc


@torch.no_grad()
def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every parameter's state with one step of zero gradients at lr 0 (so each state
    tensor exists with its final shape, dtype, device and sharding); the values are replaced."""
    groups = optimizer.param_groups
    params = [p for g in groups for p in g["params"]]
    lrs = [g["lr"] for g in groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in groups:
        g["lr"] = 0.0
    try:
        optimizer.step()
    finally:
        for g, lr in zip(groups, lrs, strict=True):
            g["lr"] = lr
        for p in params:
            p.grad = None


def _optimizer_targets(
    optimizer: torch.optim.Optimizer, skeleton: Any, sharded: bool
) -> dict[str, torch.Tensor]:
    """Tensors, laid out as this run's optimizer holds them, to load the saved ones into."""
    marks = _marks(skeleton)
    if not marks:
        return {}
    _init_optimizer_state(optimizer)
    _, current = split_tensors(optimizer.state_dict(), "optimizer")
    targets = {}
    for key, mark in marks.items():
        target = current.get(key)
        if target is None or list(target.shape) != mark["shape"]:
            if sharded:
                raise CheckpointError(
                    f"optimizer state {key} {mark['shape']} has no counterpart in this "
                    "optimizer; resume with the checkpoint's own optim.* settings"
                )
            target = torch.empty(mark["shape"], dtype=getattr(torch, mark["dtype"]))
        targets[key] = target
    return targets


def _fill(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy a whole (single-process) tensor into ``target``, sharding it like a DTensor target."""
    if is_dtensor(target):
        target.to_local().copy_(shard_like(source.to(target.dtype), target).to_local())
    else:
        target.copy_(source)


def _matching_levels(
    path: Path, fmt: int, trainer_state: dict[str, Any], levels: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The accumulators to load: none if the checkpoint has none (level steps switched on at
    resume start from zero, as in format 1); an error if it has others."""
    if fmt >= SHARDED_FORMAT:
        keys = read_metadata(Path(path) / DCP_DIR).state_dict_metadata
        saved = {k.removeprefix("levels.") for k in keys if k.startswith("levels.")}
    else:
        saved = set(trainer_state.get("level_steps", {}))
    if not saved or not levels:
        return {}
    if saved != set(levels):
        raise CheckpointError(
            f"{path}: level-step state holds {sorted(saved)[:3]}..., this run expects "
            f"{sorted(levels)[:3]}...: train.level_periods changed since the checkpoint was written"
        )
    return levels


def restore_state(
    path: Path,
    fmt: int,
    trainer_state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    levels: dict[str, torch.Tensor],
) -> None:
    """Load weights, optimizer state and level-step accumulators of checkpoint ``path`` (format
    1 or 2) into a model of any layout (plain, DDP's module, FSDP2) — resharding as needed."""
    import safetensors.torch
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    weights = model_state(model)
    sharded = any(is_dtensor(t) for t in weights.values())
    levels = _matching_levels(path, fmt, trainer_state, levels)
    # Format 1 holds the tensors themselves, format 2 references (kept as they are).
    skeleton, saved = split_tensors(trainer_state["optimizer"], "optimizer")
    targets = _optimizer_targets(optimizer, skeleton, sharded)
    if fmt >= SHARDED_FORMAT:
        dcp_load({"model": weights, "optim": targets, "levels": levels}, path)
    else:
        stored = safetensors.torch.load_file(str(Path(path) / "model.safetensors"))
        for name, target in weights.items():
            if name in stored:  # a tied alias missing from the file shares a stored tensor
                _fill(target, stored[name])
        for key, target in targets.items():
            _fill(target, saved[key])
        for name, target in levels.items():
            _fill(target, trainer_state["level_steps"][name])
    set_model_state_dict(model, weights)
    optimizer.load_state_dict(join_tensors(skeleton, targets))


def load_sharded_weights(model: nn.Module, path: Path) -> None:
    """Load a format-2 checkpoint's weights into a plain (single-process) model."""
    weights = model.state_dict()
    dcp_load({"model": weights}, path)
    model.load_state_dict(weights)
