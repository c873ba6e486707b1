"""``torch.compile`` of an optimizer step: same numbers as eager, no recompilation per step."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from nestlearn.optim import AdamMemory, DeltaMomentum, MomentumMemory, Muon, PreconditionedMomentum

SIMPLE = {
    "momentum": lambda ps: MomentumMemory(ps, lr=0.1),
    "preconditioned": lambda ps: PreconditionedMomentum(ps, lr=0.01),
    "delta_momentum": lambda ps: DeltaMomentum(ps, lr=0.1),
    "muon": lambda ps: Muon(ps, lr=0.02),
    "adam_memory": lambda ps: AdamMemory(ps, lr=0.01),
}


def compiled_vs_eager(make, backend: str, steps: int = 10) -> None:
    torch._dynamo.reset()
    counters.clear()
    w = torch.randn(5, 3, requires_grad=True)
    twin = w.detach().clone().requires_grad_(True)
    opt, ref = make([w]), make([twin])
    step = torch.compile(opt.step, backend=backend)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        grad = torch.randn(5, 3, generator=g)
        w.grad, twin.grad = grad.clone(), grad.clone()
        step()
        ref.step()
    torch.testing.assert_close(w, twin, rtol=1e-5, atol=1e-6)
    # One graph for the first step (the state is created), one or two for the steady state.
    assert counters["stats"]["unique_graphs"] <= 3


@pytest.mark.parametrize("name", ["momentum", "adam_memory"])
def test_compiled_step_matches_eager(name):
    compiled_vs_eager(SIMPLE[name], backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["preconditioned", "delta_momentum", "muon"])
def test_more_compiled_steps_match_eager(name):
    compiled_vs_eager(SIMPLE[name], backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["momentum", "adam_memory"])
def test_inductor_compiled_step_matches_eager(name):
    compiled_vs_eager(SIMPLE[name], backend="inductor")
