"""Label scoring: prompts read once and branched equal scoring each class from scratch (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.config import load_config
from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.experiments.label_scoring import PROMPT_SUFFIX, LabelScorer
from nestlearn.models.registry import build_model

MODELS = ["transformer", "gated_deltanet", "titans_lmm"]
TEXTS = ["a short one", "a much longer text that has to be cut to fit the prompt window", "é"]
LABELS = ["x", "two words", "asyncio"]


def tiny(name: str, n_layers: int = 2):
    model = {"name": name, "vocab_size": 257, "d_model": 16, "n_layers": n_layers, "n_heads": 2}
    if name != "transformer":
        model["chunk_size"] = 4
    torch.manual_seed(0)
    return build_model(load_config(None, {"model": model}).model).double().eval()


def direct_logprob(model, ids: list[int], start: int) -> float:
    """log p(ids[start:] | ids[:start]) from one plain forward over the whole sequence."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logp = F.log_softmax(model(tokens[:, :-1])[0].double(), dim=-1)[0]
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


@pytest.mark.parametrize("name", MODELS)
def test_branched_scores_equal_direct_scores(name):
    model = tiny(name, n_layers=1)
    scorer = LabelScorer(model, ByteTokenizer(), prompt_len=23)
    scores = scorer.scores(TEXTS, LABELS)
    assert scores.shape == (3, 3) and scores.dtype == torch.float64
    for b, text in enumerate(TEXTS):
        prompt = scorer.prompt_ids(text)
        for k, label in enumerate(LABELS):
            expected = direct_logprob(model, prompt + scorer.class_ids(label), len(prompt))
            assert float(scores[b, k]) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_prompts_have_one_length_eos_padding_and_the_suffix():
    tok = ByteTokenizer()
    scorer = LabelScorer(tiny("gated_deltanet"), tok, prompt_len=20)
    short, long = scorer.prompt_ids("hi"), scorer.prompt_ids("y" * 100)
    suffix = tok.encode(PROMPT_SUFFIX)
    assert len(short) == len(long) == 20
    assert short == [tok.eos_id] * (20 - 2 - len(suffix)) + tok.encode("hi") + suffix
    # A long text keeps its beginning and one eos in front.
    assert long == [tok.eos_id, *tok.encode("y" * (19 - len(suffix))), *suffix]
    assert scorer.class_ids("two words") == tok.encode(" two words\n")
    with pytest.raises(ValueError, match="leaves no room for text"):
        LabelScorer(scorer.model, tok, prompt_len=len(suffix) + 1)


def test_loss_is_the_mean_nll_of_the_true_class_tokens():
    model = tiny("gated_deltanet", n_layers=1)
    scorer = LabelScorer(model, ByteTokenizer(), prompt_len=17)
    labels = ["x", "two words", "asyncio"]
    loss = scorer.loss(TEXTS, labels)
    nll = -sum(float(scorer.scores([t], [c])[0, 0]) for t, c in zip(TEXTS, labels, strict=True))
    n_tokens = sum(len(scorer.class_ids(c)) for c in labels)
    assert loss.item() == pytest.approx(nll / n_tokens, rel=1e-9)
    loss.backward()
    assert model.embed.weight.grad is not None


def test_fine_tuning_learns_to_classify():
    model = tiny("transformer", n_layers=1).float().train()
    scorer = LabelScorer(model, ByteTokenizer(), prompt_len=16)
    texts, labels = ["red apple", "blue sea", "red fire", "blue sky"], ["red", "blue"]
    truth = [0, 1, 0, 1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(36):
        loss = scorer.loss(texts, [labels[t] for t in truth])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert scorer.predict(texts, labels, batch_size=3) == truth
    assert model.training  # predict restores the mode it found
