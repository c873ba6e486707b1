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
        # Time-major throughout: [B, w−1+T, D] and a channels-last depthwise conv2d, so that the
        # output is a contiguous [B, T, D] (conv1d on [B, D, T] would hand its consumers a
        # transposed view, and every later per-token op would stride across time).
        padded = torch.cat([state.to(x.dtype).transpose(1, 2), x], dim=1)  # [B, w−1+T, D]
        y = F.conv2d(
            padded.transpose(1, 2).unsqueeze(2),  # [B, D, 1, w−1+T], channels-last in memory
            self.weight.to(x.dtype).unsqueeze(2),
            groups=self.dim,
        )
        y = y.squeeze(2).transpose(1, 2)  # [B, T, D]
        new_state = padded[:, padded.shape[1] - (self.width - 1) :].transpose(1, 2)
        return (F.silu(y) if self.activation else y), new_state
