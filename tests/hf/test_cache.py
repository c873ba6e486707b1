"""NestlearnCache: a transformers Cache holding a nestlearn state (batch rows, rollback)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers.cache_utils import Cache, DynamicCache

from nestlearn.hf import NestlearnCache, to_hf
from tests.hf.tiny import VOCAB, tiny_model

# A KV cache, a recurrent memory with chunk counters, and HOPE's CMS levels.
ROLLBACK_MODELS = ["transformer", "titans_lmm", "hope"]


def random_state(name: str, batch: int) -> dict:
    state = tiny_model(name).init_state(batch)
    return {k: v if v.ndim == 0 else torch.randn_like(v) for k, v in state.items()}


def test_is_a_transformers_cache_and_counts_tokens():
    hf = to_hf(tiny_model("gla"))
    out = hf(torch.randint(0, VOCAB, (2, 5)), use_cache=True)
    cache = out.cache
    assert isinstance(cache, Cache) and isinstance(cache, NestlearnCache)
    assert cache.get_seq_length() == 5 and cache.batch_size == 2
    same = hf(torch.randint(0, VOCAB, (2, 3)), cache=cache).cache
    assert same is cache and cache.get_seq_length() == 8  # updated in place, as in transformers
    assert NestlearnCache().get_seq_length() == 0


@pytest.mark.parametrize(
    ("method", "arg", "rows"),
    [
        ("reorder_cache", torch.tensor([2, 2, 0]), [2, 2, 0]),
        ("batch_select_indices", torch.tensor([1, 2]), [1, 2]),
        ("batch_repeat_interleave", 2, [0, 0, 1, 1, 2, 2]),
    ],
)
def test_batch_row_operations(method, arg, rows):
    state = random_state("gla", 3)
    cache = NestlearnCache(dict(state))
    getattr(cache, method)(arg)
    for key, value in state.items():
        expected = value if value.ndim == 0 else value[rows]
        assert torch.equal(cache.state[key], expected), key


@pytest.mark.parametrize("name", ROLLBACK_MODELS)
def test_crop_then_continue_equals_never_reading_the_dropped_tokens(name):
    hf = to_hf(tiny_model(name).double())
    tokens = torch.randint(0, VOCAB, (2, 12))
    cache = NestlearnCache()
    cache.activate_past_recording()
    hf(tokens[:, :5], cache=cache)
    hf(tokens[:, 5:7], cache=cache)
    hf(torch.randint(0, VOCAB, (2, 3)), cache=cache)  # drafts, rejected below
    cache.crop(-4)  # the 3 drafts and tokens[:, 6]
    assert cache.get_seq_length() == 6
    cached = hf(tokens[:, 6:], cache=cache).logits
    assert cache.get_seq_length() == 12
    full = hf(tokens).logits
    torch.testing.assert_close(cached, full[:, 6:], rtol=1e-9, atol=1e-9)


def test_crop_zero_and_refusals():
    hf = to_hf(tiny_model("gla"))
    cache = NestlearnCache()
    hf(torch.randint(0, VOCAB, (1, 4)), cache=cache)
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.crop(-1)
    cache.activate_past_recording()
    hf(torch.randint(0, VOCAB, (1, 2)), cache=cache)
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(2)
    with pytest.raises(ValueError, match="recorded 2"):
        cache.crop(-3)
    cache.crop(0)  # a new rollback point: nothing before it can be removed
    with pytest.raises(ValueError, match="recorded 0"):
        cache.crop(-1)
    assert cache.get_seq_length() == 6


def test_an_empty_transformers_cache_starts_fresh_a_filled_one_is_refused():
    hf = to_hf(tiny_model("gla"))
    tokens = torch.randint(0, VOCAB, (1, 4))
    out = hf(tokens, cache=DynamicCache(), use_cache=True)
    assert isinstance(out.cache, NestlearnCache) and out.cache.get_seq_length() == 4
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="NestlearnCache"):
        hf(tokens, cache=filled)


@pytest.mark.parametrize("name", ["transformer", "gla"])
def test_generate_continues_a_prefix_cache(name):
    # transformers' prefix caching: a cache of the prompt's first tokens, handed to generate().
    hf = to_hf(tiny_model(name).double())
    prompt = torch.randint(0, VOCAB, (1, 7))
    expected = hf.generate(prompt, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        prefix = hf(prompt[:, :4], use_cache=True).cache
    got = hf.generate(prompt, cache=prefix, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    assert prefix.get_seq_length() == 7 + 4 - 1  # the last new token is not read back
