"""The chunkwise-parallel form of the matrix memories (SPEC §2.2), on checked inputs.

:func:`nestlearn.memory.matrix.forms.matrix_memory_chunk` validates its arguments and calls
:func:`chunk_forward`; the algebra is derived in ``memory/README.md`` ("The chunk form"). Inside,
batch, heads and chunks are folded into one batch dimension, ``[B·H·N, C, D]``, so that every
intra-chunk product is one ``bmm`` over all chunks and every tensor is contiguous.

Only the chunk-start states ``S_n`` couple the chunks:

    S_{n+1} = Γ_n S_n + K̃_nᵀ U_n        (Γ_n = γ_C of chunk n, K̃ = K ⊙ exp(b_C − b))

For ``dot`` the writes ``U_n = diag(β) V_n`` do not depend on the state, so this is a linear scan
with a scalar factor per chunk, solved without a loop:
``S_n = (Π_{i<n} Γ_i) S_0 + Σ_{m<n} (Π_{m<i<n} Γ_i) K̃_mᵀ U_m``, a strictly lower-triangular
``N × N`` matrix of chunk decays applied to all chunks' ``K̃ᵀ U`` at once. For ``l2`` the
effective writes ``U_n − W_n S_n`` need the state, so a loop over the ``N`` chunks carries it (two
small ``bmm`` per chunk). The delta rule runs as one autograd node, :class:`_DeltaChunk`, with
a hand-written backward (fewer elementwise passes and temporaries than autograd through its
pieces); its pieces (:func:`_delta_plain`: the UT transform :class:`_UTTransform` and the state
pass :class:`_DeltaScan`, each with its own backward) give the second derivatives. The dot
form is differentiated by autograd, to any order.

On the CPU (float32, one thread) the cost is mostly the ``[B·H·N, 64, 64]`` products, whose
64 × 64 output tiles run at about a third of the speed per FLOP of the layers' projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.memory.core.precision import backward_without_autocast


def chunk_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor | None,
    beta: Tensor | None,
    delta_rule: bool,
    scale: float,
    initial_state: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """``o [B, H, T, Dv]`` and the final state ``[B, H, Dk, Dv]`` of the recurrence

        dot (``delta_rule=False``):  S_t = α_t S_{t-1} + β_t k_t v_tᵀ
        l2  (``delta_rule=True``):   S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
        o_t = scale · S_tᵀ q_t

    with ``α = exp(log_alpha)`` (``None``: 1), ``β = beta`` (``None``: 1), ``S_0 = initial_state``
    (``None``: 0), in chunks of ``chunk_size`` tokens (cut to ``T``). Inputs are assumed checked.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    N = math.ceil(T / C)
    pad = N * C - T
    if pad:
        # A padded token (k = 0, v = 0, β = 0, α = 1) leaves the state as it is; its output is cut.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_alpha, beta = (None if x is None else F.pad(x, (0, pad)) for x in (log_alpha, beta))
    # [B·H·N, C, D]; a copy only where the caller's layout is not head-first contiguous.
    q, k, v = (x.reshape(B * H * N, C, x.shape[-1]) for x in (q, k, v))
    if scale != 1.0:
        # on q rather than on the read: one pass each way, where a scaled bmm-add would scale
        # three gradients (callers that can fold it in upstream pass scale = 1)
        q = q * scale
    state = None if initial_state is None else initial_state.reshape(B * H, Dk, Dv)
    if delta_rule:
        alpha_flat = None if log_alpha is None else log_alpha.reshape(B * H * N, C)
        beta_flat = None if beta is None else beta.reshape(B * H * N, C)
        o, state = _DeltaChunk.apply(q, k, v, alpha_flat, beta_flat, state, B * H, N)
        o = o.reshape(B, H, N * C, Dv)
        return (o[:, :, :T] if pad else o), state.reshape(B, H, Dk, Dv)
    if log_alpha is None:
        decay = gamma = chunk_log_decay = None
        k_to_end = k
    else:
        decay, gamma, to_end, chunk_log_decay = _chunk_decays(log_alpha.reshape(B * H * N, C))
        k_to_end = k * to_end.unsqueeze(-1)  # each write decayed to chunk end
        chunk_log_decay = chunk_log_decay.reshape(B * H, N)
    # [B·H·N, C, C]: the intra-chunk read, query t from the writes s ≤ t
    attn = q @ k.transpose(-1, -2)
    attn = attn.tril() if decay is None else attn * decay
    u = v if beta is None else beta.reshape(B * H * N, C, 1) * v
    starts, state = _linear_scan(k_to_end, u, chunk_log_decay, state, B * H, N)
    q_start = q if gamma is None else q * gamma.unsqueeze(-1)
    # o = (Q ⊙ γ) S_start + (Q Kᵀ ⊙ D) U (q scaled), one bmm and one bmm-add over all chunks
    o = torch.baddbmm(q_start @ starts, attn, u)
    o = o.reshape(B, H, N * C, Dv)
    return (o[:, :, :T] if pad else o), state.reshape(B, H, Dk, Dv)


def _delta_plain(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor | None,
    beta: Tensor | None,
    state: Tensor | None,
    batch: int,
    N: int,
) -> tuple[Tensor, Tensor]:
    """:class:`_DeltaChunk` in differentiable pieces (for derivatives of its backward): ``o``
    ``[n, C, Dv]`` and the final state of the delta rule on folded ``[n = batch·N, C, ·]`` inputs.
    """
    C = k.shape[1]
    if log_alpha is None:
        decay = gamma = chunk_log_decay = None
        k_to_end = k
    else:
        decay, gamma, to_end, chunk_log_decay = _chunk_decays(log_alpha)
        k_to_end = k * to_end.unsqueeze(-1)
        chunk_log_decay = chunk_log_decay.reshape(batch, N)
    attn = q @ k.transpose(-1, -2)
    attn = attn.tril() if decay is None else attn * decay
    beta_col = None if beta is None else beta.reshape(-1, C, 1)
    beta_v = v if beta_col is None else beta_col * v
    beta_k = k if beta_col is None else beta_col * k
    lower = beta_k @ k.transpose(-1, -2)
    if decay is not None:
        lower = lower * decay
    beta_gamma_k = beta_k if gamma is None else gamma.unsqueeze(-1) * beta_k
    u, w = _ut_transform(lower, beta_v, beta_gamma_k)
    starts, u, state = _delta_scan(k_to_end, u, w, chunk_log_decay, state, batch, N)
    q_start = q if gamma is None else q * gamma.unsqueeze(-1)
    return torch.baddbmm(q_start @ starts, attn, u), state


class _DeltaChunk(torch.autograd.Function):
    """The delta rule's chunk form on folded inputs ``q, k [n, C, Dk]``, ``v [n, C, Dv]``,
    ``log_alpha, beta [n, C]`` (or ``None``), ``state [batch, Dk, Dv]`` (or ``None``), ``n =
    batch·N``, as one autograd node: ``o [n, C, Dv]`` and the final state. With ``β̂ = diag(β)``,
    ``γ`` and ``D`` from :func:`_chunk_decays` and ``K̃ = K ⊙ exp(b_C − b)``::

        P = Q Kᵀ ⊙ D,   L = β̂ K Kᵀ ⊙ D,   A = (I + tril(L, −1))⁻¹
        Ũ = A β̂ V,   W = A β̂ γ̂ K,   (S_n, U) = scan(K̃, Ũ, W, Γ, S_0)   (:class:`_DeltaScan`)
        O = (γ̂ Q) S_n + P U

    The backward is written out (SPEC §2.2; ``G_X`` the gradient of ``X``)::

        G_{γ̂Q} = G_O S_nᵀ,  G_{S_n} = (γ̂Q)ᵀ G_O,  G_P = G_O Uᵀ,  G_U = Pᵀ G_O
        (G_K̃, G_Ũ, G_W, G_Γ, G_{S_0}) by the scan's reverse loop
        G_{β̂V} = Aᵀ G_Ũ,  G_{β̂γ̂K} = Aᵀ G_W,  G_L = −tril(G_{β̂V} Ũᵀ + G_{β̂γ̂K} Wᵀ, −1)
        G_Q = γ̂ G_{γ̂Q} + (G_P ⊙ D) K,   G_{β̂K} = (G_L ⊙ D) K + γ̂ G_{β̂γ̂K}
        G_K = (G_P ⊙ D)ᵀ Q + (G_L ⊙ D)ᵀ β̂K + β̂ G_{β̂K} + exp(b_C − b) ⊙ G_K̃
        G_V = β̂ G_{β̂V},  G_β = rowsum(G_{β̂V} ⊙ V + G_{β̂K} ⊙ K)

    and for the decays, through ``b`` (``G_D ⊙ D = G_P ⊙ P + G_L ⊙ L``): ``G_b = rowsum −
    colsum of G_D ⊙ D + γ ⊙ G_γ − exp(b_C − b) ⊙ G_exp(b_C−b)`` (plus their sum, and ``Γ G_Γ``,
    on ``b_C``), then a reverse cumulative sum, 0 on forgetting tokens (as in
    :func:`_chunk_decays`). The elementwise work is fused where autograd through
    :func:`_delta_plain` would run separate passes; under ``create_graph`` the backward
    differentiates :func:`_delta_plain` instead, so second derivatives are exact.

    The intermediates live on ``ctx`` (not ``save_for_backward``), so that the backward can drop
    each once used: new gradients then reuse their memory instead of growing the heap (on the
    CPU, fresh pages cost page faults). A second backward (``retain_graph``) recomputes them.
    """

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        log_alpha: Tensor | None,
        beta: Tensor | None,
        state: Tensor | None,
        batch: int,
        N: int,
    ) -> tuple[Tensor, Tensor]:
        o, final, pieces = _delta_chunk_pieces(q, k, v, log_alpha, beta, state, batch, N)
        ctx.save_for_backward(q, k, v, log_alpha, beta, state)
        ctx.batch, ctx.N, ctx.pieces = batch, N, pieces
        return o, final

    @staticmethod
    @backward_without_autocast
    def backward(ctx, g_o: Tensor, g_final: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, log_alpha, beta, state = ctx.saved_tensors
        batch, N = ctx.batch, ctx.N
        needs = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():  # double backward: through the plain pieces
            inputs = (q, k, v, log_alpha, beta, state)
            wanted = [x for x, need in zip(inputs, needs, strict=True) if need]
            outputs = _delta_plain(q, k, v, log_alpha, beta, state, batch, N)
            grads = iter(
                torch.autograd.grad(
                    outputs, wanted, (g_o, g_final), create_graph=True, allow_unused=True
                )
            )
            return (*(next(grads) if need else None for need in needs), None, None)
        p = ctx.pieces
        ctx.pieces = None
        if p is None:  # a second backward (retain_graph): the pieces again
            p = _delta_chunk_pieces(q, k, v, log_alpha, beta, state, batch, N)[2]
        return (*_delta_chunk_grads(q, k, v, log_alpha, beta, p, g_o, g_final, needs), None, None)


def _delta_chunk_pieces(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor | None,
    beta: Tensor | None,
    state: Tensor | None,
    batch: int,
    N: int,
) -> tuple[Tensor, Tensor, dict[str, Tensor | None]]:
    """:class:`_DeltaChunk`'s forward (no graph): ``o``, the final state and the intermediates
    its backward reads."""
    n, C, Dk = k.shape
    Dv = v.shape[-1]
    if log_alpha is None:
        decay = gamma = to_end = chunk_decay = None
    else:
        decay, gamma, to_end, chunk_log_decay = _chunk_decays_no_graph(log_alpha)
        chunk_decay = chunk_log_decay.exp().reshape(batch, N)
    k_t = k.transpose(-1, -2)
    attn = q @ k_t
    attn = attn.tril_() if decay is None else attn.mul_(decay)
    beta_col = None if beta is None else beta.unsqueeze(-1)
    beta_k = k if beta_col is None else beta_col * k
    lower = beta_k @ k_t
    if decay is not None:
        lower.mul_(decay)
    a = _solve_unit_lower(lower)
    u = a @ (v if beta_col is None else beta_col * v)
    w = a @ (beta_k if gamma is None else gamma.unsqueeze(-1) * beta_k)
    k_to_end = k if to_end is None else to_end.unsqueeze(-1) * k
    start = state if state is not None else u.new_zeros(batch, Dk, Dv)
    starts, writes, final = _delta_scan_forward(
        k_to_end.view(batch, N, C, Dk),
        u.view(batch, N, C, Dv),
        w.view(batch, N, C, Dk),
        chunk_decay,
        start,
    )
    starts, writes = starts.view(n, Dk, Dv), writes.view(n, C, Dv)
    q_start = q if gamma is None else gamma.unsqueeze(-1) * q
    o = _add_bmm_(q_start @ starts, attn, writes)
    pieces = dict(
        q_start=q_start, beta_k=beta_k, k_to_end=k_to_end, attn=attn, lower=lower, a=a, u=u,
        w=w, starts=starts, writes=writes, decay=decay, gamma=gamma, to_end=to_end,
        chunk_decay=chunk_decay,
    )  # fmt: skip
    return o, final, pieces


def _delta_chunk_grads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor | None,
    beta: Tensor | None,
    p: dict[str, Tensor | None],
    g_o: Tensor,
    g_final: Tensor,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """:class:`_DeltaChunk`'s backward (its docstring) from the intermediates ``p``, each dropped
    once used: ``∂q, ∂k, ∂v, ∂log_alpha, ∂beta, ∂state``."""
    n, C, Dk = k.shape
    Dv = v.shape[-1]
    batch = g_final.shape[0]
    N = n // batch
    decay, gamma, to_end = p.pop("decay"), p.pop("gamma"), p.pop("to_end")
    g_o = g_o.contiguous()
    starts, writes, attn = p.pop("starts"), p.pop("writes"), p.pop("attn")
    g_q_start = g_o @ starts.transpose(-1, -2)
    g_starts = p.pop("q_start").transpose(-1, -2) @ g_o
    g_attn = g_o @ writes.transpose(-1, -2)
    g_writes = attn.transpose(-1, -2) @ g_o
    del g_o
    k_to_end, w = p.pop("k_to_end"), p.pop("w")
    g_k_to_end, g_u, g_w, g_chunk_decay, g_state = _delta_scan_grads(
        k_to_end.view(batch, N, C, Dk),
        w.view(batch, N, C, Dk),
        p.pop("chunk_decay"),
        starts.view(batch, N, Dk, Dv),
        writes.view(batch, N, C, Dv),
        g_starts.view(batch, N, Dk, Dv),
        g_writes.view(batch, N, C, Dv),
        g_final,
    )
    del starts, writes, g_starts, g_writes, k_to_end
    g_k_to_end, g_u, g_w = g_k_to_end.view(n, C, Dk), g_u.view(n, C, Dv), g_w.view(n, C, Dk)
    # the UT transform: G_{β̂V} = Aᵀ G_Ũ, G_{β̂γ̂K} = Aᵀ G_W, G_L = −tril(Σ G_X Yᵀ, −1)
    a_t = p.pop("a").transpose(-1, -2)
    g_beta_v, g_beta_gamma_k = a_t @ g_u, a_t @ g_w
    del a_t, g_u, g_w
    g_lower = _bmm(g_beta_v, p.pop("u").transpose(-1, -2), alpha=-1.0)
    g_lower = _add_bmm_(g_lower, g_beta_gamma_k, w.transpose(-1, -2), alpha=-1.0).tril_(-1)
    del w
    g_attn_raw = g_attn.tril() if decay is None else g_attn * decay
    g_lower_raw = g_lower if decay is None else g_lower * decay
    # (without decay G_{γ̂Q} and G_{β̂γ̂K} are not read again: the bmm-adds may overwrite them)
    g_q = g_q_start if gamma is None else gamma.unsqueeze(-1) * g_q_start
    g_q = _add_bmm_(g_q, g_attn_raw, k)
    g_beta_k = g_beta_gamma_k if gamma is None else gamma.unsqueeze(-1) * g_beta_gamma_k
    g_beta_k = _add_bmm_(g_beta_k, g_lower_raw, k)
    beta_k = p.pop("beta_k")
    g_k = _add_bmm_(g_attn_raw.transpose(-1, -2) @ q, g_lower_raw.transpose(-1, -2), beta_k)
    del g_attn_raw, g_lower_raw
    if beta is None:
        g_k += g_beta_k
    else:
        g_k.addcmul_(beta.unsqueeze(-1), g_beta_k)
    if to_end is None:
        g_k += g_k_to_end
    else:
        g_k.addcmul_(to_end.unsqueeze(-1), g_k_to_end)
    g_v = g_beta_v if beta is None else beta.unsqueeze(-1) * g_beta_v
    g_beta = None
    if beta is not None and needs[4]:
        g_beta = torch.linalg.vecdot(g_beta_v, v) + torch.linalg.vecdot(g_beta_k, k)
    del g_beta_v, g_beta_k
    g_log_alpha = None
    if log_alpha is not None and needs[3]:
        g_gamma = torch.linalg.vecdot(g_q_start, q) + torch.linalg.vecdot(g_beta_gamma_k, beta_k)
        g_gamma[:, -1] += g_chunk_decay.reshape(n)  # Γ = γ_C
        g_to_end = torch.linalg.vecdot(g_k_to_end, k) * to_end
        # G_D ⊙ D, on the strictly lower part for L (G_L is 0 elsewhere)
        g_log_decay = g_attn.mul_(attn).addcmul_(g_lower, p.pop("lower"))
        g_b = g_log_decay.sum(-1) - g_log_decay.sum(-2) + g_gamma * gamma - g_to_end
        g_b[:, -1] += g_to_end.sum(-1)
        g_log_alpha = g_b.flip(-1).cumsum(-1).flip(-1)
        g_log_alpha = g_log_alpha.masked_fill_(log_alpha.exp() == 0, 0.0)
    return g_q, g_k, g_v, g_log_alpha, g_beta, (g_state if needs[5] else None)


def _chunk_decays(log_alpha: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The decays inside chunks of ``log_alpha [n, C]``: ``exp(b_t − b_s)`` ``[n, C, C]`` (0 for
    ``s > t``), ``γ_t = exp(b_t)``, ``exp(b_C − b_t)`` (both ``[n, C]``) and ``b_C`` ``[n]``, with
    ``b_t = log α_1 + … + log α_t`` from the chunk start.

    A token whose ``α = exp(log α)`` is 0 (``log α = −inf``, or so negative that the exp
    underflows, as in the reference) forgets everything before it. Differences of one cumulative
    sum would give ``−inf − (−inf) = nan`` there, so such tokens add 0 to the sums and instead
    cut the chunk into segments: a decay that spans a cut is an exact 0 (``−inf`` before the
    exp, zero gradient). For finite α the sums and their gradients are those of the plain
    cumulative sum; a forgetting token's ``log α`` gets a zero gradient, as ``∂α/∂log α = α = 0``.
    """
    forget = log_alpha.exp() == 0
    b = log_alpha.masked_fill(forget, 0.0).cumsum(-1)
    segment = forget.cumsum(-1)  # cuts so far: s and t share a segment when equal
    # exp(b_t − b_s) = α_{s+1} ⋯ α_t for s ≤ t in one segment; above the diagonal b_t − b_s ≥ 0
    # could overflow, so it is set to −inf before the exp: an exact 0 with a zero gradient.
    C = log_alpha.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=log_alpha.device).tril()
    joined = (segment[:, :, None] == segment[:, None, :]) & causal
    decay = (b[:, :, None] - b[:, None, :]).masked_fill_(~joined, -math.inf).exp()
    from_start = b.masked_fill(segment > 0, -math.inf)
    to_end = (b[:, -1:] - b).masked_fill_(segment != segment[:, -1:], -math.inf)
    return decay, from_start.exp(), to_end.exp(), from_start[:, -1]


def _chunk_decays_no_graph(log_alpha: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_chunk_decays` without a graph, in fewer passes when no token forgets.

    Then there are no segments: ``exp(b_t − b_s)`` is taken everywhere, in place, and its upper
    part (which may overflow to ``inf``) set to 0 by ``tril_``. The check is a host read, so
    only on the CPU; elsewhere, or when a token forgets, :func:`_chunk_decays`.
    """
    if log_alpha.device.type != "cpu" or bool((log_alpha.exp() == 0).any()):
        return _chunk_decays(log_alpha)
    b = log_alpha.cumsum(-1)
    decay = (b[:, :, None] - b[:, None, :]).exp_().tril_()
    to_end = (b[:, -1:] - b).exp_()
    return decay, b.exp(), to_end, b[:, -1]


def _linear_scan(
    k_to_end: Tensor,
    u: Tensor,
    chunk_log_decay: Tensor | None,
    state: Tensor | None,
    batch: int,
    N: int,
) -> tuple[Tensor, Tensor]:
    """Chunk-start states ``[batch·N, Dk, Dv]`` and the final state of the dot recurrence.

    ``S_{n+1} = Γ_n S_n + K̃_nᵀ U_n`` for all n at once:
    ``S_n = (Π_{i<n} Γ_i) S_0 + Σ_{m<n} (Π_{m<i<n} Γ_i) K̃_mᵀ U_m`` (``n = N``: the final state),
    two small matmuls of the chunk-decay matrices with all chunks' writes.
    """
    Dk, Dv = k_to_end.shape[-1], u.shape[-1]
    writes = (k_to_end.transpose(-1, -2) @ u).reshape(batch, N, Dk * Dv)  # K̃_nᵀ U_n
    earlier = torch.ones(N, N, dtype=torch.bool, device=u.device).tril(-1)  # m < n
    if chunk_log_decay is None:
        mix = earlier.to(u.dtype).expand(batch, N, N).contiguous()
        last = u.new_ones(batch, 1, N)
        start_decay = final_decay = None
    else:
        # Sums of log-decays over runs of chunks, Σ_{m<i≤n} log Γ_i, summed per run rather than
        # as differences of one long cumsum: those would lose digits over a long sequence.
        g = chunk_log_decay[:, :, None].expand(batch, N, N).masked_fill(~earlier, 0.0)
        runs = g.cumsum(1)  # [batch, N, N]: Σ_{m<i≤n} log Γ_i at [n, m], m < n
        # row n: exp(Σ_{m<i≤n−1} log Γ_i) for m < n, 0 above (−inf before the exp)
        mix = F.pad(runs[:, :-1], (0, 0, 1, 0)).masked_fill_(~earlier, -math.inf).exp()
        last = runs[:, -1:].exp()  # [batch, 1, N]: exp(Σ_{m<i<N} log Γ_i)
        e_before = F.pad(chunk_log_decay.cumsum(-1), (1, 0))  # Σ_{i<n} log Γ_i, n = 0..N
        start_decay, final_decay = e_before[:, :-1].exp(), e_before[:, -1].exp()
    starts = mix @ writes  # [batch, N, Dk·Dv]
    final = (last @ writes).reshape(batch, Dk, Dv)
    if state is not None:
        flat = state.reshape(batch, 1, Dk * Dv)
        starts = starts + (flat if start_decay is None else start_decay.unsqueeze(-1) * flat)
        final = final + (state if final_decay is None else final_decay[:, None, None] * state)
    return starts.reshape(batch * N, Dk, Dv), final


def _delta_scan(
    k_to_end: Tensor,
    u: Tensor,
    w: Tensor,
    chunk_log_decay: Tensor | None,
    state: Tensor | None,
    batch: int,
    N: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunk-start states, effective writes ``U_n − W_n S_n`` and final state of the l2 recurrence.

    ``[batch·N, ·, ·]`` inputs; a loop over the ``N`` chunks in :class:`_DeltaScan`.
    """
    Dk, Dv = k_to_end.shape[-1], u.shape[-1]
    if state is None:
        state = u.new_zeros(batch, Dk, Dv)
    decay = None if chunk_log_decay is None else chunk_log_decay.exp()
    split = (x.reshape(batch, N, -1, x.shape[-1]) for x in (k_to_end, u, w))
    starts, writes, final = _DeltaScan.apply(*split, decay, state)
    return starts.reshape(batch * N, Dk, Dv), writes.reshape(u.shape), final


class _DeltaScan(torch.autograd.Function):
    """The state pass of the delta rule over chunks, ``[batch, N, C, ·]`` inputs::

        U'_n = U_n − W_n S_n,   S_{n+1} = Γ_n S_n + K̃_nᵀ U'_n      (S_0 = state)

    returning ``S_0..S_{N−1}`` ``[batch, N, Dk, Dv]``, ``U'`` and ``S_N``. The backward walks the
    chunks in reverse carrying only ``∂S``::

        ∂U'_n = G_{U',n} + K̃_n ∂S_{n+1},   ∂S_n = Γ_n ∂S_{n+1} + G_{S,n} − W_nᵀ ∂U'_n

    (two small matmuls per chunk, like the forward) and then gets ``∂U = ∂U'``,
    ``∂W_n = −∂U'_n S_nᵀ``, ``∂K̃_n = U'_n ∂S_{n+1}ᵀ`` and ``∂Γ_n = ⟨∂S_{n+1}, S_n⟩`` for all
    chunks in batched products. The backward uses only inputs and outputs, in differentiable ops,
    so second derivatives go through it.
    """

    @staticmethod
    def forward(
        ctx, k_to_end: Tensor, u: Tensor, w: Tensor, decay: Tensor | None, state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        starts, writes, state = _delta_scan_forward(k_to_end, u, w, decay, state)
        ctx.save_for_backward(k_to_end, w, decay, starts, writes)
        return starts, writes, state

    @staticmethod
    @backward_without_autocast
    def backward(
        ctx, d_starts: Tensor, d_writes: Tensor, d_state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
        k_to_end, w, decay, starts, writes = ctx.saved_tensors
        return _delta_scan_grads(k_to_end, w, decay, starts, writes, d_starts, d_writes, d_state)


def _delta_scan_forward(
    k_to_end: Tensor, u: Tensor, w: Tensor, decay: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`_DeltaScan`'s loop: ``S_0..S_{N−1}``, ``U'`` (both ``[batch, N, ·, ·]``), ``S_N``."""
    # per-chunk views made once (one op each, not N): the loop runs few ops per chunk
    us, ws, k_ts = u.unbind(1), w.unbind(1), k_to_end.transpose(-1, -2).unbind(1)
    decays = [None] * len(us) if decay is None else decay[:, :, None, None].unbind(1)
    starts, writes = [], []
    for u_n, w_n, k_t, decay_n in zip(us, ws, k_ts, decays, strict=True):
        starts.append(state)
        writes.append(torch.baddbmm(u_n, w_n, state, alpha=-1.0))
        if decay_n is None:
            state = torch.baddbmm(state, k_t, writes[-1])
        else:  # in place on the fresh product: no copy
            state = _add_bmm_(decay_n * state, k_t, writes[-1])
    return torch.stack(starts, dim=1), torch.stack(writes, dim=1), state


def _delta_scan_grads(
    k_to_end: Tensor,
    w: Tensor,
    decay: Tensor | None,
    starts: Tensor,
    writes: Tensor,
    d_starts: Tensor,
    d_writes: Tensor,
    d_state: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """:class:`_DeltaScan`'s backward: ``∂K̃, ∂U, ∂W, ∂Γ, ∂S_0`` (differentiable ops)."""
    N = writes.shape[1]
    d_next, d_u = [None] * N, [None] * N  # ∂S_{n+1} and ∂U'_n per chunk
    d_writes_n, k_n, d_starts_n = d_writes.unbind(1), k_to_end.unbind(1), d_starts.unbind(1)
    w_ts = w.transpose(-1, -2).unbind(1)
    decays = [None] * N if decay is None else decay[:, :, None, None].unbind(1)
    for n in reversed(range(N)):
        d_next[n] = d_state
        d_u[n] = torch.baddbmm(d_writes_n[n], k_n[n], d_state)
        carried = (
            d_starts_n[n] + d_state
            if decays[n] is None
            else torch.addcmul(d_starts_n[n], decays[n], d_state)
        )
        d_state = _add_bmm_(carried, w_ts[n], d_u[n], alpha=-1.0)
    d_next_t, d_u_t = torch.stack(d_next, dim=1), torch.stack(d_u, dim=1)
    d_w = _bmm(d_u_t, starts.transpose(-1, -2), alpha=-1.0)
    d_k = _bmm(writes, d_next_t.transpose(-1, -2))
    d_decay = None
    if decay is not None:
        d_decay = torch.linalg.vecdot(d_next_t.flatten(-2), starts.flatten(-2))
    return d_k, d_u_t, d_w, d_decay, d_state


def _add_bmm_(x: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``x += alpha · a @ b`` in place, for a fresh ``x``: no copy of ``x``, where ``baddbmm``
    would copy it first. As ``baddbmm``'s ``out=`` (which ``FlopCounterMode`` counts, unlike
    ``baddbmm_``), or ``baddbmm_`` when autograd records it (``out=`` has no derivative)."""
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad):
        return x.baddbmm_(a, b, alpha=alpha)
    return torch.baddbmm(x, a, b, alpha=alpha, out=x)


def _bmm(a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``alpha · a @ b`` over leading dimensions ``[..., m, k] @ [..., k, n]``, the factor inside
    the product (no extra pass over the result)."""
    lead = a.shape[:-2]
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out = a3.new_empty(a3.shape[0], a3.shape[1], b3.shape[2])
    return torch.baddbmm(out, a3, b3, beta=0.0, alpha=alpha).reshape(*lead, *out.shape[-2:])


class _UTTransform(torch.autograd.Function):
    """``(A X₁, A X₂)`` with ``A = (I + tril(L, −1))⁻¹``: the UT transform of the delta rule.

    With ``Y_i = A X_i``, the backward is ``∂X_i = Aᵀ G_i`` and ``∂L = −tril(Σ_i ∂X_i Y_iᵀ, −1)``
    (from ``∂A = −Aᵀ (Σ_i G_i X_iᵀ) Aᵀ``): four batched matmuls, where autograd through
    :func:`_unit_lower_inverse` and the two products would run six. Under ``create_graph`` the
    backward rebuilds ``A`` differentiably from ``L``, so second derivatives are exact.
    """

    @staticmethod
    def forward(ctx, lower: Tensor, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        a = _solve_unit_lower(lower)
        y1, y2 = a @ x1, a @ x2
        ctx.save_for_backward(lower, a, y1, y2)
        return y1, y2

    @staticmethod
    @backward_without_autocast
    def backward(ctx, g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lower, a, y1, y2 = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: A as a function of L
            a = _unit_lower_inverse(lower)
        a_t = a.transpose(-1, -2)
        d1, d2 = a_t @ g1, a_t @ g2
        # −(d1 y1ᵀ + d2 y2ᵀ), the sign inside the products
        d_lower = torch.baddbmm(
            _bmm(d1, y1.transpose(-1, -2), alpha=-1.0), d2, y2.transpose(-1, -2), alpha=-1.0
        )
        return d_lower.tril(-1), d1, d2


def _ut_transform(lower: Tensor, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
    """``(A x1, A x2)``, ``A = (I + tril(lower, −1))⁻¹``, batched ``[n, C, C]``, ``[n, C, D]``."""
    return _UTTransform.apply(lower, x1, x2)


class _UnitLowerInverse(torch.autograd.Function):
    """``(I + tril(L, −1))⁻¹`` by one triangular solve; ``L``'s diagonal and upper part unread.

    The backward is ``−Aᵀ G Aᵀ`` on the strictly lower part: two batched matmuls, where
    autograd through ``solve_triangular`` would run a transposed triangular solve, about twice
    as slow on CPU for these many small matrices.
    """

    @staticmethod
    def forward(ctx, lower: Tensor) -> Tensor:
        inverse = _solve_unit_lower(lower)
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    @backward_without_autocast
    def backward(ctx, grad: Tensor) -> Tensor:
        (inverse,) = ctx.saved_tensors
        return -(inverse.transpose(-1, -2) @ grad @ inverse.transpose(-1, -2)).tril(-1)


def _solve_unit_lower(lower: Tensor) -> Tensor:
    """``(I + tril(lower, −1))⁻¹`` by one triangular solve (no graph)."""
    eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
    return torch.linalg.solve_triangular(
        lower, eye.expand_as(lower), upper=False, unitriangular=True
    )


def _unit_lower_inverse(lower: Tensor) -> Tensor:
    """``(I + tril(lower, −1))⁻¹`` for ``[..., C, C]``, differentiable to any order."""
    return _UnitLowerInverse.apply(lower)
