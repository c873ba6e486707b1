"""Pieces every decoder LM shares: input checks and the depth-scaled initialization."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from nestlearn.errors import DataError, SequenceTooLongError
from nestlearn.layers.norm import RMSNorm


def check_tokens(
    tokens: torch.Tensor, vocab_size: int, limit: int | None, pos: int = 0, has_state: bool = False
) -> None:
    """Token ids must be an integer ``[B, T]`` tensor within the vocabulary and context limit.

    ``limit=None``: no context limit (recurrent models stream any length).
    """
    if tokens.ndim != 2:
        raise ValueError(
            f"tokens must be [batch, seq_len], got shape {tuple(tokens.shape)}; "
            "add a batch dimension with tokens[None]"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer ids (torch.long), got dtype {tokens.dtype}")
    T = tokens.shape[1]
    if T == 0:
        raise ValueError("tokens is empty: give at least one token per sequence")
    if limit is not None and pos + T > limit:
        where = f"{pos} cached + {T} new tokens" if has_state else f"{T} tokens"
        raise SequenceTooLongError(
            f"{where} exceed model.max_seq_len={limit}; shorten the input or use a model "
            f"built with a larger model.max_seq_len"
        )
    # One host sync; skipped under torch.compile so the graph does not break.
    if not torch.compiler.is_compiling():
        outside = (tokens < 0) | (tokens >= vocab_size)
        if bool(outside.any()):
            bad = tokens[outside][0].item()
            raise DataError(
                f"token id {bad} is outside the model's vocabulary [0, {vocab_size}); "
                "the tokenizer does not match model.vocab_size"
            )


def init_decoder_weights(
    model: nn.Module, std: float, n_layers: int, residual_outputs: Iterable[nn.Linear]
) -> None:
    """Normal(0, std) linear/embedding weights, norm gains 1; residual outputs std/sqrt(2·L).

    The residual stream sums 2·n_layers branch outputs, so scaling the projections that write
    into it keeps its variance independent of depth (GPT-2). Modules with their own
    ``reset_parameters`` conventions (gates, memories) re-initialize themselves afterwards.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
    residual_std = std / math.sqrt(2 * n_layers)
    for linear in residual_outputs:
        nn.init.normal_(linear.weight, mean=0.0, std=residual_std)


def block_state(
    state: dict[str, torch.Tensor] | None, index: int
) -> dict[str, torch.Tensor] | None:
    """Block ``index``'s entries of a model state (``blocks.{index}.*``, prefix removed); a state
    without them (from another model) is refused with the fix."""
    if state is None:
        return None
    prefix = f"blocks.{index}."
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise ValueError(
            f"state has no entries for block {index} ('{prefix}*'): a state from another "
            "model? Make one with model.init_state(batch_size)"
        )
    return sub
