"""MemoryHeads against the plain computation written out here (projections, convs, F.normalize,
RMSNorm ⊙ silu gate): values, every gradient, the carried conv state, and the state dict's names
(a reference for any faster form of the shared path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.layers.memory_heads import MemoryHeads, gated_rms_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def _heads(conv_size: int = 4, dk: int = 4, dv: int = 3) -> MemoryHeads:
    torch.manual_seed(0)
    heads = MemoryHeads(8, 2, dk, dv, conv_size).double()
    with torch.no_grad():  # a non-trivial norm gain, so that its gradient is checked too
        heads.o_norm.weight.add_(0.3 * torch.randn_like(heads.o_norm.weight))
    return heads


def _one_by_one(heads: MemoryHeads, x, state=None, q_scale=1.0):
    """The unfused computation: each projection, conv, normalization and the gate on its own."""
    B, T = x.shape[:2]
    H, dk, dv = heads.n_heads, heads.dk, heads.dv
    q, k, v = heads.q_proj(x), heads.k_proj(x), heads.v_proj(x)
    new_state = {}
    if heads.conv_size > 0:
        state = state or {}
        q, new_state["conv_q"] = heads.q_conv(q, state.get("conv_q"))
        k, new_state["conv_k"] = heads.k_conv(k, state.get("conv_k"))
        v, new_state["conv_v"] = heads.v_conv(v, state.get("conv_v"))
    q = q_scale * F.normalize(q.reshape(B, T, H, dk), dim=-1).transpose(1, 2)
    k = F.normalize(k.reshape(B, T, H, dk), dim=-1).transpose(1, 2)
    v = v.reshape(B, T, H, dv).transpose(1, 2)
    return q, k, v, new_state


def _reference_output(heads: MemoryHeads, o, x):
    B, T = x.shape[:2]
    o = o.transpose(1, 2)
    normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + heads.o_norm.eps)
    gate = F.silu(heads.g_proj(x)).reshape(B, T, heads.n_heads, heads.dv)
    return heads.o_proj((normed * heads.o_norm.weight * gate).reshape(B, T, -1))


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


@pytest.mark.parametrize("conv_size", [0, 1, 4])
@pytest.mark.parametrize("dk,dv", [(4, 3), (3, 5)])
def test_qkv_equals_the_plain_computation(conv_size, dk, dv):
    heads = _heads(conv_size, dk, dv)
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    ours = heads.qkv(x, q_scale=0.5)
    theirs = _one_by_one(heads, x, q_scale=0.5)
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(a, b)
    assert ours[3].keys() == theirs[3].keys()
    # One weighted sum of q, k and v, so that every parameter on the path is compared.
    weights = [torch.randn_like(t) for t in theirs[:3]]
    params = [x, *heads.parameters()]
    names = ["x", *(n for n, _ in heads.named_parameters())]
    g_ours = _grads(sum((t * w).sum() for t, w in zip(ours[:3], weights, strict=True)), params)
    g_theirs = _grads(sum((t * w).sum() for t, w in zip(theirs[:3], weights, strict=True)), params)
    for name, a, b in zip(names, g_ours, g_theirs, strict=True):
        if b is None:  # g_proj, o_norm, o_proj: not on this path
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, msg=name)


def test_carried_conv_state_equals_the_plain_computation():
    heads = _heads()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    *_, state = heads.qkv(x[:, :5], heads.init_state(2, dtype=torch.float64))
    *_, state_ref = _one_by_one(heads, x[:, :5], heads.init_state(2, dtype=torch.float64))
    for t in range(5, 9):  # token by token from the carried state
        ours = heads.qkv(x[:, t : t + 1], state)
        theirs = _one_by_one(heads, x[:, t : t + 1], state_ref)
        for a, b in zip(ours[:3], theirs[:3], strict=True):
            torch.testing.assert_close(a, b)
        state, state_ref = ours[3], theirs[3]
        for name in ("conv_q", "conv_k", "conv_v"):
            torch.testing.assert_close(state[name], state_ref[name], msg=name)
            assert state[name].shape == heads.init_state(2)[name].shape


def test_a_conv_state_of_the_wrong_shape_is_named():
    heads = _heads()
    state = heads.init_state(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="another layer"):
        heads.qkv(torch.randn(2, 4, 8, dtype=torch.float64), state)


def test_output_equals_rmsnorm_times_silu_gate():
    heads = _heads()
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    o = torch.randn(2, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    ours = heads.output(o, x)
    theirs = _reference_output(heads, o, x)
    torch.testing.assert_close(ours, theirs)
    weight = torch.randn_like(theirs)
    inputs = [o, x, *heads.parameters()]
    names = ["o", "x", *(n for n, _ in heads.named_parameters())]
    g_ours = _grads((ours * weight).sum(), inputs)
    g_theirs = _grads((theirs * weight).sum(), inputs)
    for name, a, b in zip(names, g_ours, g_theirs, strict=True):
        if b is None:  # q/k/v projections and convs: not on this path
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, msg=name)


def test_state_dict_names_and_shapes_are_unchanged():
    heads = MemoryHeads(8, 2, 4, 3)
    shapes = {name: tuple(t.shape) for name, t in heads.state_dict().items()}
    assert shapes == {
        "q_proj.weight": (8, 8),
        "k_proj.weight": (8, 8),
        "v_proj.weight": (6, 8),
        "q_conv.weight": (8, 1, 4),
        "k_conv.weight": (8, 1, 4),
        "v_conv.weight": (6, 1, 4),
        "g_proj.weight": (6, 8),
        "o_norm.weight": (3,),
        "o_proj.weight": (8, 6),
    }


def test_gated_rms_norm_gradcheck_and_second_derivatives():
    torch.manual_seed(0)
    o = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def norm(o, gate, weight):
        return gated_rms_norm(o, gate, weight, 1e-6)

    assert torch.autograd.gradcheck(norm, (o, gate, weight))
    assert torch.autograd.gradgradcheck(norm, (o, gate, weight))


def test_output_in_bfloat16_keeps_the_float32_norm_path():
    heads = MemoryHeads(8, 2, 4, 3)
    x = torch.randn(2, 5, 8)
    o = torch.randn(2, 2, 5, 3)
    expected = heads.output(o, x)
    got = heads.to(torch.bfloat16).output(o.bfloat16(), x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.05)
