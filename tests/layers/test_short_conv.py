from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.layers.short_conv import ShortConv


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
    assert torch.equal(y[:, :5], y2[:, :5])
    assert torch.equal(y[..., [0, 2]], y2[..., [0, 2]])


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
