"""Small models trained on synthetic tasks (MQAR, needle in a haystack): build, train, score.

A synthetic task is a function ``sample(step) -> (inputs [B, T], targets [B, T])`` whose targets
hold ``IGNORE`` (-100) everywhere but the positions that are scored; training minimises the mean
cross-entropy over the scored positions only, with AdamW on fresh batches every step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nestlearn.config.loader import build_section, model_config_class
from nestlearn.errors import NonFiniteLossError
from nestlearn.models.base import LanguageModel
from nestlearn.models.registry import build_model
from nestlearn.train.optim import parameter_groups

IGNORE = -100  # target id of positions that are not scored

# Chunk sizes at the synthetic tasks' scale (sequences of 32-768 tokens), where they change
# what a model computes. SPEC §5's defaults (M_mem 64, CMS levels [64, 16]) are for sequences of
# thousands of tokens: on a 32-token MQAR sequence a 64-token chunk takes every inner gradient at
# the sequence's start weights and a CMS level of C = 64 never updates in context. Here the Titans
# memory (titans_lmm, and HOPE's M_mem with it, so both memories write at the same rate) works in
# chunks of 16 tokens, HOPE's other memories keep SPEC's 16, and the CMS levels are [16, 8]: the
# slow level updates at least once in a 32-token sequence, the fast one three times. Gated
# DeltaNet's chunk form is exact per token (its chunk size only changes speed) and the
# Transformer has none. ``--set`` / ``overrides`` still win.
SMALL_DEFAULTS: dict[str, dict[str, Any]] = {
    "titans_lmm": {"chunk_size": 16},
    "hope": {"chunk_size": 16, "other_chunk_size": 16, "cms_chunk_sizes": [16, 8]},
    "hope_attention": {"cms_chunk_sizes": [16, 8]},
}


def small_model(
    name: str,
    *,
    vocab_size: int,
    max_seq_len: int,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 2,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> LanguageModel:
    """Build the registered architecture ``name`` at a small size (fields it lacks are skipped),
    with the chunk sizes of :data:`SMALL_DEFAULTS` for the synthetic tasks' short sequences.

    ``overrides`` are further ``model.*`` fields (``{"chunk_size": 16}``), checked against the
    architecture's config class like a config file's keys; they win over the small defaults.
    """
    cls = model_config_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {
        "name": name,
        "vocab_size": vocab_size,
        "max_seq_len": max_seq_len,
        "d_model": d_model,
        "n_layers": n_layers,
    }
    if "n_heads" in fields:
        values["n_heads"] = n_heads
    values.update(SMALL_DEFAULTS.get(name, {}))
    values.update(overrides or {})
    config = build_section("model", cls, values)
    torch.manual_seed(seed)
    return build_model(config)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not ``IGNORE``."""
    logits = logits.float().reshape(-1, logits.size(-1))
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE)


def train_synthetic(
    model: LanguageModel,
    sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup: int = 0,
    grad_clip: float = 1.0,
    device: torch.device | str = "cpu",
    desc: str = "",
    progress: bool = True,
) -> list[float]:
    """Train on ``sample(step)`` for ``steps`` AdamW steps (linear warmup, cosine decay to 10%).

    Returns the loss of every step (on the scored positions only); a non-finite loss raises
    :class:`~nestlearn.errors.NonFiniteLossError` naming the step.
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    model.train().to(device)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), foreach=True
    )
    warmup = min(warmup, steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc or "train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        inputs, targets = sample(step)
        logits, _ = model(inputs.to(device))
        loss = masked_loss(logits, targets.to(device))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{desc or 'training'}: the loss became non-finite at step {step}; lower the "
                "learning rate (--lr) or the model's inner step (e.g. --set memory_max_lr=0.1)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
