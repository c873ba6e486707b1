"""sample_next and generate."""

from __future__ import annotations

import pytest
import torch

from nestlearn.models import TransformerConfig, build_model
from nestlearn.models.sampling import generate, sample_next

VOCAB = 23


def tiny(max_seq_len: int = 16):
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=max_seq_len, init_std=0.5
    )
    return build_model(cfg)


def test_greedy_is_argmax():
    logits = torch.randn(5, 40)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_one_and_tiny_top_p_are_greedy(temperature):
    logits = torch.randn(64, 40)
    gen = torch.Generator().manual_seed(0)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature, top_k=1, generator=gen), greedy)
    assert torch.equal(sample_next(logits, temperature, top_p=1e-6, generator=gen), greedy)


def test_fixed_generator_is_reproducible():
    logits = torch.randn(8, 40)
    draws = [
        sample_next(logits, 1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])


def test_samples_stay_in_the_top_k():
    logits = torch.randn(3, 50)
    allowed = logits.topk(5, dim=-1).indices  # [3, 5]
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits.repeat(1000, 1), 2.0, top_k=5, generator=gen).view(1000, 3)
    for row in range(3):
        assert set(draws[:, row].tolist()) <= set(allowed[row].tolist())
    # With a high temperature every one of the 5 shows up in 1000 draws.
    assert len(set(draws[:, 0].tolist())) == 5


@pytest.mark.parametrize(("top_p", "kept"), [(0.4, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2})])
def test_nucleus_keeps_the_smallest_set_reaching_top_p(top_p, kept):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_p=top_p, generator=gen).tolist()) == kept


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_sampling_arguments(kwargs):
    with pytest.raises(ValueError):
        sample_next(torch.randn(1, 5), **kwargs)


def test_greedy_generate_matches_forward_without_cache():
    model = tiny()
    prompt = [3, 1, 4, 1, 5]
    got = [t.item() for t in generate(model, prompt, max_new_tokens=6, temperature=0.0)]
    assert len(got) == 6
    seq = list(prompt)
    for _ in range(6):
        logits, _ = model(torch.tensor([seq]))
        seq.append(logits[0, -1].argmax().item())
    assert got == seq[len(prompt) :]


def test_generate_streams_a_batch():
    model = tiny()
    prompt = torch.randint(0, VOCAB, (3, 4))
    gen = torch.Generator().manual_seed(0)
    tokens = list(generate(model, prompt, 5, temperature=1.0, top_k=5, generator=gen))
    assert len(tokens) == 5 and all(t.shape == (3,) and t.dtype == torch.long for t in tokens)


def test_generate_stops_at_max_seq_len_without_error():
    model = tiny(max_seq_len=8)
    # Each token is predicted from <= 8 tokens of context: 8 - 5 + 1 tokens fit.
    tokens = list(generate(model, [1, 2, 3, 4, 5], max_new_tokens=100, temperature=0.0))
    assert len(tokens) == 4
    assert len(list(generate(model, list(range(8)), max_new_tokens=100))) == 1


def test_generate_stops_at_eos():
    model = tiny()
    first = next(generate(model, [1, 2], max_new_tokens=1, temperature=0.0)).item()
    tokens = list(generate(model, [1, 2], max_new_tokens=10, temperature=0.0, eos_id=first))
    assert [t.item() for t in tokens] == [first]


def test_generate_does_not_leak_inference_mode():
    model = tiny()
    stream = generate(model, [1, 2], max_new_tokens=3)
    next(stream)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    stream.close()


def test_vocab_limit_never_samples_ids_the_tokenizer_lacks():
    model = tiny()
    with torch.no_grad():  # large logits for ids >= 7 (tied head: their embeddings grow too)
        model.head.weight[7:] *= 50.0
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, VOCAB, (4, 3))
    tokens = torch.stack(list(generate(model, prompt, 20, generator=gen, vocab_limit=7)))
    assert int(tokens.max()) < 7
    with pytest.raises(ValueError, match="vocab_limit"):
        list(generate(model, [1, 2], 3, vocab_limit=0))
