"""Matrix memories (SPEC §2.2): linear attention, gated linear attention, DeltaNet, Gated DeltaNet.

One op in three forms under one signature: :func:`matrix_memory_reference` (a loop over tokens
composing :mod:`nestlearn.memory.core.rules`), :func:`matrix_memory_chunk` (the chunkwise-parallel
training form, exact up to float error) and :func:`matrix_memory_step` (one token, for decoding);
:func:`matrix_memory` dispatches. The chunk form is derived in ``memory/README.md``; its
algorithm is in :mod:`nestlearn.memory.matrix.chunk`.

Layout is head-first: ``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``, gates ``[B, H, T]``. The state
``S [B, H, Dk, Dv]`` is the transpose of SPEC's memory ``M = Sᵀ ∈ R^{Dv×Dk}`` (so that ``q S``
reads a row of queries). Per token, retention first, then one inner GD step of size ``β_t`` on the
objective at the retained state, then the read::

    dot  (L̃ = −⟨M k, v⟩):    S_t = α_t S_{t-1} + β_t k_t v_tᵀ
    l2   (L̃ = ½‖M k − v‖²):   S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
    o_t = scale · S_tᵀ q_t

``α_t = exp(log_alpha_t)`` (``log_alpha ≤ 0``, not checked; ``None``: no decay) and ``β_t = beta_t``
(``None``: 1). Linear attention is ``dot`` without decay, gated linear attention ``dot`` with it,
DeltaNet ``l2`` without decay, Gated DeltaNet ``l2`` with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nestlearn.memory.core.precision import full_precision
from nestlearn.memory.core.rules import Objective, get_objective, linear_gradient, momentum, retain
from nestlearn.memory.matrix.chunk import chunk_forward

LINEAR_OBJECTIVES = ("dot", "l2")
MODES = ("chunk", "reference")


@full_precision
def matrix_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_alpha: Tensor | None = None,
    beta: Tensor | None = None,
    objective: str | Objective = "l2",
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Run a matrix memory over a sequence with the form ``mode`` (``"chunk"`` or ``"reference"``).

    Arguments and results as :func:`matrix_memory_chunk`. A single token (decoding) takes the
    recurrent path in either mode: the chunk form would only add the work of a 1×1 chunk.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    kwargs = dict(
        log_alpha=log_alpha,
        beta=beta,
        objective=objective,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    if mode == "reference" or (q.ndim == 4 and q.shape[2] == 1):
        _check_chunk_size(chunk_size)
        return matrix_memory_reference(q, k, v, **kwargs)
    return matrix_memory_chunk(q, k, v, chunk_size=chunk_size, **kwargs)


@full_precision
def matrix_memory_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_alpha: Tensor | None = None,
    beta: Tensor | None = None,
    objective: str | Objective = "l2",
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The sequential reference: the per-token update of :func:`matrix_memory_step` in a loop.

    Slow and obvious; the oracle the chunk form is tested against. Arguments and results as
    :func:`matrix_memory_chunk`.
    """
    inner = _check_objective(objective)
    _check_inputs(q, k, v, log_alpha, beta, initial_state, "initial_state", sequence=True)
    state = _zero_state(q, v) if initial_state is None else initial_state
    T = q.shape[2]
    # unbind rather than index per token: the backward of T selects would write T full-size
    # gradients, O(T²) work that would make the oracle needlessly slow
    tokens = zip(
        q.unbind(2),
        k.unbind(2),
        v.unbind(2),
        [None] * T if log_alpha is None else log_alpha.unbind(2),
        [None] * T if beta is None else beta.unbind(2),
        strict=True,
    )
    outputs = []
    for q_t, k_t, v_t, log_alpha_t, beta_t in tokens:
        o_t, state = _token_update(q_t, k_t, v_t, log_alpha_t, beta_t, inner, scale, state)
        outputs.append(o_t)
    return torch.stack(outputs, dim=2), state if output_final_state else None


@full_precision
def matrix_memory_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_alpha: Tensor | None = None,
    beta: Tensor | None = None,
    objective: str | Objective = "l2",
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """The chunkwise-parallel form: O(T·C) work, equal to the reference up to float error.

    Args:
        q, k: ``[B, H, T, Dk]`` queries and keys (keys L2-normalized for ``l2``, as in DeltaNet).
        v: ``[B, H, T, Dv]`` values.
        log_alpha: ``[B, H, T]`` log of the retention factor ``α_t``, ``≤ 0``; ``None``: no decay.
        beta: ``[B, H, T]`` inner step size ``β_t``, in ``[0, 1]`` for ``l2``; ``None``: 1.
        objective: ``"dot"`` (linear attention, GLA) or ``"l2"`` (DeltaNet, Gated DeltaNet).
        scale: factor on the read ``o_t = scale · S_tᵀ q_t``.
        initial_state: ``[B, H, Dk, Dv]`` state before the first token (``M_0ᵀ``); ``None``: 0.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk ``C``; a ``C`` larger than ``T`` is cut to ``T``.

    Returns:
        ``o [B, H, T, Dv]`` and the final state ``[B, H, Dk, Dv]`` (``None`` unless asked for).

    Example::

        >>> q, k = torch.randn(2, 4, 100, 16), F.normalize(torch.randn(2, 4, 100, 16), dim=-1)
        >>> v, beta = torch.randn(2, 4, 100, 32), torch.rand(2, 4, 100)
        >>> log_alpha = -torch.rand(2, 4, 100)
        >>> o, state = matrix_memory_chunk(q, k, v, log_alpha=log_alpha, beta=beta,
        ...                                output_final_state=True, chunk_size=32)
        >>> o.shape, state.shape
        (torch.Size([2, 4, 100, 32]), torch.Size([2, 4, 16, 32]))
    """
    inner = _check_objective(objective)
    _check_inputs(q, k, v, log_alpha, beta, initial_state, "initial_state", sequence=True)
    _check_chunk_size(chunk_size)
    o, state = chunk_forward(
        q, k, v, log_alpha, beta, inner.name == "l2", scale, initial_state, chunk_size
    )
    return o, state if output_final_state else None


@full_precision
def matrix_memory_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_alpha: Tensor | None = None,
    beta: Tensor | None = None,
    objective: str | Objective = "l2",
    scale: float = 1.0,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of the recurrence, for decoding: O(1) in the context length.

    ``q, k [B, H, Dk]``, ``v [B, H, Dv]``, gates ``[B, H]``, ``state [B, H, Dk, Dv]`` (``None``: 0).
    Returns ``o [B, H, Dv]`` and the new state; the input state is not modified.
    """
    inner = _check_objective(objective)
    _check_inputs(q, k, v, log_alpha, beta, state, "state", sequence=False)
    state = _zero_state(q, v) if state is None else state
    return _token_update(q, k, v, log_alpha, beta, inner, scale, state)


def _token_update(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor | None,
    beta: Tensor | None,
    objective: Objective,
    scale: float,
    state: Tensor,
) -> tuple[Tensor, Tensor]:
    """S-1 with μ = 0 on ``M = Sᵀ``: ``M ← R(M) − β ∇L̃(R(M); k, v)``, then ``o = scale · M q``."""
    # The rules read a linear map as W x with W [d_out, d_in]: here W = M = Sᵀ.
    memory = state.transpose(-1, -2)  # [B, H, Dv, Dk]
    memory = retain(memory, None if log_alpha is None else log_alpha.exp())
    pred = (memory @ k.unsqueeze(-1)).squeeze(-1)  # [B, H, Dv]
    grad = linear_gradient(objective.error(pred, v), k)  # [B, H, Dv, Dk]
    memory = memory + momentum(None, grad, 0.0, 1.0 if beta is None else beta)
    o = scale * (memory @ q.unsqueeze(-1)).squeeze(-1)  # [B, H, Dv]
    return o, memory.transpose(-1, -2)


def _zero_state(q: Tensor, v: Tensor) -> Tensor:
    return q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])


def _check_objective(objective: str | Objective) -> Objective:
    # Only dot and l2 make the write linear in the state, which the chunk form relies on.
    name = objective if isinstance(objective, str) else objective.name
    if name not in LINEAR_OBJECTIVES:
        raise ValueError(
            f"objective: expected one of {', '.join(LINEAR_OBJECTIVES)} for a matrix memory, "
            f"got {name!r}"
        )
    return get_objective(objective)


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")


def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor | None,
    beta: Tensor | None,
    state: Tensor | None,
    state_name: str,
    *,
    sequence: bool,
) -> None:
    """Ranks, shapes and dtypes of a sequence (``sequence=True``) or of one token."""
    lead = "B, H, T" if sequence else "B, H"
    rank = 4 if sequence else 3
    for name, x, last in (("q", q, "Dk"), ("k", k, "Dk"), ("v", v, "Dv")):
        if x.ndim != rank:
            raise ValueError(
                f"{name}: expected shape [{lead}, {last}] ({rank} dimensions), got {list(x.shape)}"
            )
    named = {"q": q, "k": k, "v": v, "log_alpha": log_alpha, "beta": beta, state_name: state}
    for name, x in named.items():
        if x is not None and not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        if x is not None and x.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (that of q), got {x.dtype}")
    *lead_sizes, dk = q.shape
    dv = v.shape[-1]
    expected = {
        "k": (f"[{lead}, Dk]", (*lead_sizes, dk)),
        "v": (f"[{lead}, Dv]", (*lead_sizes, dv)),
        "log_alpha": (f"[{lead}]", tuple(lead_sizes)),
        "beta": (f"[{lead}]", tuple(lead_sizes)),
        state_name: ("[B, H, Dk, Dv]", (*lead_sizes[:2], dk, dv)),
    }
    for name, (dims, shape) in expected.items():
        x = named[name]
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(
                f"{name}: expected shape {dims} = {list(shape)} (sizes from q and v), "
                f"got {list(x.shape)}"
            )
    if sequence and q.shape[2] == 0:
        raise ValueError("q: expected at least one token, got T = 0")
