"""The memory mixers' one-token step (:mod:`nestlearn.layers.decode_step`) against the sequence
form on the same token: outputs, states and gradients in float64, the cached stacked weights
after a parameter update, and forward hooks."""

from __future__ import annotations

import pytest
import torch

from nestlearn.layers.decode_step import step_plan
from nestlearn.models.common import block_state
from tests.models.test_memory_models import MEMORY_MODELS, small

# conv_size=0: the step without short convs; momentum off and depth 1: Titans' other branches.
CASES = [(name, {}) for name in MEMORY_MODELS] + [
    ("gated_deltanet", {"conv_size": 0}),
    ("titans_lmm", {"memory_momentum": False, "memory_depth": 1, "memory_residual": False}),
    ("titans_lmm", {"memory_step_scale": "token", "memory_ema_momentum": False}),
]


def sequence_form(mixer, x, state):
    """The mixer's sequence path on ``x [B, 1, d]``: a no-op forward hook on ``q_proj`` makes
    the step decline, so :meth:`forward` runs the code it ran before the step existed."""
    handle = mixer.heads.q_proj.register_forward_hook(lambda module, inputs, output: None)
    try:
        return mixer(x, state)
    finally:
        handle.remove()


def prefixed(name, fields, batch=2, prefix=6):
    """A float64 model, the state of block 0 after ``prefix`` tokens, and its mixer."""
    model = small(name, **fields).double()
    state = model.init_state(batch)
    with torch.no_grad():
        _, state = model(torch.randint(0, 37, (batch, prefix)), state)
    return model, block_state(state, 0), model.blocks[0].mixer


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize(("name", "fields"), CASES)
def test_step_equals_the_sequence_form_token_after_token(name, fields):
    """Six tokens from a state 6 tokens in, chunk size 4: Titans' chunk-start weights move
    mid-way (positions 7 and 11 end chunks)."""
    _, state, mixer = prefixed(name, fields)
    fast, slow = dict(state), dict(state)
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(6):
            x = torch.randn(2, 1, mixer.heads.q_proj.in_features, dtype=torch.float64)
            y_fast, fast = mixer.step(x, fast)
            y_slow, slow = sequence_form(mixer, x, slow)
            torch.testing.assert_close(y_fast, y_slow, rtol=1e-12, atol=1e-12)
            assert_states_equal(fast, slow)


@pytest.mark.parametrize("name", ["gated_deltanet", "gla", "titans_lmm"])
def test_step_gradients_equal_the_sequence_forms(name):
    """Gradients into the input, the state and every parameter (the step trains too)."""
    _, state, mixer = prefixed(name, {})
    x = torch.randn(2, 1, mixer.heads.q_proj.in_features, dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in state.items()}
    params = [p for p in mixer.parameters()]
    grads = []
    for run in (mixer.step, lambda x, s: sequence_form(mixer, x, s)):
        xi = x.clone().requires_grad_()
        y, new = run(xi, leaves)
        loss = y.square().sum() + sum(
            v.square().sum() for v in new.values() if v.is_floating_point()
        )
        inputs = [xi, *(v for v in leaves.values() if v.requires_grad), *params]
        grads.append(torch.autograd.grad(loss, inputs, allow_unused=True))
    for fast, slow in zip(*grads, strict=True):
        if slow is None:
            assert fast is None or not fast.any()
        else:
            torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["deltanet", "titans_lmm"])
def test_the_cached_weights_follow_an_in_place_update(name):
    """Decoding under inference mode caches the stacked projections; an optimizer-style
    in-place update of a parameter (its version moves) must be seen by the next step."""
    _, state, mixer = prefixed(name, {})
    x = torch.randn(2, 1, mixer.heads.q_proj.in_features, dtype=torch.float64)
    with torch.inference_mode():
        mixer.step(x, state)  # fills the cache
    with torch.no_grad():
        for p in (mixer.heads.k_proj.weight, mixer.heads.v_conv.weight):
            p.add_(0.1 * torch.randn_like(p))
    with torch.inference_mode():
        y_fast, _ = mixer.step(x, state)
        y_slow, _ = sequence_form(mixer, x, state)
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-12, atol=1e-12)


def test_the_plan_is_cached_only_without_gradients():
    _, _, mixer = prefixed("gated_deltanet", {})
    gates = [mixer.beta_proj, mixer.decay.proj]
    with torch.no_grad():
        assert step_plan(mixer.heads, gates) is step_plan(mixer.heads, gates)
    assert step_plan(mixer.heads, gates).weight.requires_grad  # built afresh, differentiable


def test_a_model_built_under_inference_mode_decodes():
    """Its parameters are inference tensors (no version counter): nothing is cached."""
    with torch.inference_mode():
        model = small("gated_deltanet").double()
        tokens = torch.randint(0, 37, (1, 9))
        full, _ = model(tokens)
        logits, state = model(tokens[:, :5], model.init_state(1))
        steps = [logits]
        for t in range(5, 9):
            logits, state = model(tokens[:, t : t + 1], state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_a_forward_hook_on_a_projection_sees_every_decoded_token(name):
    model = small(name)
    calls = []
    model.blocks[1].mixer.heads.v_proj.register_forward_hook(
        lambda module, inputs, output: calls.append(inputs[0].shape[1])
    )
    state = model.init_state(1)
    _, state = model(torch.randint(0, 37, (1, 5)), state)
    for _ in range(3):
        _, state = model(torch.randint(0, 37, (1, 1)), state)
    assert calls == [5, 1, 1, 1]
