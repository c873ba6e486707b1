"""M3 against Algorithm 1 written as a loop over the list of past gradients."""

from __future__ import annotations

import pytest
import torch

from nestlearn.optim import M3
from nestlearn.optim.newton_schulz import newton_schulz

DT = torch.float64


def algorithm_1(w0, grads, lr, betas, alpha, f, eps, ema):
    """The arXiv algorithm with explicit chunk sums; ``ema`` replaces sums by EMAs (ours)."""
    b1, b2, b3 = betas
    keep = (lambda b: 1 - b) if ema else (lambda b: 1.0)
    w, m1, v, m2 = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0), torch.zeros_like(w0)
    o2 = torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        if t > 1 and (t - 1) % f == 0:
            m2 = keep(b3) * m2 + b3 * sum(grads[t - 1 - f : t - 1])
            o2 = newton_schulz(m2, dtype="float64")
        m1 = keep(b1) * m1 + b1 * g
        v = keep(b2) * v + b2 * g * g
        v_hat = v / (1 - (1 - b2) ** t) if ema else v
        w = w - lr * (newton_schulz(m1, dtype="float64") + alpha * o2) / (v_hat.sqrt() + eps)
    return w


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("shape", [(4, 3), (3, 5)])
def test_m3_is_algorithm_1(ema, shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen, dtype=DT).requires_grad_(True)
    grads = [torch.randn(shape, generator=gen, dtype=DT) for _ in range(10)]
    settings = {"lr": 0.01, "betas": (0.3, 0.2, 0.5), "alpha": 0.7, "eps": 1e-8, "ema": ema}
    expected = algorithm_1(w.detach(), grads, f=3, **settings)
    opt = M3([w], frequency=3, ns_dtype="float64", **settings)
    for g in grads:
        w.grad = g
        opt.step()
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-13)


def test_slow_momentum_is_held_for_a_chunk():
    w = torch.zeros(3, 3, dtype=DT, requires_grad=True)
    opt = M3([w], frequency=4)
    seen = []
    for _ in range(9):
        w.grad = torch.randn(3, 3, dtype=DT)
        opt.step()
        seen.append(opt.state[w]["o2"].clone())
    assert all(not o.any() for o in seen[:4])
    assert all(torch.equal(o, seen[4]) for o in seen[4:8]) and seen[4].any()
    assert not torch.equal(seen[8], seen[4])


def test_bad_settings():
    w = torch.zeros(2, 2, requires_grad=True)
    for bad in [{"betas": (0.1, 0.2)}, {"betas": (0.0, 0.1, 0.1)}, {"frequency": 0}]:
        with pytest.raises(ValueError):
            M3([w], **bad)
