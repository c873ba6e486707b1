"""torch.compile: the compiled model computes what the eager one does, forward and backward.

The fast suite runs one representative through dynamo + AOT autograd (``aot_eager``: the whole
capture, functionalization and joint forward/backward graph, no C++ code generation, which
takes 30-60 s per model on CPU). The ``slow`` test runs every registered model through the
default inductor backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.models.registry import available_models
from nestlearn.train.compile import MODES, graph_breaks, maybe_compile
from tests.hf.tiny import VOCAB, tiny_model


def loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits, _ = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), grads


def assert_compiled_matches_eager(name: str, backend: str, fullgraph: bool = False) -> None:
    model = tiny_model(name).train()
    # 13 tokens: not a multiple of the chunk (4) and longer than the window (8).
    tokens = torch.randint(0, VOCAB, (2, 14))
    eager_logits, eager_grads = loss_and_grads(model, tokens)
    keys = list(model.state_dict())
    torch._dynamo.reset()
    try:
        assert maybe_compile(model, True, backend=backend, fullgraph=fullgraph) is model
        logits, grads = loss_and_grads(model, tokens)
    finally:
        torch._dynamo.reset()
    # Compiled in place: same object, same parameter names (checkpoints stay loadable).
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    for key, grad in eager_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-3, atol=1e-5, msg=key)


def test_compiled_transformer_equals_eager_as_one_graph():
    assert_compiled_matches_eager("transformer", backend="aot_eager", fullgraph=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", available_models())
def test_every_model_compiled_with_inductor_equals_eager(name):
    assert_compiled_matches_eager(name, backend="inductor")


def test_disabled_returns_the_model_untouched():
    model = tiny_model("gla")
    assert maybe_compile(model, False) is model
    assert model._compiled_call_impl is None


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="max-autotune"):
        maybe_compile(tiny_model("transformer"), True, mode="fastest")
    assert "reduce-overhead" in MODES


def test_graph_breaks_names_the_reason():
    tokens = torch.randint(0, VOCAB, (2, 5))
    assert graph_breaks(tiny_model("transformer"), tokens) == []

    class HostSync(torch.nn.Module):
        def forward(self, x):
            return x * int(x.sum())

    reasons = graph_breaks(HostSync(), torch.ones(3))
    assert len(reasons) == 1 and "item" in reasons[0].lower()
