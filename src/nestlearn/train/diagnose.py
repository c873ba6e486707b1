"""Where a non-finite training loss came from (SPEC §2.1: a memory's output is read after its
write, so the first non-finite output names the memory that went first).

The batch whose loss is non-finite goes through a copy of the model built with
``model.check_finite=true`` and the same weights; that model raises naming the first layer,
memory and token that went non-finite, with the settings of that layer that can help. When every
layer's output is finite the cause is outside the memories (the head, the loss, the outer step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from nestlearn.config.schema import ModelConfig
from nestlearn.errors import NonFiniteMemoryError
from nestlearn.models.registry import build_model


def locate_non_finite(
    config: ModelConfig,
    model: nn.Module,
    tokens: torch.Tensor,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> str | None:
    """The :class:`~nestlearn.errors.NonFiniteMemoryError` message of ``tokens`` run through a
    checked copy of ``model`` (built from ``config`` with ``check_finite=True``), or None when
    no layer's output is non-finite or the model cannot be checked this way (no
    ``check_finite`` key, sharded weights, a failure while checking)."""
    if not any(f.name == "check_finite" for f in dataclasses.fields(config)):
        return None
    try:
        checked = build_model(dataclasses.replace(config, check_finite=True))
        checked.load_state_dict(model.state_dict())
        param = next(model.parameters())
        checked.to(device=param.device, dtype=param.dtype)
        checked.train(model.training)
        with torch.no_grad(), autocast() if autocast is not None else nullcontext():
            checked(tokens)
    except NonFiniteMemoryError as exc:
        return str(exc)
    except Exception:  # a diagnosis must never hide the error it explains
        return None
    return None
