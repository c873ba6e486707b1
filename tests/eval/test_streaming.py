"""Sliding-window and streaming perplexity: every target scored once, with the right context."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestlearn.data import ByteTokenizer, eval_batches
from nestlearn.errors import NonFiniteLossError, SequenceTooLongError
from nestlearn.eval import evaluate_lm
from nestlearn.eval.streaming import (
    nll_metrics,
    sliding_nll,
    sliding_windows,
    stream_perplexity,
    streaming_nll,
)
from nestlearn.eval.synthetic import small_model
from tests.eval.models import Bigram

V = 29


def full_nll(model, tokens: torch.Tensor) -> np.ndarray:
    """The nll of every target from one forward over the whole stream."""
    logits, _ = model(tokens[None, :-1])
    nll = torch.nn.functional.cross_entropy(logits[0].double(), tokens[1:], reduction="none")
    return nll.detach().numpy()


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 200), st.integers(1, 40), st.data())
def test_windows_score_every_target_once_with_enough_context(n, window, data):
    stride = data.draw(st.integers(1, window))
    plan = sliding_windows(n, window, stride)
    width = min(window, n - 1)
    covered = []
    for k, (start, n_scored) in enumerate(plan):
        assert start >= 0 and start + width <= n - 1
        assert 1 <= n_scored <= width
        # Targets of this window are x[start+1 .. start+width]; the last n_scored are scored.
        scored = list(range(start + width - n_scored + 1, start + width + 1))
        covered += scored
        if k > 0:
            assert width - n_scored >= width - stride  # context of the first scored target
    assert covered == list(range(1, n))


def test_stride_equal_to_window_gives_independent_windows():
    assert sliding_windows(11, 5, 5) == [(0, 5), (5, 5)]
    # The tail is scored by a window moved back to end at the stream's end.
    assert sliding_windows(13, 5, 5) == [(0, 5), (5, 5), (7, 2)]
    assert sliding_windows(4, 10, 3) == [(0, 3)]


@pytest.mark.parametrize(("window", "stride"), [(1, 1), (5, 2), (7, 7), (50, 13)])
def test_a_context_free_model_scores_the_same_in_every_protocol(window, stride):
    model = Bigram(V).double()
    tokens = torch.randint(0, V, (38,))
    expected = full_nll(model, tokens)
    got = sliding_nll(model, tokens, window, stride, batch_size=3)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(streaming_nll(model, tokens, chunk=5), expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("name", "chunk"), [("gated_deltanet", 1), ("gated_deltanet", 7), ("titans_lmm", 5)]
)
def test_streaming_a_recurrent_model_equals_the_full_sequence(name, chunk):
    model = (
        small_model(
            name, vocab_size=V, max_seq_len=12, d_model=8, n_heads=2, overrides={"chunk_size": 4}
        )
        .double()
        .eval()
    )
    tokens = torch.randint(0, V, (19,))
    # max_seq_len does not bound a recurrent model: 18 targets stream past it.
    np.testing.assert_allclose(
        streaming_nll(model, tokens, chunk), full_nll(model, tokens), rtol=1e-9
    )


def test_transformer_windows_see_the_right_context():
    model = small_model("transformer", vocab_size=V, max_seq_len=32, d_model=16).double().eval()
    tokens = torch.randint(0, V, (30,))
    expected = full_nll(model, tokens)
    # A window holding the whole stream is the full forward; so is the KV-cache stream.
    np.testing.assert_allclose(sliding_nll(model, tokens, 29, 3), expected, rtol=1e-9)
    np.testing.assert_allclose(streaming_nll(model, tokens, 4), expected, rtol=1e-9)
    # Window 10, stride 3: ends at targets 10, 13, .., 19, 22, so target 20 is scored by the
    # window that reads x[12:22], where it is the 8th target.
    got = sliding_nll(model, tokens, 10, 3)
    window_nll = full_nll(model, tokens[12:23])
    assert got[19] == pytest.approx(window_nll[7], rel=1e-12)


def test_chunks_mode_matches_the_trainer_evaluation():
    model = small_model("transformer", vocab_size=257, max_seq_len=16, d_model=16).eval()
    tokens = np.random.default_rng(0).integers(0, 256, 8 * 5 + 1)
    token_bytes = ByteTokenizer().token_byte_lengths()
    batches = eval_batches(tokens, batch_size=3, seq_len=8)
    expected = evaluate_lm(model, batches, token_bytes)
    got = stream_perplexity(model, tokens, token_bytes, "chunks", window=8, batch_size=2)
    assert got["tokens"] == expected["tokens"] == 40
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert got["bpb"] == pytest.approx(expected["bpb"], rel=1e-5)


def test_bits_per_byte_counts_the_bytes_of_the_targets():
    token_bytes = np.array([1, 2, 0, 3])
    nll = np.full(4, math.log(2))  # one bit per target
    metrics = nll_metrics(nll, [0, 1, 2, 3], token_bytes)
    assert metrics["bpb"] == pytest.approx(4 / 6)
    assert metrics["ppl"] == pytest.approx(2.0)


def test_bounded_models_say_when_the_text_is_too_long():
    model = small_model("transformer", vocab_size=V, max_seq_len=8, d_model=16).eval()
    tokens = torch.randint(0, V, (20,))
    with pytest.raises(SequenceTooLongError, match="use mode 'sliding'"):
        streaming_nll(model, tokens)
    with pytest.raises(SequenceTooLongError, match="use a window <= 8"):
        sliding_nll(model, tokens, 16, 4)
    metrics = stream_perplexity(model, tokens, np.ones(V, dtype=np.int64), "sliding", window=8)
    assert metrics["tokens"] == 19


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda m: sliding_windows(1, 4, 2), "no target"),
        (lambda m: sliding_windows(10, 4, 5), "stride <= window"),
        (lambda m: streaming_nll(m, [1, 2, 3], chunk=0), "chunk=0"),
        (lambda m: stream_perplexity(m, [1, 2], np.ones(V), "stream"), "choose one of"),
    ],
)
def test_bad_arguments_are_named(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call(Bigram(V))


def test_a_non_finite_loss_names_the_first_token():
    model = Bigram(V).double()
    with torch.no_grad():
        model.table[5] = float("nan")
    tokens = torch.tensor([1, 2, 3, 5, 1, 5, 2])
    with pytest.raises(NonFiniteLossError, match="non-finite from token 4 on \\(2 of 6 targets\\)"):
        stream_perplexity(model, tokens, np.ones(V, dtype=np.int64), "streaming")
