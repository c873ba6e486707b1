"""One level of a Continuum Memory System: an MLP block whose weights change every C tokens.

SPEC §4, NL-31. Per sequence, the block starts from meta-learned weights ``θ_0`` and is read with
the weights of its current chunk. The block is the gated ``y = W2 (σ(W1 z + b1) ⊙ (W3 z + b3)) +
b2`` when ``w3`` is among the weights (SwiGLU with ``σ = silu``, Llama) and the plain ``y = W2
σ(W1 z + b1) + b2`` otherwise (``σ = gelu_tanh``, GPT-2); the biases are optional (all or none)
and ``σ`` is the ``activation`` option. Default and original form: SwiGLU without biases. After each
complete chunk of ``C`` tokens it takes one inner optimizer step with the chunk's summed error
terms, all taken at the chunk-start weights ``θ_c``:

    y_t     = SwiGLU_{θ_c}(z_t)                         t in chunk c (no change inside a chunk)
    G_c     = Σ_{(s, s+1): s+1 in chunk c} ∇_θ L̃_s(θ_c)  one pair per token, target one token later
    θ_{c+1} = step(θ_c, η_c G_c)                        gd, momentum or dgd (:func:`apply_update`)

with the normalized rate ``η_c = η / (1 + E_c)``, ``E_c = Σ_s K_s`` and ``K_s`` a bound of the
block's output sensitivity ``‖J_s J_sᵀ‖`` at key ``z_s`` (``J_s = ∂y_s/∂θ``, :func:`_sensitivity`):
normalized LMS for the whole block (``step="normalized"``, the default). To first order a chunk
step then moves the outputs on the chunk's own keys by at most ``η`` times their errors, whatever
the width, chunk size and weight scale, so ``η ∈ (0, 1]`` means the same everywhere. With the
plain ``η`` (or one normalizer per map) the inner loop diverged in our tests once ``η·C·‖u‖²`` or
the weights grew. ``step="plain"`` is NL-31 as printed, ``η_c = η`` (``θ_{c+1} = θ_c − η G_c``
for gd): a paper-style ``η`` then acts ``1 + E_c`` times larger than the normalized one
(docs/cms.md measures where it stays finite).

The pair ``(s, s+1)`` has key ``z_s`` and a target known only once token ``s+1`` is read (the
next input for the ``local`` source, the next token for ``teach``); its error term therefore
joins the chunk holding ``s+1``, and the weights used at token ``t`` depend on tokens ``≤ t`` only.
``error(y_s, key_ctx_s, target_ctx_{s+1}) -> ∂L̃/∂y_s`` supplies the error at the block output
(``local_error`` or a teach signal, see ``docs/cms.md``); the weight gradients are its manual
backprop through the SwiGLU at ``θ_c``.

Two forms with one signature, equal to float error in outputs, states and gradients:
:func:`cms_level_reference` (a loop over tokens composing :mod:`nestlearn.memory.core.rules`) and
:func:`cms_level_chunk` (per chunk one batched forward of ``C + 1`` rows and one batched backward;
a Python loop over chunks, never over tokens). A one-token call of the chunk form is the
recurrent step. A chunk read whole within one call and stepped by ``gd`` or ``momentum`` (every
training chunk) takes its step fused (:func:`_fused_step`): the rate ``η / (1 + E)`` scales the
per-pair factors and the sum over pairs joins the weights in one ``baddbmm``, so ``G`` and ``Ĝ``
are never materialized (nor kept for backward). The state is a plain ``dict[str, Tensor]``:

    w1, w3 [B, h, d], w2 [B, d, h]   weights of the current chunk (w3 only when gated)
    b1, b3 [B, h], b2 [B, d]         biases of the current chunk, when the block has them
    g.{w}                             summed gradients of the current chunk's pairs so far
    e [B]                             their summed sensitivities ``E`` (the rate's normalizer;
                                      kept but unused by the plain step: one state layout)
    s.{w}                             (momentum) the momentum
    p.{w}                             (dgd) summed projections ``(θ_c û) ûᵀ`` of the chunk so far
                                      (a bias is a map of the constant input 1: its projection is b)
    z_prev [B, d]                     key of the pending pair (the last input read)
    ctx_prev [B, e]                   (when ``key_ctx`` is given) key context of that input
    pos [] int64                      tokens read so far (absolute position of the next token)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nestlearn.memory.core.precision import full_precision
from nestlearn.memory.core.rules import L2, dgd_projection, linear_gradient, momentum

State = dict[str, torch.Tensor]
Weights = dict[str, torch.Tensor]
ErrorFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
ResetFn = Callable[[int], Weights | None]

MAPS = ("w1", "w3", "w2")  # SwiGLU without biases, the default block
ORDER = ("w1", "w3", "w2", "b1", "b3", "b2")  # every name a block may have, in state order
OPTIMIZERS = ("gd", "momentum", "dgd")
STEPS = ("normalized", "plain")  # η / (1 + E) (ours, default) or NL-31's plain summed step
ACTIVATIONS = ("silu", "gelu_tanh")


def names_of(weights: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The block's weight names in state order: ``w1, (w3), w2, (b1, (b3), b2)``."""
    return tuple(name for name in ORDER if name in weights)


def _core(name: str) -> int:
    # Trailing dimensions of one sequence's copy: 1 for a bias, 2 for a matrix.
    return 1 if name[0] == "b" else 2


def _batched(x: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    return x.expand(batch, *x.shape[-_core(name) :])


def _act(x: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(x) if activation == "silu" else F.gelu(x, approximate="tanh")


def _act_grad(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return _silu_grad(x)
    # d/dx ½x(1 + tanh(c(x + 0.044715x³))), c = sqrt(2/π)
    c = 0.7978845608028654
    t = torch.tanh(c * (x + 0.044715 * x.pow(3)))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def local_error(
    y: torch.Tensor, key_ctx: torch.Tensor | None, target: torch.Tensor
) -> torch.Tensor:
    """The ``local`` source: ``∂/∂y ½‖y − sg(target)‖²`` (rules' L2), the target being the next
    token's input to the level; differentiable in ``y`` (hence in the keys and weights)."""
    return L2().error(y, target.detach())


class _Options(NamedTuple):
    lr: float
    chunk_size: int
    optimizer: str
    momentum: float
    error: ErrorFn
    detach_inner: bool
    activation: str = "silu"
    step: str = "normalized"


def init_cms_level_state(
    weights: Mapping[str, torch.Tensor],
    batch_size: int,
    *,
    optimizer: str = "gd",
    ctx_dim: int | None = None,
) -> State:
    """The state before any token: every sequence starts from ``weights`` (``[out, in]`` shared
    or ``[B, out, in]``; biases ``[out]`` or ``[B, out]``), empty accumulators, no pending pair."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    _check_optimizer(optimizer)
    _check_weights(weights, None)
    state: State = {}
    for name in names_of(weights):
        w = _batched(weights[name], name, batch_size).clone()
        state[name] = w
        state[f"g.{name}"] = torch.zeros_like(w)
        if optimizer == "momentum":
            state[f"s.{name}"] = torch.zeros_like(w)
        if optimizer == "dgd":
            state[f"p.{name}"] = torch.zeros_like(w)
    w1 = state["w1"]
    state["e"] = w1.new_zeros(batch_size)
    state["z_prev"] = w1.new_zeros(batch_size, w1.shape[-1])
    if ctx_dim is not None:
        state["ctx_prev"] = w1.new_zeros(batch_size, ctx_dim)
    state["pos"] = torch.zeros((), dtype=torch.long, device=w1.device)
    return state


def swiglu(weights: Mapping[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """``W2 (silu(W1 z) ⊙ W3 z)`` for ``z [B, n, d]`` and shared or per-sequence weights."""
    return _forward(weights, z, "silu")[0]


def mlp_block(
    weights: Mapping[str, torch.Tensor], z: torch.Tensor, activation: str = "silu"
) -> torch.Tensor:
    """The block of the module docstring (gated if ``w3`` is given, biases if ``b*`` are) for
    ``z [B, n, d]`` and shared or per-sequence weights."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown '{activation}'; choose one of {ACTIVATIONS}")
    _check_weights(weights, None)
    return _forward(weights, z, activation)[0]


@full_precision
def cms_level_chunk(
    z: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    *,
    lr: float,
    chunk_size: int,
    optimizer: str = "gd",
    momentum: float = 0.9,
    error: ErrorFn = local_error,
    key_ctx: torch.Tensor | None = None,
    target_ctx: torch.Tensor | None = None,
    reset: ResetFn | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    detach_inner: bool = False,
    history: dict[int, Weights] | None = None,
    activation: str = "silu",
    step: str = "normalized",
) -> tuple[torch.Tensor, State | None]:
    """The training form: chunk by chunk, each chunk one batched forward/backward.

    Args:
        z: ``[B, T, d]`` the level's (normalized) inputs, read and used as keys.
        weights: ``w1 [h, d]``, ``w3 [h, d]``, ``w2 [d, h]`` (or with a leading batch
            dimension): the initial weights ``θ_0``, used when ``initial_state`` is None.
            ``w3`` may be left out (an ungated block); ``b1 [h]``, ``b3 [h]``, ``b2 [d]`` added.
        lr: inner learning rate ``η ≥ 0``. chunk_size: ``C ≥ 1``.
        optimizer: ``"gd"``, ``"momentum"`` (coefficient ``momentum`` in [0, 1)) or ``"dgd"``.
        error: the error source (:func:`local_error` by default).
        key_ctx: ``[B, T, e]`` passed to ``error`` at the key positions (None: not used).
        target_ctx: ``[B, T, ·]`` passed to ``error`` at the target positions (None: ``z``).
        reset: ``reset(p)`` at each chunk start ``p`` returns weights that replace the current
            ones (momentum zeroed) or None: the nested variant.
        initial_state: a state to continue from (module docstring); it may be mid-chunk.
        output_final_state: also return the state after the last token.
        detach_inner: stop-gradient through the error terms (``G``, ``E``, ``P``); gradients still
            reach ``θ_0`` through the reads and the identity path of each update.
        history: if given, filled with ``chunk index -> weights in effect for that chunk``.
        activation: ``σ`` of the block, ``"silu"`` or ``"gelu_tanh"``.
        step: ``"normalized"`` (``Ĝ = G / (1 + E)``, default) or ``"plain"`` (``Ĝ = G``, NL-31
            as printed): :func:`apply_update`.

    Returns:
        ``y [B, T, d]`` and the final state (or None).
    """
    opts = _options(lr, chunk_size, optimizer, momentum, error, detach_inner, activation, step)
    target_ctx = z if target_ctx is None else target_ctx
    _check(z, weights, key_ctx, target_ctx, initial_state, opts)
    w, acc, z_prev, ctx_prev, pos = _unpack(initial_state, weights, opts, key_ctx)
    T, C = z.shape[1], opts.chunk_size
    first = min(C - pos % C, T)
    sizes = [first] + [C] * ((T - first) // C)
    if (T - first) % C:
        sizes.append((T - first) % C)
    pieces = [z.split(sizes, 1), target_ctx.split(sizes, 1)]
    pieces.append([None] * len(sizes) if key_ctx is None else key_ctx.split(sizes, 1))
    if history is not None:
        history[pos // C] = w
    outputs, end = [], pos + T
    for z_seg, target_seg, ctx_seg in zip(*pieces, strict=True):
        n = z_seg.shape[1]
        if pos % C == 0:
            w, acc = _maybe_reset(reset, pos, w, acc, history, C)
        rows = z_seg if pos == 0 else torch.cat([z_prev.unsqueeze(1), z_seg], 1)  # keys + reads
        y_rows, cache = _forward(w, rows, opts.activation)
        outputs.append(y_rows[:, rows.shape[1] - n :])
        completes = (pos + n) % C == 0
        # Error terms are only needed if the chunk's update (or the state) is used.
        if output_final_state or (completes and pos + n < end):
            n_keys = rows.shape[1] - 1
            if n_keys > 0:
                keys_ctx = None
                if ctx_seg is not None:
                    keys_ctx = (
                        ctx_seg if pos == 0 else torch.cat([ctx_prev.unsqueeze(1), ctx_seg], 1)
                    )
                    keys_ctx = keys_ctx[:, :n_keys]
                args = (
                    w,
                    rows[:, :n_keys],
                    [None if c is None else c[:, :n_keys] for c in cache],
                    y_rows[:, :n_keys],
                    keys_ctx,
                    target_seg[:, n - n_keys :],
                    opts,
                )
                if completes and _fusable(acc, opts):
                    # The whole chunk is in this segment: step without materializing G.
                    w, acc = _fused_step(acc, *args)
                    completes = False  # stepped
                    if history is not None:
                        history[(pos + n) // C] = w
                else:
                    acc = _accumulate(acc, *args)
            if completes:
                w, acc = apply_update(w, acc, _pairs_in_chunk(pos, C), opts)
                if history is not None:
                    history[(pos + n) // C] = w
        z_prev = z_seg[:, -1]
        if ctx_seg is not None:
            ctx_prev = ctx_seg[:, -1]
        pos += n
    y = torch.cat(outputs, 1)
    if not output_final_state:
        return y, None
    return y, _pack(w, acc, z_prev, ctx_prev, pos, opts, z)


@full_precision
def cms_level_reference(
    z: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    *,
    lr: float,
    chunk_size: int,
    optimizer: str = "gd",
    momentum: float = 0.9,
    error: ErrorFn = local_error,
    key_ctx: torch.Tensor | None = None,
    target_ctx: torch.Tensor | None = None,
    reset: ResetFn | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    detach_inner: bool = False,
    history: dict[int, Weights] | None = None,
    activation: str = "silu",
    step: str = "normalized",
) -> tuple[torch.Tensor, State | None]:
    """The oracle: a loop over tokens; per token, complete the pending pair (one error term by
    per-token backprop and :func:`~nestlearn.memory.core.rules.linear_gradient`, one DGD
    projection by :func:`~nestlearn.memory.core.rules.dgd_projection`), read, and step at chunk
    ends. Arguments as :func:`cms_level_chunk`; slow, for tests."""
    opts = _options(lr, chunk_size, optimizer, momentum, error, detach_inner, activation, step)
    target_ctx = z if target_ctx is None else target_ctx
    _check(z, weights, key_ctx, target_ctx, initial_state, opts)
    w, acc, z_prev, ctx_prev, pos = _unpack(initial_state, weights, opts, key_ctx)
    B, C = z.shape[0], opts.chunk_size
    w = {name: _batched(x, name, B) for name, x in w.items()}
    if history is not None:
        history[pos // C] = w
    outputs = []
    for t in range(z.shape[1]):
        if pos % C == 0:
            w, acc = _maybe_reset(reset, pos, w, acc, history, C)
            w = {name: _batched(x, name, B) for name, x in w.items()}
        if pos > 0:
            ctx = None if key_ctx is None else ctx_prev
            acc = _pair(acc, w, z_prev, ctx, target_ctx[:, t], opts)
        outputs.append(_token_forward(w, z[:, t], opts.activation)[0])
        z_prev = z[:, t]
        if key_ctx is not None:
            ctx_prev = key_ctx[:, t]
        pos += 1
        if pos % C == 0:
            w, acc = apply_update(w, acc, _pairs_in_chunk(pos - C, C), opts)
            if history is not None:
                history[pos // C] = w
    y = torch.stack(outputs, 1)
    if not output_final_state:
        return y, None
    return y, _pack(w, acc, z_prev, ctx_prev, pos, opts, z)


def apply_update(w: Weights, acc: State, n_pairs: int, opts: _Options) -> tuple[Weights, State]:
    """One inner step at a chunk end with the chunk's ``n_pairs`` summed error terms, normalized
    by the chunk's summed sensitivity, ``Ĝ = G / (1 + E)`` (``opts.step == "plain"``: ``Ĝ = G``,
    NL-31's summed step):

        gd        θ ← θ − η Ĝ                                   (rules.momentum with μ = 0)
        momentum  S ← μ S − η Ĝ,  θ ← θ + S                     (rules.momentum)
        dgd       θ ← θ − η' P / n − η' Ĝ,   η' = η / (1 + η)   P = Σ_s (θ_c û_s) û_sᵀ

    ``û_s`` is a map's input normalized (1 for a bias, so a bias's ``P / n`` is the bias); the
    DGD projection is averaged over the chunk so that ``θ (I − η' P/n)`` is non-expansive for any
    ``C`` (``C = 1``: SPEC §3's DGD). Accumulators restart at zero; the momentum is kept.
    """
    if n_pairs == 0:
        return w, {k: v for k, v in acc.items() if k.startswith("s.")}
    new_w: Weights = {}
    new_acc: State = {}
    for name in names_of(w):
        G = acc.get(f"g.{name}")
        if G is not None and opts.step == "normalized":
            e = acc["e"]
            G = G / (1.0 + e).view(-1, *[1] * _core(name))
        if G is None:
            new_w[name] = w[name]
            if f"s.{name}" in acc:
                new_acc[f"s.{name}"] = acc[f"s.{name}"]
            continue
        if opts.optimizer == "gd":
            new_w[name] = w[name] + momentum(None, G, 0.0, opts.lr)
        elif opts.optimizer == "momentum":
            S = momentum(acc.get(f"s.{name}"), G, opts.momentum, opts.lr)
            new_acc[f"s.{name}"] = S
            new_w[name] = w[name] + S
        else:
            eta = opts.lr / (1.0 + opts.lr)
            new_w[name] = w[name] - eta * (acc[f"p.{name}"] / n_pairs + G)
    return new_w, new_acc


def _pairs_in_chunk(start: int, chunk_size: int) -> int:
    # Token 0 has no predecessor: the first chunk holds one pair fewer.
    return chunk_size - 1 if start < chunk_size else chunk_size


def _maybe_reset(
    reset: ResetFn | None,
    pos: int,
    w: Weights,
    acc: State,
    history: dict[int, Weights] | None,
    chunk_size: int,
) -> tuple[Weights, State]:
    fresh = None if reset is None else reset(pos)
    if fresh is None:
        return w, acc
    if history is not None:
        history[pos // chunk_size] = dict(fresh)
    # A reset falls on a chunk start: only the momentum is left to clear.
    return dict(fresh), {k: v for k, v in acc.items() if not k.startswith("s.")}


def _bias(b: torch.Tensor) -> torch.Tensor:
    # A shared bias [h] broadcasts over [B, n, h]; a per-sequence one [B, h] needs the token axis.
    return b.unsqueeze(-2) if b.ndim == 2 else b


def _forward(
    w: Mapping[str, torch.Tensor], z: torch.Tensor, activation: str
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """``z [B, n, d]`` -> ``y [B, n, d]`` and the cache ``[a, b, u]`` (``b`` None if ungated)."""
    a = torch.matmul(z, w["w1"].mT)  # [B, n, h]
    if "b1" in w:
        a = a + _bias(w["b1"])
    b = None
    if "w3" in w:
        b = torch.matmul(z, w["w3"].mT)  # [B, n, h]
        if "b3" in w:
            b = b + _bias(w["b3"])
    u = _act(a, activation) if b is None else _act(a, activation) * b  # [B, n, h]
    y = torch.matmul(u, w["w2"].mT)  # [B, n, d]
    if "b2" in w:
        y = y + _bias(w["b2"])
    return y, [a, b, u]


def _silu_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


class _ErrorTerms(NamedTuple):
    """Per pair, the error at the block output and its backprop to the maps' outputs, with the
    inputs each map's gradient multiplies: ``G_w1 = daᵀ keys``, ``G_w3 = dbᵀ keys``,
    ``G_w2 = deltaᵀ u``; ``sens [B]`` the pairs' summed sensitivity ``E``."""

    w: Weights
    keys: torch.Tensor
    u: torch.Tensor
    delta: torch.Tensor
    da: torch.Tensor
    db: torch.Tensor | None
    sens: torch.Tensor


def _error_terms(
    w: Weights,
    keys: torch.Tensor,
    cache: list[torch.Tensor | None],
    y: torch.Tensor,
    key_ctx: torch.Tensor | None,
    targets: torch.Tensor,
    opts: _Options,
) -> _ErrorTerms:
    """The error terms of ``n`` pairs (keys ``[B, n, d]`` with their forward at ``θ_c``): manual
    backprop through the block, per pair (the sums over pairs are left to the caller)."""
    a, b, u = cache
    if opts.detach_inner:
        w = {k: v.detach() for k, v in w.items()}
        keys, a, u, y = keys.detach(), a.detach(), u.detach(), y.detach()
        b = None if b is None else b.detach()
    delta = opts.error(y, key_ctx, targets)  # [B, n, d]
    if opts.detach_inner:
        delta = delta.detach()
    du = torch.matmul(delta, w["w2"])  # [B, n, h]
    if b is None:
        da, db = du * _act_grad(a, opts.activation), None
    else:
        da, db = du * b * _act_grad(a, opts.activation), du * _act(a, opts.activation)
    sens = _sensitivity(w, keys, a, b, u, opts.activation).sum(-1)
    return _ErrorTerms(w, keys, u, delta, da, db, sens)


def _fusable(acc: State, opts: _Options) -> bool:
    """A chunk whose every pair is in one segment (no partial sums ``G``, ``E`` carried in) and
    an optimizer whose step is linear in ``G``: :func:`_fused_step` applies."""
    return "e" not in acc and opts.optimizer in ("gd", "momentum")


def _fused_step(
    acc: State,
    w: Weights,
    keys: torch.Tensor,
    cache: list[torch.Tensor | None],
    y: torch.Tensor,
    key_ctx: torch.Tensor | None,
    targets: torch.Tensor,
    opts: _Options,
) -> tuple[Weights, State]:
    """:func:`_accumulate` then :func:`apply_update` (gd or momentum) for a whole chunk in one
    segment, without materializing ``G`` or ``Ĝ``: the per-sequence rate ``r = η / (1 + E)``
    (``η`` for the plain step) scales the per-pair factors (``[B, n, ·]``) before the sum over
    pairs, and the sum joins the weights in one ``baddbmm``:

        gd        θ ← θ + (−r da)ᵀ keys   (w1; w3 with db; w2: (−r δ)ᵀ u)  =  θ − r G
        momentum  S ← μ S + (−r da)ᵀ keys,  θ ← θ + S

    Equal to the unfused pair to float rounding (the same sums, the scale applied first)."""
    terms = _error_terms(w, keys, cache, y, key_ctx, targets, opts)
    rate = opts.lr if opts.step == "plain" else opts.lr / (1.0 + terms.sens)
    neg = -rate if opts.step == "plain" else (-rate).view(-1, 1, 1)  # [B, 1, 1] over [B, n, ·]
    factors = {"w1": (terms.da, terms.keys), "w2": (terms.delta, terms.u)}
    if terms.db is not None:
        factors["w3"] = (terms.db, terms.keys)
    new_w: Weights = {}
    new_acc: State = {}
    for name in names_of(w):
        S = acc.get(f"s.{name}") if opts.optimizer == "momentum" else None
        # What the step adds to: θ (gd), μ S (momentum), nothing (momentum without S yet).
        base = w[name] if opts.optimizer == "gd" else (None if S is None else opts.momentum * S)
        if name[0] == "b":  # a bias: the sum over pairs of its map's factor
            step = (neg * factors["w" + name[1]][0]).sum(-2)
            new = step if base is None else base + step
        else:
            left, right = factors[name]
            step = (neg * left).mT
            new = torch.bmm(step, right) if base is None else torch.baddbmm(base, step, right)
        if opts.optimizer == "momentum":
            new_acc[f"s.{name}"] = new
            new = w[name] + new
        new_w[name] = new
    return new_w, new_acc


def _accumulate(
    acc: State,
    w: Weights,
    keys: torch.Tensor,
    cache: list[torch.Tensor | None],
    y: torch.Tensor,
    key_ctx: torch.Tensor | None,
    targets: torch.Tensor,
    opts: _Options,
) -> State:
    """Add the error terms of ``n`` pairs (keys ``[B, n, d]`` with their forward at ``θ_c``):
    manual backprop through the block, each sum over the pairs one batched matmul."""
    terms = _error_terms(w, keys, cache, y, key_ctx, targets, opts)
    w, keys, u, delta, da, db, sens = terms
    grads = {"w1": da.mT @ keys, "w2": delta.mT @ u}  # Σ_s δ_s u_sᵀ
    if db is not None:
        grads["w3"] = db.mT @ keys
    if "b1" in w:
        grads.update(b1=da.sum(-2), b2=delta.sum(-2))
        if db is not None:
            grads["b3"] = db.sum(-2)
    out = _add(acc, grads, sens)
    if opts.optimizer == "dgd":
        B, n = keys.shape[:2]
        for name in names_of(w):
            if name[0] == "b":
                proj = n * _batched(w[name], name, B)  # Σ_s (b·1)·1
            else:
                unit = F.normalize(u if name == "w2" else keys, dim=-1)
                proj = torch.matmul(unit, w[name].mT).mT @ unit  # Σ_s (θ û_s) û_sᵀ
            key = f"p.{name}"
            out[key] = proj if acc.get(key) is None else acc[key] + proj
    return out


def _sensitivity(
    w: Weights,
    z: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None,
    u: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """``‖u‖² [+ 1] + (‖z‖² [+ 1]) Σ_j ‖W2[:, j]‖² ((b_j σ'(a_j))² + σ(a_j)²)`` per key (ungated:
    ``σ'(a_j)²`` alone; the ``+ 1`` terms with biases, whose input is the constant 1): a bound of
    ``‖∂y/∂θ (∂y/∂θ)ᵀ‖`` (W2's part exact, W1's and W3's by Frobenius norms). Shapes ``[..., h]``
    for ``a, b, u`` and ``[..., d]`` for ``z`` -> ``[...]``."""
    col = w["w2"].pow(2).sum(-2)  # ‖W2[:, j]‖² [(B,) h]
    if a.ndim == 3:
        col = col.unsqueeze(-2)
    if b is None:
        gates = _act_grad(a, activation).pow(2)
    else:
        gates = (b * _act_grad(a, activation)).pow(2) + _act(a, activation).pow(2)
    biased = 1.0 if "b1" in w else 0.0
    inputs = z.pow(2).sum(-1) + biased
    return u.pow(2).sum(-1) + biased + inputs * (gates * col).sum(-1)


def _add(acc: State, grads: Weights, sensitivity: torch.Tensor) -> State:
    out = dict(acc)
    for key, value in [*((f"g.{n}", grads[n]) for n in names_of(grads)), ("e", sensitivity)]:
        out[key] = value if acc.get(key) is None else acc[key] + value
    return out


def _token_forward(
    w: Weights, z: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One token per sequence, ``z [B, d]``, weights ``[B, out, in]`` (biases ``[B, out]``):
    matrix-vector products."""
    a = (w["w1"] @ z.unsqueeze(-1)).squeeze(-1)
    if "b1" in w:
        a = a + w["b1"]
    b = None
    if "w3" in w:
        b = (w["w3"] @ z.unsqueeze(-1)).squeeze(-1)
        if "b3" in w:
            b = b + w["b3"]
    u = _act(a, activation) if b is None else _act(a, activation) * b
    y = (w["w2"] @ u.unsqueeze(-1)).squeeze(-1)
    if "b2" in w:
        y = y + w["b2"]
    return y, a, b, u


def _pair(
    acc: State,
    w: Weights,
    key: torch.Tensor,
    key_ctx: torch.Tensor | None,
    target: torch.Tensor,
    opts: _Options,
) -> State:
    """One pair's error term by per-token backprop, written with the rules' functions."""
    if opts.detach_inner:
        w, key = {k: v.detach() for k, v in w.items()}, key.detach()
    y, a, b, u = _token_forward(w, key, opts.activation)
    ctx = None if key_ctx is None else key_ctx.unsqueeze(1)
    delta = opts.error(y.unsqueeze(1), ctx, target.unsqueeze(1)).squeeze(1)
    if opts.detach_inner:
        delta = delta.detach()
    du = (w["w2"].mT @ delta.unsqueeze(-1)).squeeze(-1)
    if b is None:
        da = du * _act_grad(a, opts.activation)
        grads = {"w1": linear_gradient(da, key), "w2": linear_gradient(delta, u)}
    else:
        da, db = du * b * _act_grad(a, opts.activation), du * _act(a, opts.activation)
        grads = {
            "w1": linear_gradient(da, key),
            "w3": linear_gradient(db, key),
            "w2": linear_gradient(delta, u),
        }
    if "b1" in w:
        grads.update(b1=da, b2=delta)
        if b is not None:
            grads["b3"] = db
    out = _add(acc, grads, _sensitivity(w, key, a, b, u, opts.activation))
    if opts.optimizer == "dgd":
        for name in names_of(w):
            if name[0] == "b":
                proj = w[name]  # a bias reads the constant 1: (b·1)·1
            else:
                inp = u if name == "w2" else key
                # θ − dgd_projection(θ, û, 1) = (θ û) ûᵀ.
                proj = w[name] - dgd_projection(w[name], F.normalize(inp, dim=-1), 1.0)
            key_name = f"p.{name}"
            out[key_name] = proj if acc.get(key_name) is None else acc[key_name] + proj
    return out


def _unpack(
    state: State | None,
    weights: Mapping[str, torch.Tensor],
    opts: _Options,
    key_ctx: torch.Tensor | None,
) -> tuple[Weights, State, torch.Tensor | None, torch.Tensor | None, int]:
    """Weights, accumulators (absent = zero), pending key and context, position."""
    if state is None:
        return {name: weights[name] for name in names_of(weights)}, {}, None, None, 0
    w = {name: state[name] for name in names_of(weights)}
    acc = {k: v for k, v in state.items() if k[:2] in ("g.", "s.", "p.") or k == "e"}
    ctx = state.get("ctx_prev") if key_ctx is not None else None
    return w, acc, state["z_prev"], ctx, int(state["pos"])


def _pack(
    w: Weights,
    acc: State,
    z_prev: torch.Tensor | None,
    ctx_prev: torch.Tensor | None,
    pos: int,
    opts: _Options,
    z: torch.Tensor,
) -> State:
    B = z.shape[0]
    state: State = {}
    for name in names_of(w):
        W = _batched(w[name], name, B)
        # Entries never share memory (safetensors refuses aliases; in-place edits stay local).
        state[name] = W.clone()
        prefixes = ["g", *{"momentum": ["s"], "dgd": ["p"]}.get(opts.optimizer, [])]
        for prefix in prefixes:
            x = acc.get(f"{prefix}.{name}")
            state[f"{prefix}.{name}"] = torch.zeros_like(state[name]) if x is None else x
    e = acc.get("e")
    state["e"] = state["w1"].new_zeros(B) if e is None else e
    state["z_prev"] = z_prev.clone()
    if ctx_prev is not None:
        state["ctx_prev"] = ctx_prev.clone()
    state["pos"] = torch.tensor(pos, dtype=torch.long, device=z.device)
    return state


def _options(
    lr: float,
    chunk_size: int,
    optimizer: str,
    mu: float,
    error: ErrorFn,
    detach_inner: bool,
    activation: str = "silu",
    step: str = "normalized",
) -> _Options:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"lr: expected a float >= 0 (the inner learning rate), got {lr!r}")
    _check_optimizer(optimizer)
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"momentum: expected a coefficient in [0, 1), got {mu!r}")
    if not callable(error):
        raise ValueError(f"error: expected a callable (y, key_ctx, target) -> δ, got {error!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown '{activation}'; choose one of {ACTIVATIONS}")
    if step not in STEPS:
        raise ValueError(f"step: unknown '{step}'; choose one of {', '.join(STEPS)}")
    return _Options(
        float(lr), chunk_size, optimizer, float(mu), error, bool(detach_inner), activation, step
    )


def _check_optimizer(optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown '{optimizer}'; choose one of {', '.join(OPTIMIZERS)}")


def _check_weights(weights: Mapping[str, torch.Tensor], batch: int | None) -> None:
    names = set(weights) if isinstance(weights, Mapping) else set()
    gated = "w3" in names
    biases = {"b1", "b3", "b2"} if gated else {"b1", "b2"}
    allowed = [{"w1", "w2"} | ({"w3"} if gated else set()) | extra for extra in (set(), biases)]
    if not isinstance(weights, Mapping) or names not in allowed:
        got = sorted(weights) if isinstance(weights, Mapping) else type(weights).__name__
        raise ValueError(
            f"weights: expected the keys {list(MAPS)} (SwiGLU), w1, w2 (ungated), each optionally "
            f"with all of its biases (b1, b3, b2 / b1, b2), got {got}"
        )
    h, d = weights["w1"].shape[-2:]
    shapes = {"w1": (h, d), "w3": (h, d), "w2": (d, h), "b1": (h,), "b3": (h,), "b2": (d,)}
    for name in names_of(weights):
        x, shape = weights[name], shapes[name]
        core = _core(name)
        ok = x.ndim == core or (x.ndim == core + 1 and (batch is None or x.shape[0] == batch))
        if not ok or tuple(x.shape[-core:]) != shape:
            raise ValueError(
                f"weights['{name}']: expected shape {list(shape)} or [B, *{list(shape)}] "
                f"(w1, w3 [hidden, d], w2 [d, hidden], b1, b3 [hidden], b2 [d]), "
                f"got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"weights['{name}']: expected a floating-point tensor, got {x.dtype}")


def _check(
    z: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    key_ctx: torch.Tensor | None,
    target_ctx: torch.Tensor,
    state: State | None,
    opts: _Options,
) -> None:
    if not isinstance(z, torch.Tensor) or z.ndim != 3 or z.shape[1] < 1:
        shape = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z: expected a tensor [B, T, d] with T >= 1, got {shape}")
    if not z.is_floating_point():
        raise ValueError(f"z: expected a floating-point tensor, got {z.dtype}")
    B, T, d = z.shape
    _check_weights(weights, B)
    if weights["w1"].shape[-1] != d:
        raise ValueError(
            f"weights['w1']: expected input width d={d} (as z), got {list(weights['w1'].shape)}"
        )
    for name, ctx in (("key_ctx", key_ctx), ("target_ctx", target_ctx)):
        if ctx is not None and tuple(ctx.shape[:2]) != (B, T):
            raise ValueError(
                f"{name}: expected leading dims [B, T] = {[B, T]} (as z), got {list(ctx.shape)}"
            )
    if state is None:
        return
    if not isinstance(state, Mapping):
        raise ValueError(f"initial_state: expected a dict of tensors, got {type(state).__name__}")
    maps = names_of(weights)
    expected = set(maps) | {f"g.{m}" for m in maps} | {"e", "z_prev", "pos"}
    expected |= {f"s.{m}" for m in maps} if opts.optimizer == "momentum" else set()
    expected |= {f"p.{m}" for m in maps} if opts.optimizer == "dgd" else set()
    expected |= {"ctx_prev"} if key_ctx is not None else set()
    if set(state) != expected:
        raise ValueError(
            f"initial_state: expected keys {sorted(expected)} (optimizer '{opts.optimizer}'"
            f"{', with key_ctx' if key_ctx is not None else ''}), got {sorted(state)}; make one "
            "with init_cms_level_state"
        )
    for name in maps:
        shape = [B, *weights[name].shape[-_core(name) :]]
        for key in [name] + [k for k in state if k.endswith(f".{name}")]:
            if list(state[key].shape) != shape:
                raise ValueError(
                    f"initial_state['{key}']: expected shape {shape}, got {list(state[key].shape)}"
                )
    if list(state["e"].shape) != [B]:
        raise ValueError(f"initial_state['e']: expected shape {[B]}, got {list(state['e'].shape)}")
    if list(state["z_prev"].shape) != [B, d]:
        raise ValueError(
            f"initial_state['z_prev']: expected shape {[B, d]}, got {list(state['z_prev'].shape)}"
        )
    pos = state["pos"]
    if pos.ndim != 0 or pos.is_floating_point() or int(pos) < 0:
        raise ValueError(f"initial_state['pos']: expected an integer scalar >= 0, got {pos!r}")
