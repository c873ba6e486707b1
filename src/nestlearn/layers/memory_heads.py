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
        self, x: torch.Tensor, state: State | None = None, *, q_scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, State]:
        """``x [B, T, d]`` -> ``q, k [B, H, T, dk]``, ``v [B, H, T, dv]``, conv state.

        ``k`` has unit norm and ``q`` norm ``q_scale`` (a read scale folded into the
        normalization costs nothing; applied to the output it would be a pass each way).
        """
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_state: State = {}
        if self.conv_size > 0:
            state = state or {}
            q, new_state["conv_q"] = self.q_conv(q, state.get("conv_q"))
            k, new_state["conv_k"] = self.k_conv(k, state.get("conv_k"))
            v, new_state["conv_v"] = self.v_conv(v, state.get("conv_v"))
        # Normalized time-major ([B, T, H, d], contiguous), handed on as head-first views.
        B, T = x.shape[:2]
        q = l2_normalize(q.reshape(B, T, self.n_heads, self.dk), q_scale).transpose(1, 2)
        k = l2_normalize(k.reshape(B, T, self.n_heads, self.dk)).transpose(1, 2)
        v = v.reshape(B, T, self.n_heads, self.dv).transpose(1, 2)
        return q, k, v, new_state

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o [B, H, T, dv]`` read from the memories -> ``[B, T, d]``."""
        B, T = x.shape[:2]
        gate = self.g_proj(x).reshape(B, T, self.n_heads, self.dv)
        if o.dtype in (torch.float32, torch.float64):
            o = gated_rms_norm(o, gate, self.o_norm.weight, self.o_norm.eps)
        else:  # low precision: RMSNorm takes the mean of squares in float32
            o = self.o_norm(o.transpose(1, 2).contiguous()) * F.silu(gate)
        return self.o_proj(o.reshape(B, T, self.n_heads * self.dv))

    def projection_flops(self) -> int:
        """Matmul weights of the projections (2 FLOPs each per token forward)."""
        return sum(
            m.weight.numel()
            for m in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj)
        )


class _GatedRMSNorm(torch.autograd.Function):
    """``y = RMSNorm(o) ⊙ silu(g)``: ``o [B, H, T, D]`` head-first in, ``y [B, T, H, D]`` out.

    With ``r = (mean(o²) + eps)^{−1/2}`` and ``n = r o`` (written time-major by the product
    itself, so the transpose costs no pass of its own), ``y = n ⊙ w ⊙ silu(g)``. Backward, with
    ``G = ∂y`` and ``∂n = G ⊙ silu(g) ⊙ w``: ``∂w = Σ G ⊙ silu(g) ⊙ n``,
    ``∂g = silu'(g) ⊙ G ⊙ n ⊙ w`` and ``∂o = r (∂n − n ⟨∂n, n⟩ / D)``: about three quarters of
    the passes of autograd through RMSNorm, the gate and the copy. Under ``create_graph`` the
    backward differentiates the plain ops instead, so second derivatives are exact.
    """

    @staticmethod
    def forward(
        ctx, o: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        sq = torch.linalg.vector_norm(o, dim=-1, keepdim=True).square_()
        r = sq.div_(o.shape[-1]).add_(eps).rsqrt_().transpose(1, 2)  # [B, T, H, 1]
        n = torch.empty(g.shape, dtype=o.dtype, device=o.device)
        torch.mul(o.transpose(1, 2), r, out=n)
        s = F.silu(g)
        ctx.save_for_backward(o, g, weight, n, s, r)
        ctx.eps = eps
        return (n * weight).mul_(s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        o, g, weight, n, s, r = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: through the plain ops
            y = _gated_rms_norm_plain(o, g, weight, ctx.eps)
            grads = torch.autograd.grad(y, (o, g, weight), grad, create_graph=True)
            return (*grads, None)
        grad_s = grad * s
        grad_w = (grad_s * n).sum(tuple(range(grad.ndim - 1)))
        grad_n = grad_s.mul_(weight)
        grad_g = torch.ops.aten.silu_backward((grad * n).mul_(weight), g)
        dot = torch.linalg.vecdot(grad_n, n).unsqueeze(-1).div_(n.shape[-1])
        grad_o = torch.addcmul(grad_n, n, dot, value=-1.0).mul_(r)
        return grad_o.transpose(1, 2), grad_g, grad_w, None


def _gated_rms_norm_plain(
    o: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """:class:`_GatedRMSNorm` in differentiable ops."""
    o = o.transpose(1, 2)
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * weight * F.silu(g)


def gated_rms_norm(
    o: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``RMSNorm(oᵀ) ⊙ silu(g)`` (SPEC §2.2's read-out): ``o [B, H, T, D]`` read from the
    memories, gate pre-activation ``g [B, T, H, D]``, gain ``weight [D]`` -> ``[B, T, H, D]``.

    Equal to ``RMSNorm(o.transpose(1, 2)) * F.silu(g)`` in float32/float64, with a hand-written
    backward (:class:`_GatedRMSNorm`).
    """
    return _GatedRMSNorm.apply(o, g, weight, eps)


class _L2Normalize(torch.autograd.Function):
    """``y = scale · x / max(‖x‖, eps)`` over the last dimension (``F.normalize`` times ``scale``).

    Backward ``∂x = (scale / max(‖x‖, eps)) (g − x̂ ⟨g, x̂⟩)`` with ``x̂ = y / scale`` (the
    projection only where the norm is not clamped): three passes, about half of autograd's
    through ``F.normalize``. Under ``create_graph`` the norm is rebuilt from ``x`` differentiably.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        y = x * (scale / norm.clamp_min(eps))
        ctx.save_for_backward(x, y, norm)
        ctx.scale, ctx.eps = scale, eps
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, y, norm = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: the norm as a function of x
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        unclamped = (norm > ctx.eps).to(y.dtype)
        dot = torch.linalg.vecdot(grad, y).unsqueeze(-1) * (unclamped / ctx.scale**2)
        return (
            torch.addcmul(grad, y, dot, value=-1.0) * (ctx.scale / norm.clamp_min(ctx.eps)),
            None,
            None,
        )


def l2_normalize(x: torch.Tensor, scale: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """``scale · x / max(‖x‖₂, eps)`` over the last dimension (SPEC §2.2: unit q and k).

    Equal to ``scale * F.normalize(x, dim=-1, eps=eps)`` with a cheaper backward; ``scale > 0``.
    """
    if scale <= 0:
        raise ValueError(f"l2_normalize: scale must be > 0, got {scale}")
    return _L2Normalize.apply(x, float(scale), eps)


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
        return (-self.A_log.exp() * dt).transpose(1, 2)
