"""The interface transformers 5's own causal LMs follow: cache naming without deprecation
warnings, hidden states, resize_token_embeddings, assisted decoding."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from nestlearn.hf import NestlearnCache, from_hf, to_hf
from tests.hf.tiny import VOCAB, tiny_model


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """transformers' own warnings (its logger, not the warnings module), each shown anew."""
    hf_logging.warning_once.cache_clear()
    records = Records()
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(records)
    yield records.messages
    logger.removeHandler(records)


@pytest.mark.parametrize("name", ["transformer", "gated_deltanet"])
def test_plain_forward_and_generate_warn_nothing(name, transformers_log):
    hf = to_hf(tiny_model(name))
    tokens = torch.randint(0, VOCAB, (2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = hf(tokens, labels=tokens)
        cached = hf(tokens, use_cache=True)
        hf(tokens[:, -1:], cache=cached.cache)
        hf.generate(tokens, max_new_tokens=3, do_sample=False)
        hf.generate(tokens, max_new_tokens=3, do_sample=True, top_k=5)
    assert out.loss is not None and out.cache is None
    assert not [m for m in transformers_log if "deprecated" in m], transformers_log


def test_past_key_values_is_the_cache_s_old_name():
    hf = to_hf(tiny_model("gla").double())
    tokens = torch.randint(0, VOCAB, (1, 7))
    first = hf(tokens[:, :4], use_cache=True)
    with pytest.warns(FutureWarning, match="use `cache`"):
        second = hf(tokens[:, 4:], past_key_values=first.cache)
    torch.testing.assert_close(second.logits, hf(tokens).logits[:, 4:], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="once"):
        hf(tokens, cache=NestlearnCache(), past_key_values=NestlearnCache())


@pytest.mark.parametrize("name", ["transformer", "titans_mac", "hope"])
def test_hidden_states_per_block(name):
    model = tiny_model(name).double()
    hf = to_hf(model)
    tokens = torch.randint(0, VOCAB, (2, 6))
    out = hf(tokens, output_hidden_states=True)
    n = model.config.n_layers
    assert len(out.hidden_states) == n + 1
    assert all(h.shape == (2, 6, 16) for h in out.hidden_states)
    # The first is the residual stream entering block 1, the last what the head reads.
    torch.testing.assert_close(out.hidden_states[0], model.embed(tokens), rtol=0, atol=0)
    torch.testing.assert_close(model.head(out.hidden_states[-1]), out.logits, rtol=0, atol=0)
    assert hf(tokens).hidden_states is None
    # Each block's output is the next block's input: block 1 from hidden state 0 gives state 1.
    if name == "transformer":
        x = model.blocks[0](out.hidden_states[0], model.rope_cos, model.rope_sin, None, 0, None)
        torch.testing.assert_close(x, out.hidden_states[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["transformer", "gla"])
def test_hidden_states_of_a_left_padded_row_are_those_of_the_row_alone(name):
    hf = to_hf(tiny_model(name).double())
    tokens = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    padded = hf(tokens, attention_mask=mask, output_hidden_states=True).hidden_states
    alone = hf(tokens[:1, 2:], output_hidden_states=True).hidden_states
    full = hf(tokens[1:], output_hidden_states=True).hidden_states
    for p, a, f in zip(padded, alone, full, strict=True):
        torch.testing.assert_close(p[0, 2:], a[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(p[1], f[0], rtol=1e-9, atol=1e-9)


def test_output_attentions_is_refused_by_name():
    with pytest.raises(ValueError, match="output_attentions"):
        to_hf(tiny_model("gla"))(torch.zeros(1, 2, dtype=torch.long), output_attentions=True)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings(tied, tmp_path):
    model = tiny_model("transformer", tie_embeddings=tied).double()
    hf = to_hf(model)
    tokens = torch.randint(0, VOCAB, (2, 5))
    before = hf(tokens).logits
    hf.resize_token_embeddings(VOCAB + 5, mean_resizing=False)
    inner = from_hf(hf)
    assert inner.embed.weight.shape == (VOCAB + 5, 16)
    assert inner.head.weight.shape == (VOCAB + 5, 16)
    assert (inner.head.weight is inner.embed.weight) == tied
    assert inner.config.vocab_size == hf.config.vocab_size == VOCAB + 5
    after = hf(tokens).logits
    # A wider head matmul (other blocking): equal to float64 rounding.
    torch.testing.assert_close(after[..., :VOCAB], before, rtol=1e-12, atol=1e-12)
    new_tokens = torch.full((1, 3), VOCAB + 4)
    assert hf(new_tokens).logits.shape == (1, 3, VOCAB + 5)  # the new ids are accepted
    hf.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(tokens).logits, after, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["transformer", "titans_lmm", "hope"])
def test_assisted_decoding_equals_greedy(name, monkeypatch):
    # Prompt lookup drafts tokens from the prompt; the model rejects most of them, so the cache
    # is rolled back (NestlearnCache.crop) and the result must still equal plain greedy search.
    hf = to_hf(tiny_model(name).double())
    prompt = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 1, 2]])
    removed = []
    crop = NestlearnCache.crop
    monkeypatch.setattr(NestlearnCache, "crop", lambda self, n: (removed.append(-n), crop(self, n)))
    greedy = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assisted = hf.generate(prompt, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, greedy)
    assert any(n > 0 for n in removed)  # drafts were rejected and rolled back
    helper = to_hf(tiny_model(name, n_layers=1).double())
    drafted = hf.generate(prompt, max_new_tokens=10, do_sample=False, assistant_model=helper)
    assert torch.equal(drafted, greedy)
