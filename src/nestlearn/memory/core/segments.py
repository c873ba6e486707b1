"""Products of per-token gates over segments of a chunk, for the chunkwise forms.

A linear recurrence ``x_t = a_t x_{t-1} + b_t`` inside a chunk unrolls to
``x_t = (Π_{r=1..t} a_r) x_0 + Σ_{s≤t} (Π_{r=s+1..t} a_r) b_s``; the coefficients are the entries
of one lower-triangular matrix of segment products, computed here without division or logarithms
so that gates may be exactly 0 (a full reset) with exact values and gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

_MASKS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _later(n: int, device: torch.device) -> torch.Tensor:
    """``[n, n]`` boolean, True where the column is after the row (``t > s`` at ``[s, t]``)."""
    key = (n, device)
    if key not in _MASKS:
        idx = torch.arange(n, device=device)
        _MASKS[key] = idx[None, :] > idx[:, None]
    return _MASKS[key]


def products_forward(a: torch.Tensor) -> torch.Tensor:
    """The numbers of :func:`segment_products`, without autograd (in-place steps).

    Built transposed, ``Q[..., s, t]`` holding ``a_t`` where ``t > s`` and 1 elsewhere, so that
    the cumulative product runs along the contiguous last dimension (about 4x faster on a CPU
    than down the rows); the result is ``Q`` with ``t < s`` zeroed, returned as a transposed view
    ``[..., t, s]``.
    """
    n = a.shape[-1] + 1
    rows = torch.cat([a.new_ones(*a.shape[:-1], 1), a], dim=-1)  # [..., L+1]
    factors = torch.where(_later(n, a.device), rows.unsqueeze(-2), 1.0)  # [..., s, t]
    return factors.cumprod_(-1).triu_().mT


def products_backward(products: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the gates ``a [..., L]`` of ``P = segment_products(a)`` given ``dP``.

    ``∂P[t, s]/∂a_r = P[t, r] P[r − 1, s]`` for ``s < r ≤ t``, so
    ``da_r = Σ_t P[t, r] (dP Pᵀ)[t, r − 1]``: one matmul, no division (exact for zero gates).
    Entries of ``dP`` on or above the diagonal drop out of the formula by themselves.
    """
    h = torch.matmul(grad, products.mT)  # [..., L+1, L+1]
    return (products[..., :, 1:] * h[..., :, :-1]).sum(-2)


def rows_backward(products: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """:func:`products_backward` for ``P [M, n+1, n+1]`` given only the rows ``1..n`` of ``dP``
    (``[M, n, n+1]``; row 0 does not depend on the gates): ``[M, n]``.

    ``da_r = Σ_{t≥1} P[t, r] h[t, r−1]`` with ``h = dP Pᵀ``, taken as ``hᵀ = P dPᵀ`` so that
    both factors of the final product are read along rows of ``Pᵀ`` (contiguous for the
    products of :func:`segment_products`).
    """
    h_t = torch.bmm(products, grad_rows.mT)  # [M, n+1, n]: hᵀ[c, i] = h[i + 1, c]
    return (products.mT[:, 1:, 1:] * h_t[:, :-1]).sum(-1)


class _SegmentProducts(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        products = products_forward(a)
        ctx.save_for_backward(products)
        return products

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (products,) = ctx.saved_tensors
        return products_backward(products, grad)


def segment_products(a: torch.Tensor) -> torch.Tensor:
    """``P[..., t, s] = Π_{r=s+1..t} a_r`` for ``0 ≤ s ≤ t ≤ L`` and 0 above the diagonal.

    ``a [..., L]`` holds ``a_1 .. a_L`` (``a_r = a[..., r-1]``); the result is ``[..., L+1, L+1]``
    with index 0 the start of the segment, so ``P[..., t, 0] = Π_{r≤t} a_r`` and the diagonal is 1.
    A transposed view (``P.mT`` is contiguous). Under autograd one node whose backward is
    :func:`products_backward` (once differentiable); :func:`segment_products_reference` is the
    same numbers from plain differentiable operations.
    """
    if torch.is_grad_enabled() and a.requires_grad:
        return _SegmentProducts.apply(a)
    return products_forward(a)


def segment_products_reference(a: torch.Tensor) -> torch.Tensor:
    """:func:`segment_products` by plain operations (autograd differentiates it, to any order)."""
    n = a.shape[-1] + 1
    idx = torch.arange(n, device=a.device)
    # Row t holds the factor a_t strictly below the diagonal and 1 elsewhere, so the cumulative
    # product down the rows multiplies a_{s+1}, ..., a_t into column s: no division by a gate.
    rows = torch.cat([a.new_ones(*a.shape[:-1], 1), a], dim=-1)  # [..., L+1]
    factors = torch.where(idx[:, None] > idx[None, :], rows.unsqueeze(-1), 1.0)  # [..., L+1, L+1]
    products = torch.cumprod(factors, dim=-2)
    return torch.where(idx[:, None] >= idx[None, :], products, 0.0)
