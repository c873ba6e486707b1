"""The optimizers every shared test runs, and the convex problem they are tested on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nestlearn.optim import (
    M3,
    AdamMemory,
    DeepMomentum,
    DeltaGD,
    DeltaMomentum,
    MomentumMemory,
    Muon,
    NonlinearMomentum,
    PreconditionedMomentum,
)

DT = torch.float64
VECTOR = {"vector_rule": "adam"}


@dataclass(frozen=True)
class Case:
    """``make(model)`` builds the optimizer over all of ``model``'s parameters."""

    make: Callable[[nn.Module], torch.optim.Optimizer]
    # Final / initial loss after CONVERGE_STEPS steps with a linear lr decay to 0.
    converge_ratio: float
    matrix_only: bool = True
    # Hyper-parameter names that must be in [0, 1) (ValueError otherwise).
    unit_keys: tuple[str, ...] = ()


CASES: dict[str, Case] = {
    "momentum": Case(
        lambda m: MomentumMemory(m.parameters(), lr=0.05, momentum=0.9),
        1e-5,
        matrix_only=False,
        unit_keys=("momentum",),
    ),
    "preconditioned_identity": Case(
        lambda m: PreconditionedMomentum(m.parameters(), lr=0.05, preconditioner="identity"),
        1e-5,
        matrix_only=False,
        unit_keys=("momentum",),
    ),
    "preconditioned_diagonal": Case(
        lambda m: PreconditionedMomentum(m.parameters(), lr=0.01), 1e-5, matrix_only=False
    ),
    "preconditioned_kronecker": Case(
        lambda m: PreconditionedMomentum(
            m.parameters(), lr=0.03, preconditioner="kronecker", **VECTOR
        ),
        1e-3,
    ),
    "delta_momentum": Case(
        lambda m: DeltaMomentum(m.parameters(), lr=0.05, **VECTOR), 1e-4, unit_keys=("momentum",)
    ),
    "dmgd": Case(
        lambda m: DeepMomentum(m.parameters(), lr=0.05, **VECTOR), 1e-2, unit_keys=("momentum",)
    ),
    "dmgd_l2": Case(
        lambda m: DeepMomentum(m.parameters(), lr=0.05, objective="l2", **VECTOR), 1e-2
    ),
    "muon": Case(
        lambda m: Muon(m.parameters(), lr=0.05, weight_decay=0.0, **VECTOR),
        1e-2,
        unit_keys=("momentum",),
    ),
    "nonlinear_sign": Case(
        lambda m: NonlinearMomentum(m.parameters(), lr=0.05, sigma="sign", **VECTOR), 1e-3
    ),
    # DGD converges to the minimizer of a regularized objective (test_dgd.py checks which);
    # on this problem that minimizer's loss is about 2% of the initial one.
    "dgd": Case(lambda m: DeltaGD(m.parameters(), model=m, lr=0.3, **VECTOR), 5e-2),
    # The paper's undecayed sums: the fast momentum never forgets, the steps shrink; slow.
    "m3": Case(lambda m: M3(m.parameters(), lr=0.05, **VECTOR), 0.3),
    "m3_ema": Case(lambda m: M3(m.parameters(), lr=0.05, ema=True, **VECTOR), 2e-2),
    "adam_memory": Case(
        lambda m: AdamMemory(m.parameters(), lr=0.05), 1e-3, matrix_only=False, unit_keys=()
    ),
}

CONVERGE_STEPS = 150


def regression(seed: int = 0, n: int = 6, d: int = 5, samples: int = 48, bias: bool = True):
    """``nn.Linear(d, n)`` in float64 and data ``(X, Y)`` of a random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, d, generator=g, dtype=DT)
    y = x @ torch.randn(n, d, generator=g, dtype=DT).T
    if bias:
        y = y + torch.randn(n, generator=g, dtype=DT)
    torch.manual_seed(seed)
    return nn.Linear(d, n, bias=bias).to(DT), x, y


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``½ E‖model(x) − y‖²``: convex in the weights."""
    return 0.5 * (model(x) - y).pow(2).sum(-1).mean()


def closure_for(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        return loss

    return closure
