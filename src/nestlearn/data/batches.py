"""Batches from a token stream: random windows for training, consecutive windows for evaluation.

A training batch is a pure function of (stream, step, micro_step, seed, rank): its window offsets
come from a generator seeded by a stable hash of those numbers. The data loader therefore has no
state of its own; resuming at step ``s`` gives exactly the batches an uninterrupted run would
have seen, and each rank of a data-parallel run draws different windows.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from nestlearn.data.corpus import stable_hash
from nestlearn.errors import DataError


def train_batch(
    tokens: np.ndarray,
    *,
    step: int,
    micro_step: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: ``x`` int64 ``[batch_size, seq_len]`` and ``y``, x shifted by one.

    Windows start anywhere in the stream (they may span document boundaries, where the eos id
    sits), and may overlap each other.
    """
    _check_sizes(batch_size, seq_len)
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(
            f"the training stream has {n} tokens, too few for one window of train.seq_len="
            f"{seq_len} (+1 target): use more data or a lower train.seq_len"
        )
    rng = np.random.default_rng(stable_hash("train_batch", seed, step, micro_step, rank))
    offsets = rng.integers(0, n - seq_len, size=batch_size)
    return _windows(tokens, offsets, seq_len)


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, max_tokens: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows of the stream, each target token scored at most once.

    Window ``i`` has inputs ``tokens[i*T : (i+1)*T]`` and targets one further, so targets never
    overlap; a trailing part shorter than a window is dropped. Without a cap (``max_tokens=0``)
    every window is used, in order. With a cap, ``max_tokens // T`` windows evenly spaced over the
    whole stream (first and last included) are used, in order. A stream shorter than
    ``seq_len + 1`` gives one window of ``len(tokens) - 1``; a cap below ``seq_len`` shortens the
    window to it. The last batch may hold fewer than ``batch_size`` windows.
    """
    _check_sizes(batch_size, seq_len)
    n = len(tokens)
    if n < 2:
        raise DataError(
            f"the evaluation stream has {n} token(s), too few to score one: use more text"
        )
    seq_len = min(seq_len, n - 1)
    if max_tokens > 0:
        seq_len = min(seq_len, max_tokens)
    available = (n - 1) // seq_len
    n_windows = min(available, max_tokens // seq_len) if max_tokens > 0 else available
    # A cap takes windows evenly spread over the whole stream, not just its first documents,
    # so a small validation budget still samples every part of the held-out text.
    chosen = np.unique(np.linspace(0, available - 1, n_windows).round().astype(np.int64))
    for first in range(0, len(chosen), batch_size):
        offsets = chosen[first : first + batch_size] * seq_len
        yield _windows(tokens, offsets, seq_len)


def _check_sizes(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must both be >= 1")


def _windows(
    tokens: np.ndarray, offsets: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the windows starting at ``offsets``."""
    index = offsets[:, None] + np.arange(seq_len + 1)  # [B, T + 1]
    window = torch.from_numpy(tokens[index].astype(np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()
