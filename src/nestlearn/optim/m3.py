"""M3, Multi-scale Momentum Muon (SPEC §3; arXiv Algorithm 1): two momenta at two frequencies.

Every step (the fast level), with ``g`` the gradient of a matrix ``W``:

    M1 ← a1 M1 + β1 g          fast momentum
    V  ← a2 V  + β2 g ⊙ g      second moment

At the start of every slow chunk of ``f`` steps (the slow level; chunk ``k ≥ 2``):

    M2 ← a3 M2 + β3 Σ_{steps of chunk k−1} g,      O2 = NS(M2)     (held for the whole chunk)

and the update, Newton–Schulz before the division:

    W ← (1 − lr·λ) W − lr · (NS(M1) + α O2) / (√V̂ + ε)

The paper's accumulators are undecayed sums (``a = 1``; the steps then shrink like AdaGrad's as
``V`` grows). Ours, ``ema=True``: retention gates ``a = 1 − β`` (exponential moving averages,
``β`` the write strength) and ``V̂ = V / (1 − (1 − β2)^t)`` bias-corrected; with sums ``V̂ = V``.
``O2 = 0`` during the first chunk. NS is :func:`~nestlearn.optim.newton_schulz.newton_schulz`
(Muon's coefficients and arithmetic). The two momenta are two levels of one optimizer
(frequencies 1 and ``1/f`` per step). Memory: ``M1, V, M2, O2`` and the chunk's gradient sum,
5× the parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nestlearn.memory.core.rules import retain
from nestlearn.optim.base import (
    MemoryOptimizer,
    apply_update,
    as_matrix,
    check_int,
    check_nonnegative,
    check_positive,
    check_unit,
)
from nestlearn.optim.newton_schulz import DTYPES, MUON_COEFFICIENTS, newton_schulz


def accumulate(memory: torch.Tensor, value: torch.Tensor, beta: float, ema: bool) -> torch.Tensor:
    """``a·memory + β·value`` with retention ``a = 1`` (sum) or ``1 − β`` (EMA)."""
    return retain(memory, None if not ema else 1.0 - beta) + beta * value


class M3(MemoryOptimizer):
    """Multi-scale momentum Muon (module docstring). Matrix-only.

    ``betas = (β1, β2, β3)`` are write strengths; ``frequency`` is ``f``, the steps per slow chunk;
    ``alpha`` weighs the slow momentum's output.
    """

    matrix_only = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.1, 0.05, 0.5),
        alpha: float = 1.0,
        frequency: int = 8,
        eps: float = 1e-8,
        ema: bool = False,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: str = "bfloat16",
        vector_rule: str | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "alpha": alpha,
            "frequency": frequency,
            "eps": eps,
            "ema": bool(ema),
            "weight_decay": weight_decay,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "vector_rule": vector_rule,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if len(betas) != 3:
            raise ValueError(f"M3: betas={betas!r} must be three write strengths (β1, β2, β3)")
        for i, beta in enumerate(betas):
            check_unit("M3", f"betas[{i}]", beta, closed=True)
            check_positive("M3", f"betas[{i}]", beta)
        check_nonnegative("M3", "alpha", group["alpha"])
        check_int("M3", "frequency", group["frequency"])
        check_positive("M3", "eps", group["eps"])
        check_int("M3", "ns_steps", group["ns_steps"], minimum=0)
        if group["ns_dtype"] not in (*DTYPES, "input"):
            raise ValueError(
                f"M3: ns_dtype={group['ns_dtype']!r}; choose one of {[*DTYPES, 'input']}"
            )

    def _ns(self, x: torch.Tensor, group: dict) -> torch.Tensor:
        return newton_schulz(
            x, steps=group["ns_steps"], coefficients=MUON_COEFFICIENTS, dtype=group["ns_dtype"]
        ).to(x.dtype)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        g = as_matrix(grad)
        beta1, beta2, beta3 = group["betas"]
        ema = group["ema"]
        if not state:
            state["step"] = 0
            for key in ("m1", "v", "m2", "o2", "chunk_sum"):
                state[key] = torch.zeros_like(g)
        state["step"] += 1
        step = state["step"]
        if step > 1 and (step - 1) % group["frequency"] == 0:
            # A new slow chunk starts: the slow level reads the previous chunk's gradients.
            state["m2"] = accumulate(state["m2"], state["chunk_sum"], beta3, ema)
            state["o2"] = self._ns(state["m2"], group)
            state["chunk_sum"] = torch.zeros_like(g)
        state["chunk_sum"] = state["chunk_sum"] + g
        state["m1"] = accumulate(state["m1"], g, beta1, ema)
        state["v"] = accumulate(state["v"], g * g, beta2, ema)
        v = state["v"] / (1.0 - (1.0 - beta2) ** step) if ema else state["v"]
        direction = self._ns(state["m1"], group) + group["alpha"] * state["o2"]
        apply_update(
            param,
            direction / (v.sqrt() + group["eps"]),
            group["lr"],
            group["weight_decay"],
            -group["lr"],
        )
