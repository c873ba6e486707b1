"""Activation checkpointing: keep only each block's input, recompute its inside in backward.

Memory for activations drops from every intermediate tensor of every block to one ``[B, T, d]``
input per block (plus one block's intermediates at a time during backward), for about one extra
forward pass of compute. Applied from outside the model: each ``model.blocks[i]``'s ``forward``
is wrapped in place with :func:`torch.utils.checkpoint.checkpoint` (non-reentrant), so parameter
names, ``state_dict`` and checkpoints are unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_MARK = "_nestlearn_activation_checkpointing"


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every block of ``model.blocks`` (in place; applying twice is a no-op).

    Only forwards run with gradients enabled are checkpointed: inference and decoding
    (``torch.no_grad``) run the block as before. The recomputation replays the RNG state, so
    dropout or other random ops give the same values in both passes.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no `blocks` ModuleList; activation checkpointing wraps "
            "each block of model.blocks (every nestlearn LanguageModel has one)"
        )
    for block in blocks:
        if not getattr(block, _MARK, False):
            block.forward = _checkpointed(block.forward)
            setattr(block, _MARK, True)
    return model


def is_checkpointed(model: nn.Module) -> bool:
    """Whether :func:`apply_activation_checkpointing` has wrapped ``model``'s blocks."""
    blocks = getattr(model, "blocks", None) or []
    return len(blocks) > 0 and all(getattr(b, _MARK, False) for b in blocks)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
