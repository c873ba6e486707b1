"""Perplexity of one long token stream: sliding windows, or the recurrent state carried across it.

A stream ``x_0 .. x_{N-1}`` has ``N - 1`` targets ``x_1 .. x_{N-1}``; both protocols score every
target exactly once and return its negative log-likelihood, so their perplexity and bits per byte
(:func:`~nestlearn.eval.perplexity.metrics_from_sums`) compare directly.

- **sliding** (any model): windows of ``W`` tokens whose ends advance by the stride ``S <= W``.
  Window ``k`` ends at target ``e_k = min(W + k·S, N - 1)`` and reads ``x[e_k - W : e_k]``; it
  scores only the ``e_k - e_{k-1}`` targets no earlier window scored (``e_{-1} = 0``), so after the
  first window every scored target sees at least ``W - S`` tokens of context. ``S = W`` gives
  independent windows ("chunks"); the last window is moved back to end at the stream's end, so
  no target is dropped. Windows of one stream are scored in batches.
- **streaming** (models with a state): the stream is fed ``C`` tokens at a time from
  ``model.init_state(1)``, carrying the state, so target ``x_t`` is predicted from all of
  ``x_0 .. x_{t-1}``. For a recurrent model (``context_limit is None``) any length streams; for
  a bounded one (attention's KV cache) the stream must fit in ``context_limit``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nestlearn.errors import NonFiniteLossError, SequenceTooLongError
from nestlearn.eval.perplexity import metrics_from_sums, upcast
from nestlearn.models.base import LanguageModel

MODES = ("chunks", "sliding", "streaming")


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(start, n_scored)`` of each window over a stream of ``n_tokens`` (see module doc).

    Every window reads ``min(window, n_tokens - 1)`` tokens from ``start``; it scores the last
    ``n_scored`` of its targets. The ``n_scored`` sum to ``n_tokens - 1``.
    """
    if n_tokens < 2:
        raise ValueError(f"a stream of {n_tokens} token(s) has no target to score: use more text")
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"window={window} and stride={stride} need 1 <= stride <= window")
    width = min(window, n_tokens - 1)
    windows, scored_to, end = [], 0, width
    while True:
        windows.append((end - width, end - scored_to))
        scored_to = end
        if end == n_tokens - 1:
            return windows
        end = min(end + stride, n_tokens - 1)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood ``[B, T]`` in float (at least fp32)."""
    flat = upcast(logits).reshape(-1, logits.size(-1))
    return F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


def _as_tensor(tokens: np.ndarray | Sequence[int] | torch.Tensor) -> torch.Tensor:
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).flatten()
    if tokens.numel() < 2:
        raise ValueError(
            f"a stream of {tokens.numel()} token(s) has no target to score: use more text"
        )
    return tokens


@torch.no_grad()
def sliding_nll(
    model: LanguageModel,
    tokens: np.ndarray | Sequence[int] | torch.Tensor,
    window: int,
    stride: int,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """float64 ``[N - 1]``: the nll of each target ``x_1 .. x_{N-1}`` under sliding windows."""
    tokens = _as_tensor(tokens)
    limit = model.context_limit
    if limit is not None and min(window, tokens.numel() - 1) > limit:
        raise SequenceTooLongError(
            f"window={window} exceeds the model's context limit (model.max_seq_len={limit}); "
            f"use a window <= {limit}"
        )
    plan = sliding_windows(tokens.numel(), window, stride)
    width = min(window, tokens.numel() - 1)
    out = np.empty(tokens.numel() - 1, dtype=np.float64)
    filled, offsets = 0, torch.arange(width)
    for first in tqdm(range(0, len(plan), batch_size), desc="sliding", disable=not progress):
        group = plan[first : first + batch_size]
        starts = torch.tensor([s for s, _ in group])[:, None] + offsets  # [B, W]
        logits, _ = model(tokens[starts].to(device))
        nll = _nll(logits, tokens[starts + 1].to(device)).double().cpu()  # [B, W]
        for row, (_, n_scored) in enumerate(group):
            out[filled : filled + n_scored] = nll[row, width - n_scored :].numpy()
            filled += n_scored
    return out


@torch.no_grad()
def streaming_nll(
    model: LanguageModel,
    tokens: np.ndarray | Sequence[int] | torch.Tensor,
    chunk: int = 512,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """float64 ``[N - 1]``: the nll of each target with the whole prefix as context (state)."""
    tokens = _as_tensor(tokens)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    n = tokens.numel() - 1
    limit = model.context_limit
    if limit is not None and n > limit:
        raise SequenceTooLongError(
            f"streaming {n} tokens needs a context of {n}, but model.max_seq_len={limit}: only "
            "recurrent models (no context limit) stream any length; use mode 'sliding' or "
            f"at most {limit + 1} tokens"
        )
    state = model.init_state(1, device)
    out = np.empty(n, dtype=np.float64)
    for start in tqdm(range(0, n, chunk), desc="streaming", disable=not progress):
        end = min(start + chunk, n)
        logits, state = model(tokens[None, start:end].to(device), state)
        nll = _nll(logits, tokens[None, start + 1 : end + 1].to(device))
        out[start:end] = nll[0].double().cpu().numpy()
    return out


def nll_metrics(
    nll: np.ndarray, targets: np.ndarray | Sequence[int] | torch.Tensor, token_bytes: np.ndarray
) -> dict[str, float]:
    """``{"loss", "ppl", "bpb", "tokens"}`` of per-target nlls; ``targets`` are ``x_1 ..``."""
    targets = np.asarray(targets, dtype=np.int64)
    if len(nll) != len(targets):
        raise ValueError(f"{len(nll)} nll values for {len(targets)} targets")
    return metrics_from_sums(float(nll.sum()), len(targets), int(token_bytes[targets].sum()))


def stream_perplexity(
    model: LanguageModel,
    tokens: np.ndarray | Sequence[int] | torch.Tensor,
    token_bytes: np.ndarray,
    mode: str,
    *,
    window: int = 512,
    stride: int = 0,
    chunk: int = 512,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity and bits per byte of ``tokens`` in ``mode`` (one of :data:`MODES`).

    ``chunks`` is ``sliding`` with ``stride = window``; ``stride=0`` means ``window // 2``. A
    non-finite loss raises :class:`~nestlearn.errors.NonFiniteLossError` naming the first token.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {', '.join(MODES)}")
    tokens = _as_tensor(tokens)
    was_training = model.training
    model.eval()
    try:
        if mode == "streaming":
            nll = streaming_nll(model, tokens, chunk, device=device, progress=progress)
        else:
            stride = window if mode == "chunks" else stride or max(1, window // 2)
            nll = sliding_nll(
                model,
                tokens,
                window,
                stride,
                batch_size=batch_size,
                device=device,
                progress=progress,
            )
    finally:
        model.train(was_training)
    bad = ~np.isfinite(nll)
    if bad.any():
        raise NonFiniteLossError(
            f"mode '{mode}': the loss is non-finite from token {int(np.argmax(bad)) + 1} on "
            f"({int(bad.sum())} of {len(nll)} targets); a recurrent memory can diverge past the "
            "lengths it was trained on: find the layer with model.check_finite=true"
        )
    return nll_metrics(nll, tokens[1:].numpy(), token_bytes)
