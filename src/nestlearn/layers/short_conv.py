"""Short causal depthwise convolution (width 4), as on q/k/v in Titans and Gated DeltaNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """``y_t = silu(Σ_{i<w} c_i ⊙ x_{t−i})`` per channel (depthwise, causal, no bias).

    The recurrent state is the last ``w − 1`` inputs, ``[B, dim, w − 1]``, so a sequence processed
    in pieces (or token by token) gives the same outputs as in one call.
    """

    def __init__(self, dim: int, width: int = 4, activation: bool = True) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"ShortConv width must be >= 1, got {width}")
        self.dim, self.width, self.activation = dim, width, activation
        self.weight = nn.Parameter(torch.empty(dim, 1, width))
        # Conv1d's default init (uniform, fan-in = width).
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.dim, self.width - 1, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, dim]`` -> ``(y [B, T, dim], state [B, dim, w−1])``."""
        B, dim = x.shape[0], x.shape[-1]
        if x.ndim != 3 or dim != self.dim:
            raise ValueError(f"ShortConv expects [B, T, {self.dim}] inputs, got {tuple(x.shape)}")
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        elif state.shape != (B, self.dim, self.width - 1):
            raise ValueError(
                f"ShortConv state must be [{B}, {self.dim}, {self.width - 1}], "
                f"got {tuple(state.shape)} (a state from another layer?)"
            )
        padded = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, D, w−1+T]
        y = F.conv1d(padded, self.weight.to(x.dtype), groups=self.dim).transpose(1, 2)
        new_state = padded[..., padded.shape[-1] - (self.width - 1) :]
        return (F.silu(y) if self.activation else y), new_state
