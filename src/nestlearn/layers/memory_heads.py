"""What every memory layer shares: q/k/v projections with short convs, gates, output norm + gate.

SPEC §2.2: keys and queries are L2-normalized, q/k/v pass a short causal depthwise convolution
(width 4), gates are data-dependent projections of ``x_t``, and the read-out is normalized per
head and gated (``RMSNorm(o) ⊙ silu(x W_g)``) before the output projection, as in Titans and
Gated DeltaNet.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from nestlearn.layers.norm import RMSNorm
from nestlearn.layers.short_conv import ShortConv

State = dict[str, torch.Tensor]


class MemoryHeads(nn.Module):
    """Projections in and out of ``n_heads`` memories of key width ``dk`` and value width ``dv``."""

    def __init__(
        self, d_model: int, n_heads: int, dk: int, dv: int, conv_size: int = 4, eps: float = 1e-6
    ) -> None:
        super().__init__()
        if min(d_model, n_heads, dk, dv) < 1:
            raise ValueError(
                f"d_model={d_model}, n_heads={n_heads}, head dims dk={dk}, dv={dv} must be >= 1"
            )
        self.n_heads, self.dk, self.dv, self.conv_size = n_heads, dk, dv, conv_size
        self.q_proj = nn.Linear(d_model, n_heads * dk, bias=False)
        self.k_proj = nn.Linear(d_model, n_heads * dk, bias=False)
        self.v_proj = nn.Linear(d_model, n_heads * dv, bias=False)
        if conv_size > 0:
            self.q_conv = ShortConv(n_heads * dk, conv_size)
            self.k_conv = ShortConv(n_heads * dk, conv_size)
            self.v_conv = ShortConv(n_heads * dv, conv_size)
        self.g_proj = nn.Linear(d_model, n_heads * dv, bias=False)
        self.o_norm = RMSNorm(dv, eps)
        self.o_proj = nn.Linear(n_heads * dv, d_model, bias=False)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        if self.conv_size == 0:
            return {}
        return {
            name: conv.init_state(batch_size, device, dtype)
            for name, conv in (
                ("conv_q", self.q_conv),
                ("conv_k", self.k_conv),
                ("conv_v", self.v_conv),
            )
        }

    def qkv(
        self, x: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, State]:
        """``x [B, T, d]`` -> unit-norm ``q, k [B, H, T, dk]``, ``v [B, H, T, dv]``, conv state."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_state: State = {}
        if self.conv_size > 0:
            state = state or {}
            q, new_state["conv_q"] = self.q_conv(q, state.get("conv_q"))
            k, new_state["conv_k"] = self.k_conv(k, state.get("conv_k"))
            v, new_state["conv_v"] = self.v_conv(v, state.get("conv_v"))
        q = F.normalize(rearrange(q, "b t (h d) -> b h t d", h=self.n_heads), dim=-1)
        k = F.normalize(rearrange(k, "b t (h d) -> b h t d", h=self.n_heads), dim=-1)
        v = rearrange(v, "b t (h d) -> b h t d", h=self.n_heads)
        return q, k, v, new_state

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o [B, H, T, dv]`` read from the memories -> ``[B, T, d]``."""
        gate = rearrange(self.g_proj(x), "b t (h d) -> b h t d", h=self.n_heads)
        o = self.o_norm(o) * F.silu(gate)
        return self.o_proj(rearrange(o, "b h t d -> b t (h d)"))

    def projection_flops(self) -> int:
        """Matmul weights of the projections (2 FLOPs each per token forward)."""
        return sum(
            m.weight.numel()
            for m in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj)
        )


def gate_projection(d_model: int, n_heads: int, bias_init: float) -> nn.Linear:
    """A per-head scalar gate ``x W + b`` with small weights and a chosen initial bias."""
    proj = nn.Linear(d_model, n_heads, bias=True)
    nn.init.normal_(proj.weight, std=0.02)
    nn.init.constant_(proj.bias, bias_init)
    return proj


class MambaDecay(nn.Module):
    """Data-dependent retention ``log α_t = −exp(A) · softplus(x W + dt_bias)`` per head.

    Mamba-2 / Gated DeltaNet parameterization: ``A`` sets each head's decay rate (initialized
    in ``log U(1, 16)``) and ``dt`` its data-dependent step (bias initialized so that
    ``softplus(dt_bias) ∈ U(0.001, 0.1)`` in log scale), giving heads with memory horizons from
    tens to thousands of tokens.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, std=0.02)
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
            # Inverse of softplus, so that softplus(dt_bias) = dt.
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, d]`` -> ``log α [B, H, T]`` (≤ 0)."""
        dt = F.softplus(self.proj(x) + self.dt_bias)
        return rearrange(-self.A_log.exp() * dt, "b t h -> b h t")
