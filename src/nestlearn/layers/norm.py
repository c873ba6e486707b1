"""Root-mean-square layer norm (Zhang & Sennrich, 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        # torch's rms_norm takes the mean of squares in at least float32 (bf16/fp16 activations
        # keep their scale) and has fused kernels for matching dtypes.
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Mixed precision (e.g. bf16 activations, float32 gain): normalise in x's dtype, then
        # scale in the promoted dtype, as ``x_hat.to(x.dtype) * g``.
        return F.rms_norm(x, self.weight.shape, None, self.eps) * self.weight


NORMS = ("rms", "layer")


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``"rms"``: :class:`RMSNorm` (Llama); ``"layer"``: ``nn.LayerNorm`` with gain and bias,
    ``(x − mean(x)) / sqrt(var(x) + eps) * g + b`` (GPT-2)."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps)
    raise ValueError(f"norm: unknown '{kind}'; choose one of {', '.join(NORMS)}")
