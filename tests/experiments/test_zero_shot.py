"""The lm-eval adapter's maths without lm_eval: log-likelihoods, rolling scores, generation."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.config import load_config
from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.errors import MissingDependencyError, SequenceTooLongError
from nestlearn.experiments import run_experiment
from nestlearn.experiments.lm_scorer import LMScorer, request_args
from nestlearn.experiments.zero_shot import headline_metric
from nestlearn.models.registry import build_model

TOK = ByteTokenizer()


class ConstantLM(nn.Module):
    """Always puts most mass on byte 'a' (logit 5, all others 0)."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__()
        self.context_limit = limit
        self.anchor = nn.Parameter(torch.zeros(()))

    def init_state(self, batch_size, device=None):
        return {"pos": torch.zeros((), dtype=torch.long)}

    def forward(self, tokens, state=None):
        logits = torch.zeros(*tokens.shape, 257, dtype=torch.float64)
        logits[..., ord("a")] = 5.0
        new = None if state is None else {"pos": state["pos"] + tokens.shape[1]}
        return logits, new


def tiny(name: str, **fields):
    model = {"name": name, "vocab_size": 257, "d_model": 16, "n_layers": 1, "n_heads": 2, **fields}
    torch.manual_seed(0)
    cfg = load_config(None, {"model": model, "train": {"seq_len": 1}})
    return build_model(cfg.model).double().eval()


def direct(model, ids: list[int], n_scored: int) -> float:
    """log p of the last ``n_scored`` of ``ids`` from one forward over all of them."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = F.log_softmax(model(x[:, :-1])[0][0].double(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n_scored, len(ids)))


@pytest.mark.parametrize("name", ["transformer", "gated_deltanet", "titans_lmm"])
def test_loglikelihood_equals_a_direct_computation(name):
    model = tiny(name)
    scorer = LMScorer(model, TOK, batch_size=2)
    requests = [("The sky is ", "blue"), ("", "x"), ("One, two,", " three"), ("a", "bcdef")]
    results = scorer.loglikelihood([SimpleNamespace(args=r) for r in requests])
    eos = TOK.eos_id
    expected = [
        # The context's trailing space moves to the continuation.
        direct(model, [eos, *TOK.encode("The sky is blue")], len(" blue")),
        direct(model, [eos, *TOK.encode("x")], 1),
        direct(model, [eos, *TOK.encode("One, two, three")], len(" three")),
        direct(model, [eos, *TOK.encode("abcdef")], 5),
    ]
    for (logp, _), want in zip(results, expected, strict=True):
        assert logp == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_is_greedy_and_known_values_of_a_constant_model():
    scorer = LMScorer(ConstantLM(), TOK)
    (aa, greedy_a), (ab, greedy_b) = scorer.loglikelihood([("x", "aa"), ("x", "ab")])
    log_pa = 5.0 - torch.logsumexp(torch.tensor([5.0] + [0.0] * 256, dtype=torch.float64), 0)
    log_pother = log_pa - 5.0
    assert aa == pytest.approx(2 * float(log_pa))
    assert ab == pytest.approx(float(log_pa + log_pother))
    assert (greedy_a, greedy_b) == (True, False)


def test_attention_models_keep_the_last_tokens_of_a_long_context():
    model = tiny("transformer", max_seq_len=8)
    scorer = LMScorer(model, TOK)
    [(logp, _)] = scorer.loglikelihood([("a long context here", "xyz")])
    ids = [TOK.eos_id, *TOK.encode("a long context herexyz")]
    assert logp == pytest.approx(direct(model, ids[-9:], 3), rel=1e-9)
    with pytest.raises(SequenceTooLongError, match="continuation of 9 tokens exceeds"):
        scorer.loglikelihood([("x", "123456789")])


def test_rolling_recurrent_streams_in_windows_with_its_state():
    model = tiny("gated_deltanet")
    text = "streamed through the memory in windows"
    whole = LMScorer(model, TOK).loglikelihood_rolling([(text,)])
    windowed = LMScorer(model, TOK, window=7).loglikelihood_rolling([(text,)])
    expected = direct(model, [TOK.eos_id, *TOK.encode(text)], len(text))
    assert whole[0] == pytest.approx(expected, rel=1e-9)
    assert windowed[0] == pytest.approx(expected, rel=1e-9)


def test_rolling_attention_scores_each_token_once_with_full_windows():
    model = tiny("transformer", max_seq_len=6)
    text = "abcdefghijklm"  # 13 tokens: windows predict 0-5, 6-11, then 12 from a full window
    [score] = LMScorer(model, TOK).loglikelihood_rolling([SimpleNamespace(args=(text,))])
    full = [TOK.eos_id, *TOK.encode(text)]
    expected = direct(model, full[0:7], 6) + direct(model, full[6:13], 6)
    expected += direct(model, full[7:14], 1)
    assert score == pytest.approx(expected, rel=1e-9)


def test_generate_until_stops_at_the_first_stop_string():
    scorer = LMScorer(ConstantLM(), TOK, max_gen_toks=5)
    out = scorer.generate_until(
        [("q", {"until": ["\n"]}), ("q", {"until": "aaa"}), ("q", {"max_gen_toks": 2})]
    )
    assert out == ["aaaaa", "", "aa"]
    limited = LMScorer(ConstantLM(limit=4), TOK).generate_until([("long prompt", {})])
    assert limited == ["aaaa"]  # 1 prompt token kept; the 4th new one is read from 4 tokens


def test_request_args_accepts_instances_and_tuples():
    assert request_args(SimpleNamespace(args=("a", "b"))) == ("a", "b")
    assert request_args(("a",)) == ("a",)
    assert request_args(SimpleNamespace(args="text")) == ("text",)


def test_headline_metric_follows_the_paper():
    assert headline_metric("hellaswag", {"acc": 0.3, "acc_norm": 0.4}) == "acc_norm"
    assert headline_metric("piqa", {"acc": 0.6, "acc_norm": 0.7}) == "acc"
    assert headline_metric("my_task", {"acc": 0.5}) == "acc"
    assert headline_metric("lambada_openai", {"perplexity": 9.0}) is None


def test_without_lm_eval_the_message_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails
    with pytest.raises(MissingDependencyError, match=r"nestlearn\[lmeval\]"):
        run_experiment("zero_shot", ["--tasks=piqa", f"--out={tmp_path}"])
