"""``model.check_finite``: name the first layer, memory and token whose output went non-finite.

A model built with ``check_finite=true`` gives each checked layer a :class:`FiniteCheck` (its
name in messages and the config keys that can help, only keys that the model has) and runs
:func:`check_memory_finite` after it. The trainer adds the optimizer step to the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from nestlearn.errors import NonFiniteMemoryError

State = dict[str, torch.Tensor]
# The advice every model can follow (keys of train/optim, not of the model).
GENERIC_FIXES = ("the outer lr (optim.lr)",)
FP32 = "or train in fp32 (train.precision=fp32)"


class FiniteCheck(NamedTuple):
    """What a non-finite error says about one layer: ``layer`` names it (``block 1 (hope
    mixer)``), ``what`` is the thing that can go non-finite (``its memory``, ``its output``) and
    ``fixes`` the settings to lower, most specific first."""

    layer: str
    what: str = "its memory"
    fixes: tuple[str, ...] = GENERIC_FIXES

    @property
    def advice(self) -> str:
        return f"lower {' or '.join(self.fixes)}, {FP32}"


def inner_lr_fixes(*keys: str) -> tuple[str, ...]:
    """``fixes`` for a memory whose inner learning rate is set by ``keys`` (``model.*`` keys
    that exist for the model), then the generic ones."""
    return (*(f"{k} (its inner learning rate)" for k in keys), *GENERIC_FIXES)


def check_memory_finite(
    check: FiniteCheck,
    x: torch.Tensor,
    y: torch.Tensor,
    state: State | None,
    start: int = 0,
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Raise :class:`~nestlearn.errors.NonFiniteMemoryError` naming ``check.layer`` and the first
    token (absolute position ``start + t``) whose output ``y`` is non-finite.

    Memories are read after the write (SPEC §2.1), so the output at token ``t`` is the first place
    where a memory that went non-finite at ``t`` shows. Chunkwise forms spread a NaN over the
    tokens of its chunk, so when ``reference`` (the layer's sequential form on ``x``) is given it
    is run to find the token. A non-finite input ``x`` at or before that token (at any token,
    without ``reference``) is reported as the cause, at its first token; a finite output with a
    non-finite returned state is reported as the state after the last token.
    """
    bad_out = ~torch.isfinite(y).flatten(2).all(-1)  # [B, T]
    if bad_out.any() and reference is not None:
        bad_ref = ~torch.isfinite(reference(x)).flatten(2).all(-1)
        bad_out = bad_ref if bad_ref.any() else bad_out
    if bad_out.any():
        b, t = _first(bad_out)
        cause = check.what
        bad_in = ~torch.isfinite(x).flatten(2).all(-1)
        # A causal layer's output at t reads inputs ≤ t. Without a sequential form the
        # outputs may not locate the token (attention's masked scores spread inf to earlier
        # rows), so any non-finite input is the cause.
        if bad_in[:, : t + 1].any() or (reference is None and bad_in.any()):
            b, t = _first(bad_in)
            cause = "its input (an earlier layer or the embedding)"
        raise NonFiniteMemoryError(
            f"{check.layer}: {cause} went non-finite at token {start + t} (batch row {b}); "
            f"{check.advice}"
        )
    if state is not None:
        for key, value in state.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise NonFiniteMemoryError(
                    f"{check.layer}: state '{key}' is non-finite after token "
                    f"{start + y.shape[1] - 1}; {check.advice}"
                )


def _first(bad: torch.Tensor) -> tuple[int, int]:
    """``(row, token)`` of the earliest ``True`` of ``bad [B, T]`` (lowest row on a tie)."""
    first = bad.float().argmax(dim=1)  # first bad token per row
    rows = bad.any(dim=1).nonzero().flatten()
    b = int(rows[first[rows].argmin()])
    return b, int(first[b])


def sequential_reference(
    layer: nn.Module, state: State | None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``layer``'s sequential form (``mode = "reference"``) on an input and a copy of ``state``,
    to locate a non-finite token exactly; ``None`` for a layer without a chunkwise ``mode``
    (its outputs are token-exact already)."""
    if getattr(layer, "mode", None) != "chunk":
        return None

    def run(x: torch.Tensor) -> torch.Tensor:
        layer.mode = "reference"
        try:
            with torch.no_grad():
                return layer(x, None if state is None else dict(state))[0]
        finally:
            layer.mode = "chunk"

    return run
