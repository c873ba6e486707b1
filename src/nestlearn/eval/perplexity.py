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
    *,
    rows: Callable[[int], slice] | None = None,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> dict[str, float]:
    """Score ``(x, y)`` batches with the model (eval mode restored afterwards).

    Data parallel (``nestlearn.train.distributed``): ``rows(n)`` is this process's share of a
    batch of ``n`` rows and ``reduce`` sums ``[nll, tokens, bytes]`` over processes, so every
    process returns the single-process metrics. Every process calls the model once per batch
    (FSDP's collectives need that): one whose share of a short batch is empty scores one row and
    discards it.
    """
    was_training = model.training
    model.eval()
    byte_table = torch.as_tensor(token_bytes, dtype=torch.int64)
    sums = [0.0, 0, 0]  # nll, tokens, bytes
    try:
        for x, y in batches:
            keep = True
            if rows is not None:
                share = rows(x.size(0))
                keep = share.stop > share.start
                x, y = (x[share], y[share]) if keep else (x[:1], y[:1])
            with autocast():
                logits, _ = model(x.to(device))
            nll = F.cross_entropy(
                upcast(logits).reshape(-1, logits.size(-1)),
                y.to(device).reshape(-1),
                reduction="sum",
            )
            if keep:
                sums[0] += float(nll)
                sums[1] += y.numel()
                sums[2] += int(byte_table[y.cpu()].sum())
    finally:
        model.train(was_training)
    nll_sum, n_tokens, n_bytes = sums if reduce is None else reduce(sums)
    return metrics_from_sums(nll_sum, int(n_tokens), int(n_bytes))


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
