"""Single needle in a haystack (RULER's S-NIAH; Hsieh et al., 2024; SPEC §6).

A prompt of exactly ``L`` tokens is ``instruction + haystack[:i] + needle + haystack[i:] +
question``; the model must continue it with the needle's value. Three needles (:data:`NEEDLES`):

- ``passkey``: "The pass key is 48213. Remember it. 48213 is the pass key." (a 5-digit value),
- ``number``: "One of the special magic numbers for {key} is: 7240915." (7 digits),
- ``uuid``: the same with "uuids" and a random UUID4,

where ``{key}`` is a random adjective-noun pair. The question ends with the needle's own phrase up
to the value ("The special magic number for {key} is:", RULER's answer prefix without "mentioned
in the provided text"), so that a model without instruction tuning answers by continuing it.

Two haystacks: ``noise`` repeats RULER's "The grass is green. The sky is blue. The sun is
yellow. Here we go. There and back again." sentence by sentence; ``text`` is consecutive lines of
real documents (the stdlib corpus by default) from a random starting line. The haystack gets
every token the other pieces leave (cut to fit, so the prompt has exactly ``L`` tokens); the
needle goes at the sentence or line boundary nearest to ``depth · haystack length`` (depth 0 =
right after the instruction, 1 = right before the question).

Scoring: greedy decoding of ``len(answer tokens) + 2`` tokens after the prompt; a sample is
correct when the decoded text contains the value (RULER's string match).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from nestlearn.data.tokenizer import Tokenizer
from nestlearn.eval.synthetic import IGNORE
from nestlearn.models.sampling import generate

NOISE = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
ADJECTIVES = (
    "ancient", "bitter", "brave", "calm", "clever", "crooked", "eager", "fancy", "gentle",
    "hollow", "icy", "jolly", "lively", "mellow", "nimble", "odd", "proud", "quiet", "rapid",
    "silent", "tidy", "vivid", "wild", "young", "zealous",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "candle", "desert", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river",
    "saddle", "tunnel", "valley", "walnut", "window", "yacht", "zephyr",
)  # fmt: skip


@dataclass(frozen=True)
class Needle:
    """One needle kind: its instruction, needle sentence and question (``{key}``, ``{value}``)."""

    instruction: str
    needle: str
    question: str
    digits: int  # 0 = a UUID value

    def value(self, rng: random.Random) -> str:
        if self.digits == 0:
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return str(rng.randrange(10 ** (self.digits - 1), 10**self.digits))


_MAGIC = "Some special magic {0} are hidden in this text.\n"
NEEDLES: dict[str, Needle] = {
    "passkey": Needle(
        instruction="A pass key is hidden in this text.\n",
        needle="The pass key is {value}. Remember it. {value} is the pass key.\n",
        question="\nWhat is the pass key? The pass key is",
        digits=5,
    ),
    "number": Needle(
        instruction=_MAGIC.format("numbers"),
        needle="One of the special magic numbers for {key} is: {value}.\n",
        question="\nThe special magic number for {key} is:",
        digits=7,
    ),
    "uuid": Needle(
        instruction=_MAGIC.format("uuids"),
        needle="One of the special magic uuids for {key} is: {value}.\n",
        question="\nThe special magic uuid for {key} is:",
        digits=0,
    ),
}
HAYSTACKS = ("noise", "text")


@dataclass(frozen=True)
class NIAHSample:
    """A prompt of ``length`` token ids and the value it must be continued with."""

    prompt: list[int]
    answer: str  # the value; the reference continuation is " " + answer
    length: int
    depth: float
    needle: str


class Haystack:
    """Units of filler text (sentences or lines), tokenized lazily and cut to a token budget."""

    def __init__(self, tokenizer: Tokenizer, texts: Sequence[str] | None = None) -> None:
        """``texts=None``: the noise haystack; otherwise the documents whose lines fill it."""
        self.tokenizer = tokenizer
        if texts is None:
            self.units = list(NOISE)
        else:
            self.units = [line for text in texts for line in text.splitlines(keepends=True)]
            self.units = [u for u in self.units if u.strip()]
            if not self.units:
                raise ValueError("the haystack documents hold no text: give documents with text")
        self._cache: dict[int, list[int]] = {}

    @property
    def kind(self) -> str:
        return "noise" if self.units == list(NOISE) else "text"

    def _ids(self, i: int) -> list[int]:
        if i not in self._cache:
            self._cache[i] = self.tokenizer.encode(self.units[i])
        return self._cache[i]

    def take(self, n_tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """``n_tokens`` ids of consecutive units from a random start (noise: the first), and the
        token offsets of unit boundaries (0 and ``n_tokens`` included)."""
        start = 0 if self.kind == "noise" else rng.randrange(len(self.units))
        ids: list[int] = []
        bounds: list[int] = []
        i = start
        while len(ids) < n_tokens:
            bounds.append(len(ids))
            ids.extend(self._ids(i % len(self.units)))
            i += 1
        # The haystack's end is a boundary too: depth 1 puts the needle right before the question.
        return ids[:n_tokens], [b for b in bounds if b < n_tokens] + [n_tokens]


def make_sample(
    tokenizer: Tokenizer,
    haystack: Haystack,
    needle: str,
    length: int,
    depth: float,
    rng: random.Random,
) -> NIAHSample:
    """One prompt of exactly ``length`` tokens with the needle at ``depth`` (see module doc)."""
    if needle not in NEEDLES:
        raise ValueError(f"needle={needle!r}; choose one of {', '.join(NEEDLES)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1] (0 = start, 1 = end of the haystack)")
    spec = NEEDLES[needle]
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    value = spec.value(rng)
    head = tokenizer.encode(spec.instruction)
    body = tokenizer.encode(spec.needle.format(key=key, value=value))
    tail = tokenizer.encode(spec.question.format(key=key))
    room = length - len(head) - len(body) - len(tail)
    if room < 0:
        raise ValueError(
            f"length={length} tokens is too short for the {needle} needle and its question "
            f"({length - room} tokens); use lengths >= {length - room}"
        )
    hay, bounds = haystack.take(room, rng)
    at = min(bounds, key=lambda b: abs(b - depth * room))
    prompt = head + hay[:at] + body + hay[at:] + tail
    return NIAHSample(prompt, value, length, depth, needle)


def make_samples(
    tokenizer: Tokenizer,
    haystack: Haystack,
    needle: str,
    length: int,
    depth: float,
    n: int,
    seed: int,
) -> list[NIAHSample]:
    """``n`` samples of one (needle, length, depth) cell, reproducible from ``seed``."""
    rng = random.Random(f"niah:{seed}:{needle}:{length}:{depth}")
    return [make_sample(tokenizer, haystack, needle, length, depth, rng) for _ in range(n)]


def answer_ids(tokenizer: Tokenizer, sample: NIAHSample) -> list[int]:
    """The reference continuation's ids: ``" " + value``."""
    return tokenizer.encode(" " + sample.answer)


def training_batch(
    tokenizer: Tokenizer,
    haystack: Haystack,
    needles: Sequence[str],
    length: int,
    n: int,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` for teacher forcing: prompts of ``length`` tokens at random depths
    followed by their answers; only the answer tokens are scored (``IGNORE`` elsewhere).

    Rows are padded with the eos id to one width; padding is not scored.
    """
    rows, answers = [], []
    for _ in range(n):
        sample = make_sample(tokenizer, haystack, rng.choice(needles), length, rng.random(), rng)
        rows.append(sample.prompt)
        answers.append(answer_ids(tokenizer, sample))
    width = length + max(len(a) for a in answers)
    inputs = torch.full((n, width), tokenizer.eos_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE, dtype=torch.long)
    for b, (prompt, answer) in enumerate(zip(rows, answers, strict=True)):
        seq = prompt + answer
        inputs[b, : len(seq)] = torch.tensor(seq)
        # The prediction at position t is of token t + 1: answers start after the prompt.
        targets[b, length - 1 : length - 1 + len(answer)] = torch.tensor(answer)
    return inputs[:, :-1], targets[:, :-1]


def fits(model: torch.nn.Module, length: int, n_new: int) -> bool:
    """Whether a model with ``context_limit`` can read ``length`` prompt tokens and decode
    ``n_new`` more (recurrent models: always)."""
    limit = getattr(model, "context_limit", None)
    return limit is None or length + n_new - 1 <= limit


@torch.no_grad()
def niah_correct(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    samples: Iterable[NIAHSample],
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> list[bool]:
    """Greedy-decode each sample's answer; whether the decoded text contains the value, in order.

    Prompts of one length are decoded together, ``batch_size`` at a time. A bounded model given
    a prompt it cannot decode from raises ValueError saying so.
    """
    samples = list(samples)
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_length.setdefault(len(s.prompt), []).append(i)
    was_training = model.training
    model.eval()
    correct = [False] * len(samples)
    try:
        for length, indices in by_length.items():
            for first in range(0, len(indices), batch_size):
                group = indices[first : first + batch_size]
                n_new = max(len(answer_ids(tokenizer, samples[i])) for i in group) + 2
                if not fits(model, length, n_new):
                    raise ValueError(
                        f"a {length}-token prompt plus {n_new} decoded tokens exceeds the "
                        f"model's context limit ({model.context_limit}); use shorter lengths, or "
                        "a recurrent model, which streams any length"
                    )
                prompts = torch.tensor([samples[i].prompt for i in group], device=device)
                steps = list(generate(model, prompts, n_new, temperature=0.0))
                out = torch.stack(steps, dim=1).tolist()  # [B, n_new]
                for i, ids in zip(group, out, strict=True):
                    correct[i] = samples[i].answer in tokenizer.decode(ids)
    finally:
        model.train(was_training)
    return correct
