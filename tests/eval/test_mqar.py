"""MQAR: the Zoology layout, and accuracy with known answers (oracle 100%, guessing chance)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.errors import NonFiniteLossError
from nestlearn.eval.mqar import chance_accuracy, check_mqar, mqar_accuracy, mqar_batch
from nestlearn.eval.synthetic import IGNORE, small_model, train_synthetic
from tests.eval.models import FirstOccurrenceRecall, RandomGuess, Uniform


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(0, 10), st.integers(0, 40), st.integers(1, 3))
def test_layout_follows_the_protocol(n_pairs, extra_len, extra_vocab, n):
    seq_len = 4 * n_pairs + 2 * extra_len
    vocab = 2 * n_pairs + 2 + extra_vocab
    g = torch.Generator().manual_seed(extra_len * 100 + extra_vocab)
    inputs, targets = mqar_batch(n, seq_len, n_pairs, vocab, g)
    assert inputs.shape == targets.shape == (n, seq_len)
    assert inputs.min() >= 0 and inputs.max() < vocab
    half = vocab // 2
    for row, target in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = row[0 : 2 * n_pairs : 2], row[1 : 2 * n_pairs : 2]
        assert len(set(keys)) == n_pairs and all(1 <= k < half for k in keys)
        assert len(set(values)) == n_pairs and all(half <= v < vocab for v in values)
        pairs = dict(zip(keys, values, strict=True))
        queries = [t for t, y in enumerate(target) if y != IGNORE]
        # Every key is asked exactly once, after the pairs, at an even offset from them.
        assert sorted(row[t] for t in queries) == sorted(keys)
        assert all(t >= 2 * n_pairs and (t - 2 * n_pairs) % 2 == 0 for t in queries)
        assert all(target[t] == pairs[row[t]] for t in queries)


def test_query_gaps_favour_short_distances():
    _, targets = mqar_batch(2000, 64, 2, 64, torch.Generator().manual_seed(0))
    offsets = ((targets != IGNORE).nonzero()[:, 1] - 4) // 2  # gap g in 0 .. 29
    counts = torch.bincount(offsets, minlength=30).float()
    # p(g) ∝ (g+1)^(-0.99): the first gap is far likelier than the last.
    assert counts[0] > 5 * counts[-1]


def test_an_oracle_that_stores_the_pairs_scores_100_percent():
    batches = [mqar_batch(16, 64, 8, 64, torch.Generator().manual_seed(s)) for s in range(3)]
    result = mqar_accuracy(FirstOccurrenceRecall(64), batches)
    assert result["accuracy"] == 1.0 and result["queries"] == 3 * 16 * 8


def test_uniform_models_score_chance():
    batches = [mqar_batch(64, 32, 4, 64, torch.Generator().manual_seed(s)) for s in range(8)]
    uniform = mqar_accuracy(Uniform(64), batches)
    assert uniform["loss"] == pytest.approx(math.log(64))
    guess = mqar_accuracy(RandomGuess(64), batches)
    n, p = guess["queries"], chance_accuracy(64)
    # Within 4 binomial standard deviations of 1/V (2048 queries).
    assert abs(guess["accuracy"] - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_training_learns_recall_beyond_chance():
    torch.manual_seed(0)
    model = small_model("transformer", vocab_size=16, max_seq_len=16, d_model=32, n_heads=2)
    g = torch.Generator().manual_seed(0)
    losses = train_synthetic(
        model, lambda step: mqar_batch(16, 8, 2, 16, g), steps=80, lr=1e-2, progress=False
    )
    assert losses[-1] < losses[0]
    test = [mqar_batch(256, 8, 2, 16, torch.Generator().manual_seed(1))]
    assert mqar_accuracy(model, test)["accuracy"] > 0.3  # chance is 1/16 (about 0.6 here)


@pytest.mark.parametrize(
    ("seq_len", "n_pairs", "vocab", "fragment"),
    [
        (30, 8, 64, "seq_len=30 must be even and >= 4 \\* n_pairs = 32"),
        (33, 4, 64, "must be even"),
        (64, 8, 16, "use vocab_size >= 18"),
        (64, 0, 64, "n_pairs=0"),
    ],
)
def test_bad_settings_name_the_fix(seq_len, n_pairs, vocab, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_mqar(seq_len, n_pairs, vocab)


def test_a_non_finite_loss_names_the_step():
    model = small_model("transformer", vocab_size=16, max_seq_len=16, d_model=16)
    with torch.no_grad():
        model.embed.weight[3] = float("nan")
    g = torch.Generator().manual_seed(0)
    inputs, targets = mqar_batch(4, 8, 2, 16, g)
    inputs[:, 0] = 3  # every row reads the poisoned embedding
    with pytest.raises(NonFiniteLossError, match="mqar: the loss became non-finite at step 0"):
        train_synthetic(model, lambda s: (inputs, targets), steps=2, desc="mqar", progress=False)


@pytest.mark.parametrize("name", ["hope", "hope_attention", "titans_lmm"])
def test_small_models_update_every_memory_within_a_32_token_sequence(name):
    # SPEC's chunk sizes (64; CMS [64, 16]) never reach a chunk boundary in a 32-token MQAR
    # sequence: every inner gradient would be taken at the sequence's start weights.
    config = small_model(name, vocab_size=32, max_seq_len=32).config
    chunks = [getattr(config, f) for f in ("chunk_size", "other_chunk_size") if hasattr(config, f)]
    chunks += list(getattr(config, "cms_chunk_sizes", []))
    assert chunks and max(chunks) <= 16
    # --set still wins over the small defaults.
    field, value = ("chunk_size", 8) if name == "titans_lmm" else ("cms_chunk_sizes", [32, 4])
    given = small_model(name, vocab_size=32, max_seq_len=32, overrides={field: value}).config
    assert getattr(given, field) == value
