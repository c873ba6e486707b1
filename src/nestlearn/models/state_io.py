"""Test-time learning states (SPEC §2.3, §6): save, load and reset a model's in-context memories.

A state is the plain tensor dict of ``model.init_state`` / ``model(tokens, state)``: memories keep
learning across calls until the caller resets them. :func:`save_state` writes it as safetensors
(atomically, no pickled code) with the model's name and the state's layout in the metadata;
:func:`load_state` checks both against the model before returning an exact copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save

from nestlearn.errors import CheckpointError
from nestlearn.models.base import LanguageModel, State
from nestlearn.utils.io import atomic_write_bytes


def _layout(state: State) -> dict[str, list]:
    """Every entry's shape without the batch dimension, and its dtype."""
    return {k: [list(v.shape[1:]) if v.ndim else [], str(v.dtype)] for k, v in state.items()}


def save_state(model: LanguageModel, state: State, path: str | Path) -> None:
    """Write ``state`` (from ``model``) to ``path`` as safetensors, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {"model": model.config.name, "layout": json.dumps(_layout(tensors))}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_state(
    model: LanguageModel, path: str | Path, device: torch.device | str | None = None
) -> State:
    """Read a state written by :func:`save_state` for this model; :class:`CheckpointError`
    naming the problem when the file is missing, corrupt or from another model or config."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no state file at {path}; write one with save_state(model, state)")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device=str(device or "cpu"))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors state ({exc})") from exc
    if metadata.get("model") != model.config.name:
        raise CheckpointError(
            f"{path}: a state of model '{metadata.get('model')}', not '{model.config.name}'"
        )
    batch = next((v.shape[0] for v in tensors.values() if v.ndim), 1)
    expected = _layout(model.init_state(batch, device="meta"))
    found = _layout(tensors)
    if found != expected:
        keys = sorted(set(found) | set(expected))
        diff = [k for k in keys if found.get(k) != expected.get(k)][:3]
        raise CheckpointError(
            f"{path}: the state does not fit this model's config (first differing entries: "
            f"{', '.join(diff)}); was it saved from a model with other sizes?"
        )
    return tensors


def reset_state(model: LanguageModel, state: State, rows: torch.Tensor | list[int]) -> State:
    """A copy of ``state`` with the sequences ``rows`` back at the model's initial memories (a new
    document starts there); other rows keep learning. Scalar entries (positions shared by the
    batch, e.g. the chunk phase) are kept, so a reset row continues on the batch's chunk grid.
    Only for recurrent models: a KV cache has one position for the whole batch."""
    if model.context_limit is not None:
        raise ValueError(
            f"reset_state needs a recurrent model; '{model.config.name}' keeps a KV cache with "
            "one position per batch: start a new state with model.init_state(batch) instead"
        )
    batch = next(v.shape[0] for v in state.values() if v.ndim)
    fresh = model.init_state(batch, device=next(iter(state.values())).device)
    index = torch.as_tensor(rows, dtype=torch.long)
    out = {}
    for key, value in state.items():
        if value.ndim == 0:
            out[key] = value.clone()
        else:
            value = value.clone()
            value[index] = fresh[key][index].to(value.dtype)
            out[key] = value
    return out
