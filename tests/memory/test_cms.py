"""One CMS level: chunk form vs token-loop reference vs autograd, in float64.

The outer loss reads the outputs *and* every float entry of the final state, so gradients through
the in-context updates (into the inputs, the initial weights and the initial state) are compared.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.memory.cms import (
    MAPS,
    _options,
    apply_update,
    cms_level_chunk,
    cms_level_reference,
    init_cms_level_state,
    local_error,
    mlp_block,
    names_of,
    swiglu,
)
from nestlearn.memory.core.rules import dgd_projection

DT = torch.float64


# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# Block kinds: (gated, biases, activation). Llama's SwiGLU is the first, GPT-2's MLP the last.
KINDS = {
    "swiglu": (True, False, "silu"),
    "swiglu_bias": (True, True, "silu"),
    "gelu": (False, False, "gelu_tanh"),
    "gelu_bias": (False, True, "gelu_tanh"),
}


def make(
    seed: int,
    B: int = 2,
    T: int = 7,
    d: int = 3,
    h: int = 5,
    scale: float = 0.6,
    kind: str = "swiglu",
):
    gated, bias, _ = KINDS[kind]
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, d, generator=gen, dtype=DT).requires_grad_()
    shapes = {"w1": (h, d), "w3": (h, d), "w2": (d, h), "b1": (h,), "b3": (h,), "b2": (d,)}
    names = ["w1", "w3", "w2"] if gated else ["w1", "w2"]
    if bias:
        names += ["b1", "b3", "b2"] if gated else ["b1", "b2"]
    weights = {
        n: (scale * torch.randn(*shapes[n], generator=gen, dtype=DT)).requires_grad_()
        for n in names
    }
    return z, weights


def outer_loss(y: torch.Tensor, state: dict | None) -> torch.Tensor:
    loss = y.pow(2).sum() + y.sum()
    for value in (state or {}).values():
        if value.is_floating_point():
            loss = loss + value.sin().sum()
    return loss


def run_both(z, weights, leaves, **kwargs):
    results = []
    for op in (cms_level_chunk, cms_level_reference):
        y, state = op(z, weights, output_final_state=True, **kwargs)
        grads = torch.autograd.grad(outer_loss(y, state), leaves, allow_unused=True)
        results.append((y, state, grads))
    return results


def assert_same(a, b):
    (ya, sa, ga), (yb, sb, gb) = a, b
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-10, atol=1e-12, msg=key)
    for i, (x, y) in enumerate(zip(ga, gb, strict=True)):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11, msg=f"grad {i}")


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "dgd"])
@pytest.mark.parametrize(("T", "C"), [(7, 3), (7, 1), (1, 2), (6, 6), (5, 9)])
def test_chunk_equals_reference_with_gradients(optimizer, T, C):
    z, weights = make(T * 10 + C, T=T)
    leaves = [z, *weights.values()]
    a, b = run_both(z, weights, leaves, lr=0.5, chunk_size=C, optimizer=optimizer, momentum=0.7)
    assert_same(a, b)


@pytest.mark.parametrize("kind", ["swiglu_bias", "gelu", "gelu_bias"])
@pytest.mark.parametrize("optimizer", ["gd", "momentum", "dgd"])
def test_other_blocks_chunk_equals_reference_with_gradients(kind, optimizer):
    z, weights = make(11, T=7, kind=kind)
    leaves = [z, *weights.values()]
    kwargs = {"lr": 0.5, "chunk_size": 3, "optimizer": optimizer, "momentum": 0.7}
    a, b = run_both(z, weights, leaves, activation=KINDS[kind][2], **kwargs)
    assert_same(a, b)
    # Every map and bias is in the state, and the state continues token by token.
    assert set(names_of(weights)) <= set(a[1])


@pytest.mark.parametrize("kind", list(KINDS))
def test_block_forward_is_the_torch_mlp(kind):
    gated, _, activation = KINDS[kind]
    z, w = make(12, kind=kind)
    F = torch.nn.functional
    act = F.silu if activation == "silu" else lambda x: F.gelu(x, approximate="tanh")
    hidden = act(F.linear(z, w["w1"], w.get("b1")))
    if gated:
        hidden = hidden * F.linear(z, w["w3"], w.get("b3"))
    expected = F.linear(hidden, w["w2"], w.get("b2"))
    torch.testing.assert_close(mlp_block(w, z, activation), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "dgd"])
def test_continuing_a_mid_chunk_state_matches_with_gradients(optimizer):
    z, weights = make(1, B=1, T=9, d=4, h=3)
    kwargs = {"lr": 0.4, "chunk_size": 4, "optimizer": optimizer, "momentum": 0.5}
    # A state 6 tokens in (mid-chunk), made differentiable as a leaf of its own.
    _, state = cms_level_chunk(z[:, :6].detach(), weights, output_final_state=True, **kwargs)
    state = {
        k: v.detach().requires_grad_() if v.is_floating_point() else v for k, v in state.items()
    }
    leaves = [z, *weights.values(), *(v for v in state.values() if v.is_floating_point())]
    a, b = run_both(z[:, 6:], weights, leaves, initial_state=state, **kwargs)
    assert_same(a, b)


def test_detach_inner_keeps_outputs_and_both_forms_agree():
    z, weights = make(2)
    leaves = [z, *weights.values()]
    kwargs = {"lr": 0.3, "chunk_size": 2}
    plain, _ = cms_level_chunk(z, weights, **kwargs)
    a, b = run_both(z, weights, leaves, detach_inner=True, **kwargs)
    torch.testing.assert_close(a[0], plain, rtol=0, atol=1e-12)  # another graph: not bitwise
    assert_same(a, b)
    full_grads = torch.autograd.grad(outer_loss(*cms_level_chunk(z, weights, **kwargs)), leaves)
    assert not torch.allclose(full_grads[0], a[2][0])


@pytest.mark.parametrize(
    ("optimizer", "kind"),
    [("gd", "swiglu"), ("momentum", "swiglu"), ("dgd", "swiglu"), ("dgd", "gelu_bias")],
)
def test_prefix_then_one_token_at_a_time_equals_the_full_pass(optimizer, kind):
    z, weights = make(3, T=11, kind=kind)
    kwargs = {"lr": 0.3, "chunk_size": 4, "optimizer": optimizer, "activation": KINDS[kind][2]}
    full, final = cms_level_chunk(z, weights, output_final_state=True, **kwargs)
    y, state = cms_level_chunk(z[:, :5], weights, output_final_state=True, **kwargs)
    outputs = [y]
    for t in range(5, 11):
        y, state = cms_level_chunk(
            z[:, t : t + 1], weights, initial_state=state, output_final_state=True, **kwargs
        )
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-12, atol=1e-12)
    for key in final:
        torch.testing.assert_close(state[key], final[key], rtol=1e-12, atol=1e-12, msg=key)


def test_weights_change_only_at_chunk_ends_and_every_token_reads_them():
    z, weights = make(4, B=1, T=10)
    C = 3
    state = init_cms_level_state({k: v.detach() for k, v in weights.items()}, 1)
    with torch.no_grad():
        for t in range(10):
            before = {name: state[name] for name in MAPS}
            y, state = cms_level_chunk(
                z[:, t : t + 1],
                weights,
                lr=0.5,
                chunk_size=C,
                initial_state=state,
                output_final_state=True,
            )
            # The read uses the weights of the current chunk, whatever happens after it.
            # (another computation of the same read: equal to float64 rounding, not bitwise)
            expected = swiglu(before, z[:, t : t + 1])
            torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
            changed = any(not torch.equal(before[n], state[n]) for n in MAPS)
            assert changed == ((t + 1) % C == 0), t


@pytest.mark.parametrize("kind", list(KINDS))
def test_accumulated_gradient_is_autograd_of_the_pair_losses(kind):
    z, weights = make(5, T=5, kind=kind)
    act = KINDS[kind][2]
    names = names_of(weights)
    # One chunk longer than the sequence: nothing applied, the state holds Σ over pairs.
    _, state = cms_level_chunk(
        z, weights, lr=0.1, chunk_size=8, output_final_state=True, activation=act
    )
    y = mlp_block(weights, z[:, :-1], act)
    loss = 0.5 * (y - z[:, 1:].detach()).pow(2).sum(-1)  # pairs (s, s+1)
    for b in range(z.shape[0]):
        grads = torch.autograd.grad(loss[b].sum(), list(weights.values()), retain_graph=True)
        for name, grad in zip(names, grads, strict=True):
            torch.testing.assert_close(state[f"g.{name}"][b], grad, rtol=1e-10, atol=1e-12)
    # The normalizer bounds Σ_s ‖J_s J_sᵀ‖ (J_s = ∂y_s/∂θ) from above.
    for b in range(z.shape[0]):
        bound = 0.0
        for s in range(z.shape[1] - 1):
            key = z[b, s].detach().view(1, 1, -1)
            jac = torch.autograd.functional.jacobian(
                lambda *ws, key=key: mlp_block(dict(zip(names, ws, strict=True)), key, act),
                tuple(weights.values()),
            )
            J = torch.cat([j.reshape(z.shape[-1], -1) for j in jac], dim=1)  # [d, n_params]
            bound += torch.linalg.matrix_norm(J @ J.T, ord=2)
        assert bound <= state["e"][b] + 1e-9


def test_dgd_with_one_pair_is_the_spec_dgd_step():
    _, weights = make(6)
    w = {k: v.detach().expand(2, *v.shape) for k, v in weights.items()}
    unit = torch.nn.functional.normalize(torch.randn(2, 3, dtype=DT), dim=-1)
    G = {name: torch.randn_like(w[name]) for name in MAPS}
    energy = torch.rand(2, dtype=DT) * 3
    acc = {f"g.{n}": G[n] for n in MAPS} | {"e": energy}
    acc |= {f"p.{n}": w[n] - dgd_projection(w[n], _unit_for(n, unit), 1.0) for n in MAPS}
    lr = 0.25
    new, _ = apply_update(w, acc, 1, _options(lr, 1, "dgd", 0.0, local_error, False))
    eta = lr / (1 + lr)
    for n in MAPS:
        # W (I − η' û ûᵀ) − η' G / (1 + E): SPEC §3's step (η' = η / (1 + η)) with the
        # normalized gradient.
        G_hat = G[n] / (1 + energy)[:, None, None]
        expected = dgd_projection(w[n], _unit_for(n, unit), eta) - eta * G_hat
        torch.testing.assert_close(new[n], expected, rtol=1e-12, atol=1e-12)


def _unit_for(name: str, unit3: torch.Tensor) -> torch.Tensor:
    if name == "w2":  # input width h = 5
        return torch.nn.functional.normalize(torch.arange(10.0, dtype=DT).view(2, 5) + 1, dim=-1)
    return unit3


def test_outputs_before_t_do_not_depend_on_inputs_after_t():
    z, weights = make(7, T=9)
    y, _ = cms_level_chunk(z, weights, lr=0.5, chunk_size=2)
    other = z.detach().clone()
    other[:, 5:] = torch.randn_like(other[:, 5:])
    y2, _ = cms_level_chunk(other, weights, lr=0.5, chunk_size=2)
    torch.testing.assert_close(y2[:, :5], y[:, :5], rtol=0, atol=1e-12)
    assert not torch.allclose(y2[:, 5:], y[:, 5:])


def test_reset_hook_replaces_the_weights_and_clears_momentum():
    z, weights = make(8, T=8)
    fresh = {k: v.detach() * 0.5 for k, v in weights.items()}

    def reset(pos: int):
        return fresh if pos == 4 else None

    kwargs = {"lr": 0.3, "chunk_size": 2, "optimizer": "momentum", "reset": reset}
    leaves = [z, *weights.values()]
    a, b = run_both(z, weights, leaves, **kwargs)
    assert_same(a, b)
    # After the reset the outputs are those of a fresh run from the reset weights.
    from_fresh, _ = cms_level_chunk(z[:, 4:], fresh, **{**kwargs, "reset": None})
    y_tail_start = a[0][:, 4]
    torch.testing.assert_close(y_tail_start, from_fresh[:, 0], rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 9),
    d=st.integers(1, 4),
    h=st.integers(1, 4),
    C=st.integers(1, 5),
    optimizer=st.sampled_from(["gd", "momentum", "dgd"]),
)
def test_any_shape_chunk_equals_reference(B, T, d, h, C, optimizer):
    z, weights = make(B * 100 + T, B=B, T=T, d=d, h=h)
    kwargs = {"lr": 0.2, "chunk_size": C, "optimizer": optimizer}
    with torch.no_grad():
        y1, s1 = cms_level_chunk(z, weights, output_final_state=True, **kwargs)
        y2, s2 = cms_level_reference(z, weights, output_final_state=True, **kwargs)
    assert y1.shape == (B, T, d)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-12)
    for key in s1:
        torch.testing.assert_close(s1[key], s2[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": 0}, "chunk_size: expected an int >= 1"),
        ({"lr": -1.0}, "lr: expected a float >= 0"),
        ({"optimizer": "adam"}, "choose one of gd, momentum, dgd"),
        ({"momentum": 1.0}, r"momentum: expected a coefficient in \[0, 1\)"),
        ({"key_ctx": torch.zeros(2, 3, 1, dtype=DT)}, r"key_ctx: expected leading dims \[B, T\]"),
        ({"initial_state": {"pos": torch.tensor(0)}}, "make one with init_cms_level_state"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    z, weights = make(9)
    base = {"lr": 0.1, "chunk_size": 2}
    with pytest.raises(ValueError, match=match):
        cms_level_chunk(z, weights, **{**base, **kwargs})


def test_bad_weights_are_named():
    z, weights = make(10)
    with pytest.raises(ValueError, match=r"weights\['w2'\]: expected shape \[3, 5\]"):
        cms_level_chunk(z, {**weights, "w2": torch.zeros(5, 3, dtype=DT)}, lr=0.1, chunk_size=2)
    with pytest.raises(ValueError, match="expected the keys"):
        cms_level_chunk(z, {"w1": weights["w1"]}, lr=0.1, chunk_size=2)
    with pytest.raises(ValueError, match="expected the keys"):
        cms_level_chunk(z, {**weights, "b1": torch.zeros(5, dtype=DT)}, lr=0.1, chunk_size=2)
    with pytest.raises(ValueError, match=r"weights\['b2'\]: expected shape \[3\]"):
        bad = {**weights, "b1": torch.zeros(5, dtype=DT), "b3": torch.zeros(5, dtype=DT)}
        cms_level_chunk(z, {**bad, "b2": torch.zeros(4, dtype=DT)}, lr=0.1, chunk_size=2)
    with pytest.raises(ValueError, match="activation: unknown 'relu'"):
        cms_level_chunk(z, weights, lr=0.1, chunk_size=2, activation="relu")
    with pytest.raises(ValueError, match="input width d=2"):
        cms_level_chunk(z[..., :2], weights, lr=0.1, chunk_size=2)


# The plain step (NL-31 as printed, ``step="plain"``): the same forms, no 1 / (1 + E).


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "dgd"])
@pytest.mark.parametrize(("T", "C"), [(7, 3), (7, 1), (6, 6)])
def test_plain_step_chunk_equals_reference_with_gradients(optimizer, T, C):
    z, weights = make(T * 10 + C + 1, T=T)
    leaves = [z, *weights.values()]
    kwargs = {"lr": 0.05, "chunk_size": C, "optimizer": optimizer, "momentum": 0.7}
    a, b = run_both(z, weights, leaves, step="plain", **kwargs)
    assert_same(a, b)


def test_plain_step_is_nl31_written_by_hand():
    """``θ_{c+1} = θ_c − η Σ_{pairs of chunk c} ∇θ ½‖MLP_θc(z_s) − z_{s+1}‖²`` (autograd of the
    pair losses), every token read with its chunk's weights."""
    z, weights = make(21, T=8)
    lr, C = 0.07, 3
    y, state = cms_level_chunk(
        z, weights, lr=lr, chunk_size=C, step="plain", output_final_state=True
    )
    z0 = z.detach()
    for b in range(z.shape[0]):
        theta = {k: v.detach() for k, v in weights.items()}
        for start in range(0, z.shape[1], C):
            rows = z0[b : b + 1, start : start + C]
            torch.testing.assert_close(
                y[b : b + 1, start : start + C].detach(), swiglu(theta, rows), rtol=0, atol=1e-12
            )
            end = start + C
            if end > z.shape[1]:
                break
            leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
            keys = z0[b : b + 1, max(start - 1, 0) : end - 1]  # pairs (s, s+1), s+1 in the chunk
            targets = z0[b : b + 1, max(start, 1) : end]
            loss = 0.5 * (swiglu(leaves, keys) - targets).pow(2).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()))
            theta = {k: v - lr * g for (k, v), g in zip(theta.items(), grads, strict=True)}
        for name in MAPS:
            torch.testing.assert_close(state[name][b], theta[name], rtol=1e-12, atol=1e-12)


def test_normalized_is_the_default_and_plain_is_one_plus_e_times_larger():
    z, weights = make(22, T=4)
    kwargs = {"lr": 0.3, "chunk_size": 4, "output_final_state": True}
    y, default = cms_level_chunk(z, weights, **kwargs)
    y_norm, normalized = cms_level_chunk(z, weights, step="normalized", **kwargs)
    assert torch.equal(y, y_norm) and all(torch.equal(default[k], normalized[k]) for k in default)
    # The first chunk (C = 4: pairs (0,1), (1,2), (2,3)) is applied at the end of the call; its
    # summed sensitivity E is what a longer chunk still holds.
    _, plain = cms_level_chunk(z, weights, step="plain", **kwargs)
    _, pending = cms_level_chunk(z, weights, lr=0.3, chunk_size=5, output_final_state=True)
    e = pending["e"].view(-1, 1, 1)
    assert (e > 0.1).all()
    for name in MAPS:
        w0 = weights[name].detach()
        step_norm, step_plain = default[name] - w0, plain[name] - w0
        torch.testing.assert_close(step_plain, (1 + e) * step_norm, rtol=1e-10, atol=1e-13)


def test_unknown_step_is_named():
    z, weights = make(23)
    with pytest.raises(ValueError, match="step: unknown 'sum'; choose one of normalized, plain"):
        cms_level_chunk(z, weights, lr=0.1, chunk_size=2, step="sum")
