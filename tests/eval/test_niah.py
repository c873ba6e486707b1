"""Needle in a haystack: exact prompt lengths, needle placement, and scoring on oracles."""

from __future__ import annotations

import random
import re

import pytest
import torch

from nestlearn.data import BPETokenizer, ByteTokenizer, Document
from nestlearn.eval.niah import (
    NEEDLES,
    NOISE,
    Haystack,
    answer_ids,
    make_sample,
    make_samples,
    niah_correct,
    training_batch,
)
from nestlearn.eval.synthetic import IGNORE, small_model
from tests.eval.models import Induction, Uniform

BYTES = ByteTokenizer()
DOCS = [
    "def first(x):\n    return x + 1\n\n# a comment line\nclass Thing:\n    pass\n",
    "import os\nprint(os.getcwd())\nvalue = [1, 2, 3]\n",
]
VALUE = {"passkey": r"\d{5}", "number": r"\d{7}", "uuid": r"[0-9a-f-]{36}"}


@pytest.fixture(scope="module")
def bpe():
    text = " ".join(NOISE) * 20 + "".join(n.needle + n.question for n in NEEDLES.values()) * 5
    return BPETokenizer.train([Document("a", text + DOCS[0] * 10)], 300, 10**6, 0)


@pytest.mark.parametrize("needle", list(NEEDLES))
@pytest.mark.parametrize("haystack", ["noise", "text"])
def test_prompts_have_the_exact_length_and_hold_the_needle(needle, haystack, bpe):
    for tok in (BYTES, bpe):
        hay = Haystack(tok, None if haystack == "noise" else DOCS)
        sample = make_sample(tok, hay, needle, 300, 0.5, random.Random(0))
        assert len(sample.prompt) == 300
        assert re.fullmatch(VALUE[needle], sample.answer)
        text = tok.decode(sample.prompt)
        assert text.startswith(NEEDLES[needle].instruction)
        assert text.count(sample.answer) == (2 if needle == "passkey" else 1)
        assert text.rstrip().endswith(("is", "is:"))


def test_depth_places_the_needle_between_instruction_and_question():
    hay = Haystack(BYTES)
    spec = NEEDLES["passkey"]
    positions = []
    for depth in (0.0, 0.25, 0.5, 0.75):
        sample = make_sample(BYTES, hay, "passkey", 400, depth, random.Random(1))
        text = BYTES.decode(sample.prompt)
        start = text.index("The pass key is")
        positions.append(start - len(spec.instruction))
        # The needle sits at a sentence boundary of the noise (or right after the instruction).
        assert text[start - 2 : start] == ". " or start == len(spec.instruction)
    assert positions[0] == 0 and positions == sorted(positions)
    # Bytes are characters here; the noise sentences are at most 22 apart.
    room = 400 - len(spec.instruction) - len(spec.question) - len(spec.needle) - 2 * (5 - 7)
    assert abs(positions[2] - room / 2) <= 11
    # Depth 1: right before the question (after a haystack cut to the exact length).
    sample = make_sample(BYTES, hay, "passkey", 400, 1.0, random.Random(1))
    assert BYTES.decode(sample.prompt).endswith(
        spec.needle.format(value=sample.answer) + spec.question
    )


def test_the_text_haystack_uses_the_documents_lines():
    hay = Haystack(BYTES, DOCS)
    sample = make_sample(BYTES, hay, "number", 400, 0.0, random.Random(2))
    text = BYTES.decode(sample.prompt)
    lines = {line for doc in DOCS for line in doc.splitlines() if line.strip()}
    assert sum(line in text for line in lines) >= 3
    assert "The grass is green" not in text


@pytest.mark.parametrize("needle", list(NEEDLES))
def test_an_oracle_that_copies_the_needle_scores_100_percent(needle, bpe):
    for tok in (BYTES, bpe):
        for haystack in (Haystack(tok), Haystack(tok, DOCS)):
            samples = []
            for length in (300, 421):
                for depth in (0.0, 0.5, 1.0):
                    samples += make_samples(tok, haystack, needle, length, depth, 2, seed=0)
            # The oracle matches the question's last k tokens: 12 bytes, or 3 BPE tokens.
            oracle = Induction(tok.vocab_size, k=12 if tok is BYTES else 3)
            # Samples of two lengths in one call are decoded length by length, order kept.
            correct = niah_correct(oracle, tok, samples, batch_size=4)
            assert correct == [True] * len(samples)


def test_a_short_memory_finds_only_recent_needles():
    # The oracle sees 120 tokens back: it finds a needle near the question, not one at the start.
    model = Induction(BYTES.vocab_size, window=120)
    hay = Haystack(BYTES)
    late = make_samples(BYTES, hay, "passkey", 400, 1.0, 3, seed=0)
    early = make_samples(BYTES, hay, "passkey", 400, 0.0, 3, seed=0)
    assert niah_correct(model, BYTES, late) == [True] * 3
    assert niah_correct(model, BYTES, early) == [False] * 3


def test_a_uniform_model_scores_zero():
    samples = make_samples(BYTES, Haystack(BYTES), "number", 300, 0.5, 4, seed=0)
    assert niah_correct(Uniform(BYTES.vocab_size), BYTES, samples) == [False] * 4


def test_training_batches_score_only_the_answer():
    rng = random.Random(0)
    inputs, targets = training_batch(BYTES, Haystack(BYTES), ["passkey", "uuid"], 200, 6, rng)
    assert inputs.shape == targets.shape and inputs.shape[0] == 6
    for row, target in zip(inputs, targets, strict=True):
        scored = (target != IGNORE).nonzero().flatten()
        assert int(scored[0]) == 199  # the prediction after the last prompt token
        # Teacher forcing: the token predicted at t is the input at t + 1.
        assert torch.equal(row[scored[:-1] + 1], target[scored[:-1]])
        answer = BYTES.decode(target[scored].tolist())
        assert re.fullmatch(r" (\d{5}|[0-9a-f-]{36})", answer)


def test_bounded_models_say_when_a_prompt_is_too_long():
    model = small_model("transformer", vocab_size=257, max_seq_len=160, d_model=16)
    samples = make_samples(BYTES, Haystack(BYTES), "passkey", 158, 0.5, 1, seed=0)
    with pytest.raises(ValueError, match=r"context limit \(160\).*recurrent model"):
        niah_correct(model, BYTES, samples)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"needle": "pin"}, "choose one of passkey, number, uuid"),
        ({"depth": 1.5}, "depth=1.5 must be in"),
        ({"length": 40}, "too short for the passkey needle.*use lengths >= 1[0-9][0-9]"),
    ],
)
def test_bad_settings_name_the_fix(kwargs, fragment):
    args = {"needle": "passkey", "length": 200, "depth": 0.5, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        make_sample(BYTES, Haystack(BYTES), rng=random.Random(0), **args)
    with pytest.raises(ValueError, match="no text"):
        Haystack(BYTES, ["\n \n"])


def test_answer_ids_continue_the_question():
    sample = make_samples(BYTES, Haystack(BYTES), "passkey", 200, 0.5, 1, seed=0)[0]
    assert BYTES.decode(answer_ids(BYTES, sample)) == " " + sample.answer
