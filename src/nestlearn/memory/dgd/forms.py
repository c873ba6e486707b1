"""MLP memory trained by chunked *delta* gradient descent (DGD) with momentum and retention.

The inner memory of self-modifying Titans (SPEC §5), also usable on its own. Per head, a memory
``M_W(z) = MLP_W(z) + skip(z)`` (``depth`` bias-free linear maps, ``σ`` between them; ``skip``
none, the identity, or a linear map that is itself part of the memory) is written per token,
every linear map ``W`` with its own input ``u_t`` (``k_t`` for the first map and a linear skip,
``σ`` of the previous map's output otherwise) and its normalized input ``x_t = u_t / ‖u_t‖``:

    g_t = ∇_W L̃(M_{W_c}(k_t); v̂_t)           at the chunk-start weights W_c (per map δ_t u_tᵀ)
    S_t = μ_t S_{t-1} − η_t g_t                 momentum (μ = None: S_t = −η_t g_t)
                                                ema_momentum: S_t = μ_t S_{t-1} − (1 − μ_t) η_t g_t
    W_t = W_{t-1} (α_t I − η_t x_t x_tᵀ) + S_t   DGD (dgd=False: W_t = α_t W_{t-1} + S_t)
    o_t = M_{W_t}(q_t)                          read="per_token" (dual form); "chunk_start": M_{W_c}

``u_t``, ``x_t`` and the errors ``δ_t`` all come from ``k_t`` run through ``M_{W_c}``. The target
is ``v̂_t = v_t`` (``target="given"``) or self-generated, ``v̂_t = M_{W_c}(v_t)`` (``"self"``,
SPEC §5; then ``v`` has the key width): a fixed target of the inner loss (the inner gradient does
not differentiate it), through which the outer loss back-propagates like through everything
else. ``W_c`` becomes the current weights each time ``chunk_size`` tokens have been written.
With ``dgd=False`` this is exactly :mod:`nestlearn.memory.mlp` (Titans' chunked GD).

Three forms with one signature agree to float error, outputs, final states and gradients:
:func:`dgd_mlp_memory_reference` (a loop over tokens composing :mod:`nestlearn.memory.core.rules`),
:func:`dgd_mlp_memory_chunk` (parallel within each chunk: the UT transform of the matrix-valued
transition ``α_t I − η_t x_t x_tᵀ``, derived in ``docs/self-modifying-titans.md``) and
:func:`dgd_mlp_memory_step` (one token, for decoding). Shapes and the state (keys ``w.{i}``,
``s.{i}``, ``wc.{i}``, ``pos``; a linear skip is the last map) as in :mod:`nestlearn.memory.mlp`,
whose state helpers are reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nestlearn.errors import ConfigError
from nestlearn.memory.core.precision import full_precision
from nestlearn.memory.core.rules import (
    Objective,
    dgd_projection,
    get_objective,
    linear_gradient,
    momentum,
    retain,
)
from nestlearn.memory.core.segments import segment_products
from nestlearn.memory.dgd import gates as dgd_gates
from nestlearn.memory.matrix.chunk import _unit_lower_inverse
from nestlearn.memory.mlp import forms as mlp
from nestlearn.memory.mlp.forms import ACTIVATIONS, Gate, State, Weights, init_mlp_memory_state

SKIPS = ("none", "identity", "linear")
TARGETS = ("given", "self")
READS = ("per_token", "chunk_start")


class Options(NamedTuple):
    """Everything but the tensors: how a DGD MLP memory is written and read."""

    objective: Objective
    sigma: Callable[[torch.Tensor], torch.Tensor]
    sigma_grad: Callable[[torch.Tensor], torch.Tensor]
    skip: str
    dgd: bool
    target: str
    read: str
    chunk_size: int
    detach_inner: bool
    # > 0: a linear skip of this output width is fused into the first map as extra rows
    # (same input, so the same gradient input u and DGD input x): one map less per chunk.
    fused: int = 0
    # S_t = μ S − (1 − μ) η g (gain 1 for any μ; the DGD projection keeps η); False: − η g.
    ema_momentum: bool = False

    @property
    def chain(self) -> int:
        """How many of the maps are not the MLP chain (a linear skip is the last map, apart)."""
        return -1 if self.skip == "linear" and not self.fused else 0


def options(
    *,
    objective: str | Objective = "l2",
    activation: str = "silu",
    skip: str = "none",
    dgd: bool = True,
    target: str = "given",
    read: str = "per_token",
    chunk_size: int = 1,
    detach_inner: bool = False,
    ema_momentum: bool = False,
) -> Options:
    """Checked :class:`Options` (ValueError naming the argument and the allowed values)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    for name, value, allowed in (
        ("activation", activation, sorted(ACTIVATIONS)),
        ("skip", skip, list(SKIPS)),
        ("target", target, list(TARGETS)),
        ("read", read, list(READS)),
    ):
        if value not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    try:
        inner = get_objective(objective)
    except ConfigError as exc:
        raise ValueError(f"objective: {exc}") from exc
    sigma, sigma_grad = ACTIVATIONS[activation]
    return Options(
        inner,
        sigma,
        sigma_grad,
        skip,
        bool(dgd),
        target,
        read,
        chunk_size,
        bool(detach_inner),
        ema_momentum=bool(ema_momentum),
    )


@full_precision
def dgd_mlp_memory_reference(
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
    skip: str = "none",
    dgd: bool = True,
    target: str = "given",
    read: str = "per_token",
    chunk_size: int = 1,
    initial_state: State | None = None,
    output_final_state: bool = False,
    detach_inner: bool = False,
    ema_momentum: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """The oracle: a loop over tokens running the per-token update of :func:`dgd_mlp_memory_step`.

    Arguments as :func:`dgd_mlp_memory_chunk`. Slow (``T`` sequential small steps); for tests.
    """
    opts = options(
        objective=objective,
        activation=activation,
        skip=skip,
        dgd=dgd,
        target=target,
        read=read,
        chunk_size=chunk_size,
        detach_inner=detach_inner,
        ema_momentum=ema_momentum,
    )
    gates = check(q, k, v, weights, (eta, mu, alpha), initial_state, "initial_state", opts)
    state = initial_state if initial_state is not None else init_mlp_memory_state(weights, len(q))
    w, s, wc, pos = mlp._unpack(state, len(weights))
    B, H = q.shape[:2]
    q, k, v = (x.flatten(0, 1) for x in (q, k, v))  # [B·H, T, D]
    eta, mu, alpha = (None if g is None else g.flatten(0, 1) for g in gates)
    outputs = []
    for t in range(q.shape[1]):
        o, w, s, wc, pos = token(
            q[:, t], k[:, t], v[:, t], w, s, wc, pos, eta[:, t], _at(mu, t), _at(alpha, t), opts
        )
        outputs.append(o)
    o = torch.stack(outputs, dim=1).unflatten(0, (B, H))
    return o, mlp._pack(w, s, wc, pos, H) if output_final_state else None


@full_precision
def dgd_mlp_memory_chunk(
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
    skip: str = "none",
    dgd: bool = True,
    target: str = "given",
    read: str = "per_token",
    chunk_size: int = 1,
    initial_state: State | None = None,
    output_final_state: bool = False,
    detach_inner: bool = False,
    ema_momentum: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """Chunked DGD on an MLP memory, parallel within each chunk (the training form).

    Per chunk: one batched forward/backward of the memory at the chunk-start weights for all
    its keys; momentum and retention in closed form (``C×C`` segment products); the DGD
    transition by one ``C×C`` unit-lower-triangular inverse per map (UT transform); per-token
    reads in the dual form. ``T`` need not be a multiple of ``chunk_size``; a state may start
    mid-chunk.

    Args:
        q, k: ``[B, H, T, Dk]`` queries and keys; v: ``[B, H, T, Dv]`` values (``target="given"``)
            or ``[B, H, T, Dk]`` inputs of the self-generated targets (``target="self"``).
        weights: ``[H, out, in]`` (or ``[B, H, out, in]``) tensors: the chain ``Dk -> ... -> Dv``,
            then, for ``skip="linear"``, the skip ``[H, Dv, Dk]``. The initial memory, used when
            ``initial_state`` is None.
        eta: ``[B, H, T]`` inner learning rates ``η_t`` (also the DGD projection's step).
        mu: ``[B, H, T]`` momentum ``μ_t`` or None. alpha: ``[B, H, T]`` retention or None (1).
        objective: ``"l2"``, ``"dot"``, ``"huber"`` or an
            :class:`~nestlearn.memory.core.rules.Objective`. activation: ``"silu"`` or ``"gelu"``.
        skip: ``"none"``, ``"identity"`` (``M(z) = z + MLP(z)``, needs ``Dk == Dv``) or
            ``"linear"`` (``M(z) = W_s z + MLP(z)``, ``W_s`` written like the other maps).
        dgd: the DGD projection ``−η_t (W x_t) x_tᵀ`` per map; False: plain chunked GD.
        target: ``"given"`` (``v̂ = v``) or ``"self"`` (``v̂ = M_{W_c}(v)``).
        read: ``"per_token"`` (``M_{W_t}(q_t)``) or ``"chunk_start"`` (``M_{W_c}(q_t)``).
        chunk_size: tokens per chunk ``C ≥ 1``. initial_state: a state to continue from.
        output_final_state: also return the state after the last token.
        detach_inner: stop-gradient through the surprise, as in :mod:`nestlearn.memory.mlp`:
            ``δ``, ``u``, ``x`` and ``v̂`` from detached ``k``, ``v`` and chunk-start weights.
        ema_momentum: momentum as an average of past steps, ``S_t = μ_t S_{t−1} − (1 − μ_t)
            η_t g_t`` (the DGD projection keeps ``η_t``); without ``mu`` it changes nothing.

    Returns:
        ``o [B, H, T, Dv]`` and the final state (or None).
    """
    opts = options(
        objective=objective,
        activation=activation,
        skip=skip,
        dgd=dgd,
        target=target,
        read=read,
        chunk_size=chunk_size,
        detach_inner=detach_inner,
        ema_momentum=ema_momentum,
    )
    gates = check(q, k, v, weights, (eta, mu, alpha), initial_state, "initial_state", opts)
    state = initial_state if initial_state is not None else init_mlp_memory_state(weights, len(q))
    w, s, wc, pos = mlp._unpack(state, len(weights))
    B, H = q.shape[:2]
    flat = [None if x is None else x.flatten(0, 1) for x in (q, k, v, *gates)]
    o, w, s, wc, pos = run_chunks(*flat, w, s, wc, pos, opts)
    o = o.unflatten(0, (B, H))
    return o, mlp._pack(w, s, wc, pos, H) if output_final_state else None


@full_precision
def dgd_mlp_memory_step(
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
    skip: str = "none",
    dgd: bool = True,
    target: str = "given",
    read: str = "per_token",
    chunk_size: int,
    state: State | None = None,
    detach_inner: bool = False,
    ema_momentum: bool = False,
) -> tuple[torch.Tensor, State]:
    """One token: ``q, k [B, H, Dk]``, ``v [B, H, Dv]`` (or ``Dk``), gates ``[B, H]`` ->
    ``o [B, H, Dv]`` and the new state (``state=None``: start from ``weights``). Other arguments
    as :func:`dgd_mlp_memory_chunk`; ``chunk_size`` must be the one the state was built with."""
    opts = options(
        objective=objective,
        activation=activation,
        skip=skip,
        dgd=dgd,
        target=target,
        read=read,
        chunk_size=chunk_size,
        detach_inner=detach_inner,
        ema_momentum=ema_momentum,
    )
    gates = check(q, k, v, weights, (eta, mu, alpha), state, "state", opts, step=True)
    state = state if state is not None else init_mlp_memory_state(weights, len(q))
    w, s, wc, pos = mlp._unpack(state, len(weights))
    B, H = q.shape[:2]
    flat = [None if x is None else x.flatten(0, 1) for x in (q, k, v, *gates)]
    o, w, s, wc, pos = token(*flat[:3], w, s, wc, pos, *flat[3:], opts)
    return o.unflatten(0, (B, H)), mlp._pack(w, s, wc, pos, H)


def token(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    w: Weights,
    s: Weights,
    wc: Weights,
    pos: int,
    eta: torch.Tensor,
    mu: torch.Tensor | None,
    alpha: torch.Tensor | None,
    opts: Options,
) -> tuple[torch.Tensor | None, Weights, Weights, Weights, int]:
    """One token of the recurrence, literally. ``N`` = batch × heads: ``q, k [N, Dk]``,
    ``v [N, Dv]`` (or ``[N, Dk]`` for a self target), weights ``[N, out, in]``, gates ``[N]``;
    ``q=None`` writes without reading (``o`` is None)."""
    grad_at, k_in, v_in = wc, k, v
    if opts.detach_inner:
        grad_at, k_in, v_in = [x.detach() for x in wc], k.detach(), v.detach()
    deltas, inputs = surprise(grad_at, k_in.unsqueeze(1), v_in.unsqueeze(1), opts)
    new_w, new_s = [], []
    step = (1 - mu) * eta if opts.ema_momentum and mu is not None else eta
    for W, S, delta, u in zip(w, s, deltas, inputs, strict=True):
        g = linear_gradient(delta[:, 0], u[:, 0])  # [N, out, in]
        S = momentum(None if mu is None else S, g, mu, step)
        W_next = retain(W, alpha) + S
        if opts.dgd:
            # W (α I − η x xᵀ) = α W − (W − W (I − η x xᵀ)): the projection term of DGD.
            x = F.normalize(u[:, 0], dim=-1)
            W_next = W_next - (W - dgd_projection(W, x, eta))
        new_w.append(W_next)
        new_s.append(S)
    o = None
    if q is not None:
        o = forward(new_w if opts.read == "per_token" else wc, q.unsqueeze(1), opts)[0][:, 0]
    pos += 1
    if pos == opts.chunk_size:
        wc, pos = new_w, 0
    return o, new_w, new_s, wc, pos


def run_chunks(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor | None,
    alpha: torch.Tensor | None,
    w: Weights,
    s: Weights,
    wc: Weights,
    pos: int,
    opts: Options,
) -> tuple[torch.Tensor | None, Weights, Weights, Weights, int]:
    """The chunk form over ``T`` tokens, heads folded into the batch (``q, k, v [N, T, ·]``,
    gates ``[N, T]``): outputs ``[N, T, Dv]`` (None without ``q``) and the state after them.

    Where :func:`nestlearn.memory.dgd.segment_fused.supported` (the L2 objective, SiLU/GELU,
    skip identity or none, per-token reads: ``M_mem`` of self-modifying Titans), each segment
    is one autograd node with a hand-written backward that keeps the segment's start state and
    a few within-segment tensors, and remakes the rest (same numbers as :func:`segment`)."""
    from nestlearn.memory.dgd import segment_fused  # here: it imports this module

    T = k.shape[1]
    sizes = segment_sizes(T, opts.chunk_size, pos)
    # split, not slicing: the backward of each slice would fill a zero tensor of the full length.
    pieces = [
        [None] * len(sizes) if x is None else x.split(sizes, dim=1)
        for x in (q, k, v, eta, mu, alpha)
    ]
    (w, s, wc), fused = fuse((w, s, wc), opts)
    outputs = []
    one_node = _FUSED_SEGMENT and q is not None and segment_fused.supported(fused)
    for size, q_, k_, v_, eta_, mu_, alpha_ in zip(sizes, *pieces, strict=True):
        if one_node:
            # The same numbers as one autograd node per segment (hand-written backward).
            c = dgd_gates.gate_coefficients(eta_, mu_, alpha_, ema=opts.ema_momentum)
            o, w, s = segment_fused.segment(q_, k_, v_, w, s, wc, c, fused)
        else:
            coeffs = coefficients(eta_, mu_, alpha_, ema=opts.ema_momentum)
            o, w, s = segment(q_, k_, v_, w, s, wc, coeffs, fused)
        outputs.append(o)
        pos += size
        if pos == opts.chunk_size:
            wc, pos = w, 0
    w, s, wc = unfuse((w, s, wc), fused)
    return (None if q is None else torch.cat(outputs, dim=1)), w, s, wc, pos


# False: every segment under plain autograd (the formulation the hand-written backward of
# :mod:`nestlearn.memory.dgd.segment_fused` is tested against).
_FUSED_SEGMENT = True


def segment_sizes(T: int, chunk_size: int, pos: int) -> list[int]:
    """``[C − pos, C, ..., C, rest]`` cut to ``T``: the first segment completes the chunk a
    state is in the middle of."""
    first = min(chunk_size - pos, T)
    sizes = [first] + [chunk_size] * ((T - first) // chunk_size)
    if (T - first) % chunk_size:
        sizes.append((T - first) % chunk_size)
    return sizes


def fuse(memory: tuple[Weights, ...], opts: Options) -> tuple[tuple[Weights, ...], Options]:
    """A linear skip (last map) moved into the first map as extra output rows, for each of the
    weight lists in ``memory``; the options say so (``fused`` = the skip's width)."""
    if opts.skip != "linear" or opts.fused:
        return memory, opts
    fused = tuple([torch.cat([ws[0], ws[-1]], dim=-2), *ws[1:-1]] for ws in memory)
    return fused, opts._replace(fused=memory[0][-1].shape[-2])


def unfuse(memory: tuple[Weights, ...], opts: Options) -> tuple[Weights, ...]:
    """The inverse of :func:`fuse`."""
    if not opts.fused:
        return memory
    f = opts.fused
    return tuple([ws[0][..., :-f, :], *ws[1:], ws[0][..., -f:, :]] for ws in memory)


class Rows(NamedTuple):
    """Coefficients of the states after ``t`` tokens for a range of rows ``t``, shaped for use:
    ``decay, carry [N, r, 1]``, ``write, project [N, r, n]`` (columns the tokens 1..n)."""

    decay: torch.Tensor  # G_t = A[t, 0]
    carry: torch.Tensor | None  # c_t; None without momentum
    write: torch.Tensor  # −D[t, s] η_s
    project: torch.Tensor | None  # −A[t, j] η_j


class Coefficients(NamedTuple):
    """The unrolled recurrences of one segment of ``n`` tokens, sliced once for every map of
    every memory written with these gates."""

    before: Rows  # t = 0..n−1, the state before each token: the UT right side (no project)
    lower: torch.Tensor  # A[j−1, i] η_i for i < j, [N, n, n]: the UT system, times x_jᵀ x_i
    after: Rows  # t = 1..n, the state after each token: the per-token reads
    end: Rows  # t = n, transposed: decay, carry [N, 1, 1]; write, project [N, n, 1]
    s_decay: torch.Tensor | None  # M[n, 0], [N, 1, 1]; None without momentum
    s_write: torch.Tensor  # −M[n, s] η_s, [N, n, 1] (without momentum −η_n at s = n, else 0)

    def repeat(self, M: int) -> Coefficients:
        """The same coefficients for ``M`` memories stacked along the batch."""
        if M == 1:
            return self

        def rep(x):
            if isinstance(x, Rows):
                return Rows(*(rep(y) for y in x))
            return None if x is None else x.repeat(M, *[1] * (x.ndim - 1))

        return Coefficients(*(rep(x) for x in self))


def coefficients(
    eta: torch.Tensor, mu: torch.Tensor | None, alpha: torch.Tensor | None, *, ema: bool = False
) -> Coefficients:
    """With ``A[t, j] = Π_{r=j+1..t} α_r`` and ``M[t, s] = Π_{r=s+1..t} μ_r`` (segment products,
    no division): ``G_t = A[t, 0]``, ``c_t = Σ_j A[t, j] M[j, 0]``, ``D = A M`` (``D = A``, no
    ``c``, without momentum). Gates ``[N, n]``. ``ema``: the gradient's step is ``(1 − μ_s) η_s``
    in ``write`` and ``s_write`` (momentum as an average); the projection keeps ``η``."""
    gates = [torch.ones_like(eta) if alpha is None else alpha, *([] if mu is None else [mu])]
    products = segment_products(torch.stack(gates))  # [1 or 2, N, n+1, n+1]
    retention = products[0]
    decay = retention[..., 0, None]  # [N, n+1, 1]
    # −A[t, j] η_j, negated once here so that every write below is a plain baddbmm.
    project = -retention[..., 1:] * eta.unsqueeze(-2)  # [N, n+1, n]
    if mu is None:
        carry, write, s_decay = None, project, None
        s_write = torch.cat([torch.zeros_like(eta[:, :-1]), -eta[:, -1:]], dim=-1)
    else:
        persistence = products[1]  # M [N, n+1, n+1]
        mixed = torch.bmm(retention[..., 1:], persistence[:, 1:])  # [N, n+1, n+1]: c, then D
        step = (1 - mu) * eta if ema else eta
        carry, write = mixed[..., 0, None], -mixed[..., 1:] * step.unsqueeze(-2)
        s_decay, s_write = persistence[:, -1, 0, None, None], -persistence[:, -1, 1:] * step
    last = slice(-1, None)
    return Coefficients(
        before=Rows(decay[:, :-1], _rows(carry, slice(0, -1)), write[:, :-1], None),
        lower=-project[:, :-1],
        after=Rows(decay[:, 1:], _rows(carry, slice(1, None)), write[:, 1:], project[:, 1:]),
        end=Rows(
            decay[:, last], _rows(carry, last), write[:, -1, :, None], project[:, -1, :, None]
        ),
        s_decay=s_decay,
        s_write=s_write.unsqueeze(-1),
    )


def _rows(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if x is None else x[:, rows]


def segment(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    w: Weights,
    s: Weights,
    wc: Weights,
    coeffs: Coefficients,
    opts: Options,
) -> tuple[torch.Tensor | None, Weights, Weights]:
    """``n`` tokens that take their gradients at ``wc``, written from weights ``w`` and momentum
    ``s``: ``o [N, n, Dv]`` (None without ``q``) and the weights and momentum after them.

    Per map, with the :class:`Coefficients` of :func:`coefficients`,

        W_t z = G_t W_0 z + c_t S_0 z − Σ_{s≤t} D[t, s] η_s (u_sᵀ z) δ_s
                − Σ_{j≤t} A[t, j] η_j (x_jᵀ z) p_j,          p_j = W_{j−1} x_j

    and the ``p_j`` solve ``(I + L) P = R`` with ``L[j, i] = A[j−1, i] η_i x_jᵀ x_i`` (``i < j``)
    and ``R`` the first three terms at ``t = j − 1``, ``z = x_j`` (the UT transform).
    """
    grad_at = wc
    if opts.detach_inner:
        grad_at, k, v = [x.detach() for x in wc], k.detach(), v.detach()
    deltas, inputs = surprise(grad_at, k, v, opts)
    maps = [
        write_map(W, S, delta, u, coeffs, opts.dgd)
        for W, S, delta, u in zip(w, s, deltas, inputs, strict=True)
    ]
    o = None
    if q is not None and opts.read == "chunk_start":
        o = forward(wc, q, opts)[0]
    elif q is not None:
        # Dual form, map by map: W_t z_t for the per-token weights, never materialized.
        o = apply(lambda i, z: read_map(z, maps[i], coeffs.after), q, len(maps), opts)[0]
    new_w, new_s = zip(*(end_map(m, coeffs) for m in maps), strict=True)
    return o, list(new_w), list(new_s)


class Map(NamedTuple):
    """One linear map written over a segment: its start ``W_0, S_0``, the errors ``δ`` and
    inputs ``u`` of the surprise, and (DGD) the normalized inputs ``x`` and ``p_j = W_{j−1} x_j``.
    """

    W: torch.Tensor  # [N, out, in]
    S: torch.Tensor  # [N, out, in]
    delta: torch.Tensor  # [N, n, out]
    u: torch.Tensor  # [N, n, in]
    x: torch.Tensor | None  # [N, n, in]
    p: torch.Tensor | None  # [N, n, out]


def write_map(
    W: torch.Tensor,
    S: torch.Tensor,
    delta: torch.Tensor,
    u: torch.Tensor,
    coeffs: Coefficients,
    dgd: bool,
) -> Map:
    """The :class:`Map` of one linear map; with DGD, ``p_j = W_{j−1} x_j`` by the UT transform:
    ``(I + L) P = R``, ``R`` the reads of the states before each token without DGD terms."""
    if not dgd:
        return Map(W, S, delta, u, None, None)
    x = F.normalize(u, dim=-1)
    rhs = read_map(x, Map(W, S, delta, u, None, None), coeffs.before)
    lower = coeffs.lower * torch.bmm(x, x.mT)  # L [N, n, n], strictly lower
    return Map(W, S, delta, u, x, torch.bmm(_unit_lower_inverse(lower), rhs))


def read_map(z: torch.Tensor, m: Map, rows: Rows) -> torch.Tensor:
    """``W_t z_t`` for the ``rows`` of the coefficients, ``z [N, n, in]``: the unrolled
    recurrence of :func:`segment` (without the DGD terms when ``rows.project`` or ``m.p`` is
    None)."""
    y = torch.bmm(rows.decay * z, m.W.mT)  # [N, n, out]
    if rows.carry is not None:
        y = torch.baddbmm(y, rows.carry * z, m.S.mT)
    y = torch.baddbmm(y, rows.write * torch.bmm(z, m.u.mT), m.delta)
    if m.p is not None and rows.project is not None:
        y = torch.baddbmm(y, rows.project * torch.bmm(z, m.x.mT), m.p)
    return y


def end_map(m: Map, coeffs: Coefficients) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights and momentum after the segment, materialized once: ``Δᵀ (coeff ⊙ U)``."""
    end = coeffs.end
    kept = end.decay * m.W
    if end.carry is not None:
        kept = torch.addcmul(kept, end.carry, m.S)
    if m.p is None:
        W_n = torch.baddbmm(kept, m.delta.mT, end.write * m.u)
    else:
        # Both rank-n writes in one product: [Δ P]ᵀ [write ⊙ U; project ⊙ X].
        left = torch.cat([m.delta, m.p], dim=1)
        right = torch.cat([end.write * m.u, end.project * m.x], dim=1)
        W_n = torch.baddbmm(kept, left.mT, right)
    if coeffs.s_decay is None:
        return W_n, torch.bmm(m.delta.mT, coeffs.s_write * m.u)
    return W_n, torch.baddbmm(coeffs.s_decay * m.S, m.delta.mT, coeffs.s_write * m.u)


def apply(
    read: Callable[[int, torch.Tensor], torch.Tensor], z: torch.Tensor, n_maps: int, opts: Options
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``M(z)`` with map ``i`` applied by ``read(i, ·)``: the output, each map's input (a linear
    skip's is ``z``, last) and each hidden pre-activation (for the backward)."""
    chain = n_maps + opts.chain
    inputs, pre = [], []
    h, skip = z, None
    for i in range(chain):
        inputs.append(h)
        h = read(i, h)
        if i == 0 and opts.fused:
            h, skip = h[..., : -opts.fused], h[..., -opts.fused :]
        if i < chain - 1:
            pre.append(h)
            h = opts.sigma(h)
    if opts.skip == "identity":
        h = h + z
    elif opts.fused:
        h = h + skip
    elif opts.skip == "linear":
        inputs.append(z)
        h = h + read(chain, z)
    return h, inputs, pre


def forward(
    weights: Weights, z: torch.Tensor, opts: Options
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """:func:`apply` with explicit weights ``[N, out, in]`` and ``z [N, n, Dk]``."""
    return apply(lambda i, h: torch.bmm(h, weights[i].mT), z, len(weights), opts)


def surprise(
    weights: Weights, k: torch.Tensor, v: torch.Tensor, opts: Options
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per map, ``δ [N, n, out]`` and ``u [N, n, in]`` with ``∇_W L̃(M(k); v̂) = δ uᵀ``: manual
    backprop through the chain; a linear skip gets the output error and the input ``k``.

    ``v̂ = v`` (``target="given"``) or ``M_W(v)`` (``"self"``: the same weights, run in one
    forward with the keys), a constant of the inner loss: the error does not differentiate it.
    """
    n = k.shape[1]
    if opts.target == "self":
        out, inputs, pre = forward(weights, torch.cat([k, v], dim=1), opts)
        pred, target = out[:, :n], out[:, n:]
        inputs, pre = [x[:, :n] for x in inputs], [x[:, :n] for x in pre]
    else:
        (pred, inputs, pre), target = forward(weights, k, opts), v
    delta = error = opts.objective.error(pred, target)
    chain = len(weights) + opts.chain
    deltas = [delta]
    for W, z in zip(reversed(weights[1:chain]), reversed(pre), strict=True):
        delta = torch.bmm(delta, W) * opts.sigma_grad(z)
        deltas.append(delta)
    deltas = deltas[::-1]
    if opts.fused:
        deltas[0] = torch.cat([deltas[0], error], dim=-1)
    elif opts.skip == "linear":
        deltas.append(error)
    return deltas, inputs


def _at(gate: torch.Tensor | None, index: int) -> torch.Tensor | None:
    return None if gate is None else gate[:, index]


def check(
    q: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: Sequence[torch.Tensor],
    gates: tuple[Gate, Gate | None, Gate | None],
    state: State | None,
    state_name: str,
    opts: Options,
    *,
    step: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Check the tensors (ValueError naming the argument, expected vs received) and return the
    gates ``eta, mu, alpha`` as tensors (floats filled in)."""
    lead = ["B", "H"] if step else ["B", "H", "T"]
    value_width = "Dk" if opts.target == "self" else "Dv"
    named = (("q", q, "Dk"), ("k", k, "Dk"), ("v", v, value_width))
    for name, x, last in named:
        if not isinstance(x, torch.Tensor) or x.ndim != len(lead) + 1:
            raise ValueError(
                f"{name}: expected a tensor of rank {len(lead) + 1} "
                f"[{', '.join([*lead, last])}], got {mlp._describe(x)}"
            )
        mlp._check_float(name, x)
    if k.shape != q.shape:
        raise ValueError(
            f"k: expected shape {list(q.shape)} (as q, [{', '.join([*lead, 'Dk'])}]), "
            f"got {list(k.shape)}"
        )
    if v.shape[:-1] != q.shape[:-1] or (opts.target == "self" and v.shape != q.shape):
        expected = list(q.shape[:-1]) + ([q.shape[-1]] if opts.target == "self" else [])
        raise ValueError(
            f"v: expected {'shape' if opts.target == 'self' else 'leading dims'} "
            f"[{', '.join(lead + ([value_width] if opts.target == 'self' else []))}] = {expected} "
            f"(as q{'; target=self reads v through the memory' if opts.target == 'self' else ''}),"
            f" got shape {list(v.shape)}"
        )
    if not step and q.shape[2] < 1:
        raise ValueError(f"q: expected at least one token (T >= 1), got shape {list(q.shape)}")
    B, H, Dk = q.shape[0], q.shape[1], q.shape[-1]
    Dv = v.shape[-1] if opts.target == "given" else None
    _check_weights(weights, B, H, Dk, Dv, opts)
    if state is not None:
        mlp._check_state(state_name, state, weights, B, opts.chunk_size)
    shape = list(q.shape[:-1])
    return tuple(
        None if gate is None else mlp._gate(name, gate, shape, lead, q)
        for name, gate in zip(("eta", "mu", "alpha"), gates, strict=True)
    )


def _check_weights(
    weights: Sequence[torch.Tensor], B: int, H: int, Dk: int, Dv: int | None, opts: Options
) -> None:
    """The chain ``Dk -> ... -> Dv`` (``Dv`` None: any), then a linear skip ``[H, Dv, Dk]``."""
    need = 2 if opts.skip == "linear" else 1
    if not isinstance(weights, (list, tuple)) or len(weights) < need:
        raise ValueError(
            f"weights: expected a list of at least {need} [H, out, in] tensors"
            f"{' (the chain, then the linear skip)' if need == 2 else ''}, "
            f"got {mlp._describe(weights)}"
        )
    chain = len(weights) + opts.chain
    d_in = Dk
    for i, weight in enumerate(weights):
        if not isinstance(weight, torch.Tensor) or weight.ndim not in (3, 4):
            raise ValueError(
                f"weights[{i}]: expected a tensor [H, out, in] or [B, H, out, in], "
                f"got {mlp._describe(weight)}"
            )
        mlp._check_float(f"weights[{i}]", weight)
        if i == chain:
            d_out, d_in, role = Dv, Dk, "the linear skip [H, Dv, Dk]"
        else:
            d_out = Dv if (i == chain - 1 and Dv is not None) else weight.shape[-2]
            role = "input width " + ("Dk" if i == 0 else f"output width of weights[{i - 1}]")
        head = [H, d_out, d_in] if weight.ndim == 3 else [B, H, d_out, d_in]
        if list(weight.shape) != head:
            raise ValueError(
                f"weights[{i}]: expected shape {head} (heads H={H}, batch B={B}, {role}"
                f"{', output width Dv (as v)' if i == chain - 1 and Dv is not None else ''}), "
                f"got {list(weight.shape)}"
            )
        if i < chain:
            d_in = weight.shape[-2]
        if i == chain - 1:
            Dv = d_in
    if opts.skip == "identity" and Dv != Dk:
        raise ValueError(
            f"skip='identity' needs Dk == Dv (M(z) = z + MLP(z)), got Dk={Dk}, Dv={Dv}"
        )
