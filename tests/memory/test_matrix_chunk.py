"""The chunk form's pieces: the UT transform's hand-written backward, and input layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.memory.matrix import matrix_memory_chunk, matrix_memory_reference
from nestlearn.memory.matrix_chunk import _DeltaScan, _unit_lower_inverse, _ut_transform


def _ut_inputs(n=3, C=5, D1=2, D2=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lower = 0.3 * torch.randn(n, C, C, generator=gen, dtype=torch.float64)
    x1 = torch.randn(n, C, D1, generator=gen, dtype=torch.float64)
    x2 = torch.randn(n, C, D2, generator=gen, dtype=torch.float64)
    return [x.requires_grad_() for x in (lower, x1, x2)]


def test_ut_transform_is_the_unit_lower_inverse_applied():
    lower, x1, x2 = _ut_inputs()
    y1, y2 = _ut_transform(lower, x1, x2)
    a = torch.linalg.inv(torch.eye(5, dtype=torch.float64) + lower.detach().tril(-1))
    torch.testing.assert_close(y1, a @ x1.detach())
    torch.testing.assert_close(y2, a @ x2.detach())
    torch.testing.assert_close(_unit_lower_inverse(lower), a)


def test_ut_transform_gradients_and_second_derivatives():
    inputs = _ut_inputs()
    assert torch.autograd.gradcheck(_ut_transform, inputs)
    assert torch.autograd.gradgradcheck(_ut_transform, inputs)


def test_ut_transform_ignores_the_diagonal_and_upper_part():
    lower, x1, x2 = _ut_inputs()
    (y1, y2) = _ut_transform(lower, x1, x2)
    (y1.sum() + y2.square().sum()).backward()
    assert torch.count_nonzero(lower.grad.triu()) == 0
    shifted = lower.detach() + torch.randn(3, 5, 5, dtype=torch.float64).triu()
    torch.testing.assert_close(_ut_transform(shifted, x1, x2)[0], y1)


@pytest.mark.parametrize("objective,decay", [("dot", False), ("dot", True), ("l2", True)])
def test_head_first_views_equal_contiguous_inputs(objective, decay):
    # layers hand in [B, T, H, D] tensors viewed as [B, H, T, D]
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 11, 3, 4
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    k = F.normalize(k, dim=-1)
    log_alpha = -torch.rand(B, H, T, generator=gen, dtype=torch.float64) if decay else None
    beta = torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    views = [x.transpose(1, 2) for x in (q, k, v)]
    assert not views[0].is_contiguous()
    kwargs = dict(log_alpha=log_alpha, beta=beta, objective=objective, scale=0.5)
    o_view, _ = matrix_memory_chunk(*views, chunk_size=4, **kwargs)
    o_ref, _ = matrix_memory_reference(*(x.contiguous() for x in views), **kwargs)
    torch.testing.assert_close(o_view, o_ref)


def test_long_decayed_dot_scan_keeps_the_start_state():
    # the chunk-level scan of dot memories: many chunks, strong decay, no overflow, exact state
    gen = torch.Generator().manual_seed(1)
    B, H, T, D = 1, 2, 200, 3
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    log_alpha = -3.0 * torch.rand(B, H, T, generator=gen)
    log_alpha[..., :100] = 0.0  # no decay at first: the initial state survives 100 tokens
    state = torch.randn(B, H, D, D, generator=gen)
    kwargs = dict(log_alpha=log_alpha, objective="dot", initial_state=state)
    o, s = matrix_memory_chunk(q, k, v, chunk_size=8, output_final_state=True, **kwargs)
    o_ref, s_ref = matrix_memory_reference(q, k, v, output_final_state=True, **kwargs)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decayed", [False, True], ids=["no-decay", "decay"])
def test_delta_scan_gradients_and_second_derivatives(decayed):
    # the l2 state pass has a hand-written backward: check it, and that it is differentiable
    gen = torch.Generator().manual_seed(2)
    batch, N, C, Dk, Dv = 2, 3, 2, 3, 2

    def randn(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    k, u, w = randn(batch, N, C, Dk, s=0.5), randn(batch, N, C, Dv), randn(batch, N, C, Dk, s=0.5)
    decay = torch.rand(batch, N, generator=gen, dtype=torch.float64).requires_grad_()
    state = randn(batch, Dk, Dv)
    inputs = (k, u, w, decay if decayed else None, state)
    leaves = [x for x in inputs if x is not None]

    def scan(*args):
        it = iter(args)
        return _DeltaScan.apply(*(next(it) if x is not None else None for x in inputs))

    assert torch.autograd.gradcheck(scan, leaves)
    assert torch.autograd.gradgradcheck(scan, leaves)


def test_float32_decayed_dot_scan_does_not_lose_digits_over_a_long_sequence():
    # The chunk decays are summed per run of chunks; differences of one cumulative sum over the
    # sequence (≈ −1000 here) would leave float32 errors of about 1e-3 in the outputs.
    gen = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 1, 4096, 4
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    log_alpha = -0.5 * torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    o_ref, s_ref = matrix_memory_reference(
        q, k, v, log_alpha=log_alpha, objective="dot", output_final_state=True
    )
    o, s = matrix_memory_chunk(
        *(x.float() for x in (q, k, v)),
        log_alpha=log_alpha.float(),
        objective="dot",
        chunk_size=8,
        output_final_state=True,
    )
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=5e-5)
    torch.testing.assert_close(s.double(), s_ref, rtol=0, atol=5e-5)
