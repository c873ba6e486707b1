"""The fused bank segment (one autograd node, hand-written backward) against autograd.

``torch.autograd.gradcheck`` (float64, finite differences) checks the hand-written backward of
:class:`nestlearn.memory.dgd.bank_fused._BankSegment` through every input: keys, target inputs or
given targets, the start weights and momenta, the chunk-start weights and the gates (through the
coefficients); and the fused segment must equal :func:`nestlearn.memory.dgd.bank.segment_autograd`,
the previous formulation, outputs and gradients, over the switches of SPEC §5.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nestlearn.layers.self_modifying import SelfModifyingTitansMixer
from nestlearn.memory.dgd import bank, bank_fused, bank_layout
from nestlearn.memory.dgd import forms as dgd_mlp
from nestlearn.memory.dgd import gates as dgd_gates
from nestlearn.memory.dgd import write as dgd_write

DT = torch.float64


# Tiny tensors: intra-op threads only add overhead (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(seed: int, *, N: int = 2, n: int = 3, D: int = 4, h: int = 3, given: bool = False):
    """A bank of two residual memories (``D -> D``) and two 1-wide ones with a linear skip, its
    packed start weights, momenta and (different) chunk-start weights, keys, gates."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=DT)

    memories = {
        name: [normal(N, h, D, scale=D**-0.5), normal(N, out, h, scale=0.5)]
        + ([normal(N, out, D, scale=0.5)] if out == 1 else [])
        for name, out in (("k", D), ("v", D), ("eta", 1), ("alpha", 1))
    }
    lay = bank_layout.layout(memories, list(memories))
    w = bank_layout.pack(lay, memories)
    # Packed (zero padding of the 1-wide memories' second maps, as the bank always has).
    wc = bank_layout.pack(
        lay, {m: [x + normal(*x.shape, scale=0.1) for x in ws] for m, ws in memories.items()}
    )
    s = bank_layout.pack(
        lay, {m: [normal(*x.shape, scale=0.1) for x in ws] for m, ws in memories.items()}
    )
    k = F.normalize(normal(N, n, D), dim=-1)
    v = normal(N, n, D)
    targets = None
    if given:
        targets = torch.stack([F.pad(normal(N, n, o), (0, lay.out - o)) for o in lay.outs])
    gates = {
        "eta": 0.1 + 0.4 * torch.rand(N, n, generator=gen, dtype=DT),
        "mu": torch.rand(N, n, generator=gen, dtype=DT),
        "alpha": 0.5 + 0.5 * torch.rand(N, n, generator=gen, dtype=DT),
    }
    return lay, w, s, wc, k, v, targets, gates


def options(**kw) -> dgd_mlp.Options:
    target = kw.pop("target", "self")
    return dgd_mlp.options(skip="identity", target=target, **kw)


def segment_fn(lay, opts, fused: bool, momentum: bool, retention: bool):
    def fn(k, v, targets, F0, G0, SF0, SG0, FC, GC, eta, mu, alpha):
        gates = (eta, mu if momentum else None, alpha if retention else None)
        w, s = bank.segment(
            lay, [F0, G0], [SF0, SG0], [FC, GC], k, v, targets, gates, opts, fused=fused
        )
        return (*w, *s)

    return fn


CASES = {
    "default": {},
    "ema momentum": {"ema_momentum": True},
    "no momentum": {"momentum": False},
    "no retention": {"retention": False},
    "plain GD": {"dgd": False},
    "given targets": {"target": "given"},
    "gelu": {"activation": "gelu"},
    "detach inner": {"detach_inner": True},
}


def split_case(case: dict) -> tuple[dict, bool, bool]:
    case = dict(case)
    return case, case.pop("momentum", True), case.pop("retention", True)


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(name):
    kw, momentum, retention = split_case(CASES[name])
    given = kw.get("target") == "given"
    lay, w, s, wc, k, v, targets, gates = make_inputs(0, given=given)
    opts = options(**kw)
    assert bank_fused.supported(opts)
    inputs = [k, v, targets, *w, *s, *wc, gates["eta"], gates["mu"], gates["alpha"]]
    # detach_inner: the surprise (k, v, targets, chunk-start weights) is a constant by design.
    surprise = {0, 1, 2, 7, 8}
    inputs = [
        None if x is None else x.clone().requires_grad_(not (opts.detach_inner and i in surprise))
        for i, x in enumerate(inputs)
    ]
    fn = segment_fn(lay, opts, True, momentum, retention)
    assert torch.autograd.gradcheck(fn, tuple(inputs), atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_autograd(name):
    kw, momentum, retention = split_case(CASES[name])
    given = kw.get("target") == "given"
    lay, w, s, wc, k, v, targets, gates = make_inputs(1, N=3, n=5, D=6, h=4, given=given)
    opts = options(**kw)
    inputs = [k, v, targets, *w, *s, *wc, gates["eta"], gates["mu"], gates["alpha"]]
    results = []
    for fused in (True, False):
        leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
        out = segment_fn(lay, opts, fused, momentum, retention)(*leaves)
        # The loss reads the memories (bank_layout.unpack), not the bank's zero padding.
        gen = torch.Generator().manual_seed(7)
        loss = sum(
            (x * torch.randn(x.shape, generator=gen, dtype=DT)).sum()
            for pair in (out[:2], out[2:])
            for ws in bank_layout.unpack(lay, pair).values()
            for x in ws
        )
        wrt = [x for x in leaves if x is not None]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads, strict=True)]
        results.append((out, grads))
    (out_f, grads_f), (out_a, grads_a) = results
    for i, (a, b) in enumerate(zip(out_f, out_a, strict=True)):
        torch.testing.assert_close(a, b, msg=f"output {i}")
    for i, (a, b) in enumerate(zip(grads_f, grads_a, strict=True)):
        torch.testing.assert_close(a, b, msg=f"gradient {i}")


def test_unsupported_objective_falls_back_to_autograd():
    opts = options(objective="huber")
    assert not bank_fused.supported(opts)
    lay, w, s, wc, k, v, _, gates = make_inputs(2)
    gates = (gates["eta"], gates["mu"], gates["alpha"])
    fused = bank.segment(lay, w, s, wc, k, v, None, gates, opts)
    plain = bank.segment_autograd(lay, w, s, wc, k, v, None, dgd_mlp.coefficients(*gates), opts)
    for a, b in zip([*fused[0], *fused[1]], [*plain[0], *plain[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


LAYER_CASES = {
    "default": {},
    "heavy-ball momentum": {"ema_momentum": False},
    "no momentum": {"momentum": False},
    "no retention": {"retention": False},
    "plain GD": {"dgd": False},
    "fully adaptive": {"variant": "fully_adaptive"},
    "adaptive q, fixed k": {"adaptive_q": True, "fixed_k": True},
    "gelu": {"activation": "gelu"},
    "detach inner": {"detach_inner": True},
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_mixer_with_fused_bank_equals_autograd_bank(name):
    """The whole mixer, T not a multiple of either chunk size: outputs and every gradient."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        layer = SelfModifyingTitansMixer(
            12, 2, 4, chunk_size=5, other_chunk_size=3, **LAYER_CASES[name]
        ).to(DT)
        layer.options = dataclasses.replace(layer.options, fused_bank=fused)
        x = torch.randn(2, 11, 12, dtype=DT, generator=torch.Generator().manual_seed(1))
        y = layer(x)[0]
        (
            y * torch.randn(y.shape, dtype=DT, generator=torch.Generator().manual_seed(2))
        ).sum().backward()
        results.append((y, {n: p.grad for n, p in layer.named_parameters()}))
    (y_f, g_f), (y_a, g_a) = results
    torch.testing.assert_close(y_f, y_a)
    assert g_f.keys() == g_a.keys()
    for key in g_a:
        if g_a[key] is None:
            assert g_f[key] is None, key
        else:
            torch.testing.assert_close(g_f[key], g_a[key], msg=f"gradient of {key}")


# ``D == h``: the writes of F and G share one set of input terms (bank_fused._places).
SHARED = {"N": 2, "n": 3, "D": 3, "h": 3}


@pytest.mark.parametrize(
    "name", ["default", "ema momentum", "no momentum", "plain GD", "given targets"]
)
def test_gradcheck_shared_inputs(name):
    kw, momentum, retention = split_case(CASES[name])
    given = kw.get("target") == "given"
    lay, w, s, wc, k, v, targets, gates = make_inputs(3, given=given, **SHARED)
    inputs = [k, v, targets, *w, *s, *wc, gates["eta"], gates["mu"], gates["alpha"]]
    inputs = [None if x is None else x.clone().requires_grad_() for x in inputs]
    fn = segment_fn(lay, options(**kw), True, momentum, retention)
    assert torch.autograd.gradcheck(fn, tuple(inputs), atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("shape", [{}, SHARED], ids=["D != h", "D == h"])
def test_gradcheck_chunk_start_is_start(shape):
    """A segment that starts a chunk reads its gradients at the start weights themselves (the
    same tensors): both gradients are accumulated into one."""
    lay, w, s, _, k, v, _, gates = make_inputs(4, **shape)
    opts = options()

    def fn(k, v, F0, G0, SF0, SG0, eta, mu, alpha):
        gates = (eta, mu, alpha)
        w, s = bank.segment(lay, [F0, G0], [SF0, SG0], [F0, G0], k, v, None, gates, opts)
        return (*w, *s)

    inputs = [k, v, *w, *s, gates["eta"], gates["mu"], gates["alpha"]]
    inputs = [x.clone().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(fn, tuple(inputs), atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("ema", [False, True], ids=["heavy-ball", "ema"])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("retention", [True, False])
def test_gate_coefficients_equal_autograd(momentum, retention, ema):
    """The coefficients as one node (dgd_gates.gate_coefficients) against autograd through
    dgd_mlp.coefficients: the same numbers, the same gradients, gates exactly 0 included;
    ``ema``: the gradient's step (1 − μ) η in the write coefficients, not in the projection."""
    gen = torch.Generator().manual_seed(6)
    N, n = 3, 5
    eta = 0.1 + 0.4 * torch.rand(N, n, generator=gen, dtype=DT)
    mu = torch.rand(N, n, generator=gen, dtype=DT)
    alpha = 0.5 + 0.5 * torch.rand(N, n, generator=gen, dtype=DT)
    mu[1, 3] = alpha[0, 2] = 0.0
    gates = [eta, mu if momentum else None, alpha if retention else None]
    leaves = [None if g is None else g.clone().requires_grad_() for g in gates]
    fused = dgd_gates.gate_coefficients(*leaves, ema=ema)
    plain = write_coefficients(dgd_mlp.coefficients(*leaves, ema=ema))
    weights = []
    for a, b in zip(fused, plain, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
            weights.append(torch.randn(a.shape, generator=gen, dtype=DT))
    wrt = [x for x in leaves if x is not None]
    losses = [
        sum((x * r).sum() for x, r in zip([x for x in c if x is not None], weights, strict=True))
        for c in (fused, plain)
    ]
    for a, b in zip(*(torch.autograd.grad(loss, wrt) for loss in losses), strict=True):
        torch.testing.assert_close(a, b)

    def fn(*gates):
        it = iter(gates)
        args = [next(it), next(it) if momentum else None, next(it) if retention else None]
        return tuple(x for x in dgd_gates.gate_coefficients(*args, ema=ema) if x is not None)

    assert torch.autograd.gradcheck(fn, tuple(wrt))


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("shape", [{}, SHARED], ids=["D != h", "D == h"])
def test_read_equals_autograd(activation, shape):
    """bank_fused.read (one node) against bank.forward through autograd: outputs, gradients,
    and gradcheck."""
    lay, w, _, _, k, _, _, _ = make_inputs(8, **shape)
    opts = options(activation=activation)
    z = k + 0.5
    leaves = [x.clone().requires_grad_() for x in (z, *w)]
    fused = bank_fused.read(lay, leaves[1:], leaves[0], opts)
    plain = bank.read(lay, leaves[1:], leaves[0], opts, fused=False)
    gen = torch.Generator().manual_seed(9)
    weights = [torch.randn(x.shape, generator=gen, dtype=DT) for x in plain]
    losses = []
    for outs in (fused, plain):
        for a, b in zip(outs, plain, strict=True):
            torch.testing.assert_close(a, b)
        losses.append(sum((x * r).sum() for x, r in zip(outs, weights, strict=True)))
    for a, b in zip(*(torch.autograd.grad(loss, leaves) for loss in losses), strict=True):
        # The read never writes G's padding rows: their gradient is zero either way.
        torch.testing.assert_close(a, b)
    fn = lambda z, F0, G0: tuple(bank_fused.read(lay, [F0, G0], z, opts))  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(leaves), atol=1e-7, rtol=1e-5)


def write_coefficients(coeffs: dgd_mlp.Coefficients) -> dgd_write.WriteCoefficients:
    """The coefficients a segment's writes (no reads) use, picked from autograd's."""
    before, end = coeffs.before, coeffs.end
    return dgd_write.WriteCoefficients(
        before.decay,
        before.carry,
        before.write,
        coeffs.lower,
        end.decay,
        end.carry,
        end.write,
        end.project,
        coeffs.s_decay,
        coeffs.s_write,
    )
