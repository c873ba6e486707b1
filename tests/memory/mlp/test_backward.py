"""The hand-written backward of the MLP memory's chunk form (memory/mlp/chunk.py,
memory/mlp/segment.py) against autograd of the same forward, and torch.autograd.gradcheck.

``mlp._HAND_WRITTEN_BACKWARD = False`` runs the chunk form segment by segment under autograd (the
formulation before the hand-written backward); both must give the same outputs, final states and
gradients w.r.t. every leaf, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from nestlearn.memory.core import segments
from nestlearn.memory.core.rules import L2
from nestlearn.memory.core.segments import segment_products, segment_products_reference
from nestlearn.memory.mlp import chunk as mlp_chunked
from nestlearn.memory.mlp import forms as mlp
from nestlearn.memory.mlp import segment as mlp_segment
from nestlearn.memory.mlp.chunk import Group, MLPChunks, block_segments, groups, split
from nestlearn.memory.mlp.forms import mlp_memory_chunk
from nestlearn.memory.mlp.segment import segment_products_backward
from tests.memory.mlp.test_forms import assert_runs_close, gradients, make_case, run


@dataclass(frozen=True)
class ShiftedL2(L2):
    """An objective the backward does not know: its surprise is differentiated by autograd."""

    name: str = "shifted-l2"

    def error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.tanh(pred - target)


def run_both(case, monkeypatch, **options):
    manual = run(mlp_memory_chunk, case, **options)
    monkeypatch.setattr(mlp, "_HAND_WRITTEN_BACKWARD", False)
    reference = run(mlp_memory_chunk, case, **options)
    monkeypatch.setattr(mlp, "_HAND_WRITTEN_BACKWARD", True)
    return manual, reference


@pytest.mark.parametrize(
    "T, chunk_size, with_state",
    [(7, 3, False), (7, 3, True), (9, 3, True), (2, 4, True), (5, 1, False), (1, 2, True)],
)
@pytest.mark.parametrize("momentum, retention", [(True, True), (False, True), (True, False)])
def test_hand_written_backward_equals_autograd(
    T, chunk_size, with_state, momentum, retention, monkeypatch
):
    # Segments of several lengths: a state mid-chunk, T not a multiple of C, T < C, C = 1.
    case = make_case(
        T + chunk_size,
        T=T,
        chunk_size=chunk_size,
        with_state=with_state,
        momentum=momentum,
        retention=retention,
    )
    manual, reference = run_both(case, monkeypatch, residual=True, chunk_size=chunk_size)
    assert_runs_close(manual, reference)


@pytest.mark.parametrize(
    "depth, objective, activation",
    [(1, "l2", "silu"), (2, "huber", "gelu"), (3, "dot", "silu"), (2, ShiftedL2(), "gelu")],
)
@pytest.mark.parametrize("detach_inner", [False, True])
def test_hand_written_backward_objectives_and_depths(
    depth, objective, activation, detach_inner, monkeypatch
):
    case = make_case(depth, depth=depth, T=8, with_state=True, chunk_size=3)
    options = dict(
        objective=objective,
        activation=activation,
        chunk_size=3,
        residual=depth != 3,
        detach_inner=detach_inner,
    )
    manual, reference = run_both(case, monkeypatch, **options)
    assert_runs_close(manual, reference)


@pytest.mark.parametrize("block_elements", [1, 130, 190])
@pytest.mark.parametrize(
    "objective, detach_inner", [("l2", False), (ShiftedL2(), False), ("l2", True)]
)
def test_reads_in_blocks_of_any_size(block_elements, objective, detach_inner, monkeypatch):
    # N·C·widest = 4·3·5 = 60 floats per segment: blocks of one segment, of two, and of three
    # then one (the full-chunk group of four segments split unevenly), between a state that
    # starts mid-chunk and a last partial chunk.
    case = make_case(4, T=15, chunk_size=3, with_state=True)
    monkeypatch.setattr(mlp_chunked, "block_budget", lambda: block_elements)
    options = dict(objective=objective, residual=True, chunk_size=3, detach_inner=detach_inner)
    manual, reference = run_both(case, monkeypatch, **options)
    assert_runs_close(manual, reference)
    chunk_ref = run(mlp.mlp_memory_reference, case, **options)
    assert_runs_close(manual, chunk_ref)


def test_block_segments_and_split():
    weights = [torch.zeros(2, 5, 3), torch.zeros(2, 3, 5)]
    assert block_segments(4, 3, weights, 1) == 1
    assert block_segments(4, 3, weights, 130) == 2
    assert block_segments(4, 3, weights, 10**6) == 10**6 // 60
    g = Group(1, 3, 4, 1)
    assert [tuple(b) for b in split(g, 3)] == [(1, 3, 3, 1), (10, 3, 1, 4)]
    assert [tuple(b) for b in split(g, 8)] == [(1, 3, 4, 1)]


def test_only_outputs_or_only_state_need_gradients(monkeypatch):
    # Gradients that arrive only through the outputs, or only through the final state.
    case = make_case(5, T=8, with_state=True, chunk_size=3)
    leaves = case.leaves()
    for use in ("outputs", "state"):
        results = []
        for flag in (True, False):
            monkeypatch.setattr(mlp, "_HAND_WRITTEN_BACKWARD", flag)
            o, state = mlp_memory_chunk(
                case.q, case.k, case.v, case.weights, **case.gates, chunk_size=3,
                residual=True, initial_state=case.state, output_final_state=True,
            )  # fmt: skip
            loss = (o * o).sum() if use == "outputs" else (state["w.1"] * state["s.0"].sum()).sum()
            results.append(gradients(loss, leaves))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b)


def test_gradcheck_whole_call():
    """torch.autograd.gradcheck of :class:`MLPChunks` itself: float64, small shapes, segments of
    two lengths, momentum and retention, the weights at the last segment's start returned."""
    torch.manual_seed(0)
    N, T, D, Dh = 2, 5, 3, 4
    opts = mlp.mlp_options("l2", "silu", True, 2, False)

    def leaf(*shape, scale=1.0, low=None):
        x = torch.rand(*shape, dtype=torch.float64) if low is not None else torch.randn(*shape)
        x = x.double() * scale + (low or 0.0)
        return x.requires_grad_()

    q, k = (torch.nn.functional.normalize(leaf(N, T, D), dim=-1).detach() for _ in range(2))
    q.requires_grad_()
    k.requires_grad_()
    v = leaf(N, T, D)
    eta, mu, alpha = leaf(N, T, scale=0.4, low=0.05), leaf(N, T, low=0.0), leaf(N, T, low=0.0)
    w = [leaf(N, Dh, D, scale=0.5), leaf(N, D, Dh, scale=0.5)]
    s = [leaf(N, Dh, D, scale=0.1), leaf(N, D, Dh, scale=0.1)]
    wc = [leaf(N, Dh, D, scale=0.5), leaf(N, D, Dh, scale=0.5)]
    sizes = (1, 2, 2)  # a state one token before a chunk boundary, then two full chunks

    def call(*args):
        return MLPChunks.apply(opts, sizes, False, *args)

    assert torch.autograd.gradcheck(call, (q, k, v, eta, mu, alpha, *w, *s, *wc))
    sizes = (2, 2, 1)  # ends mid-chunk: the last segment's start weights are an output
    assert torch.autograd.gradcheck(
        lambda *a: MLPChunks.apply(opts, sizes, True, *a), (q, k, v, eta, mu, alpha, *w, *s, *wc)
    )


def test_segment_products_backward_with_zero_gates():
    a = torch.rand(3, 6, dtype=torch.float64)
    a[0, 2] = 0.0
    a[1, 0] = 0.0
    a.requires_grad_()
    grad = torch.randn(3, 7, 7, dtype=torch.float64)
    products = segment_products_reference(a)
    (expected,) = torch.autograd.grad(products, a, grad)
    torch.testing.assert_close(segment_products_backward(products.detach(), grad), expected)


def test_segment_products_node_equals_plain_operations_with_zero_gates():
    # The fast products (built transposed, one autograd node) against the plain formulation:
    # the same products in the same order, but another kernel (cumprod along another dim), so
    # float64 to a few ulps rather than bits; zero gates stay exact zeros (atol=0).
    a = torch.rand(2, 3, 9, dtype=torch.float64)
    a[0, 1, 4] = 0.0
    a[1, 2, 0] = 0.0
    a[1, 0, 8] = 0.0
    a.requires_grad_()
    fast, plain = segment_products(a), segment_products_reference(a)
    torch.testing.assert_close(fast, plain, rtol=1e-14, atol=0.0)
    assert torch.equal(fast == 0, plain == 0)
    grad = torch.randn_like(plain)
    torch.testing.assert_close(
        torch.autograd.grad(fast, a, grad)[0], torch.autograd.grad(plain, a, grad)[0]
    )
    assert torch.autograd.gradcheck(segment_products, (a,))


@pytest.mark.parametrize("momentum, retention", [(True, True), (True, False), (False, True)])
def test_coefficients_backward_equals_autograd_with_zero_gates(momentum, retention, monkeypatch):
    # coefficients_backward (two matmuls with momentum) against autograd of coefficients built
    # from the plain segment products, zero gates included (a reset: no division anywhere).
    monkeypatch.setattr(mlp_segment, "segment_products", segments.segment_products_reference)
    M, n = 5, 7
    g = torch.Generator().manual_seed(3)
    eta = torch.rand(M, n, generator=g, dtype=torch.float64)
    mu = torch.rand(M, n, generator=g, dtype=torch.float64) if momentum else None
    alpha = torch.rand(M, n, generator=g, dtype=torch.float64) if retention else None
    for gate in (mu, alpha):
        if gate is not None:
            gate[1, 3] = 0.0
            gate[2, 0] = 0.0
            gate[4, n - 1] = 0.0
    leaves = [x.requires_grad_() for x in (eta, mu, alpha) if x is not None]
    coef = mlp_segment.coefficients(eta, mu, alpha)
    outs = {
        "decay": coef["decay"],
        "carry": coef["carry"],
        "write": coef["write"],
        "last": coef["last"],
        "m0": coef["products"][1, :, -1, 0] if momentum else None,
    }
    grads = {
        k: None if x is None else torch.randn(x.shape, generator=g, dtype=x.dtype)
        for k, x in outs.items()
    }
    grads["eta"] = torch.randn(M, n, generator=g, dtype=torch.float64)
    pairs = [(x, grads[k]) for k, x in outs.items() if x is not None]
    expected = torch.autograd.grad(
        [x for x, _ in pairs] + [eta], leaves, [d for _, d in pairs] + [grads["eta"]]
    )
    detached = mlp_segment.coefficients(
        *(None if x is None else x.detach() for x in (eta, mu, alpha))
    )
    deta, dmu, dalpha = mlp_segment.coefficients_backward(detached, eta.detach(), grads)
    got = [deta] + ([dmu] if momentum else []) + ([dalpha] if retention else [])
    for x, y in zip(got, expected, strict=True):
        torch.testing.assert_close(x, y)


def test_groups_batch_equal_lengths():
    assert [tuple(g) for g in groups([2, 4, 4, 4, 1])] == [
        (0, 2, 1, 0),
        (2, 4, 3, 1),
        (14, 1, 1, 4),
    ]


def test_double_backward_is_refused():
    case = make_case(2, T=4)
    o, _ = mlp_memory_chunk(case.q, case.k, case.v, case.weights, **case.gates, chunk_size=2)
    # The incoming gradient 2·o depends on the leaves, so g records the (refused) backward.
    (g,) = torch.autograd.grad((o * o).sum(), case.q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
