"""NestlearnForCausalLM: every nestlearn model behind transformers' interfaces.

Logits and loss equal the nestlearn model's and save_pretrained/from_pretrained round-trips
exactly (generate() is in test_generate.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from nestlearn.errors import CheckpointError, ConfigError, DataError
from nestlearn.hf import (
    NestlearnCache,
    NestlearnConfig,
    NestlearnForCausalLM,
    causal_lm_loss,
    from_hf,
    to_hf,
)
from nestlearn.models.registry import available_models
from tests.hf.tiny import VOCAB, tiny_model


@pytest.mark.parametrize("name", available_models())
def test_logits_and_loss_equal_the_nestlearn_model(name):
    model = tiny_model(name).double()
    hf = to_hf(model)
    tokens = torch.randint(0, VOCAB, (2, 9))
    labels = tokens.clone()
    labels[0, 3] = -100
    out = hf(tokens, labels=labels)
    logits, _ = model(tokens)
    assert torch.equal(out.logits, logits)
    assert out.past_key_values is None
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    # transformers' own causal-LM loss (float32) agrees.
    hf_loss = ForCausalLMLoss(logits, labels, VOCAB)
    torch.testing.assert_close(out.loss.float(), hf_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", available_models())
def test_save_pretrained_from_pretrained_round_trip(name, tmp_path):
    model = tiny_model(name)
    to_hf(model).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    stored = load_file(tmp_path / "model.safetensors")
    if model.config.tie_embeddings:
        # The tied head is stored once and re-tied on load.
        assert "model.embed.weight" in stored and "model.head.weight" not in stored
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, NestlearnForCausalLM)
    inner = from_hf(loaded)
    assert inner.config == model.config
    if model.config.tie_embeddings:
        assert inner.head.weight is inner.embed.weight
    for (key, a), (_, b) in zip(
        model.state_dict().items(), inner.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key
    # Non-persistent buffers (RoPE tables, ...) are not in the file but are restored.
    for (key, a), (_, b) in zip(model.named_buffers(), inner.named_buffers(), strict=True):
        assert torch.equal(a, b), key
    tokens = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(loaded(tokens).logits, model(tokens)[0])


def test_untied_head_is_stored_and_loaded(tmp_path):
    model = tiny_model("transformer", tie_embeddings=False)
    to_hf(model).save_pretrained(tmp_path)
    assert "model.head.weight" in load_file(tmp_path / "model.safetensors")
    inner = from_hf(AutoModelForCausalLM.from_pretrained(tmp_path))
    assert inner.head.weight is not inner.embed.weight
    assert torch.equal(inner.head.weight, model.head.weight)


def test_cache_reorder_keeps_the_chosen_rows():
    model = tiny_model("gla")
    state = model.init_state(3)
    state = {k: v if v.ndim == 0 else torch.randn_like(v) for k, v in state.items()}
    cache = NestlearnCache(dict(state))
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    for key, value in state.items():
        expected = value if value.ndim == 0 else value[[2, 2, 0]]
        assert torch.equal(cache.state[key], expected), key


def test_loss_with_num_items_in_batch_is_the_sum_over_that_count():
    logits = torch.randn(2, 6, VOCAB, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (2, 6))
    mean = causal_lm_loss(logits, labels)
    torch.testing.assert_close(causal_lm_loss(logits, labels, num_items_in_batch=20), mean / 2)
    with pytest.raises(ValueError, match="labels must be"):
        causal_lm_loss(logits, labels[:, :-1])


def test_bad_inputs_are_named():
    hf = to_hf(tiny_model("gla"))
    tokens = torch.randint(0, VOCAB, (2, 5))
    mask = torch.ones_like(tokens)
    mask[0, 2] = 0
    with pytest.raises(DataError, match="hole"):
        hf(tokens, attention_mask=mask)
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf(tokens, inputs_embeds=torch.zeros(2, 5, 16))
    with pytest.raises(ValueError, match="input_ids is required"):
        hf()


def test_config_round_trip_and_auto_config(tmp_path):
    cfg = tiny_model("titans_lmm", memory_depth=1).config
    hf_cfg = NestlearnConfig.from_model_config(cfg)
    assert (hf_cfg.vocab_size, hf_cfg.hidden_size, hf_cfg.num_hidden_layers) == (VOCAB, 16, 2)
    hf_cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, NestlearnConfig)
    assert loaded.to_model_config() == cfg
    with pytest.raises(ConfigError, match="no_such_field"):
        NestlearnConfig(nestlearn={"name": "gla", "no_such_field": 1}).to_model_config()


@pytest.mark.parametrize("change", ["drop", "rename"])
def test_from_pretrained_refuses_missing_or_unexpected_weights(change, tmp_path):
    to_hf(tiny_model("gla")).save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    weight = stored.pop("model.norm.weight")
    if change == "rename":
        stored["model.norm.gain"] = weight
    save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.norm\.(weight|gain)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_from_hf_refuses_other_models():
    with pytest.raises(ValueError, match="NestlearnForCausalLM"):
        from_hf(torch.nn.Linear(2, 2))
