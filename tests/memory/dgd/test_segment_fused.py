"""The DGD MLP memory's segment as one autograd node (memory/dgd/segment_fused.py) against the
same chunk form under plain autograd (``forms._FUSED_SEGMENT = False``), and gradcheck.

Both must give the same outputs, final states and gradients w.r.t. every leaf (queries, keys,
values, gates, initial weights, initial state), in float64.
"""

from __future__ import annotations

import pytest
import torch

from nestlearn.memory.dgd import forms as dgd_mlp
from nestlearn.memory.dgd import gates as dgd_gates
from nestlearn.memory.dgd import segment_fused
from nestlearn.memory.dgd.forms import dgd_mlp_memory_chunk
from tests.memory.dgd.test_forms import assert_runs_close, make_case, run


def run_both(case, monkeypatch, **options):
    calls = []
    original = segment_fused.segment

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(segment_fused, "segment", counted)
    fused = run(dgd_mlp_memory_chunk, case, **options)
    monkeypatch.setattr(dgd_mlp, "_FUSED_SEGMENT", False)
    plain = run(dgd_mlp_memory_chunk, case, **options)
    monkeypatch.setattr(dgd_mlp, "_FUSED_SEGMENT", True)
    return fused, plain, len(calls)


@pytest.mark.parametrize("skip, target", [("identity", "self"), ("none", "given")])
@pytest.mark.parametrize(
    "momentum, retention, ema",
    [(True, True, True), (True, True, False), (False, True, False), (True, False, True)],
)
@pytest.mark.parametrize("dgd", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_fused_segment_equals_autograd(
    skip, target, momentum, retention, ema, dgd, with_state, monkeypatch
):
    # T = 8 with C = 3: segments of several lengths (a state mid-chunk, a short last one);
    # gates hold exact zeros (make_case).
    case = make_case(
        5,
        T=8,
        skip=skip,
        target=target,
        momentum=momentum,
        retention=retention,
        with_state=with_state,
    )
    options = dict(skip=skip, target=target, dgd=dgd, chunk_size=3, ema_momentum=ema)
    fused, plain, calls = run_both(case, monkeypatch, **options)
    assert calls >= 3  # the fused node ran, once per segment
    assert_runs_close(fused, plain)


@pytest.mark.parametrize("depth, dims", [(1, (3, 3, 5)), (3, (4, 4, 3))])
def test_fused_segment_any_depth(depth, dims, monkeypatch):
    Dk, Dv, Dh = dims
    case = make_case(9, T=7, Dk=Dk, Dv=Dv, Dh=Dh, depth=depth, skip="identity", target="self")
    options = dict(skip="identity", target="self", chunk_size=4, ema_momentum=True)
    fused, plain, calls = run_both(case, monkeypatch, **options)
    assert calls == 2
    assert_runs_close(fused, plain)


@pytest.mark.parametrize(
    "changes",
    [{"objective": "huber"}, {"read": "chunk_start"}, {"skip": "linear"}, {"detach_inner": True}],
)
def test_unsupported_options_use_autograd(changes):
    opts = dgd_mlp.options(**{"skip": "identity", "target": "self", **changes})
    assert not segment_fused.supported(opts)
    assert segment_fused.supported(dgd_mlp.options(skip="identity", target="self"))


@pytest.mark.parametrize("momentum, dgd", [(True, True), (False, True), (True, False)])
def test_gradcheck_one_segment(momentum, dgd):
    gen = torch.Generator().manual_seed(2)
    N, n, D, h = 2, 3, 3, 4

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    q, k, v = (torch.nn.functional.normalize(rand(N, n, D), dim=-1).detach() for _ in range(3))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    w = [rand(N, h, D, scale=0.5), rand(N, D, h, scale=0.5)]
    s = [rand(N, h, D, scale=0.1), rand(N, D, h, scale=0.1)]
    wc = [rand(N, h, D, scale=0.5), rand(N, D, h, scale=0.5)]
    eta = (0.3 * torch.rand(N, n, generator=gen, dtype=torch.float64)).requires_grad_()
    mu = torch.rand(N, n, generator=gen, dtype=torch.float64).requires_grad_()
    alpha = torch.rand(N, n, generator=gen, dtype=torch.float64).requires_grad_()
    opts = dgd_mlp.options(skip="identity", target="self", dgd=dgd, ema_momentum=True)

    def fn(q, k, v, eta, mu, alpha, *mats):
        c = dgd_gates.gate_coefficients(eta, mu if momentum else None, alpha, ema=True)
        o, w_n, s_n = segment_fused.segment(q, k, v, mats[:2], mats[2:4], mats[4:], c, opts)
        return (o, *w_n, *s_n)

    assert torch.autograd.gradcheck(fn, (q, k, v, eta, mu, alpha, *w, *s, *wc))
