"""DGD MLP memory: chunk form vs reference vs step vs an autograd implementation, and its
reduction to Titans' chunked GD (:mod:`nestlearn.memory.mlp`) without the DGD projection.

Float64 throughout, with an outer loss on the outputs *and* every entry of the final state, so
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
from nestlearn.memory.dgd.forms import (
    dgd_mlp_memory_chunk,
    dgd_mlp_memory_reference,
    dgd_mlp_memory_step,
)
from nestlearn.memory.mlp.forms import init_mlp_memory_state, mlp_memory_chunk
from tests.conftest import device_params, on_device

DT = torch.float64


# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


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

    def sliced(self, part: slice) -> Case:
        gates = {n: None if g is None else g[..., part] for n, g in self.gates.items()}
        q, k, v = (x[:, :, part] for x in (self.q, self.k, self.v))
        return Case(q, k, v, self.weights, gates, self.state)


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
    skip: str = "none",
    target: str = "given",
    momentum: bool = True,
    retention: bool = True,
    chunk_size: int = 3,
    with_state: bool = False,
) -> Case:
    """Unit-norm keys/queries, η ≤ 0.5: the inner steps stay tame; gates hold exact zeros."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=DT)

    def gate(zero_every: int) -> torch.Tensor:
        x = torch.rand(B, H, T, generator=gen, dtype=DT)
        x.view(-1)[1::zero_every] = 0.0
        return x.requires_grad_()

    widths = [Dk] + [Dh] * (depth - 1) + [Dv]
    shapes = [(d_out, d_in) for d_in, d_out in itertools.pairwise(widths)]
    shapes += [(Dv, Dk)] if skip == "linear" else []
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
        v=normal(B, H, T, Dk if target == "self" else Dv).requires_grad_(),
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


def assert_runs_close(actual, expected) -> None:
    torch.testing.assert_close(actual[0], expected[0])
    assert set(actual[1]) == set(expected[1])
    for key in expected[1]:
        torch.testing.assert_close(actual[1][key], expected[1][key], msg=f"state entry {key}")
    for i, (a, b) in enumerate(zip(actual[2], expected[2], strict=True)):
        torch.testing.assert_close(a, b, msg=f"gradient of leaf {i}")


def autograd_dgd(
    case: Case, *, objective, skip, target, read, chunk_size, dgd=True, ema_momentum=False
):
    """The recurrence written independently: ``g_t`` by ``torch.autograd.grad`` of ``L̃`` at the
    chunk-start weights (the target a constant of the inner loss), the DGD factor
    ``α I − η x xᵀ`` as an explicit matrix; ``ema_momentum``: the gradient's step ``(1 − μ) η``."""
    objective = get_objective(objective)
    mu, alpha, eta = case.gates["mu"], case.gates["alpha"], case.gates["eta"]
    B, T = case.q.shape[0], case.q.shape[2]
    chain = len(case.weights) - (skip == "linear")

    def memory(ws, z):
        """Output and each map's input."""
        inputs, h = [], z
        for i, W in enumerate(ws[:chain]):
            inputs.append(h)
            h = torch.einsum("bhoi,bhi->bho", W, h)
            h = F.silu(h) if i < chain - 1 else h
        if skip == "identity":
            h = h + z
        if skip == "linear":
            inputs.append(z)
            h = h + torch.einsum("bhoi,bhi->bho", ws[-1], z)
        return h, inputs

    w = [W.expand(B, *W.shape) for W in case.weights]
    s = [torch.zeros_like(W) for W in w]
    wc, outputs = w, []
    for t in range(T):
        k, v = case.k[:, :, t], case.v[:, :, t]
        # Fresh nodes: the inner gradient flows through the prediction only, not the target.
        at = [W + 0 for W in wc]
        goal = memory(wc, v)[0] if target == "self" else v
        pred, inputs = memory(at, k)
        grads = torch.autograd.grad(objective.value(pred, goal).sum(), at, create_graph=True)
        step = eta[..., t, None, None]
        if ema_momentum and mu is not None:
            step = (1 - mu[..., t, None, None]) * step
        s = [
            (0.0 if mu is None else mu[..., t, None, None] * S) - step * g
            for S, g in zip(s, grads, strict=True)
        ]
        a = 1.0 if alpha is None else alpha[..., t, None, None]
        new = []
        for W, S, u in zip(w, s, inputs, strict=True):
            x = F.normalize(u, dim=-1)
            eye = torch.eye(x.shape[-1], dtype=DT)
            factor = a * eye - (eta[..., t, None, None] if dgd else 0.0) * (
                x.unsqueeze(-1) * x.unsqueeze(-2)
            )
            new.append(W @ factor + S)
        outputs.append(memory(new if read == "per_token" else wc, case.q[:, :, t])[0])
        w = new
        if (t + 1) % chunk_size == 0:
            wc = w
    return torch.stack(outputs, dim=2)


def assert_output_gradients_close(o: torch.Tensor, expected: torch.Tensor, case: Case) -> None:
    torch.testing.assert_close(o, expected)
    leaves = case.leaves()
    actual = gradients(outer_loss(o, None), leaves)
    wanted = gradients(outer_loss(expected, None), leaves)
    for i, (a, b) in enumerate(zip(actual, wanted, strict=True)):
        torch.testing.assert_close(a, b, msg=f"gradient of leaf {i}")


@pytest.mark.parametrize(
    "skip, target, read, objective",
    [
        ("identity", "self", "per_token", "l2"),
        ("linear", "self", "per_token", "l2"),
        ("none", "given", "chunk_start", "dot"),
        ("identity", "given", "per_token", "huber"),
    ],
)
@pytest.mark.parametrize(
    "momentum, retention, ema", [(True, True, False), (True, True, True), (False, False, False)]
)
@pytest.mark.parametrize("device", device_params())
def test_chunk_matches_reference(skip, target, read, objective, momentum, retention, ema, device):
    # The reference on the CPU; the chunk form on `device` (CUDA: float64 kernels).
    case = make_case(
        1, skip=skip, target=target, momentum=momentum, retention=retention, with_state=True
    )
    options = dict(skip=skip, target=target, read=read, objective=objective, chunk_size=3)
    options["ema_momentum"] = ema
    moved = Case(**on_device(vars(case), device))
    assert_runs_close(
        on_device(run(dgd_mlp_memory_chunk, moved, **options), "cpu"),
        run(dgd_mlp_memory_reference, case, **options),
    )


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    T=st.integers(1, 9),
    chunk_size=st.integers(1, 6),
    dims=st.sampled_from([(3, 3, 5), (2, 4, 3), (4, 3, 2)]),
    depth=st.integers(1, 3),
    skip=st.sampled_from(["none", "identity", "linear"]),
    target=st.sampled_from(["given", "self"]),
    read=st.sampled_from(["per_token", "chunk_start"]),
    dgd=st.booleans(),
    momentum=st.booleans(),
    ema=st.booleans(),
    with_state=st.booleans(),
)
def test_chunk_matches_reference_on_random_shapes(
    seed, B, H, T, chunk_size, dims, depth, skip, target, read, dgd, momentum, ema, with_state
):
    Dk, Dv, Dh = dims
    if skip == "identity" or target == "self":
        Dv = Dk
    case = make_case(
        seed,
        B=B,
        H=H,
        T=T,
        Dk=Dk,
        Dv=Dv,
        Dh=Dh,
        depth=depth,
        skip=skip,
        target=target,
        momentum=momentum,
        chunk_size=chunk_size,
        with_state=with_state,
    )
    options = dict(skip=skip, target=target, read=read, dgd=dgd, chunk_size=chunk_size)
    options["ema_momentum"] = ema
    assert_runs_close(
        run(dgd_mlp_memory_chunk, case, **options), run(dgd_mlp_memory_reference, case, **options)
    )


@pytest.mark.parametrize("ema", [False, True], ids=["heavy-ball", "ema"])
@pytest.mark.parametrize("chunk_size", [1, 3])
@pytest.mark.parametrize(
    "skip, target, read, objective",
    [
        ("identity", "self", "per_token", "l2"),
        ("linear", "self", "per_token", "l2"),
        ("none", "given", "chunk_start", "dot"),
    ],
)
def test_chunk_matches_autograd_dgd(skip, target, read, objective, chunk_size, ema):
    case = make_case(7, T=8, skip=skip, target=target)
    options = dict(skip=skip, target=target, read=read, objective=objective, ema_momentum=ema)
    o, _ = dgd_mlp_memory_chunk(
        case.q, case.k, case.v, case.weights, **case.gates, chunk_size=chunk_size, **options
    )
    expected = autograd_dgd(case, chunk_size=chunk_size, **options)
    assert_output_gradients_close(o, expected, case)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("momentum", [False, True])
def test_without_dgd_it_is_titans_chunked_gd(residual, momentum):
    case = make_case(3, momentum=momentum, with_state=True, T=8)
    options = dict(chunk_size=3, objective="l2")
    ours = run(
        dgd_mlp_memory_chunk,
        case,
        skip="identity" if residual else "none",
        dgd=False,
        **options,
    )
    titans = run(mlp_memory_chunk, case, residual=residual, **options)
    assert_runs_close(ours, titans)
    # And the DGD projection does change the numbers.
    with_dgd = run(dgd_mlp_memory_chunk, case, skip="identity" if residual else "none", **options)
    assert not torch.allclose(with_dgd[0], titans[0])


@pytest.mark.parametrize("T, chunk_size", [(1, 1), (1, 4), (5, 8), (8, 1), (10, 4)])
def test_edge_lengths(T, chunk_size):
    case = make_case(3, B=1, T=T, skip="linear", target="self")
    options = dict(skip="linear", target="self", chunk_size=chunk_size)
    assert_runs_close(
        run(dgd_mlp_memory_chunk, case, **options), run(dgd_mlp_memory_reference, case, **options)
    )


def steps(case: Case, state, **options):
    outputs = []
    for t in range(case.q.shape[2]):
        gates = {n: None if g is None else g[..., t] for n, g in case.gates.items()}
        o, state = dgd_mlp_memory_step(
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


@pytest.mark.parametrize("ema", [False, True], ids=["heavy-ball", "ema"])
@pytest.mark.parametrize("prefix", [0, 1, 5, 6])
def test_prefix_then_steps_match_full(prefix, ema):
    case = make_case(12, T=11, skip="linear", target="self")
    options = dict(skip="linear", target="self", chunk_size=3, ema_momentum=ema)
    o, state = dgd_mlp_memory_chunk(
        case.q, case.k, case.v, case.weights, **case.gates, output_final_state=True, **options
    )
    carried, outputs = init_mlp_memory_state(case.weights, 2), []
    if prefix:
        head = case.sliced(slice(0, prefix))
        o_head, carried = dgd_mlp_memory_chunk(
            head.q, head.k, head.v, head.weights, **head.gates, output_final_state=True, **options
        )
        assert int(carried["pos"]) == prefix % 3
        outputs.append(o_head)
    o_tail, stepped = steps(case.sliced(slice(prefix, None)), carried, **options)
    torch.testing.assert_close(torch.cat([*outputs, o_tail], dim=2), o)
    for key in state:
        torch.testing.assert_close(stepped[key], state[key], msg=key)


@pytest.mark.parametrize("split", [2, 4, 7])
def test_two_chunk_calls_with_carried_state_equal_one(split):
    case = make_case(13, T=9, with_state=True, chunk_size=4, skip="identity", target="self")
    options = dict(skip="identity", target="self", chunk_size=4)
    full = run(dgd_mlp_memory_chunk, case, **options)
    outputs, state = [], case.state
    for part in (slice(0, split), slice(split, None)):
        piece = case.sliced(part)
        o, state = dgd_mlp_memory_chunk(
            piece.q,
            piece.k,
            piece.v,
            piece.weights,
            **piece.gates,
            initial_state=state,
            output_final_state=True,
            **options,
        )
        outputs.append(o)
    o = torch.cat(outputs, dim=2)
    assert_runs_close((o, state, gradients(outer_loss(o, state), case.leaves())), full)


def test_detach_inner_keeps_outputs_and_stops_inner_gradients():
    case = make_case(21, T=8, skip="identity", target="self")
    options = dict(skip="identity", target="self", chunk_size=3)
    through = run(dgd_mlp_memory_chunk, case, **options)
    stopped = run(dgd_mlp_memory_chunk, case, detach_inner=True, **options)
    torch.testing.assert_close(stopped[0], through[0])
    assert any(not torch.allclose(a, b) for a, b in zip(stopped[2], through[2], strict=True))
    assert_runs_close(stopped, run(dgd_mlp_memory_reference, case, detach_inner=True, **options))


def test_float_gates_equal_constant_tensors():
    case = make_case(5, T=6)
    shape = case.gates["eta"].shape
    options = dict(skip="identity", chunk_size=4)
    o, _ = dgd_mlp_memory_chunk(
        case.q, case.k, case.v, case.weights, eta=0.3, mu=0.9, alpha=0.95, **options
    )
    full = {
        n: torch.full(shape, x, dtype=DT) for n, x in (("eta", 0.3), ("mu", 0.9), ("alpha", 0.95))
    }
    o_tensors, _ = dgd_mlp_memory_chunk(case.q, case.k, case.v, case.weights, **full, **options)
    torch.testing.assert_close(o_tensors, o)


def _zeros(*shape: int, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


def _valid_call(**changes):
    case = make_case(0, B=2, H=2, T=5, Dk=3, Dv=1, Dh=4, skip="linear", with_state=True)
    args = dict(
        q=case.q,
        k=case.k,
        v=case.v,
        weights=case.weights,
        **case.gates,
        initial_state=case.state,
        skip="linear",
        chunk_size=3,
    )
    args.update(changes)
    q, k, v, weights = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("weights")
    return dgd_mlp_memory_chunk(q, k, v, weights, **args)


ERRORS = [
    (dict(q=_zeros(2, 2, 3)), r"q: expected a tensor of rank 4 \[B, H, T, Dk\]"),
    (dict(k=_zeros(2, 2, 6, 3)), r"k: expected shape \[2, 2, 5, 3\].*got \[2, 2, 6, 3\]"),
    (dict(v=_zeros(1, 2, 5, 1)), r"v: expected leading dims \[B, H, T\] = \[2, 2, 5\]"),
    (dict(q=_zeros(2, 2, 5, 3, dtype=torch.long)), r"q: expected a floating-point tensor"),
    (dict(weights=[_zeros(2, 1, 3)]), r"weights: expected a list of at least 2.*linear skip"),
    (
        dict(weights=[_zeros(2, 4, 3), _zeros(2, 1, 4), _zeros(2, 1, 2)]),
        r"weights\[2\]: expected shape \[2, 1, 3\] \(.*the linear skip \[H, Dv, Dk\]\)",
    ),
    (
        dict(weights=[_zeros(2, 4, 3), _zeros(2, 2, 4), _zeros(2, 1, 3)]),
        r"weights\[1\]: expected shape \[2, 1, 4\].*output width Dv",
    ),
    (dict(chunk_size=0), r"chunk_size: expected an int >= 1, got 0"),
    (dict(skip="gated"), r"skip: expected one of \['none', 'identity', 'linear'\]"),
    (dict(target="other"), r"target: expected one of \['given', 'self'\]"),
    (dict(read="never"), r"read: expected one of \['per_token', 'chunk_start'\]"),
    (dict(objective="l3"), r"objective: unknown inner objective 'l3'"),
    (dict(eta=_zeros(2, 2, 4)), r"eta: expected a float or a tensor \[B, H, T\] = \[2, 2, 5\]"),
    (dict(initial_state={"pos": torch.tensor(0)}), r"initial_state: expected keys"),
    (dict(target="self"), r"v: expected shape \[B, H, T, Dk\] = \[2, 2, 5, 3\].*target=self"),
]


@pytest.mark.parametrize("changes, message", ERRORS)
def test_errors_name_the_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        _valid_call(**changes)


def test_identity_skip_needs_equal_widths():
    case = make_case(0, Dk=3, Dv=2)
    with pytest.raises(ValueError, match=r"skip='identity' needs Dk == Dv.*Dk=3, Dv=2"):
        dgd_mlp_memory_chunk(case.q, case.k, case.v, case.weights, eta=0.1, skip="identity")
