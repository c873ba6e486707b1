"""Matrix-memory layers: chunk == sequential reference (outputs and every gradient), carried state,
and the shared heads' normalization (:func:`l2_normalize`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.layers.matrix_memory import VARIANTS, MatrixMemoryMixer
from nestlearn.layers.memory_heads import MemoryHeads, l2_normalize


def _pair(variant, chunk_size=4, conv_size=4):
    torch.manual_seed(0)
    chunk = MatrixMemoryMixer(
        variant, 12, 2, 6, chunk_size=chunk_size, conv_size=conv_size, mode="chunk"
    ).double()
    reference = MatrixMemoryMixer(
        variant, 12, 2, 6, chunk_size=chunk_size, conv_size=conv_size, mode="reference"
    ).double()
    with torch.no_grad():  # non-trivial gates, so that every parameter matters
        for p in chunk.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.load_state_dict(chunk.state_dict())
    return chunk, reference


def _output_and_grads(layer, x, weight):
    x = x.clone().requires_grad_()
    y, _ = layer(x)
    grads = torch.autograd.grad((y * weight).sum(), [x, *layer.parameters()])
    return y.detach(), dict(
        zip(["x", *(n for n, _ in layer.named_parameters())], grads, strict=True)
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("B,T,C", [(2, 13, 4), (1, 8, 8), (2, 5, 1), (1, 1, 4)])
def test_chunk_layer_equals_the_sequential_layer(variant, B, T, C):
    chunk, reference = _pair(variant, chunk_size=C)
    x = torch.randn(B, T, 12, dtype=torch.float64)
    weight = torch.randn(B, T, 12, dtype=torch.float64)
    y, grads = _output_and_grads(chunk, x, weight)
    y_ref, grads_ref = _output_and_grads(reference, x, weight)
    torch.testing.assert_close(y, y_ref)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefix_then_tokens_equal_the_full_sequence(variant):
    chunk, _ = _pair(variant)
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    full, _ = chunk(x)
    state = chunk.init_state(2, dtype=torch.float64)
    pieces = []
    y, state = chunk(x[:, :6], state)
    pieces.append(y)
    for t in range(6, 11):
        y, state = chunk(x[:, t : t + 1], state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_heads_scale_queries_and_normalize_keys():
    torch.manual_seed(0)
    heads = MemoryHeads(8, 2, 4, 3)
    q, k, v, _ = heads.qkv(torch.randn(2, 5, 8), q_scale=0.25)
    assert q.shape == k.shape == (2, 2, 5, 4) and v.shape == (2, 2, 5, 3)
    torch.testing.assert_close(q.norm(dim=-1), torch.full((2, 2, 5), 0.25))
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(2, 2, 5))


def test_l2_normalize_is_scaled_f_normalize_with_its_gradients():
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    x[0, 1] = 0.0  # a zero row: clamped norm, as in F.normalize
    x[1, 2] = 1e-14  # below eps
    x = x.requires_grad_()
    grad = torch.randn(3, 5, 7, dtype=torch.float64)
    ours = l2_normalize(x, 0.3)
    theirs = 0.3 * F.normalize(x, dim=-1)
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_theirs,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(g_ours, g_theirs)


def test_l2_normalize_gradcheck_and_second_derivatives():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: l2_normalize(t, 0.5), (x,))
    assert torch.autograd.gradgradcheck(lambda t: l2_normalize(t, 0.5), (x,))


def test_l2_normalize_rejects_a_non_positive_scale():
    with pytest.raises(ValueError, match="scale must be > 0"):
        l2_normalize(torch.randn(2, 3), 0.0)


@pytest.mark.parametrize("variant", ["deltanet", "gated_deltanet"])
def test_l2_flop_count_equals_the_chunk_ops_matmuls(variant):
    # the layer's count (used for MFU) is the matmul FLOPs the chunk form runs, UT products included
    from torch.utils.flop_counter import FlopCounterMode

    from nestlearn.memory.matrix.forms import matrix_memory_chunk

    H, D, C, T = 2, 8, 4, 8
    layer = MatrixMemoryMixer(variant, H * D, H, D, chunk_size=C)
    q, k, v = (torch.randn(1, H, T, D) for _ in range(3))
    gates = dict(beta=torch.rand(1, H, T))
    if VARIANTS[variant].decay:
        gates["log_alpha"] = -torch.rand(1, H, T)
    with FlopCounterMode(display=False) as counter:
        matrix_memory_chunk(q, F.normalize(k, dim=-1), v, chunk_size=C, **gates)
    assert counter.get_total_flops() == T * layer.flops_per_token(T)
