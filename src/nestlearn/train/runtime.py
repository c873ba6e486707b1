"""Device, precision, threads and seeds: the run's physical setting, resolved once."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from nestlearn.config.schema import TrainConfig
from nestlearn.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16" (autocast; fp16 with loss scaling)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 or fp16 autocast on the run's device, or a no-op in fp32."""
        if self.precision in AUTOCAST_DTYPES:
            dtype = AUTOCAST_DTYPES[self.precision]
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"train.device='{name}' is not a device (try auto, cpu, cuda)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device asks for CUDA but none is available; use train.device=cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA devices that support it, fp32 elsewhere.

    On CPU, bf16 autocast is slower than fp32 on most machines and breaks bit-exact comparisons,
    so it is used only when asked for explicitly. ``fp16`` is never chosen by ``auto``: it
    needs loss scaling (:mod:`nestlearn.train.loss_scaling`) and is for GPUs without bf16.
    """
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    return precision


def setup_runtime(cfg: TrainConfig, local_rank: int | None = None) -> Runtime:
    """Threads, device and precision of the run.

    ``local_rank`` (data-parallel runs): a CUDA device without an index becomes
    ``cuda:local_rank`` and is made current, so each process of a node uses its own GPU.
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if local_rank is not None and device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return Runtime(device=device, precision=resolve_precision(cfg.precision, device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
