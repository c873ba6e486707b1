"""RoPE: the convention, relative positions, and the position-offset path."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.layers import apply_rope, rope_tables


def tables(head_dim: int, length: int = 64, theta: float = 10000.0):
    return rope_tables(head_dim, length, theta, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(
    head_dim=st.integers(1, 9),
    p=st.integers(0, 30),
    s=st.integers(0, 30),
    shift=st.integers(0, 30),
    seed=st.integers(0, 2**16),
)
def test_scores_depend_only_on_the_offset(head_dim, p, s, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 1, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, head_dim, generator=gen, dtype=torch.float64)
    cos, sin = tables(head_dim)

    def score(i: int, j: int) -> torch.Tensor:
        return (apply_rope(q, cos, sin, offset=i) * apply_rope(k, cos, sin, offset=j)).sum()

    torch.testing.assert_close(score(p + shift, s + shift), score(p, s), rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(head_dim=st.integers(1, 9), length=st.integers(1, 20), data=st.data())
def test_offset_path_equals_full_table(head_dim, length, data):
    start = data.draw(st.integers(0, length - 1))
    stop = data.draw(st.integers(start + 1, length))
    x = torch.randn(2, 3, length, head_dim, dtype=torch.float64)
    cos, sin = tables(head_dim)
    full = apply_rope(x, cos, sin)
    part = apply_rope(x[:, :, start:stop], cos, sin, offset=start)
    torch.testing.assert_close(part, full[:, :, start:stop], rtol=0, atol=0)


def test_rotate_half_convention_against_complex_reference():
    head_dim, length, theta = 7, 11, 500.0
    half = head_dim // 2
    x = torch.randn(1, 2, length, head_dim, dtype=torch.float64)
    cos, sin = tables(head_dim, length, theta)
    got = apply_rope(x, cos, sin)

    # Channel i pairs with i + D/2 and turns by p * theta^(-2i/D); the odd last one stays put.
    omega = theta ** (-2 * torch.arange(half, dtype=torch.float64) / head_dim)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * omega  # [T, half]
    z = torch.complex(x[..., :half], x[..., half : 2 * half]) * torch.polar(
        torch.ones_like(angle), angle
    )
    want = torch.cat([z.real, z.imag, x[..., 2 * half :]], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))


def test_position_zero_is_identity():
    x = torch.randn(2, 2, 1, 6, dtype=torch.float64)
    cos, sin = tables(6)
    torch.testing.assert_close(apply_rope(x, cos, sin), x, rtol=0, atol=0)
