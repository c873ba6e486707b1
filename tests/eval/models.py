"""Test doubles with known answers: context-free, oracle and uniform "language models".

Each follows the :class:`~nestlearn.models.base.LanguageModel` calling convention
(``model(tokens [B, T], state) -> (logits [B, T, V], state)``) without being trained.
"""

from __future__ import annotations

import torch
from torch import nn


class _Double(nn.Module):
    """A state that is the token history, so decoding sees the whole prefix."""

    context_limit: int | None = None

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        # A parameter, so next(model.parameters()) gives the device (as generate() needs).
        self.anchor = nn.Parameter(torch.zeros(()))

    def init_state(self, batch_size: int, device=None) -> dict[str, torch.Tensor]:
        return {"tokens": torch.zeros(batch_size, 0, dtype=torch.long, device=device)}

    def forward(self, tokens: torch.Tensor, state=None):
        history = tokens if state is None else torch.cat([state["tokens"], tokens], 1)
        logits = self.predict(history)[:, -tokens.shape[1] :]
        return logits, None if state is None else {"tokens": history}

    def predict(self, history: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Bigram(_Double):
    """Logits depend on the current token only: every protocol gives the same nll per target."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        super().__init__(vocab_size)
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=g))

    def predict(self, history: torch.Tensor) -> torch.Tensor:
        return self.table[history]


class Uniform(_Double):
    """Equal logits everywhere: loss ``ln V``; argmax is always id 0."""

    def predict(self, history: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*history.shape, self.vocab_size)


class RandomGuess(_Double):
    """Independent random logits: accuracy ``1 / V`` in expectation."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        super().__init__(vocab_size)
        self.generator = torch.Generator().manual_seed(seed)

    def predict(self, history: torch.Tensor) -> torch.Tensor:
        return torch.rand(*history.shape, self.vocab_size, generator=self.generator)


class FirstOccurrenceRecall(_Double):
    """MQAR oracle: after a token seen before, predict the token that followed its *first*
    occurrence (keys first occur in the pair region, followed by their values)."""

    def predict(self, history: torch.Tensor) -> torch.Tensor:
        B, T = history.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            first: dict[int, int] = {}
            row = history[b].tolist()
            for t, token in enumerate(row):
                if token in first and first[token] + 1 < T:
                    logits[b, t, row[first[token] + 1]] = 1.0
                first.setdefault(token, t)
        return logits


class Induction(_Double):
    """NIAH oracle: find the latest earlier match of the last ``k`` tokens and copy the token
    that followed it; ``window`` limits how far back it looks (None: the whole history)."""

    def __init__(self, vocab_size: int, k: int = 12, window: int | None = None) -> None:
        super().__init__(vocab_size)
        self.k, self.window = k, window

    def predict(self, history: torch.Tensor) -> torch.Tensor:
        B, T = history.shape
        logits = torch.zeros(B, T, self.vocab_size)
        k = self.k
        for b in range(B):
            row = history[b].tolist()
            # Only the last position is needed for greedy decoding; the rest stay uniform.
            t = T - 1
            if t + 1 < k:
                continue
            suffix = row[t + 1 - k : t + 1]
            lowest = 0 if self.window is None else max(0, t + 1 - self.window)
            for j in range(t - 1, lowest + k - 2, -1):
                if row[j + 1 - k : j + 1] == suffix:
                    logits[b, t, row[j + 1]] = 1.0
                    break
        return logits
