"""Sliding-window attention with persistent tokens: blocked masked form vs a per-query loop,
ring-buffer decoding vs the full forward, RoPE at absolute positions, errors."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.layers.rope import apply_rope, rope_tables
from nestlearn.layers.sliding_attention import SlidingWindowAttention, rope_at

DT = torch.float64


def layer(d=12, H=2, D=5, window=4, P=3, seed=0) -> SlidingWindowAttention:
    torch.manual_seed(seed)
    return SlidingWindowAttention(d, H, D, window=window, n_persistent=P).to(DT)


def oracle(attn: SlidingWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Each query on its own: softmax over the persistent keys (unrotated score) and the window
    of rotated keys, then the output projection. RoPE from the existing full tables."""
    H, D, W, T = attn.n_heads, attn.head_dim, attn.window, x.shape[1]
    q, k, v = rearrange(attn.qkv(x), "b t (n h d) -> n b h t d", n=3, h=H)
    cos, sin = rope_tables(D, T, attn.rope_theta, DT)
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    pk, pv = attn.persistent_k, attn.persistent_v  # [H, P, D]
    outputs = []
    for t in range(T):
        lo = max(0, t - W + 1)
        local = torch.einsum("bhd,bhsd->bhs", q_rot[:, :, t], k_rot[:, :, lo : t + 1])
        persistent = torch.einsum("bhd,hpd->bhp", q[:, :, t], pk)
        p = torch.softmax(torch.cat([persistent, local], -1) / math.sqrt(D), dim=-1)
        n = pk.shape[1]
        o = torch.einsum("bhp,hpd->bhd", p[..., :n], pv)
        o = o + torch.einsum("bhs,bhsd->bhd", p[..., n:], v[:, :, lo : t + 1])
        outputs.append(o)
    return attn.o_proj(rearrange(torch.stack(outputs, 2), "b h t d -> b t (h d)"))


def grads(attn: SlidingWindowAttention, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    w = torch.linspace(-1, 1, y.numel(), dtype=DT).view_as(y)
    params = [x, *attn.parameters()]
    return torch.autograd.grad((y * w).sum(), params, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize(
    ("B", "T", "window", "P"),
    [(2, 11, 4, 3), (1, 1, 4, 3), (2, 7, 1, 0), (1, 9, 20, 2), (2, 13, 3, 0), (1, 10, 5, 1)],
)
def test_blocked_form_equals_the_per_query_oracle_with_gradients(B, T, window, P):
    attn = layer(window=window, P=P)
    x = torch.randn(B, T, 12, dtype=DT, requires_grad=True)
    y, state = attn(x)
    expected = oracle(attn, x)
    assert state is None
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads(attn, x, y), grads(attn, x, expected), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 17),
    window=st.integers(1, 7),
    P=st.integers(0, 2),
    H=st.integers(1, 3),
    D=st.integers(1, 6),
)
def test_any_shape_matches_the_oracle(B, T, window, P, H, D):
    attn = layer(d=7, H=H, D=D, window=window, P=P)
    x = torch.randn(B, T, 7, dtype=DT)
    torch.testing.assert_close(attn(x)[0], oracle(attn, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("prefix", "window"), [(7, 3), (1, 4), (2, 5), (0, 4)])
def test_ring_buffer_decoding_equals_the_full_forward(prefix, window):
    attn = layer(window=window)
    x = torch.randn(2, 17, 12, dtype=DT, requires_grad=True)
    full, _ = attn(x)
    state = attn.init_state(2, dtype=DT)
    outputs = []
    if prefix:
        y, state = attn(x[:, :prefix], state)
        outputs.append(y)
    for t in range(prefix, 17):
        y, state = attn(x[:, t : t + 1], state)
        outputs.append(y)
        assert state["k"].shape == (2, 2, window, 5)
    stepped = torch.cat(outputs, 1)
    torch.testing.assert_close(stepped, full, rtol=1e-10, atol=1e-12)
    assert int(state["pos"]) == 17
    for got, want in zip(grads(attn, x, stepped), grads(attn, x, full), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_multi_token_calls_continue_a_state_longer_than_the_window():
    attn = layer(window=3)
    x = torch.randn(1, 23, 12, dtype=DT)
    full, _ = attn(x)
    state = attn.init_state(1, dtype=DT)
    outputs = []
    for a, b in [(0, 2), (2, 9), (9, 10), (10, 23)]:
        y, state = attn(x[:, a:b], state)
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-10, atol=1e-12)


def test_outputs_depend_on_the_window_only_at_any_absolute_position():
    # Relative RoPE and unrotated persistent scores: y_t is a function of x_{t-W+1..t} alone,
    # whether those tokens sit at positions 0.. or 20..
    attn = layer(window=3)
    x = torch.randn(1, 24, 12, dtype=DT)
    full, _ = attn(x)
    fresh, _ = attn(x[:, 21:])
    torch.testing.assert_close(full[:, -1], fresh[:, -1], rtol=1e-10, atol=1e-12)
    x.requires_grad_()
    (x_grad,) = torch.autograd.grad(attn(x)[0][:, -1].sum(), x)
    assert x_grad[:, :21].abs().max() == 0 and x_grad[:, 21:].abs().min() > 0


def test_persistent_tokens_are_visible_to_every_query():
    attn = layer(window=2, P=2)
    x = torch.randn(1, 15, 12, dtype=DT)
    y, _ = attn(x)
    for t in (0, 7, 14):
        (g,) = torch.autograd.grad(y[:, t].sum(), attn.persistent_v, retain_graph=True)
        assert g.abs().min() > 0, f"query {t} does not read every persistent value"
    # Without persistent tokens, a window of one is the value projection of the token itself.
    plain = layer(window=1, P=0)
    v = rearrange(plain.qkv(x), "b t (n h d) -> n b h t d", n=3, h=2)[2]
    torch.testing.assert_close(plain(x)[0], plain.merge(v))


def test_rope_at_equals_the_table_rows():
    positions = torch.tensor([0, 3, 4, 1000, 7])
    for D in (5, 8):
        cos, sin = rope_tables(D, 1001, dtype=DT)
        got = rope_at(positions, D, dtype=DT)
        # cos/sin of 5 angles and of a table's: vector and scalar kernels may differ by an ulp
        torch.testing.assert_close(got[0], cos[positions], rtol=0, atol=1e-15)
        torch.testing.assert_close(got[1], sin[positions], rtol=0, atol=1e-15)


def test_levels_and_flops():
    attn = layer(window=4, P=3)
    (level,) = attn.inner_levels()
    assert level.update_every == 1 and "window 4" in level.memory and "3 persistent" in level.memory
    # A query sees min(t+1, W) tokens: at seq_len 2 the mean is 1.5, then it tends to W.
    assert attn.flops_per_token(2) == 4 * 2 * 5 * (1.5 + 3)
    assert attn.flops_per_token(10_000) == pytest.approx(4 * 2 * 5 * (4 + 3), rel=1e-3)


def test_bad_inputs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        SlidingWindowAttention(8, 2, window=0)
    with pytest.raises(ValueError, match="n_persistent must be >= 0"):
        SlidingWindowAttention(8, 2, window=4, n_persistent=-1)
    with pytest.raises(ValueError, match="must be >= 1"):
        SlidingWindowAttention(8, 0, window=4)
    attn = layer()
    with pytest.raises(ValueError, match=r"\[B, T >= 1, d\]"):
        attn(torch.randn(2, 0, 12, dtype=DT))
    with pytest.raises(ValueError, match=r"\[B, T, 12\]"):
        attn(torch.randn(2, 3, 11, dtype=DT))
    with pytest.raises(ValueError, match="another layer"):
        attn(torch.randn(2, 3, 12, dtype=DT), {"conv_q": torch.zeros(1)})
    with pytest.raises(ValueError, match="another batch size or window"):
        attn(torch.randn(2, 3, 12, dtype=DT), layer(window=5).init_state(2, dtype=DT))
    with pytest.raises(ValueError, match="another batch size or window"):
        attn(torch.randn(2, 3, 12, dtype=DT), attn.init_state(3, dtype=DT))


def test_the_ring_buffer_keeps_its_dtype_under_autocast():
    attn = SlidingWindowAttention(12, 2, 5, window=3, n_persistent=2)
    state = attn.init_state(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = attn(torch.randn(2, 5, 12), state)
    assert y.dtype == torch.bfloat16
    assert state["k"].dtype == state["v"].dtype == torch.float32
