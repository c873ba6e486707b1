"""Self-modifying Titans (SPEC §5): chunk form vs reference vs step vs an autograd oracle.

Float64; the outer loss reads the outputs and every entry of the final state, and gradients are
compared for every meta-parameter: the input, every memory's initial weights, the fixed maps,
the gate biases and the momentum.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.memory.core.rules import get_objective
from nestlearn.memory.self_modifying import (
    SelfModifyingOptions,
    SelfModifyingParams,
    init_self_modifying_state,
    self_modifying_chunk,
    self_modifying_reference,
    self_modifying_step,
)

DT = torch.float64


# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


GATES = ("eta", "alpha")


def make_params(
    seed: int,
    *,
    H: int = 2,
    D: int = 3,
    hidden: int = 4,
    adaptive_q: bool = False,
    fixed_k: bool = False,
    fixed_v: bool = False,
    retention: bool = True,
    momentum: bool = True,
) -> SelfModifyingParams:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen, dtype=DT)).requires_grad_()

    def memory(out: int) -> list[torch.Tensor]:
        weights = [normal(H, hidden, D, scale=D**-0.5), normal(H, out, hidden, scale=0.5 / hidden)]
        return weights + ([normal(H, out, D, scale=0.3)] if out != D else [])

    fixed = {"q": not adaptive_q, "k": fixed_k, "v": fixed_v}
    memories = {n: memory(D) for n in ("k", "v", "q") if not fixed[n]}
    memories["eta"] = memory(1)
    if retention:
        memories["alpha"] = memory(1)
    memories["mem"] = memory(D)
    return SelfModifyingParams(
        memories=memories,
        projections={n: normal(H, D, D, scale=D**-0.5) for n in fixed if fixed[n]},
        eta_bias=normal(H, scale=0.3),
        alpha_bias=(normal(H, scale=0.3).detach() + 2.0).requires_grad_() if retention else None,
        mu=torch.rand(H, generator=gen, dtype=DT).requires_grad_() if momentum else None,
    )


def leaves(x: torch.Tensor, params: SelfModifyingParams, state=None) -> list[torch.Tensor]:
    out = [x, *(w for ws in params.memories.values() for w in ws), *params.projections.values()]
    out += [params.eta_bias] + ([] if params.alpha_bias is None else [params.alpha_bias])
    out += [params.mu] if isinstance(params.mu, torch.Tensor) else []
    return out + [t for t in (state or {}).values() if t.is_floating_point() and t.requires_grad]


def make_x(seed: int, B: int = 2, H: int = 2, T: int = 7, D: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 100)
    return F.normalize(torch.randn(B, H, T, D, generator=gen, dtype=DT), dim=-1).requires_grad_()


def outer_loss(y: torch.Tensor, state: dict | None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=DT)).sum()
    for key in sorted(state or {}):
        if state[key].is_floating_point():
            loss = (
                loss + (state[key] * torch.randn(state[key].shape, generator=gen, dtype=DT)).sum()
            )
    return loss


def run(fn, x, params, options, initial_state=None):
    y, state = fn(x, params, options, initial_state=initial_state, output_final_state=True)
    wrt = leaves(x, params, initial_state)
    grads = torch.autograd.grad(outer_loss(y, state), wrt, allow_unused=True)
    return (
        y,
        state,
        [torch.zeros_like(a) if g is None else g for a, g in zip(wrt, grads, strict=True)],
    )


def assert_runs_close(actual, expected) -> None:
    torch.testing.assert_close(actual[0], expected[0])
    assert set(actual[1]) == set(expected[1])
    for key in expected[1]:
        torch.testing.assert_close(actual[1][key], expected[1][key], msg=f"state entry {key}")
    for i, (a, b) in enumerate(zip(actual[2], expected[2], strict=True)):
        torch.testing.assert_close(a, b, msg=f"gradient of leaf {i}")


def oracle(x: torch.Tensor, params: SelfModifyingParams, options: SelfModifyingOptions):
    """SPEC §5 written out independently: every inner gradient by ``torch.autograd.grad``
    (targets constant in the inner loss, differentiable for the outer one), the DGD factor
    ``α I − η x xᵀ`` as an explicit matrix per map, reads as plain MLP evaluations."""
    B, T = x.shape[0], x.shape[2]
    objective = get_objective(options.objective)

    def memory(name, ws, z):
        """Output and each map's input (the gate memories' linear skip last)."""
        h1 = torch.einsum("bhoi,bhi->bho", ws[0], z)
        out = torch.einsum("bhoi,bhi->bho", ws[1], F.silu(h1))
        if name in GATES:
            return out + torch.einsum("bhoi,bhi->bho", ws[2], z), [z, F.silu(h1), z]
        return out + z, [z, F.silu(h1)]

    w = {n: [W.expand(B, *W.shape) for W in ws] for n, ws in params.memories.items()}
    s = {n: [torch.zeros_like(W) for W in ws] for n, ws in w.items()}
    wc = dict(w)
    mu = None if params.mu is None else params.mu[None, :, None, None]
    outputs = []
    for t in range(T):

        def read(n, xt=x[:, :, t]):
            if n in params.projections:
                return torch.einsum("hoi,bhi->bho", params.projections[n], xt)
            return memory(n, wc[n], xt)[0]

        k, v, q = F.normalize(read("k"), dim=-1), read("v"), F.normalize(read("q"), dim=-1)
        if options.normalize_v and options.variant == "self_modifying":
            v = F.normalize(v, dim=-1)  # the input of the self-generated targets
        eta = F.softplus(read("eta")[..., 0] + params.eta_bias) * options.eta_scale
        alpha = None
        if params.alpha_bias is not None:
            alpha = torch.sigmoid(read("alpha")[..., 0] + params.alpha_bias)
        kappa = int(options.dgd) + int(options.objective != "dot")
        if kappa:
            eta = torch.minimum(eta, (1 + (1.0 if alpha is None else alpha)) / kappa)
        for n in w:
            if options.variant == "self_modifying":
                goal = memory(n, wc[n], v)[0]
            else:
                goal = v.mean(-1, keepdim=True) if n in GATES else v
            at = [W + 0 for W in wc[n]]
            pred, inputs = memory(n, at, k)
            grads = torch.autograd.grad(objective.value(pred, goal).sum(), at, create_graph=True)
            e = eta[..., None, None]
            a = 1.0 if alpha is None else alpha[..., None, None]
            # the gradient's step: (1 − μ) η with EMA momentum; the DGD factor keeps η
            step = e if mu is None or not options.ema_momentum else (1 - mu) * e
            s[n] = [
                (0.0 if mu is None else mu * S) - step * g for S, g in zip(s[n], grads, strict=True)
            ]
            new = []
            for W, S, u in zip(w[n], s[n], inputs, strict=True):
                xx = F.normalize(u, dim=-1)
                eye = torch.eye(xx.shape[-1], dtype=DT)
                outer = xx.unsqueeze(-1) * xx.unsqueeze(-2)
                new.append(W @ (a * eye - (e if options.dgd else 0.0) * outer) + S)
            w[n] = new
        read_at = w["mem"] if options.read == "per_token" else wc["mem"]
        outputs.append(memory("mem", read_at, q)[0])
        for n in w:
            C = options.chunk_size if n == "mem" else options.other_chunk_size
            if (t + 1) % C == 0:
                wc[n] = w[n]
    return torch.stack(outputs, dim=2)


ABLATIONS = {
    "default": ({}, {}),
    "heavy-ball momentum": ({}, dict(ema_momentum=False)),
    "v as read": ({}, dict(normalize_v=False)),
    "fixed v, v as read": (dict(fixed_v=True), dict(normalize_v=False)),
    "gd": ({}, dict(dgd=False)),
    "no momentum": (dict(momentum=False), {}),
    "no retention": (dict(retention=False), {}),
    "fixed k": (dict(fixed_k=True), {}),
    "fixed v": (dict(fixed_v=True), {}),
    "dot": ({}, dict(objective="dot")),
    "fully adaptive": ({}, dict(variant="fully_adaptive")),
    "adaptive q, chunk-start read": (dict(adaptive_q=True), dict(read="chunk_start")),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_chunk_matches_reference(name):
    param_args, option_args = ABLATIONS[name]
    params = make_params(1, **param_args)
    options = SelfModifyingOptions(chunk_size=4, other_chunk_size=3, **option_args)
    x = make_x(1, T=8)
    assert_runs_close(
        run(self_modifying_chunk, x, params, options),
        run(self_modifying_reference, x, params, options),
    )


@pytest.mark.parametrize(
    "name",
    ["default", "heavy-ball momentum", "v as read", "no momentum", "fully adaptive", "dot"],
)
@pytest.mark.parametrize("chunks", [(1, 1), (3, 2)])
def test_chunk_matches_autograd_oracle(name, chunks):
    param_args, option_args = ABLATIONS[name]
    params = make_params(2, **param_args)
    options = SelfModifyingOptions(chunk_size=chunks[0], other_chunk_size=chunks[1], **option_args)
    x = make_x(2, T=7)
    y, _ = self_modifying_chunk(x, params, options)
    expected = oracle(x, params, options)
    torch.testing.assert_close(y, expected)
    wrt = leaves(x, params)
    actual = torch.autograd.grad(outer_loss(y, None), wrt, allow_unused=True)
    wanted = torch.autograd.grad(outer_loss(expected, None), wrt, allow_unused=True)
    for i, (a, b) in enumerate(zip(actual, wanted, strict=True)):
        assert a is not None and b is not None, f"leaf {i} gets no gradient"
        torch.testing.assert_close(a, b, msg=f"gradient of leaf {i}")


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    T=st.integers(1, 10),
    D=st.integers(2, 4),
    hidden=st.integers(1, 5),
    chunk_size=st.integers(1, 5),
    other_chunk_size=st.integers(1, 5),
    name=st.sampled_from(list(ABLATIONS)),
)
def test_chunk_matches_reference_on_random_shapes(
    seed, B, H, T, D, hidden, chunk_size, other_chunk_size, name
):
    param_args, option_args = ABLATIONS[name]
    params = make_params(seed, H=H, D=D, hidden=hidden, **param_args)
    options = SelfModifyingOptions(
        chunk_size=chunk_size, other_chunk_size=other_chunk_size, **option_args
    )
    x = make_x(seed, B=B, H=H, T=T, D=D)
    assert_runs_close(
        run(self_modifying_chunk, x, params, options),
        run(self_modifying_reference, x, params, options),
    )


@pytest.mark.parametrize("prefix", [0, 1, 5, 8])
def test_prefix_then_steps_match_full(prefix):
    params = make_params(3)
    options = SelfModifyingOptions(chunk_size=4, other_chunk_size=3)
    x = make_x(3, T=11)
    y, state = self_modifying_chunk(x, params, options, output_final_state=True)
    outputs, carried = [], None
    if prefix:
        y_head, carried = self_modifying_chunk(
            x[:, :, :prefix], params, options, output_final_state=True
        )
        assert int(carried["mem.pos"]) == prefix % 4 and int(carried["k.pos"]) == prefix % 3
        outputs.append(y_head)
    for t in range(prefix, 11):
        y_t, carried = self_modifying_step(x[:, :, t], params, options, state=carried)
        outputs.append(y_t.unsqueeze(2))
    torch.testing.assert_close(torch.cat(outputs, dim=2), y)
    for key in state:
        torch.testing.assert_close(carried[key], state[key], msg=key)


@pytest.mark.parametrize("split", [2, 5, 7])
def test_two_chunk_calls_with_carried_state_equal_one(split):
    params = make_params(4)
    options = SelfModifyingOptions(chunk_size=4, other_chunk_size=3)
    x = make_x(4, T=10)
    start = init_self_modifying_state(params, 2)
    full = run(self_modifying_chunk, x, params, options, start)
    outputs, state = [], start
    for part in (slice(0, split), slice(split, None)):
        y, state = self_modifying_chunk(
            x[:, :, part], params, options, initial_state=state, output_final_state=True
        )
        outputs.append(y)
    y = torch.cat(outputs, dim=2)
    wrt = leaves(x, params, start)
    grads = torch.autograd.grad(outer_loss(y, state), wrt, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(wrt, grads, strict=True)]
    assert_runs_close((y, state, grads), full)


def test_every_meta_parameter_gets_a_gradient():
    # No straight-through shortcut: the outer loss reaches every memory's initial weights
    # through the inner updates (M_v only through the targets it generates).
    params = make_params(5, adaptive_q=True)
    x = make_x(5, T=8)
    y, _ = self_modifying_chunk(x, params, SelfModifyingOptions(chunk_size=3, other_chunk_size=2))
    wrt = leaves(x, params)
    for i, g in enumerate(torch.autograd.grad(outer_loss(y, None), wrt, allow_unused=True)):
        assert g is not None and g.abs().max() > 0, f"leaf {i} gets no gradient"


def test_detach_inner_keeps_outputs():
    params = make_params(6)
    x = make_x(6, T=8)
    options = SelfModifyingOptions(chunk_size=3, other_chunk_size=2)
    detached = SelfModifyingOptions(chunk_size=3, other_chunk_size=2, detach_inner=True)
    through = run(self_modifying_chunk, x, params, options)
    stopped = run(self_modifying_chunk, x, params, detached)
    torch.testing.assert_close(stopped[0], through[0])
    assert any(not torch.allclose(a, b) for a, b in zip(stopped[2], through[2], strict=True))
    assert_runs_close(stopped, run(self_modifying_reference, x, params, detached))


def _replace(params: SelfModifyingParams, **changes) -> SelfModifyingParams:
    return params._replace(**changes)


def test_errors_name_the_problem():
    params = make_params(0)
    wider = make_params(0, hidden=6).memories
    bad_mem = [torch.zeros(2, 4, 2, dtype=DT), params.memories["mem"][1]]
    x = make_x(0, T=5)
    options = SelfModifyingOptions(chunk_size=4, other_chunk_size=3)
    cases = [
        (dict(x=x[0]), r"x: expected a tensor \[B, H, T, D\], got shape \[2, 5, 3\]"),
        (dict(x=x.long()), r"x: expected a floating-point tensor"),
        (
            dict(options=SelfModifyingOptions(other_chunk_size=0)),
            r"other_chunk_size: expected an int >= 1, got 0",
        ),
        (
            dict(options=SelfModifyingOptions(variant="other")),
            r"variant: expected one of \['self_modifying', 'fully_adaptive'\]",
        ),
        (
            dict(params=_replace(params, memories={**params.memories, "q": params.memories["k"]})),
            r"q: expected either params.memories\['q'\] \(adaptive\) or params.projections",
        ),
        (
            dict(params=_replace(params, memories={"k": params.memories["k"]})),
            r"params.memories: expected a memory 'mem'",
        ),
        (
            dict(params=_replace(params, memories={**params.memories, "mem": bad_mem})),
            r"params.memories\['mem'\]: weights\[0\]: expected shape \[2, 4, 3\]",
        ),
        (
            dict(
                params=_replace(
                    params, memories={**params.memories, "eta": params.memories["eta"][:2]}
                )
            ),
            r"params.memories\['eta'\]: expected 3 tensors \(a 2-layer MLP and its linear skip\)",
        ),
        (
            dict(params=_replace(params, memories={**params.memories, "v": wider["v"]})),
            r"the memories other than mem share one hidden width.*'k': 4, 'v': 6",
        ),
        (
            dict(params=_replace(params, eta_bias=torch.zeros(3, dtype=DT))),
            r"params.eta_bias: expected shape \[H\] = \[2\]",
        ),
        (
            dict(params=_replace(params, alpha_bias=None)),
            r"alpha: params.memories\['alpha'\] and params.alpha_bias go together",
        ),
        (dict(initial_state={"k.pos": torch.tensor(0)}), r"initial_state: expected keys"),
    ]
    for changes, message in cases:
        args = dict(x=x, params=params, options=options, initial_state=None)
        args.update(changes)
        with pytest.raises(ValueError, match=message):
            self_modifying_chunk(
                args["x"], args["params"], args["options"], initial_state=args["initial_state"]
            )


def test_state_errors_name_the_entry():
    params = make_params(0)
    x = make_x(0, T=5)
    options = SelfModifyingOptions(chunk_size=4, other_chunk_size=3)
    state = init_self_modifying_state(params, 2)
    wrong = {**state, "v.w.1": torch.zeros(2, 2, 5, 4, dtype=DT)}
    with pytest.raises(ValueError, match=r"initial_state\[v\.\*\]\['w.1'\]: expected shape"):
        self_modifying_chunk(x, params, options, initial_state=wrong)
    apart = {**state, "k.pos": torch.tensor(1)}
    with pytest.raises(ValueError, match=r"share one chunk grid"):
        self_modifying_chunk(x, params, options, initial_state=apart)
    with pytest.raises(ValueError, match=r"x: expected a tensor \[B, H, D\] \(one token\)"):
        self_modifying_step(x, params, options)


def test_eta_is_clamped_for_a_non_expansive_step():
    # A huge η scale: the clamp keeps η ≤ (1 + α) / 2 and the memories finite.
    params = make_params(7)
    x = make_x(7, T=12)
    options = SelfModifyingOptions(chunk_size=4, other_chunk_size=3, eta_scale=1e3)
    y, state = self_modifying_chunk(x, params, options, output_final_state=True)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert math.isfinite(float(outer_loss(y, state).detach()))
