"""Deep (MLP) associative memory trained online by chunked gradient descent: Titans' LMM.

SPEC §2.2 (last memory row) and §2.3. Per head, a memory ``M_W`` with ``depth`` linear maps
``W_1 [Dh, Dk], ..., W_L [Dv, Dh]`` (depth 1: ``W_1 [Dv, Dk]``), an activation ``σ`` between them
and optionally a residual ``M(x) = x + MLP(x)`` (needs ``Dk == Dv``), is written per token with
the inner objective ``L̃`` and read after the write:

    g_t = ∇_W L̃(M_{W_c}(k_t); v_t)        at the chunk-start weights W_c, per linear map
    S_t = μ_t S_{t-1} − η_t g_t              momentum (μ = None: S_t = −η_t g_t)
    W_t = α_t W_{t-1} + S_t                  retention α_t ∈ [0, 1] (None: 1); Titans' forget gate
                                             is 1 − α_t
    o_t = M_{W_t}(q_t)

``W_c`` is replaced by the current weights each time ``chunk_size`` tokens have been written;
with ``chunk_size = 1`` this is per-token gradient descent with momentum (S-1) exactly. Three forms
share one signature and agree to float error, outputs, final states and gradients:
:func:`mlp_memory_reference` (a loop over tokens), :func:`mlp_memory_chunk` (the training form,
derived in ``memory/README.md``, "MLP memories") and :func:`mlp_memory_step` (one token, for
decoding). All are differentiable end to end, into ``q, k, v``, the gates, the initial weights and
the initial state (meta-learning of the inner level); the chunk form is one autograd node with a
hand-written backward (:mod:`nestlearn.memory.mlp.chunk`; README, "Backward"), exact but not
twice differentiable.

Shapes: ``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``, gates ``eta, mu, alpha [B, H, T]`` (or Python
floats), ``weights`` a list of ``depth`` tensors ``[H, out, in]`` shared across the batch, or
``[B, H, out, in]`` already per sequence. The state is a plain ``dict[str, Tensor]``:

    w.{i}    [B, H, out_i, in_i]   weights of map i after the last token written
    s.{i}    [B, H, out_i, in_i]   momentum S of map i after the last token written
    wc.{i}   [B, H, out_i, in_i]   weights of map i at the start of the current chunk (gradients
                                   are taken there)
    pos      [] int64              tokens already written into the current chunk, 0 ≤ pos < C

No two entries share memory, so a state can be saved with safetensors, copied and restored; a
state from the chunk form with ``output_final_state=True`` continues exactly with the step form
or another chunk-form call, also in the middle of a chunk. When a state is given, it replaces the
initial weights (``weights`` then only fixes the shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nestlearn.errors import ConfigError
from nestlearn.memory.core.precision import full_precision
from nestlearn.memory.core.rules import Objective, get_objective, linear_gradient, momentum, retain
from nestlearn.memory.mlp.chunk import MLPChunks, chunk_forward
from nestlearn.memory.mlp.segment import mlp_forward as _forward
from nestlearn.memory.mlp.segment import segment_forward
from nestlearn.memory.mlp.segment import surprise as _surprise

State = dict[str, torch.Tensor]
Gate = torch.Tensor | float
Weights = list[torch.Tensor]

# False: the chunk form segment by segment under autograd (:func:`_chunk_loop`), the formulation
# the hand-written backward of :mod:`nestlearn.memory.mlp.chunk` is tested against.
_HAND_WRITTEN_BACKWARD = True


def _silu_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    # d/dx x Φ(x) = Φ(x) + x φ(x) for the exact (erf) GELU.
    cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "silu": (F.silu, _silu_grad),
    "gelu": (F.gelu, _gelu_grad),
}


class MLPOptions(NamedTuple):
    """Everything but the tensors: how an MLP memory is written and read (:func:`mlp_options`)."""

    objective: Objective
    sigma: Callable[[torch.Tensor], torch.Tensor]
    sigma_grad: Callable[[torch.Tensor], torch.Tensor]
    residual: bool
    chunk_size: int
    detach_inner: bool


@full_precision
def mlp_memory_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: Sequence[torch.Tensor],
    *,
    eta: Gate,
    mu: Gate | None = None,
    alpha: Gate | None = None,
    objective: str | Objective = "l2",
    activation: str = "silu",
    residual: bool = False,
    chunk_size: int = 1,
    initial_state: State | None = None,
    output_final_state: bool = False,
    detach_inner: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """The oracle: a loop over tokens running the per-token update of :func:`mlp_memory_step`.

    Arguments as :func:`mlp_memory_chunk`. Slow (``T`` sequential small steps); for tests.
    """
    opts = mlp_options(objective, activation, residual, chunk_size, detach_inner)
    eta, mu, alpha = _check(
        q, k, v, weights, (eta, mu, alpha), initial_state, "initial_state", opts, step=False
    )
    state = initial_state if initial_state is not None else init_mlp_memory_state(weights, len(q))
    w, s, wc, pos = _unpack(state, len(weights))
    B, H, T = q.shape[:3]
    q, k, v = (x.flatten(0, 1) for x in (q, k, v))  # [B·H, T, D]
    eta, mu, alpha = (None if g is None else g.flatten(0, 1) for g in (eta, mu, alpha))
    outputs = []
    for t in range(T):
        o, w, s, wc, pos = _token(
            q[:, t], k[:, t], v[:, t], w, s, wc, pos, eta[:, t], _at(mu, t), _at(alpha, t), opts
        )
        outputs.append(o)
    o = torch.stack(outputs, dim=1).unflatten(0, (B, H))
    return o, _pack(w, s, wc, pos, H) if output_final_state else None


@full_precision
def mlp_memory_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: Sequence[torch.Tensor],
    *,
    eta: Gate,
    mu: Gate | None = None,
    alpha: Gate | None = None,
    objective: str | Objective = "l2",
    activation: str = "silu",
    residual: bool = False,
    chunk_size: int = 1,
    initial_state: State | None = None,
    output_final_state: bool = False,
    detach_inner: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """Chunked gradient descent on an MLP memory, parallel within each chunk (the training form).

    Per chunk: one batched forward/backward of the MLP at the chunk-start weights for all its
    keys, then the momentum and retention recurrences in closed form with ``C×C`` triangular
    coefficient matrices, and reads through the per-token weights in the dual form (README).
    ``T`` need not be a multiple of ``chunk_size``; a given state may start mid-chunk.

    Args:
        q, k: ``[B, H, T, Dk]`` queries and keys; v: ``[B, H, T, Dv]`` values.
        weights: ``depth`` tensors ``[H, out, in]`` (or ``[B, H, out, in]``) chaining
            ``Dk -> ... -> Dv``: the initial memory, used when ``initial_state`` is None.
        eta: ``[B, H, T]`` inner learning rates ``η_t``. mu: ``[B, H, T]`` momentum ``μ_t`` or
            None (no momentum). alpha: ``[B, H, T]`` retention ``α_t`` or None (keep all).
        objective: ``"l2"`` (``½‖M(k) − v‖²``), ``"dot"`` (``−⟨M(k), v⟩``), ``"huber"`` or any
            :class:`~nestlearn.memory.core.rules.Objective`. activation: ``"silu"`` or ``"gelu"``.
        residual: read ``M(x) = x + MLP(x)``. chunk_size: tokens per chunk ``C ≥ 1``.
        initial_state: a state (module docstring) to continue from.
        output_final_state: also return the state after the last token.
        detach_inner: stop-gradient through the surprise: each ``g_t = δ_t u_tᵀ`` is computed
            from ``k.detach()``, ``v.detach()`` and the detached chunk-start weights, so no
            gradient flows through the MLP backward at ``W_c``. Gradients still reach ``q``,
            ``η``, ``μ``, ``α``, and the initial weights/state through the retention and
            momentum terms and the reads. Outputs are unchanged.

    Returns:
        ``o [B, H, T, Dv]`` and the final state (or None).

    Example::

        q = k = torch.nn.functional.normalize(torch.randn(2, 4, 100, 16), dim=-1)
        v = torch.randn(2, 4, 100, 16)
        weights = [torch.randn(4, 32, 16) / 4, torch.zeros(4, 16, 32)]
        eta = torch.full((2, 4, 100), 0.1)
        o, state = mlp_memory_chunk(q, k, v, weights, eta=eta, mu=0.9, alpha=0.99,
                                    residual=True, chunk_size=16, output_final_state=True)
    """
    opts = mlp_options(objective, activation, residual, chunk_size, detach_inner)
    eta, mu, alpha = _check(
        q, k, v, weights, (eta, mu, alpha), initial_state, "initial_state", opts, step=False
    )
    state = initial_state if initial_state is not None else init_mlp_memory_state(weights, len(q))
    w, s, wc, pos = _unpack(state, len(weights))
    B, H, T = q.shape[:3]
    q, k, v = (x.flatten(0, 1) for x in (q, k, v))  # [B·H, T, D]
    eta, mu, alpha = (None if g is None else g.flatten(0, 1) for g in (eta, mu, alpha))
    # The first segment only completes the chunk a given state is in the middle of.
    first = min(chunk_size - pos, T)
    sizes = [first] + [chunk_size] * ((T - first) // chunk_size)
    if (T - first) % chunk_size:
        sizes.append((T - first) % chunk_size)
    if not _HAND_WRITTEN_BACKWARD:
        o, w, s, wc, pos = _chunk_loop(q, k, v, w, s, wc, pos, eta, mu, alpha, sizes, opts)
        return o.unflatten(0, (B, H)), _pack(w, s, wc, pos, H) if output_final_state else None
    end = (pos + T) % chunk_size
    with_last = len(sizes) > 1 and end != 0
    tensors = [q, k, v, eta, mu, alpha, *w, *s, *wc]
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        o, *ends = MLPChunks.apply(opts, tuple(sizes), with_last, *tensors)
        depth = len(w)
        w_end, s_end, w_last = ends[:depth], ends[depth : 2 * depth], ends[2 * depth :]
    else:
        o, w_end, s_end, w_last, _ = chunk_forward(opts, sizes, q, k, v, eta, mu, alpha, w, s, wc)
    # The chunk-start weights after the call: the last boundary crossed, or the given ones.
    wc_end = w_end if end == 0 else (w_last if len(sizes) > 1 else wc)
    o = o.unflatten(0, (B, H))
    return o, _pack(w_end, s_end, wc_end, end, H) if output_final_state else None


def _chunk_loop(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: Weights,
    s: Weights,
    wc: Weights,
    pos: int,
    eta: torch.Tensor,
    mu: torch.Tensor | None,
    alpha: torch.Tensor | None,
    sizes: list[int],
    opts: MLPOptions,
) -> tuple[torch.Tensor, Weights, Weights, Weights, int]:
    """The chunk form segment by segment, each differentiated by autograd
    (:func:`_segment_autograd`): the formulation the hand-written backward is tested against."""
    # split, not slicing: the backward of each slice would fill a zero tensor of the full length.
    pieces = [
        [None] * len(sizes) if x is None else x.split(sizes, dim=1)
        for x in (q, k, v, eta, mu, alpha)
    ]
    outputs = []
    for size, q_, k_, v_, eta_, mu_, alpha_ in zip(sizes, *pieces, strict=True):
        o, w, s = _segment_autograd(q_, k_, v_, w, s, wc, eta_, mu_, alpha_, opts)
        outputs.append(o)
        pos += size
        if pos == opts.chunk_size:
            wc, pos = w, 0
    return torch.cat(outputs, dim=1), w, s, wc, pos


@full_precision
def mlp_memory_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: Sequence[torch.Tensor],
    *,
    eta: Gate,
    mu: Gate | None = None,
    alpha: Gate | None = None,
    objective: str | Objective = "l2",
    activation: str = "silu",
    residual: bool = False,
    chunk_size: int,
    state: State | None = None,
    detach_inner: bool = False,
) -> tuple[torch.Tensor, State]:
    """One token: ``q, k [B, H, Dk]``, ``v [B, H, Dv]``, gates ``[B, H]`` -> ``o [B, H, Dv]``
    and the new state (``state=None``: start from ``weights``). Other arguments as
    :func:`mlp_memory_chunk`; ``chunk_size`` must be the one the state was built with."""
    opts = mlp_options(objective, activation, residual, chunk_size, detach_inner)
    eta, mu, alpha = _check(q, k, v, weights, (eta, mu, alpha), state, "state", opts, step=True)
    state = state if state is not None else init_mlp_memory_state(weights, len(q))
    w, s, wc, pos = _unpack(state, len(weights))
    B, H = q.shape[:2]
    q, k, v = (x.flatten(0, 1) for x in (q, k, v))  # [B·H, D]
    eta, mu, alpha = (None if g is None else g.flatten(0, 1) for g in (eta, mu, alpha))
    o, w, s, wc, pos = _token(q, k, v, w, s, wc, pos, eta, mu, alpha, opts)
    return o.unflatten(0, (B, H)), _pack(w, s, wc, pos, H)


def init_mlp_memory_state(weights: Sequence[torch.Tensor], batch_size: int) -> State:
    """The state before any token: every sequence starts from ``weights``, zero momentum.

    ``weights``: tensors ``[H, out, in]`` (broadcast over the batch, differentiably) or
    ``[B, H, out, in]``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError("weights: expected a non-empty list of [H, out, in] tensors")
    state: State = {}
    for i, weight in enumerate(weights):
        if not isinstance(weight, torch.Tensor) or weight.ndim not in (3, 4):
            raise ValueError(
                f"weights[{i}]: expected a tensor [H, out, in] or [B, H, out, in], "
                f"got {_describe(weight)}"
            )
        if weight.ndim == 4 and weight.shape[0] != batch_size:
            raise ValueError(
                f"weights[{i}]: expected batch size {batch_size} in [B, H, out, in], "
                f"got shape {_shape(weight)}"
            )
        w = weight.expand(batch_size, *weight.shape[-3:]).contiguous()
        state[f"w.{i}"] = w
        state[f"s.{i}"] = torch.zeros_like(w)
        state[f"wc.{i}"] = w.clone()
    state["pos"] = torch.zeros((), dtype=torch.long, device=weights[0].device)
    return state


def _token(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: Weights,
    s: Weights,
    wc: Weights,
    pos: int,
    eta: torch.Tensor,
    mu: torch.Tensor | None,
    alpha: torch.Tensor | None,
    opts: MLPOptions,
) -> tuple[torch.Tensor, Weights, Weights, Weights, int]:
    """S-1 for one token, literally. ``N`` = batch × heads: ``q, k [N, Dk]``, ``v [N, Dv]``,
    weights and momenta ``[N, out, in]``, gates ``[N]``."""
    grad_at, k_in, v_in = wc, k, v
    if opts.detach_inner:
        grad_at, k_in, v_in = [x.detach() for x in wc], k.detach(), v.detach()
    deltas, inputs = _surprise(grad_at, k_in.unsqueeze(1), v_in.unsqueeze(1), opts)
    new_w, new_s = [], []
    for W, S, delta, u in zip(w, s, deltas, inputs, strict=True):
        g = linear_gradient(delta[:, 0], u[:, 0])  # [N, out, in]
        S = momentum(None if mu is None else S, g, mu, eta)
        new_s.append(S)
        new_w.append(retain(W, alpha) + S)
    o = _forward(new_w, q.unsqueeze(1), opts)[0][:, 0]
    pos += 1
    if pos == opts.chunk_size:
        wc, pos = new_w, 0
    return o, new_w, new_s, wc, pos


def _segment_autograd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: Weights,
    s: Weights,
    wc: Weights,
    eta: torch.Tensor,
    mu: torch.Tensor | None,
    alpha: torch.Tensor | None,
    opts: MLPOptions,
) -> tuple[torch.Tensor, Weights, Weights]:
    """``n`` tokens that take their gradients at ``wc``, written from weights ``w`` and momentum
    ``s``: ``o [N, n, Dv]`` and the weights and momentum ``[N, out, in]`` after the last of them,
    differentiated by autograd op by op (the reference for the hand-written backward).

    ``N`` = batch × heads; ``q, k [N, n, Dk]``, ``v [N, n, Dv]``, gates ``[N, n]``. With
    ``A[t, s] = Π_{r=s+1..t} α_r`` and ``M[t, s] = Π_{r=s+1..t} μ_r`` (README):
    ``W_t = A[t, 0] W_0 + c_t S_0 − Σ_{s≤t} D[t, s] η_s δ_s u_sᵀ`` with ``D = A M`` and
    ``c = A M[:, 0]`` (rows and columns 1..n); without momentum ``D = A`` and ``c = 0``.
    """
    if opts.detach_inner:
        wc, k, v = [x.detach() for x in wc], k.detach(), v.detach()
    deltas, inputs = _surprise(wc, k, v, opts)
    return segment_forward(q, w, s, deltas, inputs, eta, mu, alpha, opts)


def _at(gate: torch.Tensor | None, index: int | slice) -> torch.Tensor | None:
    return None if gate is None else gate[..., index]


def _unpack(state: State, depth: int) -> tuple[Weights, Weights, Weights, int]:
    """The state's matrices with the heads folded into the batch, ``[B·H, out, in]``: heads are
    independent memories, and every product is then one bmm."""
    w, s, wc = ([state[f"{p}.{i}"].flatten(0, 1) for i in range(depth)] for p in ("w", "s", "wc"))
    return w, s, wc, int(state["pos"])


def _pack(w: Weights, s: Weights, wc: Weights, pos: int, heads: int) -> State:
    state: State = {}
    for i, (W, S, Wc) in enumerate(zip(w, s, wc, strict=True)):
        W, S, Wc = (x.unflatten(0, (-1, heads)) for x in (W, S, Wc))
        state[f"w.{i}"], state[f"s.{i}"] = W, S
        # At a chunk boundary wc is w itself; a state must not alias (safetensors refuses
        # tensors sharing memory, and an in-place edit of one entry must not change another).
        state[f"wc.{i}"] = W.clone() if pos == 0 else Wc
    state["pos"] = torch.tensor(pos, dtype=torch.long, device=w[0].device)
    return state


def mlp_options(
    objective: str | Objective, activation: str, residual: bool, chunk_size: int, detach_inner: bool
) -> MLPOptions:
    """The checked :class:`MLPOptions` of the forms' keyword arguments."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    try:
        inner = get_objective(objective)
    except ConfigError as exc:
        raise ValueError(f"objective: {exc}") from exc
    sigma, sigma_grad = ACTIVATIONS[activation]
    return MLPOptions(inner, sigma, sigma_grad, bool(residual), chunk_size, bool(detach_inner))


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: Sequence[torch.Tensor],
    gates: tuple[Gate, Gate | None, Gate | None],
    state: State | None,
    state_name: str,
    opts: MLPOptions,
    *,
    step: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Check the tensors (ValueError naming the argument, expected vs received) and return the
    gates ``eta, mu, alpha`` as tensors (floats filled in)."""
    lead = ["B", "H"] if step else ["B", "H", "T"]
    for name, x, last in (("q", q, "Dk"), ("k", k, "Dk"), ("v", v, "Dv")):
        if not isinstance(x, torch.Tensor) or x.ndim != len(lead) + 1:
            raise ValueError(
                f"{name}: expected a tensor of rank {len(lead) + 1} "
                f"[{', '.join([*lead, last])}], got {_describe(x)}"
            )
        _check_float(name, x)
    if k.shape != q.shape:
        raise ValueError(
            f"k: expected shape {_shape(q)} (as q, [{', '.join([*lead, 'Dk'])}]), got {_shape(k)}"
        )
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v: expected leading dims [{', '.join(lead)}] = {list(q.shape[:-1])} (as q), "
            f"got shape {_shape(v)}"
        )
    if not step and q.shape[2] < 1:
        raise ValueError(f"q: expected at least one token (T >= 1), got shape {_shape(q)}")
    B, H, Dk, Dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(
            f"weights: expected a non-empty list of [H, out, in] tensors, got {_describe(weights)}"
        )
    d_in = Dk
    for i, weight in enumerate(weights):
        if not isinstance(weight, torch.Tensor) or weight.ndim not in (3, 4):
            raise ValueError(
                f"weights[{i}]: expected a tensor [H, out, in] or [B, H, out, in], "
                f"got {_describe(weight)}"
            )
        _check_float(f"weights[{i}]", weight)
        expected = (
            [H, weight.shape[-2], d_in] if weight.ndim == 3 else [B, H, weight.shape[-2], d_in]
        )
        if list(weight.shape) != expected:
            raise ValueError(
                f"weights[{i}]: expected shape {expected} (heads H={H}, batch B={B}, input width "
                f"{d_in} = {'Dk' if i == 0 else f'output width of weights[{i - 1}]'}), "
                f"got {_shape(weight)}"
            )
        d_in = weight.shape[-2]
    if d_in != Dv:
        raise ValueError(
            f"weights[{len(weights) - 1}]: expected output width Dv={Dv} (as v), got shape "
            f"{_shape(weights[-1])}"
        )
    if opts.residual and Dk != Dv:
        raise ValueError(f"residual=True needs Dk == Dv (M(x) = x + MLP(x)), got Dk={Dk}, Dv={Dv}")
    if state is not None:
        _check_state(state_name, state, weights, B, opts.chunk_size)
    shape = list(q.shape[:-1])
    return tuple(
        None if gate is None else _gate(name, gate, shape, lead, q)
        for name, gate in zip(("eta", "mu", "alpha"), gates, strict=True)
    )


def _gate(
    name: str, gate: Gate, shape: list[int], lead: list[str], like: torch.Tensor
) -> torch.Tensor:
    if isinstance(gate, (int, float)) and not isinstance(gate, bool):
        return torch.full(shape, float(gate), dtype=like.dtype, device=like.device)
    if not isinstance(gate, torch.Tensor) or list(gate.shape) != shape:
        raise ValueError(
            f"{name}: expected a float or a tensor [{', '.join(lead)}] = {shape}, "
            f"got {_describe(gate)}"
        )
    _check_float(name, gate)
    return gate


def _check_state(
    name: str, state: State, weights: Sequence[torch.Tensor], batch: int, chunk_size: int
) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{name}: expected a dict of tensors, got {type(state).__name__}")
    keys = {f"{p}.{i}" for p in ("w", "s", "wc") for i in range(len(weights))} | {"pos"}
    if set(state) != keys:
        raise ValueError(
            f"{name}: expected keys {sorted(keys)} for depth {len(weights)}, got {sorted(state)}"
        )
    for i, weight in enumerate(weights):
        expected = [batch, *weight.shape[-3:]]
        for prefix in ("w", "s", "wc"):
            x = state[f"{prefix}.{i}"]
            if not isinstance(x, torch.Tensor) or list(x.shape) != expected:
                raise ValueError(
                    f"{name}['{prefix}.{i}']: expected shape [B, H, out, in] = {expected}, "
                    f"got {_describe(x)}"
                )
            _check_float(f"{name}['{prefix}.{i}']", x)
    pos = state["pos"]
    if (
        not isinstance(pos, torch.Tensor)
        or pos.ndim != 0
        or pos.is_floating_point()
        or not 0 <= int(pos) < chunk_size
    ):
        raise ValueError(
            f"{name}['pos']: expected an integer scalar tensor in [0, chunk_size={chunk_size}) "
            f"(tokens into the current chunk), got {_describe(pos)}"
        )


def _check_float(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def _shape(x: torch.Tensor) -> list[int]:
    return list(x.shape)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        if x.ndim == 0 and not x.is_floating_point():
            return f"tensor({int(x)}) of dtype {x.dtype}"
        return f"shape {list(x.shape)} (rank {x.ndim})"
    return f"{type(x).__name__} {x!r}" if isinstance(x, (int, float)) else type(x).__name__
