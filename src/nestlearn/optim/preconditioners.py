"""Preconditioners ``P_i`` of preconditioned momentum (NL-19/20) and delta-rule momentum (NL-22).

In NL-19 the preconditioner is the *value* the momentum memory maps each gradient to; any map
``g ↦ P_i(g)`` that keeps the gradient's shape plugs in. A preconditioner is a small object with

    matrix_only: bool                             True if it needs a matrix gradient
    apply(grad, state) -> P(grad)                 reads/writes its own entries ``pre.*`` of the
                                                  optimizer's per-parameter ``state``

Its hyper-parameters are attributes (fixed at construction); its state lives in the optimizer's
state, so ``state_dict()`` saves and restores it. Shipped: :class:`Identity` (plain momentum),
:class:`DiagonalSecondMoment` (Adam-style ``g / (√v̂ + ε)``) and :class:`Kronecker`
(Shampoo-style ``L^{-1/4} g R^{-1/4}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from nestlearn.optim.moments import second_moment


class Preconditioner(Protocol):
    matrix_only: bool

    def apply(self, grad: torch.Tensor, state: dict) -> torch.Tensor: ...


@dataclass(frozen=True)
class Identity:
    """``P(g) = g``: NL-20 reduces to momentum (NL-17). No state."""

    matrix_only: bool = False

    def apply(self, grad: torch.Tensor, state: dict) -> torch.Tensor:
        return grad


@dataclass(frozen=True)
class DiagonalSecondMoment:
    """``P(g) = g / (√v̂ + ε)`` with ``v ← β v + (1 − β) g²``, ``v̂ = v / (1 − β^t)``.

    The diagonal (Adam/RMSProp) preconditioner. State: ``pre.v`` (1× the parameter),
    ``pre.step``.
    """

    beta: float = 0.999
    eps: float = 1e-8
    matrix_only: bool = False

    def __post_init__(self) -> None:
        _check(self.beta, self.eps, "DiagonalSecondMoment")

    def apply(self, grad: torch.Tensor, state: dict) -> torch.Tensor:
        if "pre.v" not in state:
            state["pre.v"] = torch.zeros_like(grad)
            state["pre.step"] = 0
        state["pre.step"] += 1
        state["pre.v"] = second_moment(state["pre.v"], grad, self.beta)
        correction = 1.0 - self.beta ** state["pre.step"]
        return grad / ((state["pre.v"] / correction).sqrt() + self.eps)


@dataclass(frozen=True)
class Kronecker:
    """Shampoo-style ``P(g) = L̂^{-1/4} g R̂^{-1/4}`` for a matrix gradient ``g [n, d]``.

    ``L ← β L + (1 − β) g gᵀ [n, n]`` and ``R ← β R + (1 − β) gᵀ g [d, d]`` (bias-corrected by
    ``1 − β^t``) are the two Kronecker factors of the full-matrix second moment. The inverse
    fourth roots are recomputed every ``update_every`` steps (eigendecomposition in float64,
    eigenvalues floored at ``eps ×`` the largest, so a rank-deficient factor is damped relative to
    its own scale) and held in between. For ``g = σ u vᵀ`` this returns ``u vᵀ``: like Adam, a
    unit-scale update. State: ``pre.L``, ``pre.R``, their roots ``pre.L_root``, ``pre.R_root``
    (``2 (n² + d²)`` numbers) and ``pre.step``.
    """

    beta: float = 0.999
    eps: float = 1e-6
    update_every: int = 10
    matrix_only: bool = True

    def __post_init__(self) -> None:
        _check(self.beta, self.eps, "Kronecker")
        if isinstance(self.update_every, bool) or not (
            isinstance(self.update_every, int) and self.update_every >= 1
        ):
            raise ValueError(f"Kronecker: update_every={self.update_every!r} must be an int >= 1")

    def apply(self, grad: torch.Tensor, state: dict) -> torch.Tensor:
        n, d = grad.shape
        if "pre.L" not in state:
            state["pre.step"] = 0
            state["pre.L"] = grad.new_zeros(n, n)
            state["pre.R"] = grad.new_zeros(d, d)
        state["pre.step"] += 1
        step = state["pre.step"]
        state["pre.L"] = torch.lerp(state["pre.L"], grad @ grad.mT, 1.0 - self.beta)
        state["pre.R"] = torch.lerp(state["pre.R"], grad.mT @ grad, 1.0 - self.beta)
        if (step - 1) % self.update_every == 0:
            correction = 1.0 - self.beta**step
            state["pre.L_root"] = _inverse_root(state["pre.L"] / correction, self.eps)
            state["pre.R_root"] = _inverse_root(state["pre.R"] / correction, self.eps)
        return state["pre.L_root"] @ grad @ state["pre.R_root"]


def _inverse_root(factor: torch.Tensor, eps: float) -> torch.Tensor:
    """``F^{-1/4}`` of a symmetric PSD ``F``, eigenvalues floored at ``eps·λ_max`` (0 if F = 0)."""
    values, vectors = torch.linalg.eigh(factor.double())
    top = values.max().clamp(min=0.0)
    if top == 0:
        return torch.zeros_like(factor)
    roots = values.clamp(min=eps * top).pow(-0.25)
    return ((vectors * roots) @ vectors.mT).to(factor.dtype)


def _check(beta: float, eps: float, name: str) -> None:
    if not 0 <= beta < 1:
        raise ValueError(f"{name}: beta={beta!r} must be in [0, 1)")
    if not eps > 0:
        raise ValueError(f"{name}: eps={eps!r} must be > 0")


PRECONDITIONERS = {
    "identity": Identity,
    "diagonal": DiagonalSecondMoment,
    "kronecker": Kronecker,
}


def get_preconditioner(spec: str | Preconditioner) -> Preconditioner:
    """A preconditioner by name (``identity``, ``diagonal``, ``kronecker``; default settings) or
    an object with ``matrix_only`` and ``apply`` passed through."""
    if isinstance(spec, str):
        if spec not in PRECONDITIONERS:
            raise ValueError(
                f"unknown preconditioner '{spec}'; choose one of {', '.join(PRECONDITIONERS)} "
                "or pass an object with matrix_only and apply(grad, state)"
            )
        return PRECONDITIONERS[spec]()
    if not hasattr(spec, "apply") or not hasattr(spec, "matrix_only"):
        raise ValueError(
            f"preconditioner {spec!r} needs a matrix_only attribute and an "
            "apply(grad, state) method"
        )
    return spec
