"""Nonlinear outputs of momentum (NL-24); with Newton–Schulz, Muon.

    m_{i+1} = β m_i − (1 − β) g_i                       linear momentum memory (descent sign)
    o_i     = β m_{i+1} − (1 − β) g_i  (Nesterov) or m_{i+1}
    W_{i+1} = (1 − lr·λ) W_i + lr_A · σ(o_i)            lr_A = lr adjusted by shape

NL-24 writes ``W + σ(m(g))`` with the step size inside ``m``; since Newton–Schulz removes the scale
of its input, the step size must act after ``σ``: ``lr_A`` is Muon's learning rate adjusted to the
matrix shape. With ``σ`` = Newton–Schulz (:mod:`nestlearn.optim.newton_schulz`) this *is*
``torch.optim.Muon`` step for step with the same settings (nesterov, weight decay, lr adjustment,
coefficients (3.4445, −4.7750, 2.0315), 5 steps, bfloat16 iteration; tested): Muon's buffer
``b ← β b + (1 − β) g`` is ``−m`` and Newton–Schulz is odd. ``σ`` is pluggable: a name of
:data:`~nestlearn.optim.newton_schulz.SIGMAS` or a callable ``matrix -> matrix``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from nestlearn.optim.base import (
    MemoryOptimizer,
    apply_update,
    as_matrix,
    check_int,
    check_positive,
    check_unit,
)
from nestlearn.optim.moments import first_moment
from nestlearn.optim.newton_schulz import (
    ADJUST_RULES,
    DTYPES,
    MUON_COEFFICIENTS,
    SIGMAS,
    adjust_lr,
    newton_schulz,
)


class NonlinearMomentum(MemoryOptimizer):
    """NL-24 (module docstring); the defaults are ``torch.optim.Muon``'s. Matrix-only.

    State: ``m`` (1× the parameter). ``sigma``: ``"newton_schulz"`` (uses ``ns_steps``,
    ``ns_coefficients``, ``eps``, ``ns_dtype``), ``"sign"``, ``"identity"`` or a callable.
    """

    matrix_only = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        sigma: str | Callable[[torch.Tensor], torch.Tensor] = "newton_schulz",
        ns_coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        ns_dtype: str = "bfloat16",
        adjust_lr_fn: str | None = None,
        vector_rule: str | None = None,
    ) -> None:
        if isinstance(sigma, str) and sigma not in SIGMAS:
            raise ValueError(f"unknown sigma '{sigma}'; choose one of {', '.join(SIGMAS)}")
        if not isinstance(sigma, str) and not callable(sigma):
            raise ValueError(f"sigma must be a name of {list(SIGMAS)} or a callable, got {sigma!r}")
        self.sigma = sigma
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": bool(nesterov),
            "ns_coefficients": tuple(ns_coefficients),
            "eps": eps,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "adjust_lr_fn": adjust_lr_fn,
            "vector_rule": vector_rule,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_unit(name, "momentum", group["momentum"])
        check_int(name, "ns_steps", group["ns_steps"], minimum=0)
        check_positive(name, "eps", group["eps"])
        if len(group["ns_coefficients"]) != 3:
            raise ValueError(f"{name}: ns_coefficients={group['ns_coefficients']!r} needs 3 values")
        if group["ns_dtype"] not in (*DTYPES, "input"):
            raise ValueError(
                f"{name}: ns_dtype={group['ns_dtype']!r}; choose one of {[*DTYPES, 'input']}"
            )
        if group["adjust_lr_fn"] not in ADJUST_RULES:
            raise ValueError(
                f"{name}: adjust_lr_fn={group['adjust_lr_fn']!r}; choose one of {ADJUST_RULES}"
            )

    def output(self, o: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """``σ(o)`` for the momentum read-out ``o`` (a matrix)."""
        if self.sigma == "newton_schulz":
            return newton_schulz(
                o,
                steps=group["ns_steps"],
                coefficients=group["ns_coefficients"],
                eps=group["eps"],
                dtype=group["ns_dtype"],
            )
        if isinstance(self.sigma, str):
            return SIGMAS[self.sigma](o)
        return self.sigma(o)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        g = as_matrix(grad)
        beta = group["momentum"]
        if "m" not in state:
            state["m"] = torch.zeros_like(g)
        state["m"] = first_moment(state["m"], g, beta)
        read = first_moment(state["m"], g, beta) if group["nesterov"] else state["m"]
        lr = adjust_lr(group["lr"], tuple(g.shape), group["adjust_lr_fn"])
        apply_update(param, self.output(read, group), group["lr"], group["weight_decay"], lr)


class Muon(NonlinearMomentum):
    """:class:`NonlinearMomentum` with ``σ`` = Newton–Schulz: ``torch.optim.Muon``'s update,
    plus rank > 2 parameters (as matrices) and the ``vector_rule`` fallback."""

    def __init__(self, params: Iterable, lr: float = 1e-3, **kwargs: Any) -> None:
        if "sigma" in kwargs:
            raise ValueError("Muon fixes sigma='newton_schulz'; use NonlinearMomentum for another")
        super().__init__(params, lr=lr, sigma="newton_schulz", **kwargs)
