"""What every optimizer of :mod:`nestlearn.optim` shares: checks, the step loop, the 1-D fallback.

An optimizer here is the *outer level* of the update rules in :mod:`nestlearn.memory.core.rules`
(SPEC §1, §3): a subclass only writes ``_update(param, grad, state, group)`` for one parameter,
built from those rules; this base class does the rest the same way for all of them:

- hyper-parameters are checked per parameter group when the group is added (construction or
  ``add_param_group``), with a ``ValueError`` naming the value and its valid range;
- ``step(closure)`` evaluates the closure with gradients enabled, skips parameters whose ``.grad``
  is None and refuses sparse or complex gradients;
- *matrix-only* rules (Newton–Schulz, delta-rule momentum, Kronecker preconditioners, DGD, M3,
  DMGD) read a parameter of rank > 2 as the matrix ``[shape[0], prod(shape[1:])]`` (a conv kernel
  as ``[out, in·kh·kw]``) and refuse rank < 2 parameters unless the group sets
  ``vector_rule="adam"``: then biases and gains get Adam
  (:func:`nestlearn.optim.moments.adam_update` with ``vector_betas`` and ``vector_eps``, the
  group's ``lr`` and ``weight_decay``);
- the state of a parameter is a flat dict of tensors, ints and floats only, so
  ``torch.load(weights_only=True)`` reads a saved ``state_dict()`` and a resumed run is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from nestlearn.optim.moments import adam_update

VECTOR_RULES = (None, "adam")


class MemoryOptimizer(Optimizer):
    """Base class: subclasses set ``matrix_only`` and implement :meth:`_update` and
    :meth:`_check_group`."""

    matrix_only: ClassVar[bool] = False

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        if self.matrix_only:
            vector = {"vector_rule": None, "vector_betas": (0.9, 0.95), "vector_eps": 1e-8}
            defaults = {**vector, **defaults}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = type(self).__name__
        check_nonnegative(name, "lr", group["lr"])
        check_nonnegative(name, "weight_decay", group.get("weight_decay", 0.0))
        self._check_group(group)
        if not self.matrix_only:
            return
        rule = group["vector_rule"]
        if rule not in VECTOR_RULES:
            raise ValueError(
                f"{name}: vector_rule={rule!r}; choose None (refuse rank < 2 parameters) or 'adam'"
            )
        check_betas(name, "vector_betas", group["vector_betas"])
        check_positive(name, "vector_eps", group["vector_eps"])
        for p in group["params"]:
            if p.ndim < 2 and rule is None:
                raise ValueError(
                    f"{name} updates matrices only, got a parameter of shape {list(p.shape)}; "
                    "give rank < 2 parameters (biases, norm gains) to another optimizer "
                    "(nestlearn.optim.hybrid routes them to AdamW) or set vector_rule='adam' "
                    "in their parameter group"
                )

    def _check_group(self, group: dict[str, Any]) -> None:
        """Range checks of the subclass's hyper-parameters (raise ``ValueError``)."""

    def _update(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict[str, Any]
    ) -> None:
        raise NotImplementedError

    def _begin_step(self) -> None:
        """Called once per :meth:`step` before any parameter is updated."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One outer update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._begin_step()
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                check_dense(type(self).__name__, param, grad)
                state = self.state[param]
                if self.matrix_only and param.ndim < 2:
                    vector_update(param, grad, state, group)
                else:
                    self._update(param, grad, state, group)
        return loss


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """A rank ≥ 2 tensor as the matrix ``[shape[0], prod(shape[1:])]`` (a view when possible)."""
    return x if x.ndim == 2 else x.reshape(x.shape[0], -1)


def vector_update(
    param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict[str, Any]
) -> None:
    """The 1-D fallback of matrix-only rules: Adam with the group's ``vector_*`` settings."""
    if "vector.m" not in state:
        state["step"] = 0
        state["vector.m"] = torch.zeros_like(param)
        state["vector.v"] = torch.zeros_like(param)
    state["step"] += 1
    beta1, beta2 = group["vector_betas"]
    m, v, delta = adam_update(
        state["vector.m"],
        state["vector.v"],
        grad,
        step=state["step"],
        lr=group["lr"],
        betas=(beta1, beta2),
        eps=group["vector_eps"],
    )
    state["vector.m"], state["vector.v"] = m, v
    apply_update(param, delta, group["lr"], group.get("weight_decay", 0.0))


def apply_update(
    param: torch.Tensor, delta: torch.Tensor, lr: float, weight_decay: float, scale: float = 1.0
) -> None:
    """``W ← R(W) + scale·Δ`` with retention ``R(W) = (1 − lr·λ) W`` (decoupled weight decay,
    SPEC S-1 retention), in place; ``delta`` may be the matrix view of a rank > 2 parameter and
    of another dtype (a bfloat16 Newton–Schulz output is promoted, not rounded, by the add)."""
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(delta.reshape(param.shape), alpha=scale)


def check_dense(name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise ValueError(
            f"{name} does not support sparse gradients (parameter of shape {list(param.shape)}); "
            "use nn.Embedding(sparse=False) or torch.optim.SparseAdam for that parameter"
        )
    if torch.is_complex(param):
        raise ValueError(f"{name} does not support complex parameters (shape {list(param.shape)})")


def check_nonnegative(name: str, key: str, value: float) -> None:
    if not _is_real(value) or value < 0:
        raise ValueError(f"{name}: {key}={value!r} must be a number >= 0")


def check_positive(name: str, key: str, value: float) -> None:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name}: {key}={value!r} must be a number > 0")


def check_unit(name: str, key: str, value: float, *, closed: bool = False) -> None:
    """``0 ≤ value < 1`` (``closed``: ``≤ 1``): a retention gate, momentum or beta."""
    upper_ok = value <= 1 if closed else value < 1
    if not _is_real(value) or not (value >= 0 and upper_ok):
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{name}: {key}={value!r} must be in {interval}")


def check_betas(name: str, key: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name}: {key}={betas!r} must be a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        check_unit(name, f"{key}[{i}]", beta)


def check_int(name: str, key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: {key}={value!r} must be an int >= {minimum}")


def _is_real(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and math.isfinite(float(value))
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
