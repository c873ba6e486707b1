"""Every memory-mixer model: decode == forward, chunk == reference, overfits, levels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.config import load_config
from nestlearn.models.registry import build_model

MEMORY_MODELS = ["linear_attention", "gla", "deltanet", "gated_deltanet", "titans_lmm"]


def small(name: str, **fields):
    overrides = {
        "name": name,
        "vocab_size": 37,
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "chunk_size": 4,
        **fields,
    }
    seq_len = min(256, overrides.get("max_seq_len", 1024))
    cfg = load_config(None, {"model": overrides, "train": {"seq_len": seq_len}})
    torch.manual_seed(0)
    return build_model(cfg.model)


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_decoding_token_by_token_equals_the_full_forward(name):
    model = small(name).double().eval()
    tokens = torch.randint(0, 37, (2, 11))
    full, _ = model(tokens)
    state = model.init_state(2)
    # A prefix of 6 (not a multiple of the chunk), then one token at a time.
    logits, state = model(tokens[:, :6], state)
    outputs = [logits]
    for t in range(6, 11):
        logits, state = model(tokens[:, t : t + 1], state)
        outputs.append(logits)
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-9, atol=1e-9)
    assert int(state["pos"]) == 11


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_chunk_mode_equals_reference_mode_with_gradients(name):
    chunk = small(name).double()
    reference = small(name, mode="reference").double()
    reference.load_state_dict(chunk.state_dict())
    tokens = torch.randint(0, 37, (2, 10))
    losses = []
    for model in (chunk, reference):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 37), tokens[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-10)
    for (pname, p), q in zip(chunk.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=pname)


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_overfits_one_batch(name):
    model = small(name, d_model=32)
    tokens = torch.randint(0, 37, (2, 17))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 37), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_levels_report_the_memory(name):
    levels = small(name).levels()
    assert levels[0].component == "blocks.0.mixer"
    expected = 4 if name == "titans_lmm" else 1
    assert levels[0].update_every == expected
    assert levels[-1].update_every is None


def test_a_state_from_another_model_is_refused():
    model = small("deltanet")
    other = small("deltanet", n_layers=1).init_state(1)
    with pytest.raises(ValueError, match="block 1"):
        model(torch.randint(0, 37, (1, 3)), other)


def test_recurrent_models_stream_past_max_seq_len():
    model = small("gated_deltanet", max_seq_len=8).eval()
    state = model.init_state(1)
    with torch.no_grad():
        _, state = model(torch.randint(0, 37, (1, 8)), state)
        logits, state = model(torch.randint(0, 37, (1, 5)), state)
    assert logits.shape == (1, 5, 37) and int(state["pos"]) == 13


def test_titans_step_options_reach_the_layer_and_bad_values_are_named():
    """``model.memory_step_scale`` / ``memory_ema_momentum`` (docs/titans-stability.md)."""
    from nestlearn.errors import ConfigError

    mixer = small("titans_lmm", memory_step_scale="token", memory_ema_momentum=False)
    mixer = mixer.blocks[0].mixer
    assert (mixer.step_scale, mixer.ema_momentum) == ("token", False)
    assert small("titans_lmm").blocks[0].mixer.step_scale == "chunk"
    with pytest.raises(ConfigError, match=r"memory_step_scale='tokens'.*\['chunk', 'token'\]"):
        small("titans_lmm", memory_step_scale="tokens")
