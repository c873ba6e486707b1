"""Activation checkpointing: same gradients, fewer saved activations, same state_dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.models.registry import available_models
from nestlearn.train.activation_checkpointing import (
    apply_activation_checkpointing,
    is_checkpointed,
)
from tests.hf.tiny import VOCAB, tiny_model


def loss_grads_and_saved_bytes(model: torch.nn.Module, tokens: torch.Tensor):
    """Loss, every gradient, and the bytes autograd kept for backward outside checkpoints."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("name", available_models())
def test_gradients_equal_and_activations_shrink(name):
    model = tiny_model(name).double().train()
    tokens = torch.randint(0, VOCAB, (2, 14))
    loss, grads, plain_bytes = loss_grads_and_saved_bytes(model, tokens)
    keys = list(model.state_dict())

    assert apply_activation_checkpointing(model) is model and is_checkpointed(model)
    ck_loss, ck_grads, ck_bytes = loss_grads_and_saved_bytes(model, tokens)

    assert list(model.state_dict()) == keys
    torch.testing.assert_close(ck_loss, loss, rtol=1e-12, atol=1e-12)
    for key, grad in grads.items():
        torch.testing.assert_close(ck_grads[key], grad, rtol=1e-10, atol=1e-12, msg=key)
    # Only what lies outside the blocks (embedding, final norm, head, loss) stays saved.
    assert ck_bytes < plain_bytes / 2, (ck_bytes, plain_bytes)


def test_decoding_without_grad_is_unchanged():
    model = tiny_model("titans_lmm").double()
    tokens = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        full, _ = model(tokens)
        apply_activation_checkpointing(model)
        logits, state = model(tokens[:, :5], model.init_state(1))
        step, _ = model(tokens[:, 5:6], state)
    torch.testing.assert_close(torch.cat([logits, step], 1), full[:, :6], rtol=1e-9, atol=1e-9)


def test_applying_twice_wraps_once():
    model = apply_activation_checkpointing(tiny_model("gla"))
    forwards = [block.forward for block in model.blocks]
    apply_activation_checkpointing(model)
    assert [block.forward for block in model.blocks] == forwards


def test_model_without_blocks_is_named():
    with pytest.raises(ValueError, match="blocks"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2))
    assert not is_checkpointed(torch.nn.Linear(2, 2))
