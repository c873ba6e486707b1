"""Products of per-token gates over segments of a chunk, for the chunkwise forms.

A linear recurrence ``x_t = a_t x_{t-1} + b_t`` inside a chunk unrolls to
``x_t = (Π_{r=1..t} a_r) x_0 + Σ_{s≤t} (Π_{r=s+1..t} a_r) b_s``; the coefficients are the entries
of one lower-triangular matrix of segment products, computed here without division or logarithms
so that gates may be exactly 0 (a full reset) with exact values and gradients.
"""

from __future__ import annotations

import torch


def segment_products(a: torch.Tensor) -> torch.Tensor:
    """``P[..., t, s] = Π_{r=s+1..t} a_r`` for ``0 ≤ s ≤ t ≤ L`` and 0 above the diagonal.

    ``a [..., L]`` holds ``a_1 .. a_L`` (``a_r = a[..., r-1]``); the result is ``[..., L+1, L+1]``
    with index 0 the start of the segment, so ``P[..., t, 0] = Π_{r≤t} a_r`` and the diagonal is 1.
    """
    n = a.shape[-1] + 1
    idx = torch.arange(n, device=a.device)
    # Row t holds the factor a_t strictly below the diagonal and 1 elsewhere, so the cumulative
    # product down the rows multiplies a_{s+1}, ..., a_t into column s: no division by a gate.
    rows = torch.cat([a.new_ones(*a.shape[:-1], 1), a], dim=-1)  # [..., L+1]
    factors = torch.where(idx[:, None] > idx[None, :], rows.unsqueeze(-1), 1.0)  # [..., L+1, L+1]
    products = torch.cumprod(factors, dim=-2)
    return torch.where(idx[:, None] >= idx[None, :], products, 0.0)
