"""Preconditioned momentum (NL-19/20): momentum as a memory from gradients to values ``P_i``.

With value ``P_i`` the momentum's inner objective becomes ``⟨m gᵀ, P_i⟩`` (NL-19); one GD step of
size ``η`` with retention ``α`` gives

    m_{i+1} = α m_i − η P_i(g_i)          (:func:`nestlearn.memory.core.rules.momentum`)
    W_{i+1} = W_i + m_{i+1}               (NL-20; decoupled weight decay as retention of W)

``P_i`` is pluggable (:mod:`nestlearn.optim.preconditioners`): identity (= NL-17), diagonal second
moment, Shampoo-style Kronecker factors, or any object with ``matrix_only`` and ``apply``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nestlearn.memory.core.rules import momentum
from nestlearn.optim.base import MemoryOptimizer, apply_update, as_matrix, check_unit
from nestlearn.optim.preconditioners import Preconditioner, get_preconditioner


class PreconditionedMomentum(MemoryOptimizer):
    """NL-20 (module docstring). State: ``m`` (1× the parameter) plus the preconditioner's.

    With a matrix-only preconditioner (Kronecker) the optimizer is matrix-only (rank > 2
    parameters read as ``[shape[0], -1]``; rank < 2 need ``vector_rule="adam"``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.9,
        preconditioner: str | Preconditioner = "diagonal",
        weight_decay: float = 0.0,
        vector_rule: str | None = None,
    ) -> None:
        self.preconditioner = get_preconditioner(preconditioner)
        self.matrix_only = bool(self.preconditioner.matrix_only)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        if self.matrix_only:
            defaults["vector_rule"] = vector_rule
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_unit("PreconditionedMomentum", "momentum", group["momentum"])

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        g = as_matrix(grad) if self.matrix_only else grad
        pg = self.preconditioner.apply(g, state)
        state["m"] = momentum(state.get("m"), pg, group["momentum"], group["lr"])
        apply_update(param, state["m"], group["lr"], group["weight_decay"])
