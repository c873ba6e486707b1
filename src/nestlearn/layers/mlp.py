"""The gated feed-forward block of Llama / PaLM (Shazeer, 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``y = W2 (silu(W1 x) ⊙ W3 x)`` with ``W1, W3: dim -> hidden`` and ``W2: hidden -> dim``.

    No biases. ``w2`` writes into the residual stream (its init is scaled by depth).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
