"""Titans MAC / MAG / MAL models: shapes, decode == forward with gradients, causality,
overfitting, foreign states, levels, config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.config import load_config
from nestlearn.errors import ConfigError
from nestlearn.models.registry import build_model

MODELS = ["titans_mac", "titans_mag", "titans_mal"]
V = 37


def small(name: str, **fields):
    overrides = {
        "name": name,
        "vocab_size": V,
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "chunk_size": 4,
        **({"window": 3, "n_persistent": 2} if name in MODELS else {}),
        **fields,
    }
    seq_len = min(64, overrides.get("max_seq_len", 1024))
    cfg = load_config(None, {"model": overrides, "train": {"seq_len": seq_len}})
    torch.manual_seed(0)
    return build_model(cfg.model)


@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes_and_no_context_limit(name):
    model = small(name)
    logits, state = model(torch.randint(0, V, (3, 9)))
    assert logits.shape == (3, 9, V) and state is None
    assert model.context_limit is None


@pytest.mark.parametrize("name", MODELS)
def test_prefix_then_steps_equals_the_full_forward_with_gradients(name):
    model = small(name).double()
    tokens = torch.randint(0, V, (2, 11))
    full, _ = model(tokens)
    state = model.init_state(2)
    sizes = {k: v.shape for k, v in state.items()}
    # A prefix of 6 (not a multiple of the chunk 4 nor of the window 3), then single tokens.
    logits, state = model(tokens[:, :6], state)
    outputs = [logits]
    for t in range(6, 11):
        logits, state = model(tokens[:, t : t + 1], state)
        outputs.append(logits)
        assert {k: v.shape for k, v in state.items()} == sizes  # constant in the context
    stepped = torch.cat(outputs, 1)
    torch.testing.assert_close(stepped, full, rtol=1e-9, atol=1e-9)
    assert int(state["pos"]) == 11
    params = list(model.parameters())
    w = torch.randn_like(full)
    want = torch.autograd.grad((full * w).sum(), params, allow_unused=True, materialize_grads=True)
    got = torch.autograd.grad(
        (stepped * w).sum(), params, allow_unused=True, materialize_grads=True
    )
    for (pname, _), g, h in zip(model.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-10, msg=pname)


@pytest.mark.parametrize("name", MODELS)
def test_changing_later_tokens_leaves_earlier_logits_alone(name):
    model = small(name).double()
    tokens = torch.randint(0, V, (2, 11))
    changed = tokens.clone()
    changed[:, 5:] = torch.randint(0, V, (2, 6))
    before, _ = model(tokens)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-12)
    assert (before[:, 5:] - after[:, 5:]).abs().max() > 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_overfits_one_batch(name):
    model = small(name, d_model=32, n_layers=1)
    tokens = torch.randint(0, V, (2, 17))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("name", MODELS)
def test_a_state_from_another_model_is_refused(name):
    model = small(name)
    tokens = torch.randint(0, V, (1, 3))
    other = "titans_mac" if name != "titans_mac" else "titans_mag"
    for foreign in (small("titans_lmm").init_state(1), small(other).init_state(1)):
        with pytest.raises(ValueError, match="a state from another model"):
            model(tokens, foreign)
    with pytest.raises(ValueError, match=r"state.*\[1, |batch size"):
        model(tokens, model.init_state(2))


@pytest.mark.parametrize("name", MODELS)
def test_levels_list_the_attention_and_the_memory(name):
    levels = small(name).levels()
    by_component = {lv.component: lv for lv in levels}
    attn, memory = by_component["blocks.0.mixer.attn"], by_component["blocks.0.mixer.memory"]
    assert attn.update_every == 1 and "non-parametric" in attn.memory
    assert memory.update_every == 4 and "MLP" in memory.memory
    assert levels[-1].update_every is None
    expected = "segment 4" if name == "titans_mac" else "window 3"
    assert expected in attn.memory and "2 persistent" in attn.memory


@pytest.mark.parametrize("name", MODELS)
def test_streams_past_max_seq_len(name):
    model = small(name, max_seq_len=8).eval()
    state = model.init_state(1)
    with torch.no_grad():
        _, state = model(torch.randint(0, V, (1, 8)), state)
        logits, state = model(torch.randint(0, V, (1, 5)), state)
    assert logits.shape == (1, 5, V) and int(state["pos"]) == 13
    assert model.flops_per_token(64) > 6 * sum(p.numel() for p in model.blocks.parameters())


def test_bad_attention_config_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.window=0 must be >= 1"):
        small("titans_mag", window=0)
    with pytest.raises(ConfigError, match="n_persistent=-1"):
        small("titans_mac", n_persistent=-1)
