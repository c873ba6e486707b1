"""Synthetic facts for test-time learning: documents of ``key=value;`` facts and their queries.

An episode is ``n_docs`` documents of ``facts_per_doc`` facts each. A fact binds a key of
``key_len`` lowercase letters (distinct within an episode) to a value of ``value_digits`` digits
1-9, written ``ab=42;``; a document is its facts followed by a newline. A query is ``ab?`` and
its answer ``42``, followed by ``;``. With no knowledge of the fact, guessing the answer succeeds
with probability ``9^-value_digits``.

Queries come as a chain, ``ab?42;cd?17;...``, teacher-forced (the answers are in the input; a
query is answered when the greedy prediction of each of its answer tokens is right), in training
and evaluation alike.

Pieces (a document, a query with its answer) are tokenized separately and stacked over a batch of
episodes by left-padding each piece with the end-of-text id to the batch's longest (with the byte
tokenizer every piece of a kind has one length and no padding happens), so all rows of a batch
reach a document or query boundary at the same position and a batch can be streamed through a
model's decoding state.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nestlearn.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class Fact:
    key: str
    value: str

    @property
    def text(self) -> str:
        return f"{self.key}={self.value};"

    @property
    def query(self) -> str:
        return f"{self.key}?"


Episode = list[list[Fact]]  # documents, each a list of facts


def sample_episode(
    rng: random.Random, n_docs: int, facts_per_doc: int, key_len: int = 2, value_digits: int = 2
) -> Episode:
    """``n_docs`` documents of fresh facts with keys distinct within the episode."""
    n = n_docs * facts_per_doc
    if n > 26**key_len:
        raise ValueError(f"{n} facts need distinct keys but {key_len} letters give {26**key_len}")
    keys: set[str] = set()
    while len(keys) < n:
        keys.add("".join(rng.choices(string.ascii_lowercase, k=key_len)))
    ordered = rng.sample(sorted(keys), n)
    facts = [Fact(k, "".join(rng.choices("123456789", k=value_digits))) for k in ordered]
    return [facts[d * facts_per_doc : (d + 1) * facts_per_doc] for d in range(n_docs)]


def document_text(doc: Sequence[Fact]) -> str:
    return "".join(f.text for f in doc) + "\n"


def chance_accuracy(value_digits: int) -> float:
    return 9.0**-value_digits


def pad_left(rows: Sequence[Sequence[int]], pad: int, device=None) -> torch.Tensor:
    """``[B, max_len]`` long: each row right-aligned after ``pad`` ids."""
    width = max(map(len, rows))
    return torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)


def document_batch(
    tokenizer: Tokenizer, episodes: Sequence[Episode], d: int, device=None
) -> torch.Tensor:
    """Document ``d`` of every episode, ``[B, L]``."""
    rows = [tokenizer.encode(document_text(ep[d])) for ep in episodes]
    return pad_left(rows, tokenizer.eos_id, device)


def query_batch(
    tokenizer: Tokenizer,
    episodes: Sequence[Episode],
    order: Sequence[tuple[int, int]],
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chain of queries ``ab?42;cd?17;...``, teacher-forced: fact ``order[k] = (d, f)`` (document,
    fact) of every episode is the ``k``-th query.

    Returns ``(tokens [B, T], owner [B, T])`` where ``owner[b, t] = k`` when token ``t`` of row
    ``b`` is an answer token of the ``k``-th query and ``-1`` elsewhere. Each query piece is
    left-padded across the batch.
    """
    eos = tokenizer.eos_id
    pieces, owners = [], []
    for k, (d, f) in enumerate(order):
        rows, own = [], []
        for ep in episodes:
            fact = ep[d][f]
            q, a, end = (tokenizer.encode(s) for s in (fact.query, fact.value, ";"))
            rows.append(q + a + end)
            own.append([-1] * len(q) + [k] * len(a) + [-1] * len(end))
        pieces.append(pad_left(rows, eos, device))
        owners.append(pad_left(own, -1, device))
    return torch.cat(pieces, dim=1), torch.cat(owners, dim=1)


def answer_hits(logits: torch.Tensor, tokens: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` bool: the greedy prediction of every answer token of query ``k`` is right.

    ``logits [B, T, V]`` are the model's outputs on ``tokens`` continuing a state, so position
    ``t`` predicts token ``t + 1``; the first token of ``tokens`` is never an answer token.
    """
    K = int(owner.max()) + 1
    right = logits[:, :-1].argmax(-1) == tokens[:, 1:]  # [B, T-1]
    own = owner[:, 1:]
    hits = []
    for k in range(K):
        hits.append((right | (own != k)).all(-1))
    return torch.stack(hits, dim=1)


def training_batch(
    tokenizer: Tokenizer, episodes: Sequence[Episode], rng: random.Random, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole episodes as training sequences: every document, then a query of every fact in a
    shuffled order. Returns ``(inputs [B, T-1], targets [B, T-1])`` with targets ``-100``
    except at answer tokens (all episodes must have the same number of documents and facts)."""
    n_docs, n_facts = len(episodes[0]), len(episodes[0][0])
    docs = [document_batch(tokenizer, episodes, d, device) for d in range(n_docs)]
    order = rng.sample([(d, f) for d in range(n_docs) for f in range(n_facts)], n_docs * n_facts)
    queries, owner = query_batch(tokenizer, episodes, order, device)
    tokens = torch.cat([*docs, queries], dim=1)
    owner = torch.cat([*(torch.full_like(d, -1) for d in docs), owner], dim=1)
    targets = tokens.masked_fill(owner < 0, -100)
    # Position t predicts token t + 1.
    return tokens[:, :-1], targets[:, 1:]
