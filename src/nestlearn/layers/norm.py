"""Root-mean-square layer norm (Zhang & Sennrich, 2019)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x²) + eps) * g`` over the last dimension, with a learnable gain ``g``.

    No mean subtraction and no bias, unlike LayerNorm.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares is taken in at least float32 so bf16 activations keep their scale.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype) * self.weight


NORMS = ("rms", "layer")


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``"rms"``: :class:`RMSNorm` (Llama); ``"layer"``: ``nn.LayerNorm`` with gain and bias,
    ``(x − mean(x)) / sqrt(var(x) + eps) * g + b`` (GPT-2)."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps)
    raise ValueError(f"norm: unknown '{kind}'; choose one of {', '.join(NORMS)}")
