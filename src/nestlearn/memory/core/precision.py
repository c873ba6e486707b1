"""Memories compute in float32 under autocast or on 16-bit inputs.

A memory's state, its gates' log-space sums and segment products, the triangular solves of the
delta rule and the inner updates lose too much in bfloat16 or float16 (and CPU has no 16-bit
triangular solve). :func:`full_precision` wraps a memory op ``(inputs…) -> (o, state)``: when
autocast is on for the inputs' device, or an input is 16-bit, every 16-bit input (nested in
dicts, lists, tuples and NamedTuples too) is upcast to float32, the op runs with autocast off,
and the output ``o`` is cast back to the dtype of the first tensor argument; the state stays
float32. Otherwise the op runs untouched: float32 and float64 results are bit for bit those of
the op itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
Op = TypeVar("Op", bound=Callable[..., Any])


def full_precision(op: Op) -> Op:
    """Decorate a memory op returning ``(o, state)`` (or ``o``) to compute in float32 (module
    docstring)."""

    @functools.wraps(op)
    def run(*args: Any, **kwargs: Any) -> Any:
        tensors = [x for x in _leaves((args, kwargs)) if x.is_floating_point()]
        if not tensors:
            return op(*args, **kwargs)
        device_type = tensors[0].device.type
        autocast = torch.is_autocast_enabled(device_type)
        if not autocast and not any(x.dtype in HALF_DTYPES for x in tensors):
            return op(*args, **kwargs)
        out_dtype = tensors[0].dtype
        with torch.autocast(device_type, enabled=False):
            result = op(*_upcast(args), **_upcast(kwargs))
        if isinstance(result, torch.Tensor):
            return result.to(out_dtype)
        if isinstance(result, tuple) and result and isinstance(result[0], torch.Tensor):
            return (result[0].to(out_dtype), *result[1:])
        return result

    return run  # type: ignore[return-value]


def _leaves(x: Any):
    """Every tensor inside ``x`` (dicts, lists, tuples, NamedTuples)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for value in x.values():
            yield from _leaves(value)
    elif isinstance(x, (list, tuple)):
        for value in x:
            yield from _leaves(value)


def _upcast(x: Any) -> Any:
    """``x`` with every 16-bit floating tensor in float32. A container without one is returned
    as is, the same object (an op may fill a dict it is given, e.g. CMS's ``history``)."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in HALF_DTYPES else x
    if isinstance(x, dict):
        values = {key: _upcast(value) for key, value in x.items()}
        if all(values[key] is value for key, value in x.items()):
            return x
        return type(x)(values)
    if isinstance(x, (list, tuple)):
        values = [_upcast(value) for value in x]
        if all(new is old for new, old in zip(values, x, strict=True)):
            return x
        return type(x)(*values) if hasattr(x, "_fields") else type(x)(values)
    return x


def backward_without_autocast(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a memory's hand-written ``backward(ctx, *grads)`` to run with autocast off.

    Its forward ran inside :func:`full_precision` with autocast off; a backward called under
    autocast (``loss.backward()`` inside the ``with``) would otherwise run its matmuls in 16 bits
    and mix them with the float32 tensors it saved (as ``torch.amp.custom_bwd`` replays the
    forward's autocast state).
    """

    @functools.wraps(backward)
    def run(ctx: Any, *grads: Any) -> Any:
        device_type = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(device_type):
            return backward(ctx, *grads)
        with torch.autocast(device_type, enabled=False):
            return backward(ctx, *grads)

    return run
