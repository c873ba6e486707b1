"""``NestlearnForCausalLM.from_pretrained(RUN)``: a nestlearn run folder loaded directly.

A run folder (``runs/x``: its newest valid checkpoint) or a checkpoint folder
(``runs/x/checkpoints/step_*``) has no ``config.json``; it is read with nestlearn's own loader
(:func:`~nestlearn.train.checkpoint.load_model`, verified hashes, sharded checkpoints included)
and wrapped with :func:`~nestlearn.hf.convert.to_hf` (eos and pad = the run tokenizer's eos).
``AutoModelForCausalLM`` and other processes need an exported folder (``nestlearn export``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nestlearn.train.checkpoint_folders import MANIFEST_FILE, checkpoint_root


def is_run_folder(path: Any) -> bool:
    """A local folder without ``config.json`` that is a run or a checkpoint folder."""
    if not isinstance(path, (str, Path)) or not Path(path).is_dir():
        return False
    path = Path(path)
    if (path / "config.json").exists():
        return False
    return (path / MANIFEST_FILE).is_file() or checkpoint_root(path).is_dir()


def from_run_folder(cls: type, path: str | Path, **kwargs: Any):
    """``cls`` (a :class:`~nestlearn.hf.modeling.NestlearnForCausalLM`) wrapping the model of
    run/checkpoint folder ``path``, in eval mode.

    ``dtype`` (or ``torch_dtype``: a ``torch.dtype``, its name, or ``"auto"`` = as saved) and
    ``device_map`` (one device) are applied; other ``from_pretrained`` options do not apply
    to a run folder and raise ``ValueError``.
    """
    from nestlearn.hf.convert import to_hf
    from nestlearn.train.checkpoint import load_model

    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    device = kwargs.pop("device_map", None)
    want_info = kwargs.pop("output_loading_info", False)
    kwargs.pop("trust_remote_code", None)  # nothing remote is run
    if kwargs:
        raise ValueError(
            f"{path} is a nestlearn run folder, which from_pretrained loads with dtype and "
            f"device_map only (got {sorted(kwargs)}); export it first (nestlearn export "
            f"{path} OUT_DIR) and load OUT_DIR for the other options"
        )
    if device is not None and not isinstance(device, (str, int, torch.device)):
        raise ValueError(
            f"device_map={device!r}: a run folder loads onto one device; pass e.g. "
            "device_map='cuda:0'"
        )
    model, loaded = load_model(Path(path), device="cpu" if device is None else device)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    hf = to_hf(model, eos_id=loaded.tokenizer.eos_id)
    if cls is not type(hf) and not isinstance(hf, cls):
        raise TypeError(f"a run folder loads as NestlearnForCausalLM, not {cls.__name__}")
    hf.eval()
    info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return (hf, info) if want_info else hf
