"""Rotary position embedding (Su et al., 2021), rotate-half convention of Llama / GPT-NeoX.

Channel ``i`` is paired with channel ``i + D/2`` and the pair is rotated by the angle
``p · θ^(-2i/D)`` at position ``p``:

    x'_i       = x_i cos(p ω_i) - x_{i+D/2} sin(p ω_i)
    x'_{i+D/2} = x_{i+D/2} cos(p ω_i) + x_i sin(p ω_i)

so ``<R_p q, R_s k> = <q, R_{s-p} k>`` depends on the offset ``s - p`` only. With an odd head
dimension the last channel has no partner and passes through unrotated (cos 1, sin 0).
"""

from __future__ import annotations

import torch


def rope_tables(
    head_dim: int,
    max_seq_len: int,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` tables ``[max_seq_len, head_dim]``; row ``p`` rotates position ``p``.

    Angles are computed in float64 and rounded once to ``dtype``.
    """
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64, device=device) * 2 / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), inv_freq)
    # The unpaired last channel of an odd head_dim is left alone.
    rest = head_dim - 2 * half
    ones = torch.ones(max_seq_len, rest, dtype=torch.float64, device=device)
    zeros = torch.zeros(max_seq_len, rest, dtype=torch.float64, device=device)
    cos = torch.cat([angles.cos(), angles.cos(), ones], dim=-1)  # [L, D]
    sin = torch.cat([angles.sin(), angles.sin(), zeros], dim=-1)  # [L, D]
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2, rest) -> (-x2, x1, rest)`` over the last dimension (``rest`` is 0 or 1 wide)."""
    half = x.shape[-1] // 2
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([-x2, x1, rest], dim=-1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0
) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` as positions ``offset .. offset+T-1``.

    ``cos, sin`` are full tables ``[L, D]`` (from :func:`rope_tables`, ``L >= offset + T``); the
    rows for this chunk are sliced here so decoding at position ``p`` uses row ``p``.
    """
    T = x.shape[-2]
    cos = cos[offset : offset + T].to(x.dtype)  # [T, D]
    sin = sin[offset : offset + T].to(x.dtype)  # [T, D]
    return x * cos + rotate_half(x) * sin
