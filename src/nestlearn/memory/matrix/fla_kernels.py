"""Optional CUDA kernels for the matrix memories: ``flash-linear-attention`` (``fla``).

The four matrix memories of :mod:`nestlearn.memory.matrix` are, token for token, the recurrences
that ``fla``'s Triton chunk kernels compute (SPEC §2.2; same state convention ``S [Dk, Dv]``, read
``o_t = scale · S_tᵀ q_t``, retention before the write, ``g = log α``):

| objective | decay | fla kernel                                   |
|-----------|-------|----------------------------------------------|
| dot       | any   | ``fla.ops.simple_gla.chunk_simple_gla``       |
| l2        | no    | ``fla.ops.delta_rule.chunk_delta_rule``       |
| l2        | yes   | ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` |

A dot memory with a write strength ``β ≠ 1`` has no fla kernel and stays on ours. The kernels
run on CUDA in float32/bfloat16/float16 only; our chunk form stays the reference they are tested
against (``tests/memory/matrix/test_fla_kernels.py``, on a GPU). ``model.kernel`` picks: ``torch``
(ours, always), ``fla`` (fla wherever it can run, an error where it cannot), ``auto`` (fla when
installed and the inputs are CUDA tensors of a supported dtype, ours otherwise). Never required:
install with ``pip install 'nestlearn[fla]'``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
from torch import Tensor

KERNELS = ("torch", "fla", "auto")
FLA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INSTALL = "pip install 'nestlearn[fla]'  (or: pip install flash-linear-attention)"


@functools.cache
def fla_installed() -> bool:
    """Whether ``fla`` can be imported (checked once, without importing it: ``auto`` asks on
    every forward)."""
    return importlib.util.find_spec("fla") is not None


def check_kernel(kernel: str) -> None:
    """``ValueError`` for an unknown kernel name or ``fla`` asked for but not installed."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "fla" and not fla_installed():
        raise ValueError(f"kernel='fla' needs flash-linear-attention: {INSTALL}")


def on_cuda(x: Tensor) -> bool:
    return x.is_cuda


def use_fla(kernel: str, x: Tensor, *, objective: str, beta: Tensor | None) -> bool:
    """Whether a sequence ``x`` (any of q, k, v) runs on fla under ``kernel``.

    ``auto`` falls back to ours where fla cannot run; ``fla`` says why it cannot instead.
    """
    if kernel == "torch":
        return False
    reasons = []
    if not fla_installed():
        reasons.append(f"flash-linear-attention is not installed ({INSTALL})")
    if not on_cuda(x):
        reasons.append(f"its kernels run on CUDA only (inputs are on {x.device})")
    if x.dtype not in FLA_DTYPES:
        reasons.append(f"its kernels take float32/bfloat16/float16, not {x.dtype}")
    if objective == "dot" and beta is not None:
        reasons.append("it has no dot-objective kernel with a write strength β")
    if not reasons:
        return True
    if kernel == "auto":
        return False
    raise RuntimeError(
        "model.kernel='fla' cannot run here: "
        + "; ".join(reasons)
        + ". Use model.kernel=auto to fall back to the torch chunk form."
    )


def matrix_memory_fla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_alpha: Tensor | None,
    beta: Tensor | None,
    objective: str,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """:func:`~nestlearn.memory.matrix.forms.matrix_memory_chunk` computed by fla's chunk kernels.

    Same arguments and results (head-first ``[B, H, T, D]`` in and out; fla works time-major
    ``[B, T, H, D]``, so inputs are transposed on the way in and the output on the way out). The
    final state is float32, as fla keeps it.
    """

    def time_major(x: Tensor) -> Tensor:
        return x.transpose(1, 2).contiguous()

    args = dict(
        q=time_major(q),
        k=time_major(k),
        v=time_major(v),
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float().contiguous(),
        output_final_state=output_final_state,
    )
    g = None if log_alpha is None else log_alpha.transpose(1, 2).float().contiguous()  # [B, T, H]
    b = None if beta is None else beta.transpose(1, 2).contiguous()  # [B, T, H]
    if objective == "dot":
        kernel = _import("fla.ops.simple_gla").chunk_simple_gla
        o, state = kernel(g=g, **args)
    elif g is None:
        kernel = _import("fla.ops.delta_rule").chunk_delta_rule
        o, state = kernel(beta=_ones_like_gate(q) if b is None else b, **args)
    else:
        kernel = _import("fla.ops.gated_delta_rule").chunk_gated_delta_rule
        o, state = kernel(g=g, beta=_ones_like_gate(q) if b is None else b, **args)
    return o.transpose(1, 2), state if output_final_state else None


def _ones_like_gate(q: Tensor) -> Tensor:
    B, H, T, _ = q.shape
    return q.new_ones(B, T, H)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{name} is needed for model.kernel='fla': {INSTALL}") from exc
