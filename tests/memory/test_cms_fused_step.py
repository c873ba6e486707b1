"""The CMS level's fused chunk step (``memory/cms.py`` ``_fused_step``: the rate scales the
per-pair factors, one ``baddbmm`` per map) against the unfused pair (``_accumulate`` then
``apply_update``, the form before it), float64: outputs, final states and gradients into the
inputs, the initial weights and an initial momentum."""

from __future__ import annotations

import pytest
import torch

from nestlearn.memory import cms as cms_op
from nestlearn.memory.cms import cms_level_chunk, local_error

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {  # gated, biases, activation
    "swiglu": (True, False, "silu"),
    "swiglu_bias": (True, True, "silu"),
    "gelu_bias": (False, True, "gelu_tanh"),
}


def make(seed: int, kind: str, B: int = 2, T: int = 11, d: int = 4, h: int = 6):
    gated, bias, _ = KINDS[kind]
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, d, generator=gen, dtype=DT).requires_grad_()
    ctx = torch.randn(B, T, d, generator=gen, dtype=DT)
    shapes = {"w1": (h, d), "w3": (h, d), "w2": (d, h), "b1": (h,), "b3": (h,), "b2": (d,)}
    names = ["w1", "w3", "w2"] if gated else ["w1", "w2"]
    if bias:
        names += ["b1", "b3", "b2"] if gated else ["b1", "b2"]
    weights = {
        n: (0.6 * torch.randn(*shapes[n], generator=gen, dtype=DT)).requires_grad_() for n in names
    }
    return z, ctx, weights


def teach_like(y: torch.Tensor, key_ctx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A stop-gradient error as the teach signal's: a function of ``key_ctx + y``, detached."""
    with torch.no_grad():
        return torch.tanh(key_ctx + y.detach()) - target


def run(monkeypatch, fused: bool, z, weights, **kwargs):
    calls = []
    real = cms_op._fused_step

    def spy(*args):
        calls.append(1)
        return real(*args)

    with monkeypatch.context() as m:
        m.setattr(cms_op, "_fused_step", spy)
        if not fused:
            m.setattr(cms_op, "_fusable", lambda acc, opts: False)
        y, state = cms_level_chunk(z, weights, output_final_state=True, **kwargs)
    loss = y.pow(2).sum() + y.sum()
    loss = loss + sum(v.sin().sum() for v in state.values() if v.is_floating_point())
    leaves = [z, *weights.values()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return y, state, grads, len(calls)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
@pytest.mark.parametrize("step", ["normalized", "plain"])
@pytest.mark.parametrize("objective", ["teach", "local"])
@pytest.mark.parametrize("detach_inner", [False, True])
def test_fused_step_equals_the_unfused_update(
    monkeypatch, kind, optimizer, step, objective, detach_inner
):
    z, ctx, weights = make(3, kind)
    kwargs = {
        "lr": 0.4 if step == "normalized" else 0.05,  # plain: 1 + E times larger, kept finite
        "chunk_size": 3,
        "optimizer": optimizer,
        "momentum": 0.7,
        "activation": KINDS[kind][2],
        "step": step,
        "detach_inner": detach_inner,
    }
    if objective == "teach":
        kwargs.update(error=teach_like, key_ctx=ctx)
    else:
        kwargs.update(error=local_error)
    y0, s0, g0, calls0 = run(monkeypatch, False, z, weights, **kwargs)
    y1, s1, g1, calls1 = run(monkeypatch, True, z, weights, **kwargs)
    assert calls0 == 0 and calls1 == 3  # T = 11, C = 3: three complete chunks are stepped fused
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-13)
    assert s1.keys() == s0.keys()
    for key in s0:
        torch.testing.assert_close(s1[key], s0[key], rtol=1e-12, atol=1e-13, msg=key)
    for i, (a, b) in enumerate(zip(g1, g0, strict=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"grad {i}")


def test_a_state_carried_in_mid_chunk_is_not_fused(monkeypatch):
    """A chunk whose first pairs came in a state keeps the unfused sums (G, E carried in)."""
    z, _, weights = make(5, "swiglu", T=12)
    kwargs = {"lr": 0.4, "chunk_size": 4}
    _, state = cms_level_chunk(z[:, :2].detach(), weights, output_final_state=True, **kwargs)
    calls = []
    real = cms_op._fused_step
    monkeypatch.setattr(cms_op, "_fused_step", lambda *a: calls.append(1) or real(*a))
    cms_level_chunk(z[:, 2:], weights, initial_state=state, **kwargs)
    # tokens 2-3 finish chunk 0 unfused; chunk 1 (4-7) is fused; chunk 2's update is read by none
    assert calls == [1]
