from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.layers.short_conv import ShortConv, short_conv


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 12),
    dim=st.integers(1, 6),
    width=st.integers(1, 5),
    split=st.integers(0, 12),
)
def test_pieces_and_steps_equal_one_call(B, T, dim, width, split):
    torch.manual_seed(0)
    conv = ShortConv(dim, width).double()
    x = torch.randn(B, T, dim, dtype=torch.float64)
    full, state = conv(x)
    split = min(split, T)
    if split:
        first, mid = conv(x[:, :split])
        second, end = conv(x[:, split:], mid) if split < T else (first[:, :0], mid)
        torch.testing.assert_close(torch.cat([first, second], 1), full)
        torch.testing.assert_close(end, state)
    carried = conv.init_state(B, dtype=torch.float64)
    steps = []
    for t in range(T):
        y, carried = conv(x[:, t : t + 1], carried)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_is_causal_and_depthwise():
    conv = ShortConv(3, 4).double()
    x = torch.randn(1, 8, 3, dtype=torch.float64)
    y, _ = conv(x)
    x2 = x.clone()
    x2[0, 5, 1] += 1.0
    y2, _ = conv(x2)
    # other inputs: equal to float64 rounding (a leak of the +1 would be of the weights' size)
    torch.testing.assert_close(y[:, :5], y2[:, :5], rtol=0, atol=1e-12)
    torch.testing.assert_close(y[..., [0, 2]], y2[..., [0, 2]], rtol=0, atol=1e-12)


def test_matches_a_padded_conv1d():
    conv = ShortConv(4, 3, activation=False).double()
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    reference = torch.nn.functional.conv1d(
        torch.nn.functional.pad(x.transpose(1, 2), (2, 0)), conv.weight, groups=4
    ).transpose(1, 2)
    torch.testing.assert_close(conv(x)[0], reference)


def test_bad_shapes_are_named():
    conv = ShortConv(4, 3)
    with pytest.raises(ValueError, match=r"\[B, T, 4\]"):
        conv(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="another layer"):
        conv(torch.randn(2, 5, 4), torch.zeros(2, 4, 5))


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [True, False])
def test_short_conv_gradients_gradcheck_and_second_derivatives(width, activation):
    """The hand-written backward (both outputs: y and the new state) against finite
    differences, and the double backward through it."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, width, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, 3, width - 1, dtype=torch.float64, requires_grad=True)

    def conv(x, weight, state):
        return short_conv(x.transpose(0, 1).transpose(0, 1), weight, state, activation)

    assert torch.autograd.gradcheck(conv, (x, weight, state))
    assert torch.autograd.gradgradcheck(conv, (x, weight, state))


def test_short_conv_backward_equals_autograd_through_the_plain_ops():
    torch.manual_seed(0)
    conv = ShortConv(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    y, new_state = conv(x, state)
    padded = torch.cat([state.transpose(1, 2), x], 1)
    ref = F.conv1d(padded.transpose(1, 2), conv.weight, groups=6).transpose(1, 2)
    ref, ref_state = F.silu(ref), padded[:, -3:].transpose(1, 2)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(new_state, ref_state)
    gy, gs = torch.randn_like(y), torch.randn_like(new_state)
    ours = torch.autograd.grad([y, new_state], [x, state, conv.weight], [gy, gs])
    theirs = torch.autograd.grad([ref, ref_state], [x, state, conv.weight], [gy, gs])
    for name, a, b in zip(("x", "state", "weight"), ours, theirs, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    # only the state's gradient asked for (y unused)
    (only_state,) = torch.autograd.grad(conv(x, state)[1], x, gs)
    (only_state_ref,) = torch.autograd.grad(ref_state, x, gs)
    torch.testing.assert_close(only_state, only_state_ref)
