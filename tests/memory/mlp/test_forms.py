"""MLP memory (Titans' LMM): chunk form vs reference vs step vs an autograd implementation.

Everything in float64 with an outer loss on the outputs *and* every entry of the final state, so
that gradients through the whole inner loop (into q, k, v, the gates, the initial weights and the
initial state) are compared, not only the forward.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.memory.core.rules import get_objective
from nestlearn.memory.mlp.forms import (
    init_mlp_memory_state,
    mlp_memory_chunk,
    mlp_memory_reference,
    mlp_memory_step,
)
from tests.conftest import device_params, on_device

DT = torch.float64


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    weights: list[torch.Tensor]
    gates: dict[str, torch.Tensor | None]
    state: dict[str, torch.Tensor] | None

    def leaves(self) -> list[torch.Tensor]:
        gates = [g for g in self.gates.values() if g is not None]
        state = [x for x in (self.state or {}).values() if x.is_floating_point()]
        return [self.q, self.k, self.v, *self.weights, *gates, *state]


def make_case(
    seed: int,
    *,
    B: int = 2,
    H: int = 2,
    T: int = 7,
    Dk: int = 3,
    Dv: int = 3,
    Dh: int = 5,
    depth: int = 2,
    momentum: bool = True,
    retention: bool = True,
    chunk_size: int = 3,
    with_state: bool = False,
) -> Case:
    """Unit-norm keys/queries and η ≤ 0.5 keep the inner GD tame; gates hold exact zeros."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=DT)

    def gate(zero_every: int | None) -> torch.Tensor:
        x = torch.rand(B, H, T, generator=gen, dtype=DT)
        if zero_every is not None:
            x.view(-1)[1::zero_every] = 0.0
        return x.requires_grad_()

    widths = [Dk] + [Dh] * (depth - 1) + [Dv]
    shapes = [(d_out, d_in) for d_in, d_out in itertools.pairwise(widths)]
    state = None
    if with_state:
        state = {}
        for i, (d_out, d_in) in enumerate(shapes):
            for name, scale in (("w", 1.0), ("s", 0.1), ("wc", 1.0)):
                x = scale * normal(B, H, d_out, d_in) / math.sqrt(d_in)
                state[f"{name}.{i}"] = x.requires_grad_()
        state["pos"] = torch.tensor(seed % chunk_size)
    return Case(
        q=F.normalize(normal(B, H, T, Dk), dim=-1).requires_grad_(),
        k=F.normalize(normal(B, H, T, Dk), dim=-1).requires_grad_(),
        v=normal(B, H, T, Dv).requires_grad_(),
        weights=[(normal(H, o, i) / math.sqrt(i)).requires_grad_() for o, i in shapes],
        gates={
            "eta": (0.5 * torch.rand(B, H, T, generator=gen, dtype=DT)).requires_grad_(),
            "mu": gate(3) if momentum else None,
            "alpha": gate(4) if retention else None,
        },
        state=state,
    )


def outer_loss(o: torch.Tensor, state: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """A fixed random linear functional of the outputs and every float entry of the state."""
    gen = torch.Generator().manual_seed(1234)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=DT).to(o.device)).sum()
    for key in sorted(state or {}):
        if state[key].is_floating_point():
            weight = torch.randn(state[key].shape, generator=gen, dtype=DT).to(o.device)
            loss = loss + (state[key] * weight).sum()
    return loss


def gradients(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """``∂loss/∂leaf`` for every leaf, zeros where the loss does not depend on it."""
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]


def run(fn, case: Case, **options):
    """Outputs, final state and the gradient of :func:`outer_loss` w.r.t. every leaf."""
    o, state = fn(
        case.q,
        case.k,
        case.v,
        case.weights,
        **case.gates,
        initial_state=case.state,
        output_final_state=True,
        **options,
    )
    return o, state, gradients(outer_loss(o, state), case.leaves())


def assert_states_close(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=f"state entry {key}")


def assert_runs_close(actual, expected) -> None:
    torch.testing.assert_close(actual[0], expected[0])
    assert_states_close(actual[1], expected[1])
    assert len(actual[2]) == len(expected[2])
    for i, (a, b) in enumerate(zip(actual[2], expected[2], strict=True)):
        torch.testing.assert_close(a, b, msg=f"gradient of leaf {i}")


def autograd_gd(case: Case, *, objective, activation, residual, chunk_size, detach=False):
    """Chunked GD written independently: ``g_t`` by ``torch.autograd.grad`` of ``L̃`` at the
    chunk-start weights (through the inner gradient unless ``detach``), then S-1."""
    sigma = {"silu": F.silu, "gelu": F.gelu}[activation]
    objective = get_objective(objective)
    mu, alpha, eta = case.gates["mu"], case.gates["alpha"], case.gates["eta"]
    B, T = case.q.shape[0], case.q.shape[2]

    def memory(ws, x):
        h = x
        for i, W in enumerate(ws):
            h = torch.einsum("bhoi,bhi->bho", W, h)
            h = sigma(h) if i < len(ws) - 1 else h
        return h + x if residual else h

    w = [W.expand(B, *W.shape) for W in case.weights]
    s = [torch.zeros_like(W) for W in w]
    wc, outputs = w, []
    for t in range(T):
        k, v, at = case.k[:, :, t], case.v[:, :, t], wc
        if detach:
            k, v, at = k.detach(), v.detach(), [W.detach().requires_grad_() for W in wc]
        loss = objective.value(memory(at, k), v).sum()
        grads = torch.autograd.grad(loss, at, create_graph=not detach)
        s = [
            (0.0 if mu is None else mu[..., t, None, None] * S) - eta[..., t, None, None] * g
            for S, g in zip(s, grads, strict=True)
        ]
        w = [
            (1.0 if alpha is None else alpha[..., t, None, None]) * W + S
            for W, S in zip(w, s, strict=True)
        ]
        outputs.append(memory(w, case.q[:, :, t]))
        if (t + 1) % chunk_size == 0:
            wc = w
    return torch.stack(outputs, dim=2)


def steps(case: Case, state, start: int, **options):
    """Token by token from ``start``; outputs ``[B, H, T - start, Dv]`` and the last state."""
    outputs = []
    for t in range(start, case.q.shape[2]):
        gates = {n: None if g is None else g[..., t] for n, g in case.gates.items()}
        o, state = mlp_memory_step(
            case.q[:, :, t],
            case.k[:, :, t],
            case.v[:, :, t],
            case.weights,
            **gates,
            state=state,
            **options,
        )
        outputs.append(o)
    return torch.stack(outputs, dim=2), state


@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("retention", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("device", device_params())
def test_chunk_matches_reference(depth, residual, retention, momentum, objective, device):
    # The reference on the CPU; the chunk form on `device` (CUDA: float64 kernels).
    case = make_case(depth, depth=depth, momentum=momentum, retention=retention, with_state=True)
    options = dict(objective=objective, residual=residual, chunk_size=3)
    moved = Case(**on_device(vars(case), device))
    assert_runs_close(
        on_device(run(mlp_memory_chunk, moved, **options), "cpu"),
        run(mlp_memory_reference, case, **options),
    )


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    T=st.integers(1, 9),
    chunk_size=st.integers(1, 6),
    dims=st.sampled_from([(3, 3, 5), (2, 4, 3), (4, 3, 2)]),
    depth=st.integers(1, 3),
    momentum=st.booleans(),
    retention=st.booleans(),
    with_state=st.booleans(),
    objective=st.sampled_from(["l2", "dot", "huber"]),
    activation=st.sampled_from(["silu", "gelu"]),
    residual=st.booleans(),
)
def test_chunk_matches_reference_on_random_shapes(
    seed,
    B,
    H,
    T,
    chunk_size,
    dims,
    depth,
    momentum,
    retention,
    with_state,
    objective,
    activation,
    residual,
):
    Dk, Dv, Dh = dims
    case = make_case(
        seed,
        B=B,
        H=H,
        T=T,
        Dk=Dk,
        Dv=Dv,
        Dh=Dh,
        depth=depth,
        momentum=momentum,
        retention=retention,
        chunk_size=chunk_size,
        with_state=with_state,
    )
    options = dict(
        objective=objective,
        activation=activation,
        residual=residual and Dk == Dv,
        chunk_size=chunk_size,
    )
    assert_runs_close(
        run(mlp_memory_chunk, case, **options), run(mlp_memory_reference, case, **options)
    )


def assert_output_gradients_close(o: torch.Tensor, expected: torch.Tensor, case: Case) -> None:
    torch.testing.assert_close(o, expected)
    leaves = case.leaves()
    actual, wanted = (
        gradients(outer_loss(o, None), leaves),
        gradients(outer_loss(expected, None), leaves),
    )
    for i, (a, b) in enumerate(zip(actual, wanted, strict=True)):
        torch.testing.assert_close(a, b, msg=f"gradient of leaf {i}")


@pytest.mark.parametrize("chunk_size", [1, 3])
@pytest.mark.parametrize(
    "depth, residual, objective, activation",
    [
        (1, False, "l2", "silu"),
        (2, True, "l2", "silu"),
        (2, False, "dot", "gelu"),
        (3, True, "l2", "gelu"),
    ],
)
def test_chunk_matches_autograd_gd(depth, residual, objective, activation, chunk_size):
    # chunk_size = 1 is per-token GD with momentum (S-1) exactly: checks the manual backprop.
    case = make_case(7, depth=depth, T=8)
    options = dict(objective=objective, activation=activation, residual=residual)
    o, _ = mlp_memory_chunk(
        case.q, case.k, case.v, case.weights, **case.gates, chunk_size=chunk_size, **options
    )
    expected = autograd_gd(case, chunk_size=chunk_size, **options)
    assert_output_gradients_close(o, expected, case)


@pytest.mark.parametrize("T, chunk_size", [(1, 1), (1, 4), (5, 8), (8, 1), (10, 4)])
def test_edge_lengths(T, chunk_size):
    case = make_case(3, B=1, T=T, with_state=False)
    options = dict(residual=True, chunk_size=chunk_size)
    assert_runs_close(
        run(mlp_memory_chunk, case, **options), run(mlp_memory_reference, case, **options)
    )


def test_steps_from_init_match_chunk():
    case = make_case(11, T=10)
    options = dict(residual=True, chunk_size=4)
    o, state = mlp_memory_chunk(
        case.q, case.k, case.v, case.weights, **case.gates, output_final_state=True, **options
    )
    o_steps, state_steps = steps(case, init_mlp_memory_state(case.weights, 2), 0, **options)
    torch.testing.assert_close(o_steps, o)
    assert_states_close(state_steps, state)
    o_none, _ = steps(case, None, 0, **options)
    torch.testing.assert_close(o_none, o)


@pytest.mark.parametrize("prefix", [1, 5, 6])
def test_prefix_then_steps_match_full(prefix):
    case = make_case(12, T=11)
    options = dict(residual=True, chunk_size=3)
    o, state = mlp_memory_chunk(
        case.q, case.k, case.v, case.weights, **case.gates, output_final_state=True, **options
    )
    head = slice(0, prefix)
    gates = {n: None if g is None else g[..., head] for n, g in case.gates.items()}
    o_head, carried = mlp_memory_chunk(
        case.q[:, :, head],
        case.k[:, :, head],
        case.v[:, :, head],
        case.weights,
        **gates,
        output_final_state=True,
        **options,
    )
    assert int(carried["pos"]) == prefix % 3
    o_tail, state_steps = steps(case, carried, prefix, **options)
    torch.testing.assert_close(torch.cat([o_head, o_tail], dim=2), o)
    assert_states_close(state_steps, state)


@pytest.mark.parametrize("split", [2, 4, 7])
def test_two_chunk_calls_with_carried_state_equal_one(split):
    case = make_case(13, T=9, with_state=True, chunk_size=4)
    options = dict(residual=True, chunk_size=4, objective="l2")
    full = run(mlp_memory_chunk, case, **options)

    def split_call(case: Case, **options):
        outputs, state = [], case.state
        for part in (slice(0, split), slice(split, None)):
            gates = {n: None if g is None else g[..., part] for n, g in case.gates.items()}
            o, state = mlp_memory_chunk(
                case.q[:, :, part],
                case.k[:, :, part],
                case.v[:, :, part],
                case.weights,
                **gates,
                initial_state=state,
                output_final_state=True,
                **options,
            )
            outputs.append(o)
        return torch.cat(outputs, dim=2), state

    parts = (case.q, case.k, case.v, case.weights, case.gates, case.state)
    o, state = split_call(Case(*parts), **options)
    assert_runs_close((o, state, gradients(outer_loss(o, state), case.leaves())), full)


def test_detach_inner_keeps_outputs_and_stops_inner_gradients():
    case = make_case(21, T=8, with_state=False)
    options = dict(residual=True, chunk_size=3, objective="l2", activation="silu")
    through = run(mlp_memory_chunk, case, **options)
    stopped = run(mlp_memory_chunk, case, detach_inner=True, **options)
    torch.testing.assert_close(stopped[0], through[0])
    assert_states_close(stopped[1], through[1])
    assert any(not torch.allclose(a, b) for a, b in zip(stopped[2], through[2], strict=True))
    assert_runs_close(stopped, run(mlp_memory_reference, case, detach_inner=True, **options))
    # What an independent stop-gradient implementation gives, for the outputs' loss.
    o, _ = mlp_memory_chunk(
        case.q, case.k, case.v, case.weights, **case.gates, detach_inner=True, **options
    )
    assert_output_gradients_close(o, autograd_gd(case, detach=True, **options), case)


def test_float_gates_and_batched_weights():
    case = make_case(5, T=6, momentum=False, retention=False)
    B = case.q.shape[0]
    shape = case.gates["eta"].shape
    options = dict(residual=True, chunk_size=4)
    o, _ = mlp_memory_chunk(
        case.q, case.k, case.v, case.weights, eta=0.3, mu=0.9, alpha=0.95, **options
    )
    batched = [W.expand(B, *W.shape) for W in case.weights]
    o_batched, _ = mlp_memory_chunk(
        case.q,
        case.k,
        case.v,
        batched,
        eta=torch.full(shape, 0.3, dtype=DT),
        mu=torch.full(shape, 0.9, dtype=DT),
        alpha=torch.full(shape, 0.95, dtype=DT),
        **options,
    )
    torch.testing.assert_close(o_batched, o)


def test_state_saves_with_safetensors_and_resumes(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    case = make_case(8, T=8)
    options = dict(residual=True, chunk_size=4)
    with torch.no_grad():
        _, state = mlp_memory_chunk(
            case.q, case.k, case.v, case.weights, **case.gates, output_final_state=True, **options
        )
    # T is a multiple of C: the chunk-start weights equal the weights but must not alias them.
    assert int(state["pos"]) == 0
    safetensors.save_file(state, tmp_path / "memory.safetensors")
    loaded = safetensors.load_file(tmp_path / "memory.safetensors")
    assert_states_close(loaded, state)


def _valid_call(**changes):
    case = make_case(0, B=2, H=2, T=5, Dk=3, Dv=3, Dh=4, with_state=True)
    args = dict(
        q=case.q,
        k=case.k,
        v=case.v,
        weights=case.weights,
        **case.gates,
        initial_state=case.state,
        residual=True,
        chunk_size=3,
    )
    args.update(changes)
    q, k, v, weights = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("weights")
    return mlp_memory_chunk(q, k, v, weights, **args)


def _weights(*shapes):
    return [torch.zeros(*s, dtype=DT) for s in shapes]


def _zeros(*shape: int, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


def _weights(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    return [_zeros(*shape) for shape in shapes]


ERRORS = [
    (dict(q=_zeros(2, 2, 3)), r"q: expected a tensor of rank 4 \[B, H, T, Dk\]"),
    (dict(k=_zeros(2, 2, 6, 3)), r"k: expected shape \[2, 2, 5, 3\].*got \[2, 2, 6, 3\]"),
    (dict(v=_zeros(1, 2, 5, 3)), r"v: expected leading dims \[B, H, T\] = \[2, 2, 5\]"),
    (dict(q=_zeros(2, 2, 5, 3, dtype=torch.long)), r"q: expected a floating-point tensor"),
    (dict(weights=[]), r"weights: expected a non-empty list"),
    (
        dict(weights=_weights((3, 4, 3), (2, 3, 4))),
        r"weights\[0\]: expected shape \[2, 4, 3\].*got \[3, 4, 3\]",
    ),
    (
        dict(weights=_weights((2, 4, 3), (2, 3, 5))),
        r"weights\[1\]: expected shape \[2, 3, 4\].*output width of weights\[0\]",
    ),
    (dict(weights=_weights((2, 4, 3), (2, 2, 4))), r"weights\[1\]: expected output width Dv=3"),
    (
        dict(weights=_weights((1, 2, 4, 3), (2, 3, 4))),
        r"weights\[0\]: expected shape \[2, 2, 4, 3\]",
    ),
    (dict(chunk_size=0), r"chunk_size: expected an int >= 1, got 0"),
    (dict(activation="relu"), r"activation: expected one of \['gelu', 'silu'\], got 'relu'"),
    (dict(objective="l3"), r"objective: unknown inner objective 'l3'"),
    (
        dict(eta=_zeros(2, 2, 4)),
        r"eta: expected a float or a tensor \[B, H, T\] = \[2, 2, 5\], got shape \[2, 2, 4\]",
    ),
    (dict(mu=_zeros(2, 2, 5, dtype=torch.long)), r"mu: expected a floating-point tensor"),
    (dict(initial_state={"pos": torch.tensor(0)}), r"initial_state: expected keys"),
]


@pytest.mark.parametrize("changes, message", ERRORS)
def test_errors_name_the_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        _valid_call(**changes)


def test_more_errors():
    case = make_case(0, B=2, H=2, T=5, Dk=3, Dv=2, Dh=4, with_state=True)
    with pytest.raises(ValueError, match=r"residual=True needs Dk == Dv.*Dk=3, Dv=2"):
        mlp_memory_chunk(case.q, case.k, case.v, case.weights, eta=0.1, residual=True)
    bad_pos = {**case.state, "pos": torch.tensor(3)}
    with pytest.raises(ValueError, match=r"initial_state\['pos'\].*\[0, chunk_size=3\)"):
        mlp_memory_chunk(
            case.q, case.k, case.v, case.weights, eta=0.1, chunk_size=3, initial_state=bad_pos
        )
    bad_w = {**case.state, "w.1": torch.zeros(2, 2, 3, 4, dtype=DT)}
    with pytest.raises(
        ValueError, match=r"initial_state\['w.1'\]: expected shape .* \[2, 2, 2, 4\]"
    ):
        mlp_memory_reference(
            case.q, case.k, case.v, case.weights, eta=0.1, chunk_size=3, initial_state=bad_w
        )
    with pytest.raises(ValueError, match=r"q: expected a tensor of rank 3 \[B, H, Dk\]"):
        mlp_memory_step(
            case.q, case.k[:, :, 0], case.v[:, :, 0], case.weights, eta=0.1, chunk_size=2
        )
    with pytest.raises(ValueError, match=r"eta: expected a float or a tensor \[B, H\] = \[2, 2\]"):
        mlp_memory_step(
            case.q[:, :, 0],
            case.k[:, :, 0],
            case.v[:, :, 0],
            case.weights,
            eta=case.gates["eta"],
            chunk_size=2,
        )
    with pytest.raises(ValueError, match=r"weights\[0\]: expected batch size 3"):
        init_mlp_memory_state([torch.zeros(2, 2, 4, 3)], 3)
