"""Read a local Hugging Face model folder without ``transformers``: ``config.json`` and the weights
(``model.safetensors``, or shards listed by ``model.safetensors.index.json``), via ``safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from nestlearn.errors import CheckpointError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of ``hf_dir`` as a dict; CheckpointError names a missing or bad file."""
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a directory; give a local Hugging Face model folder"
        )
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {CONFIG}: not a Hugging Face model folder (save one with "
            "model.save_pretrained(folder), or download it with huggingface-cli download)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


class HFTensors(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face folder by name, read lazily from one or several safetensors
    files. ``hf[key]`` loads one tensor (CPU, stored dtype)."""

    def __init__(self, hf_dir: str | Path) -> None:
        from safetensors import safe_open

        folder = Path(hf_dir)
        self._open = safe_open
        self._where: dict[str, Path] = {}
        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"{folder / INDEX} is not a valid shard index ({exc})"
                ) from None
            for key, file in weight_map.items():
                self._where[key] = folder / file
            for file in sorted(set(self._where.values())):
                if not file.is_file():
                    raise CheckpointError(f"{folder / INDEX} lists {file.name}, which is missing")
        elif (folder / SINGLE).is_file():
            with safe_open(str(folder / SINGLE), framework="pt") as f:
                self._where = dict.fromkeys(f.keys(), folder / SINGLE)
        else:
            found = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                p.name for p in folder.glob("*.pth")
            )
            hint = f" (found {', '.join(found)}: pickled weights are not read)" if found else ""
            raise CheckpointError(
                f"{folder} has no {SINGLE} or {INDEX}{hint}; re-save the model with "
                "save_pretrained(folder, safe_serialization=True)"
            )
        self._files: dict[Path, Any] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self._where.get(key)
        if file is None:
            raise KeyError(key)
        if file not in self._files:
            self._files[file] = self._open(str(file), framework="pt")
        return self._files[file].get_tensor(key)

    def __contains__(self, key: object) -> bool:
        # Mapping's default would read the tensor to answer.
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
