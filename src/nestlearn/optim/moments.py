"""Moment memories: the first and second moments of gradients as associative memories.

arXiv App. B (Eqs 101–104) / NeurIPS C.4 read Adam's two states as memories of the gradients,
written by plain sums ``M ← M + β1 g`` and ``H ← H + β2 g²``. Ours add the retention gates of
SPEC S-1 (``R(M) = β M``, an exponential moving average) and Adam's bias correction, so that
:class:`~nestlearn.optim.adam.AdamMemory` is ``torch.optim.Adam``/``AdamW`` step for step:

    M_t = β1 M_{t−1} − (1 − β1) g_t          first moment, stored with the descent sign
                                              (:func:`~nestlearn.memory.core.rules.momentum`)
    H_t = β2 H_{t−1} + (1 − β2) g_t ⊙ g_t     second moment
                                              (:func:`~nestlearn.memory.core.rules.retain`)
    Δ_t = lr · M̂_t / (√Ĥ_t + ε)               M̂ = M / (1 − β1^t), Ĥ = H / (1 − β2^t)

The first moment holds ``−EMA(g)`` (the paper's momentum sign, ``W ← W + Δ``), which is
``−exp_avg`` of torch's Adam.
"""

from __future__ import annotations

import math

import torch

from nestlearn.memory.core.rules import momentum, retain


def first_moment(m: torch.Tensor, grad: torch.Tensor, beta: float) -> torch.Tensor:
    """``M ← β M − (1 − β) g``: an EMA of the descent direction (momentum with dampening)."""
    return momentum(m, grad, beta, 1.0 - beta)


def second_moment(v: torch.Tensor, grad: torch.Tensor, beta: float) -> torch.Tensor:
    """``H ← β H + (1 − β) g ⊙ g`` (same operation order as ``torch.optim.Adam``)."""
    return retain(v, beta).addcmul_(grad, grad, value=1.0 - beta)


def adam_update(
    m: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam write and read: returns the new ``(M, H)`` and the update ``Δ`` (``W ← W + Δ``).

    ``step`` counts this write (1 for the first). The bias corrections and ``ε`` follow
    ``torch.optim.Adam``'s arithmetic (``√Ĥ = √H / √(1 − β2^t)``).
    """
    beta1, beta2 = betas
    m = first_moment(m, grad, beta1)
    v = second_moment(v, grad, beta2)
    step_size = lr / (1.0 - beta1**step)
    denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
    return m, v, (m / denom).mul_(step_size)
