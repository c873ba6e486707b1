"""The functional core of inner updates (SPEC §2.1, S-1), per token, on plain tensors.

Every memory of the library (matrix memories in attention-like layers, MLP memories in Titans,
CMS blocks, and later the optimizer states of `nestlearn.optim`) is updated by compositions of
these functions; the chunkwise forms in this package are parallel rewritings of the same
compositions and are tested against loops that call these functions literally.

Conventions: a linear map ``W`` has shape ``[..., d_out, d_in]`` and reads ``W x``; leading
dimensions (batch, heads) broadcast; per-token scalars (gates) have shape ``[...]``.

    g_t = ∇_W L̃(W_{t-1}; k_t, v_t)          inner gradient ("surprise"), :func:`linear_gradient`
    S_t = μ_t S_{t-1} − η_t · P_t(g_t)        inner momentum, :func:`momentum`
    W_t = R_t(W_{t-1}) + S_t                   retention + write, :func:`retain`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from nestlearn.errors import ConfigError


class Objective(Protocol):
    """An inner objective ``L̃(pred; target)`` summed over the last dimension."""

    name: str

    def value(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``L̃`` per token: ``[..., d] -> [...]``."""
        ...

    def error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``∂L̃/∂pred``, the error signal a linear map's gradient is built from: ``[..., d]``."""
        ...


@dataclass(frozen=True)
class DotProduct:
    """``L̃ = −⟨pred, target⟩``: a Hebbian write (linear attention, NL-12..16).

    Its gradient ``−target`` does not depend on the memory, so writes never interfere.
    """

    name: str = "dot"

    def value(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -(pred * target).sum(-1)

    def error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -target.expand_as(pred) if target.shape != pred.shape else -target


@dataclass(frozen=True)
class L2:
    """``L̃ = ½‖pred − target‖²``: regression, which gives the delta rule for a linear map."""

    name: str = "l2"

    def value(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (pred - target).pow(2).sum(-1)

    def error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return pred - target


@dataclass(frozen=True)
class Huber:
    """``L̃ = Σ huber_δ(pred − target)``: L2 near the target, L1 far from it (Miras family)."""

    delta: float = 1.0
    name: str = "huber"

    def value(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        r = (pred - target).abs()
        quad = 0.5 * r.pow(2)
        lin = self.delta * (r - 0.5 * self.delta)
        return torch.where(r <= self.delta, quad, lin).sum(-1)

    def error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred - target).clamp(-self.delta, self.delta)


OBJECTIVES: dict[str, Objective] = {"dot": DotProduct(), "l2": L2(), "huber": Huber()}


def get_objective(name: str | Objective) -> Objective:
    """An objective by name (``dot``, ``l2``, ``huber``) or an instance passed through."""
    if not isinstance(name, str):
        return name
    if name not in OBJECTIVES:
        raise ConfigError(
            f"unknown inner objective '{name}'; choose one of {', '.join(OBJECTIVES)}"
        )
    return OBJECTIVES[name]


def linear_gradient(error: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``∇_W L̃`` for a linear map ``pred = W x``: the outer product ``error xᵀ``.

    ``error [..., d_out]``, ``x [..., d_in]`` -> ``[..., d_out, d_in]``.
    """
    return error.unsqueeze(-1) * x.unsqueeze(-2)


def momentum(
    state: torch.Tensor | None,
    grad: torch.Tensor,
    mu: torch.Tensor | float,
    eta: torch.Tensor | float,
) -> torch.Tensor:
    """``S_t = μ_t S_{t-1} − η_t g_t`` (``state=None`` is ``S_{t-1} = 0``); gates broadcast over
    the last two (matrix) dimensions when given per token as ``[...]`` tensors."""
    eta = _per_matrix(eta, grad)
    if state is None:
        return -eta * grad
    return _per_matrix(mu, grad) * state - eta * grad


def retain(weight: torch.Tensor, alpha: torch.Tensor | float | None) -> torch.Tensor:
    """``R_t(W) = α_t W`` (weight decay as retention); ``None`` keeps everything."""
    if alpha is None:
        return weight
    return _per_matrix(alpha, weight) * weight


def dgd_projection(
    weight: torch.Tensor, x: torch.Tensor, eta: torch.Tensor | float
) -> torch.Tensor:
    """``W (I − η x xᵀ)``: the projection term of delta gradient descent (NL-27..29).

    For ``‖x‖ = 1`` and ``0 ≤ η ≤ 2`` the factor is non-expansive. ``x [..., d_in]``.
    """
    wx = (weight @ x.unsqueeze(-1)).squeeze(-1)  # [..., d_out]
    return weight - _per_matrix(eta, weight) * linear_gradient(wx, x)


def _per_matrix(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A per-token gate ``[...]`` viewed as ``[..., 1, 1]`` against a matrix ``[..., m, n]``."""
    if isinstance(value, torch.Tensor) and value.ndim == like.ndim - 2:
        return value[..., None, None]
    return value
