"""generate() of the Hugging Face wrapper, with the nestlearn state as its cache."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from nestlearn.hf import NestlearnCache, to_hf
from nestlearn.models.registry import available_models
from nestlearn.models.sampling import generate
from tests.hf.tiny import VOCAB, tiny_model


@pytest.mark.parametrize("name", available_models())
def test_greedy_generate_equals_nestlearn_generate(name):
    model = tiny_model(name)
    hf = to_hf(model)
    prompt = torch.randint(0, VOCAB, (2, 6))
    out = hf.generate(prompt, max_new_tokens=5, do_sample=False)
    ours = torch.stack(list(generate(model, prompt, 5, temperature=0)), dim=1)
    assert torch.equal(out[:, :6], prompt)
    assert out[:, 6:].tolist() == ours.tolist()


@pytest.mark.parametrize("name", ["transformer", "gated_deltanet"])
def test_beam_search_with_the_state_cache_equals_no_cache(name):
    # Beams reorder the state's batch rows; without a cache every step re-reads the prefix.
    # Those are other computations: in float64 no near-tie of beam scores can flip a choice.
    hf = to_hf(tiny_model(name).double())
    prompt = torch.randint(0, VOCAB, (2, 5))
    cached = hf.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    uncached = hf.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["transformer", "titans_lmm"])
def test_forward_continues_from_the_returned_cache(name):
    model = tiny_model(name).double()
    hf = to_hf(model)
    tokens = torch.randint(0, VOCAB, (2, 11))
    first = hf(tokens[:, :6], use_cache=True)
    assert isinstance(first.cache, NestlearnCache)
    assert first.cache.get_seq_length() == 6
    second = hf(tokens[:, 6:], cache=first.cache)
    assert second.cache.get_seq_length() == 11
    full, _ = model(tokens)
    joined = torch.cat([first.logits, second.logits], dim=1)
    torch.testing.assert_close(joined, full, rtol=1e-9, atol=1e-9)
