"""Held-out loss, perplexity and bits per byte.

For targets ``y_1..y_N`` with model probabilities ``p(y_i)``: loss = ``−(1/N) Σ ln p(y_i)`` nats
per token, perplexity = ``exp(loss)``, and bits per byte = ``−Σ log2 p(y_i) / Σ bytes(y_i)`` where
``bytes(y)`` is the number of UTF-8 bytes token ``y`` stands for. Bits per byte does not depend on
the tokenizer, so models with different vocabularies compare on it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from nestlearn.models.base import LanguageModel


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the softmax (bf16 autocast outputs), float64 kept."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def metrics_from_sums(nll_sum: float, n_tokens: int, n_bytes: int) -> dict[str, float]:
    """``{"loss", "ppl", "bpb", "tokens"}`` from summed negative log-likelihood in nats."""
    loss = nll_sum / max(1, n_tokens)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": nll_sum / math.log(2) / max(1, n_bytes),
        "tokens": n_tokens,
    }


@torch.no_grad()
def evaluate_lm(
    model: LanguageModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: np.ndarray,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Score ``(x, y)`` batches with the model (eval mode restored afterwards)."""
    was_training = model.training
    model.eval()
    byte_table = torch.as_tensor(token_bytes, dtype=torch.int64)
    nll_sum, n_tokens, n_bytes = 0.0, 0, 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast():
                logits, _ = model(x)
            nll = F.cross_entropy(
                upcast(logits).reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
            )
            nll_sum += float(nll)
            n_tokens += y.numel()
            n_bytes += int(byte_table[y.cpu()].sum())
    finally:
        model.train(was_training)
    return metrics_from_sums(nll_sum, n_tokens, n_bytes)


def unigram_metrics(
    train_tokens: np.ndarray,
    targets: np.ndarray,
    vocab_size: int,
    token_bytes: np.ndarray,
) -> dict[str, float]:
    """The unigram baseline: ``p(y) = (count(y) + 1) / (N + V)`` fitted on the training stream
    (add-one smoothing), scored on ``targets`` — the floor any language model must clearly beat.
    """
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)
    logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    targets = np.asarray(targets, dtype=np.int64)
    nll_sum = float(-logp[targets].sum())
    return metrics_from_sums(nll_sum, targets.size, int(token_bytes[targets].sum()))
