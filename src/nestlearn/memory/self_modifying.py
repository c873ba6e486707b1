"""Self-modifying Titans (SPEC §5; arXiv §8, Eqs 83–93): memories that generate their own
keys, values, learning rates, retention gates and targets, all learning in context.

Per head, on the (convolved, normalized) input ``x_t`` of width ``D``, and ``c(t)`` the state at
the end of the previous chunk of each memory's own chunk size:

    k_t = normalize(M_{k,c(t)}(x_t))    v_t = normalize(M_{v,c(t)}(x_t))    q_t = normalize(x_t W_q)
    η_t = min(softplus(M_{η,c(t)}(x_t) + b_η) · scale, (1 + α_t) / κ)
    α_t = sigmoid(M_{α,c(t)}(x_t) + b_α)
    every memory □ ∈ {k, v, (q), η, α, mem}: one token of chunked DGD with momentum
    (:mod:`nestlearn.memory.dgd.forms`) on ½‖M_□(k_t) − v̂_{□,t}‖², v̂_{□,t} = M_{□,c(t)}(v_t),
    the momentum an average of past steps, S_t = μ S_{t−1} − (1 − μ) η_t g_t (``ema_momentum``,
    default; False: S_t = μ S_{t−1} − η_t g_t). ``v_t`` is normalized like ``k_t`` and ``q_t``
    (its only role is the input of the self-generated targets; ``normalize_v=False``: as read).
    y_t = M_{mem,t}(q_t)   (per-token state, dual form; option: the chunk-start state)

``M_k, M_v, M_q, M_mem`` map ``D -> D`` (residual, ``M(z) = z + MLP(z)``); ``M_η, M_α`` map
``D -> 1`` with a linear skip that is written like the MLP's maps. ``κ = 2`` for the L2 objective
with DGD (the ``x xᵀ`` term appears in the projection and in the gradient), 1 with one of them,
none otherwise. ``q`` (default), ``k`` or ``v`` may be fixed per-head maps ``x W`` instead of
memories, ``α`` may be absent (no retention), ``μ`` (a per-head momentum) too. In the
``fully_adaptive`` variant (arXiv Eqs 79–82) every memory regresses onto the shared ``v_t``
(its channel mean for the 1-wide memories) instead of its own ``v̂``.

Because the other memories are read only at their chunk-start states, the chunk form first runs
them chunk by chunk (``other_chunk_size``, parallel within a chunk, memories of one shape batched
together), which yields ``k, v, q, η, α`` for every token, then runs ``M_mem`` with its own chunk
size in one :func:`nestlearn.memory.dgd.forms.run_chunks` call. The reference is one loop over
tokens calling :func:`nestlearn.memory.dgd.forms.token` per memory; the step is one of its tokens.
Derivation and decisions: ``docs/self-modifying-titans.md``.

Shapes: ``x [B, H, T, D]``, output ``y [B, H, T, D]``. The state is a flat dict with, per memory
``name``, the entries of :mod:`nestlearn.memory.mlp`'s state under ``"{name}."``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nestlearn.memory.core.precision import full_precision
from nestlearn.memory.dgd import bank, bank_layout
from nestlearn.memory.dgd import forms as dgd_mlp
from nestlearn.memory.mlp import forms as mlp
from nestlearn.memory.mlp.forms import State, init_mlp_memory_state

OTHERS = ("k", "v", "q", "eta", "alpha")
MEMORIES = (*OTHERS, "mem")
GATES = ("eta", "alpha")
VARIANTS = ("self_modifying", "fully_adaptive")


@dataclass(frozen=True)
class SelfModifyingOptions:
    """How the memories are written and read (SPEC §5; defaults are SPEC's)."""

    chunk_size: int = 64  # tokens per chunk of M_mem
    other_chunk_size: int = 16  # tokens per chunk of M_k, M_v, M_q, M_η, M_α
    objective: str = "l2"  # inner objective of every memory: l2, dot, huber
    activation: str = "silu"  # σ inside the memories
    dgd: bool = True  # DGD projection per map; False: plain chunked GD
    variant: str = "self_modifying"  # or "fully_adaptive": shared targets v_t
    read: str = "per_token"  # M_mem read: per_token (dual form) or chunk_start
    eta_scale: float = 0.1  # η_t = softplus(·) · eta_scale, before the clamp
    # S_t = μ S_{t−1} − (1 − μ) η_t g_t: the gradient's gain 1, as the DGD projection's, so it
    # cannot outweigh the projection where a self-generated target cancels the L2 pull
    # (docs/self-modifying-titans.md §7); False: S_t = μ S_{t−1} − η_t g_t (gain 1/(1 − μ)).
    ema_momentum: bool = True
    # v_t = normalize(M_{v,c}(x_t)) (self-modifying variant): the self-generated targets
    # M_{□,c}(v_t) read a unit vector, as every memory input; False: v_t as read, whose scale
    # grows with M_v's gain, so M_v's own target M_v(M_v(x)) with its square.
    normalize_v: bool = True
    detach_inner: bool = False  # stop-gradient through every memory's surprise
    # The other memories' reads, coefficients and writes as autograd nodes with hand-written
    # backwards, one each per segment (memory/dgd/bank_fused.py, dgd/write.py; L2 objective; once
    # differentiable); False: plain autograd, the reference formulation.
    fused_bank: bool = True


class SelfModifyingParams(NamedTuple):
    """The meta-learned (outer-level) tensors, per head ``H``, memory width ``D``."""

    memories: Mapping[str, Sequence[torch.Tensor]]  # initial weights [H, out, in] per memory
    # fixed maps [H, D, D] for q (and k, v when fixed); [H, 1, D] for the gates η, α when fixed
    projections: Mapping[str, torch.Tensor]
    eta_bias: torch.Tensor  # [H]
    alpha_bias: torch.Tensor | None  # [H]; None (and no "alpha" memory): no retention
    mu: torch.Tensor | float | None  # [H] momentum per head; None: no momentum


class _Memory(NamedTuple):
    """One memory's state with heads folded into the batch, ``[B·H, out, in]``."""

    w: list[torch.Tensor]
    s: list[torch.Tensor]
    wc: list[torch.Tensor]
    pos: int


def init_self_modifying_state(params: SelfModifyingParams, batch_size: int) -> State:
    """The state before any token: every memory at its initial weights, zero momentum."""
    state: State = {}
    for name, weights in params.memories.items():
        memory = init_mlp_memory_state(list(weights), batch_size)
        state.update({f"{name}.{key}": value for key, value in memory.items()})
    return state


@full_precision
def self_modifying_reference(
    x: torch.Tensor,
    params: SelfModifyingParams,
    options: SelfModifyingOptions = SelfModifyingOptions(),
    *,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """The oracle: a loop over tokens, each one :func:`self_modifying_step`'s update."""
    plan = _plan(params, options)
    memories = _start(x, params, plan, initial_state, "initial_state", options)
    B, H = x.shape[:2]
    mu = _mu(params, x)
    flat = x.flatten(0, 1)  # [B·H, T, D]
    fixed = _fixed(params, B)
    outputs = []
    for t in range(x.shape[2]):
        y, memories = _token(flat[:, t], memories, params, plan, fixed, _at(mu, t), options, B)
        outputs.append(y)
    y = torch.stack(outputs, dim=1).unflatten(0, (B, H))
    return y, _pack(memories, H) if output_final_state else None


@full_precision
def self_modifying_step(
    x: torch.Tensor,
    params: SelfModifyingParams,
    options: SelfModifyingOptions = SelfModifyingOptions(),
    *,
    state: State | None = None,
) -> tuple[torch.Tensor, State]:
    """One token ``x [B, H, D]`` -> ``y [B, H, D]`` and the new state (None: from the initial
    weights); equal to the chunk form token by token."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(f"x: expected a tensor [B, H, D] (one token), got {mlp._describe(x)}")
    plan = _plan(params, options)
    memories = _start(x.unsqueeze(2), params, plan, state, "state", options)
    B, H = x.shape[:2]
    mu = _mu(params, x.unsqueeze(2))
    y, memories = _token(
        x.flatten(0, 1), memories, params, plan, _fixed(params, B), _at(mu, 0), options, B
    )
    return y.unflatten(0, (B, H)), _pack(memories, H)


@full_precision
def self_modifying_chunk(
    x: torch.Tensor,
    params: SelfModifyingParams,
    options: SelfModifyingOptions = SelfModifyingOptions(),
    *,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """The training form: the other memories chunk by chunk, then ``M_mem`` chunk by chunk.

    Args:
        x: ``[B, H, T, D]`` the memories' input per head (after the short conv).
        params: initial memory weights, fixed projections, gate biases, momentum.
        options: chunk sizes and switches, :class:`SelfModifyingOptions`.
        initial_state: a state (module docstring) to continue from, possibly mid-chunk.
        output_final_state: also return the state after the last token.

    Returns:
        ``y [B, H, T, D]`` and the final state (or None).
    """
    plan = _plan(params, options)
    memories = _start(x, params, plan, initial_state, "initial_state", options)
    B, H, T = x.shape[:3]
    mu = _mu(params, x)
    flat = x.flatten(0, 1)  # [B·H, T, D]
    fixed = _fixed(params, B)
    # The other memories as one bank (memory/dgd/bank.py): one map for all the maps that read the
    # input, one batch of second maps; one set of coefficients, as they share η, μ, α.
    names = [n for n in OTHERS if n in params.memories]
    lay = bank_layout.layout(params.memories, names)
    opts = plan[names[0]]
    w, s, wc = (
        bank_layout.pack(lay, {n: getattr(memories[n], f) for n in names}) for f in ("w", "s", "wc")
    )
    pos = memories[names[0]].pos
    sizes = dgd_mlp.segment_sizes(T, options.other_chunk_size, pos)
    mu_parts = [None] * len(sizes) if mu is None else mu.split(sizes, dim=1)
    # The fixed maps read the input, not a memory: once for the whole sequence (a fixed gate's
    # raw read joins the memories' raw reads, to be squashed with them).
    fixed_raw = {n: torch.bmm(flat, W.mT) for n, W in fixed.items()}
    fixed_tokens = {n: _token_of(n, r, options) for n, r in fixed_raw.items() if n not in GATES}
    fixed_parts = {n: t.split(sizes, dim=1) for n, t in fixed_tokens.items()}
    gate_parts = {n: r.split(sizes, dim=1) for n, r in fixed_raw.items() if n in GATES}
    parts: dict[str, list] = {name: [] for name in ("k", "v", "q", "eta", "alpha")}
    for i, (x_n, mu_n) in enumerate(zip(flat.split(sizes, dim=1), mu_parts, strict=True)):
        given = {n: p[i] for n, p in fixed_parts.items()}
        raw_gates = {n: p[i] for n, p in gate_parts.items()}
        tokens, w, s = _others_segment(
            x_n, mu_n, w, s, wc, lay, opts, params, given, options, raw_gates
        )
        for name, value in tokens.items():
            if name not in fixed_tokens:
                parts[name].append(value)
        pos += x_n.shape[1]
        if pos == options.other_chunk_size:
            wc, pos = w, 0
    unpacked = [bank_layout.unpack(lay, x) for x in (w, s, wc)]
    for name in names:
        memories[name] = _Memory(*(u[name] for u in unpacked), pos)
    inputs = {n: None if p[0] is None else torch.cat(p, dim=1) for n, p in parts.items() if p}
    inputs.update(fixed_tokens)
    mem = memories["mem"]
    y, w, s, wc, pos = dgd_mlp.run_chunks(
        inputs["q"],
        inputs["k"],
        _target_input("mem", inputs["v"], options),
        inputs["eta"],
        mu,
        inputs["alpha"],
        *mem,
        plan["mem"],
    )
    memories["mem"] = _Memory(w, s, wc, pos)
    y = y.unflatten(0, (B, H))
    return y, _pack(memories, H) if output_final_state else None


def _others_segment(
    x: torch.Tensor,
    mu: torch.Tensor | None,
    w: list[torch.Tensor],
    s: list[torch.Tensor],
    wc: list[torch.Tensor],
    lay: bank_layout.Layout,
    opts: dgd_mlp.Options,
    params: SelfModifyingParams,
    fixed: Mapping[str, torch.Tensor],
    options: SelfModifyingOptions,
    raw_gates: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor | None], list[torch.Tensor], list[torch.Tensor]]:
    """One chunk segment of the other memories (a :mod:`~nestlearn.memory.dgd.bank`), tokens
    ``x [N, n, D]``: their ``k, v, q, η, α`` from the chunk-start weights ``wc`` (``fixed``: the
    tokens of the fixed maps, given; ``raw_gates``: the raw reads of fixed gates, given), then the
    bank's weights and momenta after writing them."""
    raw = dict(zip(lay.names, bank.read(lay, wc, x, opts, fused=options.fused_bank), strict=True))
    raw.update(raw_gates or {})
    tokens = _finish(raw, params, options, len(x) // len(params.eta_bias))
    tokens.update(fixed)
    targets = None
    if options.variant == "fully_adaptive":
        pads = zip(lay.names, lay.outs, strict=True)
        targets = torch.stack(
            [F.pad(_target_input(n, tokens["v"], options), (0, lay.out - o)) for n, o in pads]
        )
    gates = (tokens["eta"], mu, tokens["alpha"])
    w, s = bank.segment(
        lay, w, s, wc, tokens["k"], tokens["v"], targets, gates, opts, fused=options.fused_bank
    )
    return tokens, w, s


def _token(
    x: torch.Tensor,
    memories: dict[str, _Memory],
    params: SelfModifyingParams,
    plan: dict[str, dgd_mlp.Options],
    fixed: dict[str, torch.Tensor],
    mu: torch.Tensor | None,
    options: SelfModifyingOptions,
    B: int,
) -> tuple[torch.Tensor, dict[str, _Memory]]:
    """SPEC §5 for one token ``x [B·H, D]``: inputs from the chunk-start states, then one DGD
    token per memory (:func:`nestlearn.memory.dgd.forms.token`), the read of ``M_mem``."""
    raw = {
        name: dgd_mlp.forward(memory.wc, x.unsqueeze(1), plan[name])[0]
        for name, memory in memories.items()
        if name != "mem"
    }
    raw.update({name: torch.bmm(x.unsqueeze(1), W.mT) for name, W in fixed.items()})
    tokens = {
        n: None if t is None else t[:, 0] for n, t in _finish(raw, params, options, B).items()
    }
    new, y = {}, None
    for name, memory in memories.items():
        o, *updated = dgd_mlp.token(
            tokens["q"] if name == "mem" else None,
            tokens["k"],
            _target_input(name, tokens["v"], options),
            *memory,
            tokens["eta"],
            mu,
            tokens["alpha"],
            plan[name],
        )
        new[name] = _Memory(*updated)
        y = o if name == "mem" else y
    return y, new


def _finish(
    raw: Mapping[str, torch.Tensor],
    params: SelfModifyingParams,
    options: SelfModifyingOptions,
    B: int,
) -> dict[str, torch.Tensor | None]:
    """``k, v, q [N, n, D]`` (those of them in ``raw``) and ``η, α [N, n]`` from the raw reads
    ``[N, n, out]`` of the memories at their chunk-start weights (or of the fixed maps); ``α``
    None without retention."""
    eta = F.softplus(raw["eta"][..., 0] + _per_sequence(params.eta_bias, B)) * options.eta_scale
    alpha = None
    if params.alpha_bias is not None:
        alpha = torch.sigmoid(raw["alpha"][..., 0] + _per_sequence(params.alpha_bias, B))
    tokens = {n: _token_of(n, raw[n], options) for n in ("k", "v", "q") if n in raw}
    return {**tokens, "eta": _clamp(eta, alpha, options), "alpha": alpha}


def _token_of(name: str, raw: torch.Tensor, options: SelfModifyingOptions) -> torch.Tensor:
    """``k``, ``q``: unit rows; ``v`` too where it is the input of the self-generated targets
    (``normalize_v``, self-modifying variant), else as read (a regression target)."""
    if name == "v" and not (options.normalize_v and options.variant == "self_modifying"):
        return raw
    return F.normalize(raw, dim=-1)


def _clamp(
    eta: torch.Tensor, alpha: torch.Tensor | None, options: SelfModifyingOptions
) -> torch.Tensor:
    """``η ≤ (1 + α) / κ`` with ``κ`` the number of ``x xᵀ`` terms of one step on a unit ``x``:
    one from the DGD projection, one from an objective whose error depends on the prediction
    (L2, Huber). Then ``α I − κ η x xᵀ`` has no eigenvalue below −1 (SPEC §5)."""
    kappa = int(options.dgd) + int(options.objective != "dot")
    if kappa == 0:
        return eta
    bound = (1.0 + (1.0 if alpha is None else alpha)) / kappa
    return torch.minimum(eta, torch.as_tensor(bound, dtype=eta.dtype, device=eta.device))


def _target_input(name: str, v: torch.Tensor, options: SelfModifyingOptions) -> torch.Tensor:
    """What :func:`dgd_mlp.token` receives as ``v``: the input of the self-generated target, or
    (fully adaptive) the shared target ``v_t``, its channel mean for a 1-wide memory."""
    if options.variant == "self_modifying" or name not in GATES:
        return v
    return v.mean(-1, keepdim=True)


def _plan(params: SelfModifyingParams, options: SelfModifyingOptions) -> dict[str, dgd_mlp.Options]:
    """Per memory, the options of its DGD op (skip, target, chunk size, read)."""
    _check_options(options)
    plan = {}
    for name in params.memories:
        plan[name] = dgd_mlp.options(
            objective=options.objective,
            activation=options.activation,
            skip="linear" if name in GATES else "identity",
            dgd=options.dgd,
            target="self" if options.variant == "self_modifying" else "given",
            read=options.read,
            chunk_size=options.chunk_size if name == "mem" else options.other_chunk_size,
            detach_inner=options.detach_inner,
            ema_momentum=options.ema_momentum,
        )
    return plan


def _check_options(options: SelfModifyingOptions) -> None:
    if not isinstance(options, SelfModifyingOptions):
        raise ValueError(f"options: expected SelfModifyingOptions, got {type(options).__name__}")
    for name in ("chunk_size", "other_chunk_size"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if options.variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {options.variant!r}")
    if not options.eta_scale > 0:
        raise ValueError(f"eta_scale: expected a number > 0, got {options.eta_scale!r}")


def _start(
    x: torch.Tensor,
    params: SelfModifyingParams,
    plan: dict[str, dgd_mlp.Options],
    state: State | None,
    state_name: str,
    options: SelfModifyingOptions,
) -> dict[str, _Memory]:
    """Check ``x``, the parameters and the state; the memories with heads folded into the
    batch, in the order the reference updates them."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x: expected a tensor [B, H, T, D], got {mlp._describe(x)}")
    mlp._check_float("x", x)
    B, H, T, D = x.shape
    if T < 1:
        raise ValueError(f"x: expected at least one token (T >= 1), got shape {list(x.shape)}")
    _check_params(params, B, H, D, plan)
    if state is None:
        state = init_self_modifying_state(params, B)
    elif not isinstance(state, dict):
        raise ValueError(f"{state_name}: expected a dict of tensors, got {type(state).__name__}")
    expected = {f"{n}.{key}" for n, weights in params.memories.items() for key in _keys(weights)}
    if set(state) != expected:
        raise ValueError(
            f"{state_name}: expected keys {sorted(expected)} (memories "
            f"{', '.join(params.memories)}), got {sorted(state)}"
        )
    memories = {}
    for name in [*(n for n in OTHERS if n in params.memories), "mem"]:
        weights = params.memories[name]
        sub = {key[len(name) + 1 :]: v for key, v in state.items() if key.startswith(f"{name}.")}
        mlp._check_state(f"{state_name}[{name}.*]", sub, weights, B, plan[name].chunk_size)
        memories[name] = _Memory(*mlp._unpack(sub, len(weights)))
    positions = {memories[n].pos for n in memories if n != "mem"}
    if len(positions) > 1:
        raise ValueError(
            f"{state_name}: the memories other than mem share one chunk grid, got positions "
            f"{ {n: m.pos for n, m in memories.items() if n != 'mem'} }"
        )
    return memories


def _keys(weights: Sequence[torch.Tensor]) -> list[str]:
    return [f"{p}.{i}" for p in ("w", "s", "wc") for i in range(len(weights))] + ["pos"]


def _check_params(
    params: SelfModifyingParams, B: int, H: int, D: int, plan: dict[str, dgd_mlp.Options]
) -> None:
    if not isinstance(params, SelfModifyingParams):
        raise ValueError(f"params: expected SelfModifyingParams, got {type(params).__name__}")
    unknown = set(params.memories) - set(MEMORIES)
    if unknown:
        raise ValueError(f"params.memories: unknown {sorted(unknown)}; allowed {list(MEMORIES)}")
    if "mem" not in params.memories:
        raise ValueError(f"params.memories: expected a memory 'mem', got {sorted(params.memories)}")
    if not set(OTHERS[:2] + GATES) & set(params.memories):
        raise ValueError(
            "params.memories: at least one of k, v, eta, alpha must be a memory (the others "
            "are written as one bank); got every one of them fixed"
        )
    gates = ("eta", "alpha") if params.alpha_bias is not None else ("eta",)
    for name in ("k", "v", "q", *gates):
        if (name in params.memories) == (name in params.projections):
            raise ValueError(
                f"{name}: expected either params.memories[{name!r}] (adaptive) or "
                f"params.projections[{name!r}] (fixed), not both or neither"
            )
    if set(params.projections) - {"k", "v", "q", *GATES}:
        raise ValueError(
            "params.projections: expected keys among k, v, q, eta, alpha, got "
            f"{sorted(params.projections)}"
        )
    has_alpha = "alpha" in params.memories or "alpha" in params.projections
    if has_alpha != (params.alpha_bias is not None):
        raise ValueError(
            "alpha: params.memories['alpha'] and params.alpha_bias go together (retention), "
            "or neither (no retention); a fixed α is params.projections['alpha']"
        )
    for name, weights in params.memories.items():
        expected = 3 if name in GATES else 2
        if not isinstance(weights, (list, tuple)) or len(weights) != expected:
            raise ValueError(
                f"params.memories[{name!r}]: expected {expected} tensors (a 2-layer MLP"
                f"{' and its linear skip' if name in GATES else ''}), got {mlp._describe(weights)}"
                f"{'' if not isinstance(weights, (list, tuple)) else f' of length {len(weights)}'}"
            )
        try:
            dgd_mlp._check_weights(list(weights), B, H, D, 1 if name in GATES else D, plan[name])
        except ValueError as exc:
            raise ValueError(f"params.memories[{name!r}]: {exc}") from None
    hidden = {n: params.memories[n][0].shape[-2] for n in OTHERS if n in params.memories}
    if len(set(hidden.values())) > 1:
        raise ValueError(
            f"params.memories: the memories other than mem share one hidden width (they are "
            f"written as one bank), got {hidden}"
        )
    for name, weight in params.projections.items():
        shape = [H, 1 if name in GATES else D, D]
        if not isinstance(weight, torch.Tensor) or list(weight.shape) != shape:
            raise ValueError(
                f"params.projections[{name!r}]: expected shape {shape} (H, out, D), "
                f"got {mlp._describe(weight)}"
            )
    biases = (("eta_bias", params.eta_bias), ("alpha_bias", params.alpha_bias))
    for name, bias in biases:
        if bias is not None and (not isinstance(bias, torch.Tensor) or list(bias.shape) != [H]):
            raise ValueError(
                f"params.{name}: expected shape [H] = [{H}], got {mlp._describe(bias)}"
            )
    mu = params.mu
    if isinstance(mu, torch.Tensor) and list(mu.shape) != [H]:
        raise ValueError(
            f"params.mu: expected a float or shape [H] = [{H}], got {mlp._describe(mu)}"
        )


def _mu(params: SelfModifyingParams, x: torch.Tensor) -> torch.Tensor | None:
    """The per-head momentum as a gate ``[B·H, T]``."""
    if params.mu is None:
        return None
    B, H, T = x.shape[:3]
    mu = torch.as_tensor(params.mu, dtype=x.dtype, device=x.device)
    return mu.reshape(-1, 1).expand(H, T).expand(B, H, T).flatten(0, 1)


def _fixed(params: SelfModifyingParams, B: int) -> dict[str, torch.Tensor]:
    """The fixed per-head maps ``[B·H, out, D]`` (``out = D``; 1 for a fixed gate)."""
    return {n: W.expand(B, *W.shape).flatten(0, 1) for n, W in params.projections.items()}


def _per_sequence(bias: torch.Tensor, B: int) -> torch.Tensor:
    """A per-head bias ``[H]`` as ``[B·H, 1]``, against gates ``[B·H, n]``."""
    return bias.expand(B, -1).reshape(-1, 1)


def _at(gate: torch.Tensor | None, t: int) -> torch.Tensor | None:
    return None if gate is None else gate[:, t]


def _pack(memories: dict[str, _Memory], H: int) -> State:
    state: State = {}
    for name, memory in memories.items():
        packed = mlp._pack(memory.w, memory.s, memory.wc, memory.pos, H)
        state.update({f"{name}.{key}": value for key, value in packed.items()})
    return state
