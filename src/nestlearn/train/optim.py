"""The outer optimizer (AdamW) and its warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from nestlearn.config.schema import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear maps only; embeddings, norms' gains and biases are not decayed.

    Embeddings are excluded because decay pulls rare tokens' rows to zero (with tied weights the
    head is the embedding, so it is excluded too). Shared parameters are listed once.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim >= 2 and id(param) not in embedding_ids:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups` (``optim.name`` selects; deep optimizers come later)."""
    groups = parameter_groups(model, cfg.weight_decay)
    # foreach keeps the step fast on CPU and is deterministic; fused is CUDA-only.
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then cosine or constant.

    Warmup: ``(step + 1) / warmup_steps``; cosine: ``r + (1 - r)·½(1 + cos(π·p))`` with
    ``p`` the fraction of post-warmup steps done and ``r = min_lr_ratio``.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    r = cfg.min_lr_ratio
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; its state is its step count (saved in checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, total_steps)
    )
