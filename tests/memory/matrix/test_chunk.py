"""The chunk form's pieces: the UT transform's hand-written backward, and input layouts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nestlearn.memory.matrix.chunk import (
    _chunk_decays,
    _chunk_decays_no_graph,
    _DeltaScan,
    _unit_lower_inverse,
    _ut_transform,
)
from nestlearn.memory.matrix.forms import (
    matrix_memory_chunk,
    matrix_memory_reference,
    matrix_memory_step,
)


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


def _forgetting_inputs(objective, seed=3, B=2, H=2, T=13, D=3):
    """float64 inputs whose gates forget everything (α = 0, log α = −inf) at some tokens: at a
    chunk start and end (chunk 4), twice in a row, inside a chunk, and on every token of one
    head, mixed with finite gates."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    k = F.normalize(k, dim=-1)
    log_alpha = -torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    log_alpha[0, 0, [0, 3, 4, 9]] = -math.inf
    log_alpha[0, 1, [6, 7]] = -math.inf
    log_alpha[1, 0] = -math.inf
    beta = torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    state = torch.randn(B, H, D, D, generator=gen, dtype=torch.float64)
    return q, k, v, log_alpha, beta, state


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 64])
@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_full_forgetting_gates_match_the_reference_with_their_gradients(objective, chunk_size):
    # log α = −inf used to give −inf − (−inf) = nan inside the chunk form
    inputs = [x.requires_grad_() for x in _forgetting_inputs(objective)]
    q, k, v, log_alpha, beta, state = inputs
    kwargs = dict(log_alpha=log_alpha, beta=beta, objective=objective, initial_state=state)
    kwargs.update(scale=0.7, output_final_state=True)
    o, s = matrix_memory_chunk(q, k, v, chunk_size=chunk_size, **kwargs)
    o_ref, s_ref = matrix_memory_reference(q, k, v, **kwargs)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(o), torch.randn_like(s)
    loss = (o * weights[0]).sum() + (s * weights[1]).sum()
    loss_ref = (o_ref * weights[0]).sum() + (s_ref * weights[1]).sum()
    grads = torch.autograd.grad(loss, inputs)
    grads_ref = torch.autograd.grad(loss_ref, inputs)
    names = ["q", "k", "v", "log_alpha", "beta", "state"]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=name)
    assert (grads[3][log_alpha.detach().isinf()] == 0).all()  # ∂/∂log α = α (…) = 0


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_full_forgetting_chunk_form_is_twice_differentiable_in_the_finite_inputs(objective):
    q, k, v, log_alpha, beta, state = (x[:1, :, :9] for x in _forgetting_inputs(objective))
    state = state[:1]
    forget = log_alpha.isinf()
    finite = log_alpha.masked_fill(forget, -0.5)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, state, finite)]

    def run(q, k, v, beta, state, finite_log_alpha):
        log_alpha = finite_log_alpha.masked_fill(forget, -math.inf)
        kwargs = dict(log_alpha=log_alpha, beta=beta, objective=objective, initial_state=state)
        return matrix_memory_chunk(q, k, v, chunk_size=4, output_final_state=True, **kwargs)

    assert torch.autograd.gradcheck(run, leaves)
    assert torch.autograd.gradgradcheck(run, leaves)


def test_gates_whose_exp_underflows_forget_as_in_the_reference():
    # float32 exp(−200) = 0: the reference forgets exactly there, and so must the chunk form,
    # without summing such gates (two of −3e38 overflow to −inf)
    q, k, v, log_alpha, beta, state = (x.float() for x in _forgetting_inputs("l2"))
    log_alpha = log_alpha.clamp(min=-3e38)
    log_alpha[1, 1, 2:5] = -200.0
    for objective in ("dot", "l2"):
        kwargs = dict(log_alpha=log_alpha, beta=beta, objective=objective, initial_state=state)
        o, s = matrix_memory_chunk(q, k, v, chunk_size=4, output_final_state=True, **kwargs)
        o_ref, s_ref = matrix_memory_reference(q, k, v, output_final_state=True, **kwargs)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_one_token_step_with_full_forgetting_drops_the_state(objective):
    q, k, v, _, beta, state = _forgetting_inputs(objective)
    q, k, v, beta = (x[:, :, 0] for x in (q, k, v, beta))
    log_alpha = torch.full_like(beta, -math.inf)
    kwargs = dict(log_alpha=log_alpha, beta=beta, objective=objective)
    o, s = matrix_memory_step(q, k, v, state=state, **kwargs)
    o_fresh, s_fresh = matrix_memory_step(q, k, v, state=None, **kwargs)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o, o_fresh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_fresh, rtol=1e-12, atol=1e-12)


def test_no_graph_decays_equal_the_segmented_decays():
    # the fast path (no forgetting token: no segments, exp then tril) and the fallback
    gen = torch.Generator().manual_seed(3)
    log_alpha = -3.0 * torch.rand(4, 6, generator=gen, dtype=torch.float64)
    for x in (
        log_alpha,
        log_alpha.clone().index_put_(
            (torch.tensor([1]), torch.tensor([2])), torch.tensor(-math.inf, dtype=torch.float64)
        ),
    ):
        for fast, slow in zip(_chunk_decays_no_graph(x), _chunk_decays(x), strict=True):
            torch.testing.assert_close(fast, slow, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("decay", [False, True], ids=["deltanet", "gated"])
def test_delta_chunk_second_backward_with_retained_graph_gives_the_same_gradients(decay):
    # the fused node drops its intermediates in the backward; a retained graph recomputes them
    gen = torch.Generator().manual_seed(4)
    B, H, T, D = 1, 2, 10, 3
    q, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    k = F.normalize(torch.randn(B, H, T, D, generator=gen, dtype=torch.float64), dim=-1)
    beta = torch.rand(B, H, T, generator=gen, dtype=torch.float64)
    log_alpha = -torch.rand(B, H, T, generator=gen, dtype=torch.float64) if decay else None
    leaves = [x.requires_grad_() for x in (q, k, v, beta) + ((log_alpha,) if decay else ())]
    o, _ = matrix_memory_chunk(q, k, v, beta=beta, log_alpha=log_alpha, chunk_size=4)
    first = torch.autograd.grad(o.square().sum(), leaves, retain_graph=True)
    second = torch.autograd.grad(o.square().sum(), leaves)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)
