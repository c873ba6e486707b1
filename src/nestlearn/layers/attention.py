"""Causal multi-head self-attention with RoPE, grouped-query heads and a static KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.layers.rope import apply_rope, rotate_half


class CausalSelfAttention(nn.Module):
    """``softmax(q kᵀ / sqrt(D) + causal mask) v`` per head, then an output projection.

    ``q, k, v`` come from one fused projection ``qkv: dim -> (H + 2·H_kv)·D`` (no bias unless
    ``bias=True``, which also gives ``out`` a bias: GPT-2), with ``D = dim / n_heads``.
    Grouped-query attention: query head ``h`` reads key/value head ``h // (H / H_kv)``;
    ``n_kv_heads = n_heads`` is ordinary multi-head attention. Queries and keys are rotated by RoPE
    at their absolute positions (unless the tables are None: positions enter elsewhere, e.g.
    learned embeddings); the cache holds rotated keys.
    """

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int | None = None, bias: bool = False
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(
                f"dim={dim} must be divisible by n_heads={n_heads}, "
                f"and n_heads by n_kv_heads={n_kv_heads}"
            )
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        pos: int = 0,
        lead: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend ``x [B, T, dim]`` causally; returns ``[B, T, dim]``.

        ``cos, sin``: full RoPE tables ``[L, D]``, or both None for no rotation. Without a cache,
        ``x`` is the whole sequence from position 0. With ``cache = (k_cache, v_cache)``, each
        ``[B, H_kv, L, D]``, ``x`` holds positions ``pos .. pos+T-1``: their keys/values are
        written into the cache *in place* at those positions, and the queries attend over cache
        positions ``0 .. pos+T-1``.

        ``lead [B]`` (left padding, :mod:`nestlearn.models.padding`): row ``b``'s positions
        ``< lead[b]`` are pads. Its queries never read them, and RoPE rotates position ``s`` as
        ``s - lead[b]``, so the real tokens see exactly what they would unpadded (a pad query
        reads itself only, to stay finite).
        """
        if lead is not None:
            return self._forward_padded(x, cos, sin, cache, pos, lead)
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self._heads(x)
        if cos is not None:
            q = apply_rope(q, cos, sin, offset=pos)
            k = apply_rope(k, cos, sin, offset=pos)

        end = pos + T
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, pos:end] = k
            v_cache[:, :, pos:end] = v
            # Under autocast the cache keeps the parameters' dtype while q is in bf16.
            k = k_cache[:, :, :end].to(q.dtype)  # [B, H_kv, pos+T, D]
            v = v_cache[:, :, :end].to(q.dtype)  # [B, H_kv, pos+T, D]
        if H_kv != H:
            k = k.repeat_interleave(H // H_kv, dim=1)  # [B, H, S, D]
            v = v.repeat_interleave(H // H_kv, dim=1)  # [B, H, S, D]

        if pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # is_causal aligns the mask top-left; after a prefix, query i sits at pos + i and
            # sees keys 0 .. pos+i, so the mask is built explicitly.
            key_pos = torch.arange(end, device=x.device)
            query_pos = torch.arange(pos, end, device=x.device)
            mask = key_pos[None, :] <= query_pos[:, None]  # [T, pos+T]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # [B, T, H·D]
        return self.out(y)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, H, T, D]`` and k, v ``[B, H_kv, T, D]`` of ``x [B, T, d_model]``."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, H_kv * D, H_kv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, H_kv, D).transpose(1, 2)
        v = v.view(B, T, H_kv, D).transpose(1, 2)
        return q, k, v

    def _forward_padded(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        pos: int,
        lead: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`forward` with per-row left padding ``lead [B]`` (see there)."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self._heads(x)
        end = pos + T
        query_pos = torch.arange(pos, end, device=x.device)  # [T]
        if cos is not None:
            rows = (query_pos[None, :] - lead[:, None]).clamp(min=0)  # [B, T] RoPE positions
            cos_b = cos[rows].to(q.dtype)[:, None]  # [B, 1, T, D]
            sin_b = sin[rows].to(q.dtype)[:, None]
            q = q * cos_b + rotate_half(q) * sin_b
            k = k * cos_b + rotate_half(k) * sin_b
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, pos:end] = k
            v_cache[:, :, pos:end] = v
            k = k_cache[:, :, :end].to(q.dtype)  # [B, H_kv, pos+T, D]
            v = v_cache[:, :, :end].to(q.dtype)
        if H_kv != H:
            k = k.repeat_interleave(H // H_kv, dim=1)
            v = v.repeat_interleave(H // H_kv, dim=1)
        key_pos = torch.arange(end, device=x.device)  # [S]
        causal = key_pos[None, :] <= query_pos[:, None]  # [T, S]
        real_key = key_pos[None, :] >= lead[:, None]  # [B, S]
        itself = key_pos[None, :] == query_pos[:, None]  # [T, S]
        mask = causal[None] & (real_key[:, None, :] | itself[None])  # [B, T, S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.out(y)

    def inner_levels(self) -> list:
        """Softmax attention as an associative memory (SPEC §2.2, last row): non-parametric,
        its "update" is appending k/v to the cache and its read solves the objective in closed
        form."""
        from nestlearn.levels import Level

        return [
            Level(
                "",
                f"{self.n_kv_heads} x KV cache (non-parametric)",
                "Σ_i softmax(qᵀk_i)·‖v_i − m‖²",
                "closed form (softmax-weighted mean)",
                1,
            )
        ]
