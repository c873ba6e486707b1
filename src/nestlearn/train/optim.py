"""The outer optimizer (AdamW or a deep optimizer) and its warmup + cosine learning-rate schedule.

``optim.name=adamw`` is AdamW over :func:`parameter_groups`. Every other name is a deep optimizer
of :mod:`nestlearn.optim` on the matrices of the model with AdamW on the rest
(:func:`nestlearn.optim.hybrid`); both follow the same schedule, each from its own peak lr.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nestlearn.config.schema import OptimConfig
from nestlearn.errors import ConfigError
from nestlearn.optim import (
    M3,
    AdamMemory,
    DeepMomentum,
    DeltaGD,
    DeltaMomentum,
    MomentumMemory,
    Muon,
    PreconditionedMomentum,
    hybrid,
)


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


def _matrix_optimizer(
    params: list[nn.Parameter], model: nn.Module, cfg: OptimConfig, lr: float
) -> torch.optim.Optimizer:
    """The deep optimizer ``cfg.name`` over the model's matrices at peak lr ``lr``."""
    wd = cfg.weight_decay
    if cfg.name == "adam_memory":
        return AdamMemory(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=wd)
    if cfg.name == "momentum":
        return MomentumMemory(params, lr=lr, momentum=cfg.momentum, weight_decay=wd)
    if cfg.name == "preconditioned":
        return PreconditionedMomentum(
            params, lr=lr, momentum=cfg.momentum, preconditioner=cfg.preconditioner, weight_decay=wd
        )
    if cfg.name == "delta_momentum":
        return DeltaMomentum(
            params, lr=lr, momentum=cfg.momentum, gamma=cfg.delta_gamma, weight_decay=wd
        )
    if cfg.name == "dmgd":
        return DeepMomentum(
            params,
            lr=lr,
            momentum=cfg.momentum,
            depth=cfg.dmgd_depth,
            hidden=cfg.dmgd_hidden,
            objective=cfg.dmgd_objective,
            form=cfg.dmgd_form,
            weight_decay=wd,
        )
    if cfg.name == "muon":
        return Muon(
            params,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            ns_steps=cfg.ns_steps,
            weight_decay=wd,
        )
    if cfg.name == "dgd":
        return DeltaGD(params, model=model, lr=lr, weight_decay=wd, missing_inputs="gradient")
    if cfg.name == "m3":
        return M3(
            params,
            lr=lr,
            betas=(cfg.m3_beta1, cfg.m3_beta2, cfg.m3_beta3),
            alpha=cfg.m3_alpha,
            frequency=cfg.m3_frequency,
            eps=cfg.eps,
            ema=cfg.m3_ema,
            ns_steps=cfg.ns_steps,
            weight_decay=wd,
        )
    raise ConfigError(f"optim.name={cfg.name!r}; choose adamw or one of {', '.join(MATRIX_LR)}")


# Peak lr of each deep optimizer when optim.matrix_lr = 0 (None: optim.lr), from a small sweep
# (2-3 values each) with the debug transformer in benchmarks/optim.py's setting; see
# docs/optimizers.md.
MATRIX_LR: dict[str, float | None] = {
    "adam_memory": None,
    "momentum": 0.03,
    "preconditioned": 3e-4,
    "delta_momentum": 0.05,
    "dmgd": 0.05,
    "muon": 0.02,
    "dgd": 0.05,
    "m3": 1e-4,
}


def matrix_lr(cfg: OptimConfig) -> float:
    """The matrix optimizer's peak lr: ``optim.matrix_lr``, else the default of ``optim.name``."""
    if cfg.matrix_lr > 0:
        return cfg.matrix_lr
    default = MATRIX_LR[cfg.name]
    return cfg.lr if default is None else default


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups` for ``optim.name=adamw``; otherwise the deep optimizer
    ``optim.name`` on the matrices and AdamW on the rest (:func:`nestlearn.optim.hybrid`)."""
    if cfg.name != "adamw":
        if cfg.name not in MATRIX_LR:
            raise ConfigError(
                f"optim.name={cfg.name!r}; choose adamw or one of {', '.join(MATRIX_LR)}"
            )
        lr = matrix_lr(cfg)
        exclude = []
        if cfg.name == "dgd":
            # DGD reads layer inputs: only nn.Linear weights can be its matrices.
            linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
            exclude = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in linear]
        return hybrid(
            model,
            lambda params: _matrix_optimizer(params, model, cfg, lr),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            exclude=exclude,
        )
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
