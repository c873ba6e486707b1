"""Each deep optimizer against what it must equal: torch's SGD, Adam, AdamW and Muon, the memory
engine of nestlearn.memory, and closed forms of NL-17..24 (float64, several steps)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.memory.mlp.forms import mlp_memory_reference
from nestlearn.optim import (
    AdamMemory,
    DeepMomentum,
    DeltaMomentum,
    MomentumMemory,
    Muon,
    NonlinearMomentum,
    PreconditionedMomentum,
)
from nestlearn.optim.deep_momentum import dmgd_write, memory_forward, memory_read
from nestlearn.optim.delta_momentum import delta_momentum_update
from nestlearn.optim.newton_schulz import newton_schulz, ns_gd_coefficients
from nestlearn.optim.preconditioners import DiagonalSecondMoment, Kronecker

DT = torch.float64
SHAPES = [(5, 3), (4, 9), (6, 6), (7,)]


def params(shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=DT).requires_grad_(True) for s in shapes]


def lockstep(make_a, make_b, shapes=SHAPES, steps: int = 8, groups=None):
    """Both optimizers on identical copies, fed the same gradients; returns both param lists."""
    a, b = params(shapes), params(shapes)
    opt_a, opt_b = make_a(groups(a) if groups else a), make_b(groups(b) if groups else b)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for pa, pb in zip(a, b, strict=True):
            grad = torch.randn(pa.shape, generator=g, dtype=DT)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    return a, b


def assert_same(a, b, atol=1e-13):
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=atol)


def two_groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03}]


@pytest.mark.parametrize("alpha", [0.0, 0.9])
def test_momentum_memory_is_sgd_with_momentum(alpha):
    # SGD keeps b = α b + g and steps W − lr b; the memory keeps m = α m − lr g = −lr b.
    a, b = lockstep(
        lambda ps: MomentumMemory(ps, lr=0.1, momentum=alpha),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=alpha, dampening=0, foreach=False),
        groups=two_groups,
    )
    assert_same(a, b)


def test_momentum_memory_weight_decay_is_retention():
    a, b = lockstep(
        lambda ps: MomentumMemory(ps, lr=0.1, momentum=0.0, weight_decay=0.5),
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        steps=1,
    )
    # One step from the same start: a = (1 − lr·λ) W − lr g, b = W − lr g.
    start = params()
    for pa, pb, w in zip(a, b, start, strict=True):
        torch.testing.assert_close(pa - pb, -0.05 * w.detach(), rtol=0, atol=1e-13)


def test_preconditioned_momentum_with_identity_is_momentum():
    a, b = lockstep(
        lambda ps: PreconditionedMomentum(ps, lr=0.1, momentum=0.8, preconditioner="identity"),
        lambda ps: MomentumMemory(ps, lr=0.1, momentum=0.8),
    )
    assert_same(a, b)


def test_preconditioned_momentum_diagonal_against_its_loop():
    (w,) = params([(3, 4)])
    opt = PreconditionedMomentum(
        [w], lr=0.1, momentum=0.5, preconditioner=DiagonalSecondMoment(0.9)
    )
    ref, m, v = w.detach().clone(), torch.zeros(3, 4, dtype=DT), torch.zeros(3, 4, dtype=DT)
    g = torch.Generator().manual_seed(3)
    for t in range(1, 6):
        grad = torch.randn(3, 4, generator=g, dtype=DT)
        w.grad = grad
        opt.step()
        v = 0.9 * v + 0.1 * grad**2
        m = 0.5 * m - 0.1 * grad / ((v / (1 - 0.9**t)).sqrt() + 1e-8)
        ref = ref + m
    torch.testing.assert_close(w.detach(), ref, rtol=0, atol=1e-13)


def test_kronecker_preconditioner_whitens_a_rank_one_gradient():
    u, v = torch.randn(5, dtype=DT), torch.randn(3, dtype=DT)
    u, v = u / u.norm(), v / v.norm()
    out = Kronecker(update_every=1).apply(7.0 * torch.outer(u, v), {})
    torch.testing.assert_close(out, torch.outer(u, v), rtol=0, atol=1e-6)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_memory_is_torch_adam(decoupled):
    wd = 0.1 if decoupled else 0.0
    reference = torch.optim.AdamW if decoupled else torch.optim.Adam
    a, b = lockstep(
        lambda ps: AdamMemory(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd),
        lambda ps: reference(
            ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, foreach=False
        ),
        groups=two_groups,
        steps=10,
    )
    assert_same(a, b)


MUON_SETTINGS = [
    {},
    {"nesterov": False},
    {"weight_decay": 0.0},
    {"adjust_lr_fn": "match_rms_adamw", "momentum": 0.9},
    {"adjust_lr_fn": "spectral_unclamped", "ns_steps": 3},
]


@pytest.mark.parametrize("setting", MUON_SETTINGS, ids=str)
def test_nonlinear_momentum_with_newton_schulz_is_torch_muon(setting):
    # Pinned on both sides: nesterov, weight decay, lr adjustment, (3.4445, −4.7750, 2.0315),
    # 5 steps unless set, the iteration in bfloat16.
    pinned = {
        "nesterov": True,
        "weight_decay": 0.1,
        "adjust_lr_fn": None,
        "ns_coefficients": (3.4445, -4.7750, 2.0315),
        "ns_steps": 5,
        "momentum": 0.95,
    } | setting
    _skip_unless_torch_muon_supports(pinned)
    a, b = lockstep(
        lambda ps: NonlinearMomentum(ps, lr=0.02, sigma="newton_schulz", **pinned),
        lambda ps: torch.optim.Muon(ps, lr=0.02, **pinned),
        shapes=[(5, 3), (4, 9), (6, 6)],
        steps=6,
    )
    assert_same(a, b)


def _skip_unless_torch_muon_supports(settings: dict) -> None:
    """Older torch releases lack some lr adjustments (2.13 has no ``spectral_unclamped``)."""
    w = torch.nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    try:
        torch.optim.Muon([w], lr=0.02, **settings).step()
    except ValueError as exc:
        pytest.skip(f"torch {torch.__version__} Muon: {exc}")


def test_muon_is_nonlinear_momentum_with_newton_schulz():
    a, b = lockstep(
        lambda ps: Muon(ps, lr=0.02),
        lambda ps: NonlinearMomentum(ps, lr=0.02, sigma="newton_schulz"),
        shapes=[(5, 3)],
    )
    assert_same(a, b, atol=0)
    with pytest.raises(ValueError, match="sigma"):
        Muon(params([(2, 2)]), sigma="sign")


def test_identity_output_is_linear_momentum():
    # σ = id, no Nesterov: W ← W − lr·b with b = β b + (1 − β) g (the memory holds m = −b).
    (w,) = params([(4, 3)])
    opt = NonlinearMomentum(
        [w], lr=0.1, sigma="identity", nesterov=False, weight_decay=0.0, adjust_lr_fn="none"
    )
    ref, b = w.detach().clone(), torch.zeros(4, 3, dtype=DT)
    g = torch.Generator().manual_seed(4)
    for _ in range(6):
        grad = torch.randn(4, 3, generator=g, dtype=DT)
        w.grad = grad
        opt.step()
        b = 0.95 * b + 0.05 * grad
        ref = ref - 0.1 * b
    torch.testing.assert_close(w.detach(), ref, rtol=0, atol=1e-14)


def test_newton_schulz_matches_torch_and_is_odd():
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.Generator().manual_seed(0)
    for shape in [(5, 3), (3, 5), (8, 8)]:
        x = torch.randn(shape, generator=g)
        ours = newton_schulz(x)
        theirs = _zeropower_via_newtonschulz(x, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        assert torch.equal(ours, theirs)
        assert torch.equal(newton_schulz(-x), -ours)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 10_000),
)
def test_newton_schulz_orthogonalizes(rows, cols, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(rows, cols, generator=g, dtype=DT)
    s = torch.linalg.svdvals(newton_schulz(x, dtype="float64"))
    # Muon's quintic pushes every singular value into roughly [0.7, 1.2] in 5 steps; a tiny
    # singular value of x (relative to ‖x‖) needs more steps, so only the largest is checked.
    assert 0.6 < float(s.max()) < 1.25


def test_newton_schulz_as_inner_gradient_descent():
    # One step with coefficients (1 + γ, −γ, 0) is GD of size γ on ¼‖Y Yᵀ − I‖² at Y = X/‖X‖.
    x = torch.randn(3, 5, dtype=DT)
    y = (x / x.norm()).requires_grad_(True)
    loss = 0.25 * (y @ y.T - torch.eye(3, dtype=DT)).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, y)
    expected = y.detach() - 0.3 * grad
    out = newton_schulz(x, steps=1, coefficients=ns_gd_coefficients(0.3), dtype="float64")
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-14)


def test_dmgd_with_a_linear_memory_is_momentum():
    a, b = lockstep(
        lambda ps: DeepMomentum(ps, lr=0.1, momentum=0.9, depth=1),
        lambda ps: MomentumMemory(ps, lr=0.1, momentum=0.9),
        shapes=[(5, 3), (4, 9)],
    )
    assert_same(a, b)


def test_dmgd_l2_with_a_linear_memory_is_the_delta_rule():
    g = torch.Generator().manual_seed(0)
    m, grad = torch.randn(4, 6, generator=g, dtype=DT), torch.randn(4, 6, generator=g, dtype=DT)
    (new,) = dmgd_write([m], grad, alpha=0.9, eta=0.1, objective="l2", activation="tanh")
    expected = m @ (0.9 * torch.eye(6, dtype=DT) - 0.1 * grad.T @ grad) - 0.1 * grad
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("objective", ["dot", "l2"])
@pytest.mark.parametrize("depth", [2, 3])
def test_dmgd_write_is_one_chunk_of_the_memory_engine(objective, depth):
    """All rows of g written at the same weights = the engine's chunked GD with one chunk of n
    tokens (keys g_j, values −e_j), no momentum, no retention."""
    n, d, h = 5, 4, 3
    gen = torch.Generator().manual_seed(depth)
    shapes = [(h, d)] + [(h, h)] * (depth - 2) + [(n, h)]
    weights = [torch.randn(s, generator=gen, dtype=DT) / 2 for s in shapes]
    grad = torch.randn(n, d, generator=gen, dtype=DT)
    ours = dmgd_write(weights, grad, alpha=1.0, eta=0.3, objective=objective, activation="silu")
    keys = grad[None, None]  # [B=1, H=1, T=n, d]
    values = -torch.eye(n, dtype=DT)[None, None]
    _, state = mlp_memory_reference(
        keys,
        keys,
        values,
        [w[None] for w in weights],
        eta=0.3,
        objective=objective,
        activation="silu",
        chunk_size=n,
        output_final_state=True,
    )
    for i, w in enumerate(ours):
        torch.testing.assert_close(w, state[f"w.{i}"][0, 0], rtol=0, atol=1e-13)


def test_dmgd_retention_acts_on_the_output_map_and_read_is_at_one_hot_keys():
    gen = torch.Generator().manual_seed(5)
    weights = [
        torch.randn(3, 4, generator=gen, dtype=DT),
        torch.randn(5, 3, generator=gen, dtype=DT),
    ]
    grad = torch.randn(5, 4, generator=gen, dtype=DT)
    kept = dmgd_write(weights, grad, alpha=1.0, eta=0.2, objective="dot", activation="tanh")
    decayed = dmgd_write(weights, grad, alpha=0.7, eta=0.2, objective="dot", activation="tanh")
    torch.testing.assert_close(decayed[0], kept[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(decayed[1], kept[1] - 0.3 * weights[1], rtol=0, atol=1e-14)
    read = memory_read(decayed, "tanh")
    torch.testing.assert_close(
        read, memory_forward(decayed, torch.eye(4, dtype=DT), "tanh").T, rtol=0, atol=1e-14
    )


def test_dmgd_initialization_is_seeded_and_reads_zero():
    (w,) = params([(6, 4)])
    a = DeepMomentum([w], seed=3).init_memory(w, {"depth": 2, "hidden": 0, "seed": 3})
    b = DeepMomentum([w], seed=3).init_memory(w, {"depth": 2, "hidden": 0, "seed": 3})
    assert [x.shape for x in a] == [(4, 4), (6, 4)]
    assert torch.equal(a[0], b[0]) and not a[1].any()


def test_delta_momentum_is_one_gd_step_on_its_l2_objective():
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(4, 6, generator=gen, dtype=DT)
    grad = 3.0 * torch.randn(4, 6, generator=gen, dtype=DT)
    alpha, gamma, lr = 0.9, 0.5, 0.1
    gamma_i = gamma / grad.pow(2).sum()
    # Value −(lr/γ_i) I: GD of size γ_i on ½‖m gᵀ − V‖² with retention α.
    value = -(lr / gamma_i) * torch.eye(4, dtype=DT)
    leaf = m.clone().requires_grad_(True)
    (dm,) = torch.autograd.grad(0.5 * (leaf @ grad.T - value).pow(2).sum(), leaf)
    expected = alpha * m - gamma_i * dm
    ours = delta_momentum_update(m, grad, grad, alpha=alpha, gamma=gamma, lr=lr)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    scale=st.floats(1e-4, 1e4),
    alpha=st.floats(0.0, 0.999),
    gamma=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_delta_momentum_erase_never_expands(shape, scale, alpha, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    grad = scale * torch.randn(shape, generator=gen, dtype=DT)
    # The linear map m ↦ m (α I − γ_i gᵀg): apply it to the identity to read its matrix.
    eye = torch.eye(shape[1], dtype=DT)
    erase = delta_momentum_update(eye, grad, torch.zeros_like(eye), alpha=alpha, gamma=gamma, lr=0)
    eigenvalues = torch.linalg.eigvalsh(erase)
    assert eigenvalues.max() <= alpha + 1e-9 and eigenvalues.min() >= alpha - gamma - 1e-9


def test_delta_momentum_optimizer_runs_the_update():
    a, b = lockstep(
        lambda ps: DeltaMomentum(ps, lr=0.1, momentum=0.9, gamma=0.5),
        lambda ps: _DeltaReference(ps, lr=0.1, alpha=0.9, gamma=0.5),
        shapes=[(5, 3), (4, 9)],
    )
    assert_same(a, b, atol=1e-12)


class _DeltaReference(torch.optim.Optimizer):
    """NL-22 literally, with explicit matrices."""

    def __init__(self, ps, lr, alpha, gamma):
        super().__init__(ps, {"lr": lr, "alpha": alpha, "gamma": gamma})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                m = self.state[p].get("m", torch.zeros_like(p))
                eye = torch.eye(g.shape[1], dtype=DT)
                gamma_i = group["gamma"] / (g * g).sum()
                m = m @ (group["alpha"] * eye - gamma_i * g.T @ g) - group["lr"] * g
                self.state[p]["m"] = m
                p.add_(m)
