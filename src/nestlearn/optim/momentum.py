"""Momentum as an associative memory (NL-17/18).

The momentum ``m`` is a memory whose inner objective is ``⟨m gᵀ, I⟩ = ⟨m, g⟩`` (NL-18): one GD
step of size ``η`` on it, with retention ``α`` (SPEC S-1), is

    m_{i+1} = α m_i − η g_i          (:func:`nestlearn.memory.core.rules.momentum`)
    W_{i+1} = W_i + m_{i+1}          (NL-17; decoupled weight decay as retention of W)

With a constant ``η = lr`` this is ``torch.optim.SGD(lr, momentum=α, dampening=0)`` step for step:
SGD keeps ``b = α b + g`` and steps ``W ← W − lr·b``, so ``m = −lr·b`` (tested). Under a
learning-rate schedule the two differ on purpose: here ``η_i`` scales the gradient written at
step i (the paper's ``η_t``), in SGD ``lr_i`` rescales the whole buffer at every read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nestlearn.memory.core.rules import momentum
from nestlearn.optim.base import MemoryOptimizer, apply_update, check_unit


class MomentumMemory(MemoryOptimizer):
    """NL-17/18 (module docstring). Elementwise: any shape. State: ``m`` (1× the parameter)."""

    def __init__(
        self, params: Iterable, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    def _check_group(self, group: dict[str, Any]) -> None:
        check_unit("MomentumMemory", "momentum", group["momentum"])

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        m = state.get("m")
        state["m"] = momentum(m, grad, group["momentum"], group["lr"])
        apply_update(param, state["m"], group["lr"], group["weight_decay"])
