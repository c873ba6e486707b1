"""Layers against their formulas written out naively."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nestlearn.layers import CausalSelfAttention, RMSNorm, SwiGLU, apply_rope, rope_tables


def reference_attention(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-head loops: query head h reads key/value head h // (H / H_kv)."""
    B, T, _ = x.shape
    H, H_kv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    cos, sin = rope_tables(D, T, dtype=x.dtype)
    q, k, v = attn.qkv(x).split([H * D, H_kv * D, H_kv * D], dim=-1)
    q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(B, T, H_kv, D).transpose(1, 2), cos, sin)
    v = v.view(B, T, H_kv, D).transpose(1, 2)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for h in range(H):
        g = h // (H // H_kv)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(D)  # [B, T, T]
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        heads.append(weights @ v[:, g])  # [B, T, D]
    return attn.out(torch.cat(heads, dim=-1))


@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(1, 1), (3, 3), (4, 2), (6, 2), (4, 1)])
def test_attention_matches_reference(n_heads, n_kv_heads):
    torch.manual_seed(0)
    attn = CausalSelfAttention(n_heads * 5, n_heads, n_kv_heads).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 9, n_heads * 5, dtype=torch.float64)
    cos, sin = rope_tables(5, 9, dtype=torch.float64)
    got = attn(x, cos, sin)
    torch.testing.assert_close(got, reference_attention(attn, x), rtol=1e-10, atol=1e-10)


def test_rmsnorm():
    norm = RMSNorm(6, eps=1e-5).double()
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), want)
    half = norm.to(torch.bfloat16)
    assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_swiglu():
    mlp = SwiGLU(4, 7).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    w1, w2, w3 = mlp.w1.weight, mlp.w2.weight, mlp.w3.weight
    want = (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(mlp(x), want)
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))
