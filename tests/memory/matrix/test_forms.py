"""Matrix memories: chunk and step forms against the reference, carried state, closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.memory.matrix.forms import (
    matrix_memory,
    matrix_memory_chunk,
    matrix_memory_reference,
    matrix_memory_step,
)
from tests.conftest import device_params, on_device

# (objective, decay): linear attention, gated linear attention, DeltaNet, Gated DeltaNet.
CASES = [("dot", False), ("dot", True), ("l2", False), ("l2", True)]
CASE_IDS = ["linear-attention", "gla", "deltanet", "gated-deltanet"]
NAMES = ("q", "k", "v", "log_alpha", "beta", "initial_state")


def make_inputs(B, H, T, Dk, Dv, objective, decay, *, seed=0, dtype=torch.float64, min_log=-3.0):
    """Leaf tensors ``q, k, v, log_alpha, beta, initial_state``; no decay: ``log_alpha`` None."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    k = randn(B, H, T, Dk)
    if objective == "l2":
        k = F.normalize(k, dim=-1)
    inputs = {
        "q": randn(B, H, T, Dk),
        "k": k,
        "v": randn(B, H, T, Dv),
        "log_alpha": min_log * rand(B, H, T) if decay else None,
        # β in (0.05, 0.95): strictly inside (0, 1)
        "beta": 0.05 + 0.9 * rand(B, H, T),
        "initial_state": 0.5 * randn(B, H, Dk, Dv),
    }
    return {n: x.requires_grad_() if x is not None else None for n, x in inputs.items()}


def loss_and_grads(o, state, inputs, seed=1):
    """Forward results and gradients of a fixed random linear function of ``o`` and the state."""
    gen = torch.Generator().manual_seed(seed)
    # drawn in float64 and cast, so that float32 and float64 runs weigh the same loss
    w_o, w_state = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (o, state))
    loss = (o * w_o.to(o)).sum() + (state * w_state.to(o)).sum()
    leaves = {n: x for n, x in inputs.items() if x is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o.detach(), "state": state.detach(), **dict(zip(leaves, grads, strict=True))}


def run_reference(inputs, objective, scale=0.7):
    o, state = matrix_memory_reference(
        **inputs, objective=objective, scale=scale, output_final_state=True
    )
    return loss_and_grads(o, state, inputs)


def run_chunk(inputs, objective, chunk_size, scale=0.7):
    o, state = matrix_memory_chunk(
        **inputs, objective=objective, scale=scale, output_final_state=True, chunk_size=chunk_size
    )
    return loss_and_grads(o, state, inputs)


def run_steps(inputs, objective, scale=0.7):
    state = inputs["initial_state"]
    outputs = []
    for t in range(inputs["q"].shape[2]):
        token = {n: inputs[n][:, :, t] for n in ("q", "k", "v")}
        gates = {
            n: None if inputs[n] is None else inputs[n][:, :, t] for n in ("log_alpha", "beta")
        }
        o_t, state = matrix_memory_step(
            **token, **gates, objective=objective, scale=scale, state=state
        )
        outputs.append(o_t)
    return loss_and_grads(torch.stack(outputs, dim=2), state, inputs)


def assert_same(actual, expected, **tol):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name, **tol)


@given(
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    T=st.integers(1, 24),
    Dk=st.integers(1, 6),
    Dv=st.integers(1, 6),
    C=st.integers(1, 32),
    case=st.sampled_from(CASES),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=20, deadline=None)
def test_chunk_and_steps_equal_reference(B, H, T, Dk, Dv, C, case, seed):
    objective, decay = case
    inputs = make_inputs(B, H, T, Dk, Dv, objective, decay, seed=seed)
    expected = run_reference(inputs, objective)
    assert_same(run_chunk(inputs, objective, C), expected)
    assert_same(run_steps(inputs, objective), expected)


# (B, H, T, Dk, Dv, C): T not a multiple of C, C = 1, T = 1, batch 1 with odd dims, C > T.
SHAPES = [
    (2, 2, 37, 4, 4, 8),
    (1, 2, 9, 3, 5, 1),
    (2, 1, 1, 4, 3, 4),
    (1, 1, 12, 3, 5, 5),
    (2, 3, 10, 6, 2, 64),
    (1, 2, 64, 8, 8, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}T{}Dk{}Dv{}C{}".format(*s))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("device", device_params())
def test_chunk_equals_reference_on_edge_shapes(case, shape, device):
    # The reference on the CPU; the chunk and step forms on `device` (CUDA: float64 kernels).
    objective, decay = case
    B, H, T, Dk, Dv, C = shape
    inputs = make_inputs(B, H, T, Dk, Dv, objective, decay)
    expected = run_reference(inputs, objective)
    moved = on_device(inputs, device)
    assert_same(on_device(run_chunk(moved, objective, C), "cpu"), expected)
    assert_same(on_device(run_steps(moved, objective), "cpu"), expected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_without_gates_or_initial_state(case):
    objective, decay = case
    inputs = make_inputs(2, 2, 19, 4, 3, objective, decay)
    inputs["beta"] = inputs["initial_state"] = None
    o_ref, s_ref = matrix_memory_reference(**inputs, objective=objective, output_final_state=True)
    o, s = matrix_memory_chunk(**inputs, objective=objective, output_final_state=True, chunk_size=4)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prefix_then_steps_equals_full_sequence(case):
    objective, decay = case
    T, prefix = 23, 13
    inputs = make_inputs(2, 2, T, 4, 5, objective, decay)
    o_full, s_full = matrix_memory_chunk(
        **inputs, objective=objective, output_final_state=True, chunk_size=4
    )

    def part(name, sl):
        return None if inputs[name] is None else inputs[name][:, :, sl]

    head = {n: part(n, slice(0, prefix)) for n in ("q", "k", "v", "log_alpha", "beta")}
    o_head, state = matrix_memory_chunk(
        **head,
        objective=objective,
        initial_state=inputs["initial_state"],
        output_final_state=True,
        chunk_size=4,
    )
    outputs = [o_head]
    for t in range(prefix, T):
        token = {n: part(n, t) for n in ("q", "k", "v", "log_alpha", "beta")}
        o_t, state = matrix_memory_step(**token, objective=objective, state=state)
        outputs.append(o_t.unsqueeze(2))
    torch.testing.assert_close(torch.cat(outputs, dim=2), o_full)
    torch.testing.assert_close(state, s_full)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_two_calls_carrying_state_equal_one_call(case):
    objective, decay = case
    T, half = 30, 17
    inputs = make_inputs(2, 2, T, 4, 5, objective, decay)
    full = run_chunk(inputs, objective, chunk_size=8)

    def part(name, sl):
        return None if inputs[name] is None else inputs[name][:, :, sl]

    per_token = ("q", "k", "v", "log_alpha", "beta")
    o1, s1 = matrix_memory_chunk(
        **{n: part(n, slice(0, half)) for n in per_token},
        objective=objective,
        scale=0.7,
        initial_state=inputs["initial_state"],
        output_final_state=True,
        chunk_size=8,
    )
    o2, s2 = matrix_memory_chunk(
        **{n: part(n, slice(half, T)) for n in per_token},
        objective=objective,
        scale=0.7,
        initial_state=s1,
        output_final_state=True,
        chunk_size=8,
    )
    assert_same(loss_and_grads(torch.cat([o1, o2], dim=2), s2, inputs), full)


def test_linear_attention_is_causal_masked_attention():
    B, H, T, D = 2, 3, 21, 4
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    expected = ((q @ k.transpose(-1, -2)) * mask) @ v * 0.5
    for mode in ("chunk", "reference"):
        o, state = matrix_memory(q, k, v, objective="dot", scale=0.5, mode=mode, chunk_size=8)
        assert state is None
        torch.testing.assert_close(o, expected)


def test_deltanet_one_token_closed_form():
    B, H, Dk, Dv = 2, 3, 4, 5
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(B, H, 1, Dk, generator=gen, dtype=torch.float64) for _ in range(2))
    k = F.normalize(k, dim=-1)
    v = torch.randn(B, H, 1, Dv, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, H, 1, generator=gen, dtype=torch.float64)
    log_alpha = -torch.rand(B, H, 1, generator=gen, dtype=torch.float64)
    s0 = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64)
    # SPEC's M = Sᵀ: M_1 = α M_0 (I − β k kᵀ) + β v kᵀ, o = M_1 q.
    m0 = s0.transpose(-1, -2)  # [B, H, Dv, Dk]
    kc, vc, qc = (x[:, :, 0, :, None] for x in (k, v, q))  # column vectors [B, H, D, 1]
    a, b = log_alpha.exp()[..., None], beta[..., None]  # [B, H, 1, 1]
    m1 = a * m0 @ (torch.eye(Dk, dtype=torch.float64) - b * kc @ kc.mT) + b * vc @ kc.mT
    for form in (matrix_memory_reference, matrix_memory_chunk):
        o, s1 = form(
            q, k, v, log_alpha=log_alpha, beta=beta, initial_state=s0, output_final_state=True
        )
        torch.testing.assert_close(s1, m1.transpose(-1, -2))
        torch.testing.assert_close(o[:, :, 0], (m1 @ qc).squeeze(-1))


@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("objective", ["l2", "dot"])
def test_float32_long_sequence_is_stable(objective, decay):
    inputs64 = make_inputs(1, 2, 2048, 32, 32, objective, decay, seed=5, min_log=-5.0)
    inputs32 = {
        n: None if x is None else x.detach().float().requires_grad_() for n, x in inputs64.items()
    }
    scale = 32**-0.5
    got = run_chunk(inputs32, objective, chunk_size=64, scale=scale)
    expected = run_chunk(inputs64, objective, chunk_size=64, scale=scale)
    for name, x in got.items():
        assert torch.isfinite(x).all(), name
        ref = expected[name]
        # error relative to the size of the quantity: float32 with 2048 tokens of accumulation
        err = (x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)
        assert err < 1e-4, (name, err.item())


def bad_inputs(**changes):
    """Valid float32 inputs with ``changes`` applied; ``log_alpha`` and ``beta`` follow T."""
    T = changes["q"].shape[2] if "q" in changes and changes["q"].ndim == 4 else 10
    inputs = {
        "q": torch.randn(2, 3, 10, 4),
        "k": torch.randn(2, 3, 10, 4),
        "v": torch.randn(2, 3, 10, 5),
        "log_alpha": -torch.rand(2, 3, T),
        "beta": torch.rand(2, 3, T),
        "initial_state": torch.zeros(2, 3, 4, 5),
    }
    inputs.update(changes)
    return inputs


ERRORS = [
    (
        {"q": torch.randn(2, 10, 4)},
        r"q: expected shape \[B, H, T, Dk\] \(4 dimensions\), got \[2, 10, 4\]",
    ),
    ({"v": torch.randn(2, 3, 10, 5, 1)}, r"v: expected shape \[B, H, T, Dv\] \(4 dimensions\)"),
    ({"k": torch.randn(2, 3, 10, 3)}, r"k: expected shape \[B, H, T, Dk\] = \[2, 3, 10, 4\] "),
    ({"k": torch.randn(2, 3, 9, 4)}, r"k: expected shape .*got \[2, 3, 9, 4\]"),
    ({"v": torch.randn(1, 3, 10, 5)}, r"v: expected shape \[B, H, T, Dv\] = \[2, 3, 10, 5\]"),
    ({"v": torch.randn(2, 2, 10, 5)}, r"v: expected shape .*got \[2, 2, 10, 5\]"),
    ({"beta": torch.rand(2, 3, 10, 1)}, r"beta: expected shape \[B, H, T\] = \[2, 3, 10\]"),
    ({"log_alpha": torch.rand(2, 3)}, r"log_alpha: expected shape \[B, H, T\] = \[2, 3, 10\]"),
    ({"initial_state": torch.zeros(2, 3, 5, 4)}, r"initial_state: expected shape \[B, H, Dk, Dv\]"),
    (
        {"initial_state": torch.zeros(2, 3, 4)},
        r"initial_state: .* = \[2, 3, 4, 5\] .*got \[2, 3, 4\]",
    ),
    (
        {"q": torch.randn(2, 3, 0, 4), "k": torch.randn(2, 3, 0, 4), "v": torch.randn(2, 3, 0, 5)},
        r"q: expected at least one token",
    ),
    ({"q": torch.ones(2, 3, 10, 4, dtype=torch.long)}, r"q: expected a floating-point tensor"),
    ({"beta": torch.ones(2, 3, 10, dtype=torch.bool)}, r"beta: expected a floating-point tensor"),
    ({"v": torch.randn(2, 3, 10, 5).double()}, r"v: expected dtype torch.float32 \(that of q\)"),
    ({"initial_state": torch.zeros(2, 3, 4, 5).double()}, r"initial_state: expected dtype"),
]


@pytest.mark.parametrize("form", [matrix_memory_reference, matrix_memory_chunk, matrix_memory])
@pytest.mark.parametrize(("changes", "message"), ERRORS)
def test_bad_inputs_name_the_argument(form, changes, message):
    with pytest.raises(ValueError, match=message):
        form(**bad_inputs(**changes))


@pytest.mark.parametrize("chunk_size", [0, -4, 2.0, True])
def test_bad_chunk_size(chunk_size):
    for form in (matrix_memory_chunk, matrix_memory):
        with pytest.raises(ValueError, match=r"chunk_size: expected a positive int"):
            form(**bad_inputs(), chunk_size=chunk_size)


def step_inputs(**changes):
    inputs = {
        "q": torch.randn(2, 3, 4),
        "k": torch.randn(2, 3, 4),
        "v": torch.randn(2, 3, 5),
        "log_alpha": -torch.rand(2, 3),
        "beta": torch.rand(2, 3),
        "state": torch.zeros(2, 3, 4, 5),
    }
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("objective", ["huber", "cosine"])
def test_bad_objective(objective):
    for form in (matrix_memory_reference, matrix_memory_chunk, matrix_memory_step):
        inputs = bad_inputs() if form is not matrix_memory_step else step_inputs()
        with pytest.raises(
            ValueError, match=rf"objective: expected one of dot, l2 .*'{objective}'"
        ):
            form(**inputs, objective=objective)


def test_bad_mode():
    with pytest.raises(ValueError, match=r"mode: expected one of chunk, reference, got 'fast'"):
        matrix_memory(**bad_inputs(), mode="fast")


STEP_ERRORS = [
    ({"q": torch.randn(2, 3, 1, 4)}, r"q: expected shape \[B, H, Dk\] \(3 dimensions\)"),
    ({"k": torch.randn(2, 3, 3)}, r"k: expected shape \[B, H, Dk\] = \[2, 3, 4\]"),
    ({"beta": torch.rand(2, 3, 1)}, r"beta: expected shape \[B, H\] = \[2, 3\]"),
    ({"state": torch.zeros(2, 3, 4)}, r"state: expected shape \[B, H, Dk, Dv\] = \[2, 3, 4, 5\]"),
    ({"log_alpha": -torch.rand(2, 3, dtype=torch.float64)}, r"log_alpha: expected dtype"),
]


@pytest.mark.parametrize(("changes", "message"), STEP_ERRORS)
def test_bad_step_inputs_name_the_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        matrix_memory_step(**step_inputs(**changes))


def test_step_does_not_modify_its_state():
    inputs = step_inputs(state=torch.randn(2, 3, 4, 5))
    before = inputs["state"].clone()
    o, state = matrix_memory_step(**inputs)
    assert o.shape == (2, 3, 5) and state.shape == (2, 3, 4, 5)
    torch.testing.assert_close(inputs["state"], before)


def test_dispatch_single_token_and_modes_agree():
    inputs = make_inputs(2, 2, 1, 4, 3, "l2", True)
    o_chunk, s_chunk = matrix_memory(**inputs, output_final_state=True)
    o_ref, s_ref = matrix_memory(**inputs, output_final_state=True, mode="reference")
    torch.testing.assert_close(o_chunk, o_ref)
    torch.testing.assert_close(s_chunk, s_ref)
    inputs = make_inputs(1, 2, 40, 4, 3, "l2", True)
    o_chunk, _ = matrix_memory(**inputs, chunk_size=16)
    torch.testing.assert_close(o_chunk, matrix_memory(**inputs, mode="reference")[0])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunk_form_has_second_derivatives(case):
    # the UT transform's inverse has a hand-written backward; it must itself be differentiable
    objective, decay = case
    inputs = make_inputs(1, 1, 5, 3, 2, objective, decay)
    leaves = [x for x in inputs.values() if x is not None]
    names = [n for n, x in inputs.items() if x is not None]

    def chunk(*args):
        o, state = matrix_memory_chunk(
            **dict(zip(names, args, strict=True)),
            objective=objective,
            output_final_state=True,
            chunk_size=2,
        )
        return o, state

    assert torch.autograd.gradgradcheck(chunk, leaves)
