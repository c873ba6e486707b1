"""Delta-rule momentum (NL-21/22): momentum written with the L2 inner objective.

The momentum ``m`` (shape of ``W [n, d]``) is a memory from keys, the rows ``g_j`` of the
gradient, to values, the columns of ``−P_i`` (the descent sign). One GD step of size ``γ_i`` on
``½‖m gᵀ + P_i‖²`` with retention ``α`` and the write scaled to ``η`` gives the corrected NL-22

    m_{i+1} = m_i (α I − γ_i g_iᵀ g_i) − η P_i(g_i)
    W_{i+1} = W_i + m_{i+1}

*Right* multiplication (SPEC §3): the NeurIPS print multiplies on the left, the arXiv print on the
right with ``g gᵀ``; neither shape-checks for a non-square ``m``, this form does. Ours: the erase
strength ``γ_i = γ / ‖g_i‖²_F`` with ``0 ≤ γ ≤ 1``, so ``γ_i‖g_i‖² = γ ≤ 1`` and every eigenvalue
of ``α I − γ_i gᵀg`` lies in ``[α − γ, α] ⊂ [−1, 1)``: the erase never expands the memory. ``γ``
is the fraction of what ``m`` returns for the current gradient's top direction that is erased
before the new write. ``P`` is pluggable as in :mod:`nestlearn.optim.preconditioned`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nestlearn.memory.core.rules import momentum, retain
from nestlearn.optim.base import MemoryOptimizer, apply_update, as_matrix, check_unit
from nestlearn.optim.preconditioners import Preconditioner, get_preconditioner


def delta_momentum_update(
    m: torch.Tensor | None,
    grad: torch.Tensor,
    pgrad: torch.Tensor,
    *,
    alpha: float,
    gamma: float,
    lr: float,
) -> torch.Tensor:
    """``m (α I − γ_i gᵀg) − η P(g)`` with ``γ_i = γ / ‖g‖²_F`` for ``m, g, P(g) [n, d]``."""
    write = momentum(None, pgrad, alpha, lr)
    if m is None:
        return write
    norm2 = grad.pow(2).sum()
    gamma_i = gamma / norm2.clamp(min=torch.finfo(grad.dtype).tiny)
    # (m gᵀ) g = Σ_j (m g_j) g_jᵀ: the delta rule's erase summed over the keys g_j, one matmul.
    erase = (m @ grad.mT) @ grad
    return retain(m, alpha) - gamma_i * erase + write


class DeltaMomentum(MemoryOptimizer):
    """NL-21/22 (module docstring). Matrix-only. State: ``m`` (1× the parameter) plus the
    preconditioner's."""

    matrix_only = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        momentum: float = 0.9,
        gamma: float = 0.5,
        preconditioner: str | Preconditioner = "identity",
        weight_decay: float = 0.0,
        vector_rule: str | None = None,
    ) -> None:
        self.preconditioner = get_preconditioner(preconditioner)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "gamma": gamma,
            "weight_decay": weight_decay,
            "vector_rule": vector_rule,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_unit("DeltaMomentum", "momentum", group["momentum"])
        check_unit("DeltaMomentum", "gamma", group["gamma"], closed=True)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        g = as_matrix(grad)
        state["m"] = delta_momentum_update(
            state.get("m"),
            g,
            self.preconditioner.apply(g, state),
            alpha=group["momentum"],
            gamma=group["gamma"],
            lr=group["lr"],
        )
        apply_update(param, state["m"], group["lr"], group["weight_decay"])
