"""Adam as an associative memory (arXiv App. B Eqs 101–104; NeurIPS C.4).

The paper's part: Adam's two states are memories of the gradients, written by sums
``M ← M + β1 g`` and ``H ← H + β2 g²``, and the update ``M / √H`` is (close to) the optimal read
of such a memory. Ours: retention gates (``M ← β1 M + (1 − β1)·``, the EMA), Adam's bias
correction and decoupled weight decay as retention of the weights, which make this optimizer equal
to ``torch.optim.Adam`` (``weight_decay=0``) and ``torch.optim.AdamW`` step for step (tested in
float64). The rule is :func:`nestlearn.optim.moments.adam_update`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nestlearn.optim.base import MemoryOptimizer, apply_update, check_betas, check_positive
from nestlearn.optim.moments import adam_update


class AdamMemory(MemoryOptimizer):
    """``M, H`` moment memories (module docstring); ``W ← (1 − lr·λ) W + lr·M̂/(√Ĥ + ε)``.

    Elementwise, so parameters of any shape (1-D included) use the same rule. State per
    parameter: ``step`` (int), ``m`` (``−exp_avg``), ``v`` (``exp_avg_sq``): 2× the parameter.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    def _check_group(self, group: dict[str, Any]) -> None:
        check_betas("AdamMemory", "betas", group["betas"])
        check_positive("AdamMemory", "eps", group["eps"])

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        if not state:
            state["step"] = 0
            state["m"] = torch.zeros_like(param)
            state["v"] = torch.zeros_like(param)
        state["step"] += 1
        state["m"], state["v"], delta = adam_update(
            state["m"],
            state["v"],
            grad,
            step=state["step"],
            lr=group["lr"],
            betas=tuple(group["betas"]),
            eps=group["eps"],
        )
        apply_update(param, delta, group["lr"], group["weight_decay"])
