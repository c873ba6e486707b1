"""Test-time learning: an oracle memory gives the known matrices; facts, padding and a real run."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.errors import CheckpointError, SequenceTooLongError
from nestlearn.experiments import run_experiment
from nestlearn.experiments.facts import (
    Fact,
    answer_hits,
    document_text,
    query_batch,
    sample_episode,
    training_batch,
)
from nestlearn.experiments.test_time import run_test_time

DIGITS = 2


class OracleMemory(nn.Module):
    """A recurrent "model" that stores every ``ab=42;`` it reads and answers ``ab?`` from it.

    With ``capacity`` it forgets a fact once ``capacity`` newer facts were stored. Unknown answers
    are predicted as ``0``, which never occurs in a value, so they are always wrong.
    """

    context_limit = None

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__()
        self.capacity = capacity
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def init_state(self, batch_size: int, device=None) -> dict[str, torch.Tensor]:
        return {
            "mem": torch.zeros(batch_size, 26, 26, DIGITS, dtype=torch.long),
            "stamp": torch.zeros(batch_size, 26, 26, dtype=torch.long),
            "clock": torch.zeros(batch_size, dtype=torch.long),
            "hist": torch.full((batch_size, DIGITS + 4), -1, dtype=torch.long),
        }

    def forward(self, tokens, state=None):
        state = {k: v.clone() for k, v in (state or self.init_state(len(tokens))).items()}
        mem, stamp, clock, hist = state["mem"], state["stamp"], state["clock"], state["hist"]
        logits = torch.zeros(*tokens.shape, 257)
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                hist[b] = torch.cat([hist[b, 1:], tokens[b, t : t + 1]])
                h = bytes(max(0, int(c)) for c in hist[b])
                if h[-1:] == b";" and h[-DIGITS - 2 : -DIGITS - 1] == b"=":
                    k = h[-DIGITS - 4 : -DIGITS - 2]
                    key = (k[0] - 97, k[1] - 97)
                    clock[b] += 1
                    mem[b][key] = torch.tensor(list(h[-DIGITS - 1 : -1]))
                    stamp[b][key] = clock[b]
                logits[b, t, self.predict(h, mem[b], stamp[b], int(clock[b]))] = 10.0
        return logits, state

    def predict(self, h: bytes, mem, stamp, clock: int) -> int:
        for i in range(DIGITS):  # i answer digits already read after "ab?"
            q = h[len(h) - i - 3 :]
            if q[2:3] == b"?" and q[:2].isalpha() and q[:2].islower():
                key = (q[0] - 97, q[1] - 97)
                fresh = self.capacity is None or clock - int(stamp[key]) < self.capacity
                if int(stamp[key]) > 0 and fresh:
                    return int(mem[key][i])
                return ord("0")
        return ord(" ")


def run_oracle(capacity=None, tmp_path=None, docs=4, facts=2):
    return run_test_time(
        OracleMemory(capacity),
        ByteTokenizer(),
        n_docs=docs,
        facts_per_doc=facts,
        episodes=3,
        value_digits=DIGITS,
        state_path=None if tmp_path is None else tmp_path / "state.safetensors",
    )


def tril(A) -> np.ndarray:
    A = np.array(A, dtype=float)
    return np.where(np.tril(np.ones_like(A)) > 0, A, -1.0)


def test_an_unlimited_memory_recalls_everything_when_carried(tmp_path):
    result = run_oracle(tmp_path=tmp_path)
    carry, reset = result["conditions"]["carry"], result["conditions"]["reset"]
    np.testing.assert_array_equal(tril(carry["recall_matrix"]), tril(np.ones((4, 4))))
    # Reset: only the document just read is known.
    np.testing.assert_array_equal(tril(reset["recall_matrix"]), tril(np.eye(4)))
    assert carry["final_accuracy"] == 1.0 and carry["forgetting"] == 0.0
    assert reset["final_accuracy"] == 0.25 and reset["last_document_accuracy"] == 1.0
    assert reset["final_accuracy_by_age"] == [1.0, 0.0, 0.0, 0.0]
    assert reset["backward_transfer"] == -1.0
    assert result["chance_accuracy"] == pytest.approx(1 / 81)
    assert result["state_roundtrip_exact"] is True
    assert (tmp_path / "state.safetensors").stat().st_size > 0


def test_a_memory_of_two_documents_forgets_older_ones():
    result = run_oracle(capacity=2 * 2)  # two documents of two facts
    carry = result["conditions"]["carry"]
    n, d = np.indices((4, 4))
    np.testing.assert_array_equal(tril(carry["recall_matrix"]), tril((n - d < 2).astype(float)))
    assert carry["final_accuracy_by_age"] == [1.0, 1.0, 0.0, 0.0]
    assert carry["forgetting"] == pytest.approx(2 / 3)


def test_episodes_have_distinct_keys_and_are_seeded():
    episode = sample_episode(random.Random(0), 5, 4, value_digits=3)
    facts = [f for doc in episode for f in doc]
    assert len(episode) == 5 and all(len(doc) == 4 for doc in episode)
    assert len({f.key for f in facts}) == 20
    assert all(len(f.value) == 3 and "0" not in f.value for f in facts)
    assert episode == sample_episode(random.Random(0), 5, 4, value_digits=3)
    assert document_text([Fact("ab", "42"), Fact("cd", "17")]) == "ab=42;cd=17;\n"
    with pytest.raises(ValueError, match="distinct keys"):
        sample_episode(random.Random(0), 1, 27, key_len=1)


class UnevenTokenizer(ByteTokenizer):
    """Bytes, but a query of a key starting with 'a' gets one extra token: pieces differ."""

    def encode(self, text: str) -> list[int]:
        extra = [ord("!")] if text.startswith("a") and text.endswith("?") else []
        return extra + super().encode(text)


def test_query_chains_are_left_padded_and_answers_located():
    tok = UnevenTokenizer()
    episodes = [[[Fact("ab", "12"), Fact("cd", "34")]], [[Fact("xy", "56"), Fact("zz", "78")]]]
    tokens, owner = query_batch(tok, episodes, [(0, 1), (0, 0)])
    rows = [bytes(max(0, c) if c != tok.eos_id else 35 for c in row).decode() for row in tokens]
    assert rows == ["cd?34;!ab?12;", "zz?78;#xy?56;"]
    answers = [
        "".join(chr(t) for t, o in zip(tokens[b], owner[b], strict=True) if o >= 0) for b in (0, 1)
    ]
    assert answers == ["3412", "7856"]
    # A model right on every answer token but one (row 1, query 0's second digit).
    logits = torch.zeros(*tokens.shape, 257)
    logits[:, :-1].scatter_(-1, tokens[:, 1:, None], 1.0)
    logits[1, 3, ord("1")] = 5.0
    assert answer_hits(logits, tokens, owner).tolist() == [[True, True], [False, True]]


def test_training_targets_are_exactly_the_answers():
    rng = random.Random(0)
    episodes = [sample_episode(rng, 2, 3) for _ in range(2)]
    x, y = training_batch(ByteTokenizer(), episodes, rng)
    assert x.shape == y.shape == (2, 2 * 19 + 6 * 6 - 1)
    for b, ep in enumerate(episodes):
        answers = "".join(chr(t) for t in y[b].tolist() if t != -100)
        chain = bytes(x[b, 38:].tolist()).decode() + ";"
        expected = [f.value for f in (fact for doc in ep for fact in doc)]
        assert sorted(answers[i : i + 2] for i in range(0, 12, 2)) == sorted(expected)
        assert chain.count("?") == 6 and "".join(c for c in chain if c.isdigit()) == answers


def test_end_to_end_with_a_short_training(tmp_path):
    argv = [
        "--model=gated_deltanet",
        "model.d_model=16",
        "model.n_layers=1",
        "model.n_heads=2",
        "--docs=2",
        "--facts-per-doc=2",
        "--episodes=2",
        "--train-steps=2",
        "--batch-size=2",
        f"--out={tmp_path}",
        "--no-progress",
    ]
    assert run_experiment("test_time", argv) == 0
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["experiment"] == "test_time"
    assert [row[2] for row in written["table"]["rows"]] == ["carry", "reset"]
    [record] = written["results"]
    assert (record["model"], record["seed"]) == ("gated_deltanet", 0)
    assert set(record["conditions"]) == {"carry", "reset"}
    assert np.isfinite(record["train_final_loss"])
    assert record["state_roundtrip_exact"] is True
    assert "age 1" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "forgetting.png").stat().st_size > 0
    assert (tmp_path / "states" / "gated_deltanet-seed0.safetensors").stat().st_size > 0


def test_a_transformer_that_cannot_hold_the_stream_says_so(tmp_path):
    argv = ["--model=debug", "--docs=8", "--key-len=2", "--train-steps=0", f"--out={tmp_path}"]
    with pytest.raises(SequenceTooLongError, match=r"carried document stream.*fewer --docs"):
        run_experiment("test_time", argv)
    # 3 documents of 2 facts fit for evaluation (39 + 12 tokens) but not for training (39 + 36).
    small = ["--model=debug", "--docs=3", "--facts-per-doc=2", "--key-len=2", f"--out={tmp_path}"]
    with pytest.raises(SequenceTooLongError, match=r"a training episode is 75 tokens.*at most 64"):
        run_experiment("test_time", [*small, "--train-steps=1"])
    assert run_experiment("test_time", [*small, "--train-steps=0", "--episodes=1"]) == 0


def test_more_facts_than_keys_is_refused(tmp_path):
    from nestlearn.errors import ConfigError

    argv = ["--docs=9", "--facts-per-doc=3", "--key-len=1", f"--out={tmp_path}"]
    with pytest.raises(ConfigError, match=r"27 facts need distinct keys.*--key-len 1 gives 26"):
        run_experiment("test_time", argv)


def test_the_default_fresh_models_are_small_and_overrides_replace_their_sizes():
    from nestlearn.experiments.model_comparison import build, model_specs
    from nestlearn.experiments.model_source import apply_preset
    from nestlearn.experiments.test_time import PRESETS, build_parser

    def one(*argv: str):
        args = apply_preset(build_parser().parse_intermixed_args(list(argv)), PRESETS)
        [spec] = model_specs(args)
        return build(spec, args, 0)

    default = one("--model", "gated_deltanet")
    assert (default.model.config.name, default.model.config.d_model) == ("gated_deltanet", 64)
    assert default.model.config.mlp_hidden == 240  # the width that equalises parameter counts
    assert "model.d_model=64" in default.name
    given = one("--model", "gated_deltanet", "model.n_layers=1")
    assert (given.model.config.d_model, given.model.config.n_layers) == (192, 1)


def test_a_checkpoint_without_its_tokenizer_is_refused(tmp_path, debug_config):
    from nestlearn.models.registry import build_model
    from nestlearn.train.checkpoint import save_checkpoint

    cfg = debug_config("model.vocab_size=257")
    ckpt = save_checkpoint(
        tmp_path / "run",
        1,
        model=build_model(cfg.model),
        trainer_state={},
        cfg=cfg,
        tokenizer=ByteTokenizer(),
    )
    (ckpt / "tokenizer.json").unlink()
    argv = [f"--checkpoint={tmp_path / 'run'}", "--train-steps=0", f"--out={tmp_path}"]
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        run_experiment("test_time", argv)


def test_fresh_models_resolve_configs_and_architectures():
    from nestlearn.errors import ConfigError
    from nestlearn.experiments.model_source import fresh_model_config

    named = fresh_model_config("titans_lmm-tiny", ["model.n_layers=1"])
    assert (named.name, named.n_layers, named.d_model) == ("titans_lmm", 1, 192)
    assert fresh_model_config("gated_deltanet") == fresh_model_config("gated_deltanet-tiny")
    # No transformer-tiny config: the tiny config's sizes, and a max_seq_len below train.seq_len.
    bare = fresh_model_config("transformer", ["model.max_seq_len=32"])
    assert (bare.name, bare.d_model, bare.max_seq_len) == ("transformer", 192, 32)
    with pytest.raises(ConfigError, match="neither a named config"):
        fresh_model_config("nope")
    with pytest.raises(ConfigError, match=r"only model\.\* overrides"):
        fresh_model_config("tiny", ["train.steps=3"])
