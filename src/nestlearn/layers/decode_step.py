"""The one-token step of the memory layers (decoding): the same maths in a few large ops.

A decoded token runs every layer on ``[B, 1, d]``, where each op costs its fixed dispatch
overhead far more than its arithmetic. The step of a memory mixer (:class:`MemoryHeads` plus
gates, SPEC §2.2) therefore

- projects once: the rows of ``q, k, v``, the output gate ``g`` and the mixer's scalar gates are
  stacked into one weight, so ``x W_qᵀ, x W_kᵀ, ...`` is one matmul (:class:`StepPlan`);
- runs the three short convolutions as one over the concatenated channels
  (``y = silu(Σ_i c_i ⊙ x_{t−i})`` on the window ``[state, x_t]``, :func:`conv_step`);
- normalizes ``q`` and ``k`` in one pass (``scale · x / max(‖x‖, eps)``, per-row scales);
- writes and reads a matrix memory in three products (:func:`matrix_token`);
- reads out with ``RMSNorm(o) ⊙ silu(g)`` and the output projection (:func:`read_out`).

Each value equals the sequence form's up to float rounding (the same formulas, summed in another
order); the tests compare both in float64. Plain differentiable ops: the step also trains
(gradients through a decoded prefix). The stacked weights are cached on the layer only where no
gradient is recorded, and rebuilt when a parameter changes (another tensor, device or dtype, or
an in-place update: its version counter).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from nestlearn.memory.mlp.forms import MLPOptions
from nestlearn.memory.mlp.segment import mlp_forward, surprise_saving

State = dict[str, torch.Tensor]

_PLAN = "_decode_step_plan"


class StepPlan(NamedTuple):
    """What a mixer's step reads besides the token: the stacked projection ``weight [N, d]``
    (rows ``q, k, v, g``, then the gates) and ``bias`` (None if no projection has one), the
    stacked conv taps ``conv [2·H·dk + H·dv, w]`` (None without convs), the per-row norms of
    ``q`` and ``k`` ``scales [2H, 1]``, and the split of the projection ``[qkv, g, gates]``."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    conv: torch.Tensor | None
    scales: torch.Tensor
    sizes: list[int]


def step_plan(
    heads: nn.Module, gates: list[nn.Linear], q_scale: float = 1.0, bypassed: tuple = ()
) -> StepPlan | None:
    """The :class:`StepPlan` of ``heads`` (a :class:`MemoryHeads`) with the scalar ``gates``;
    None where a forward hook is registered on a module the step does not call (the
    projections, convs, the read-out norm, ``bypassed``): the caller then runs the sequence
    form, so that every hook sees its call.

    Cached on ``heads`` where no gradient is recorded and no parameter is an inference tensor
    (which has no version counter), keyed on every parameter's storage and version."""
    h = heads
    linears = [h.q_proj, h.k_proj, h.v_proj, h.g_proj, *gates]
    convs = [h.q_conv, h.k_conv, h.v_conv] if h.conv_size > 0 else []
    if _hooked([*linears, *convs, h.o_norm, *bypassed]):
        return None
    params = [p for lin in linears for p in (lin.weight, lin.bias) if p is not None]
    if h.conv_size > 0:
        params += [h.q_conv.weight, h.k_conv.weight, h.v_conv.weight]
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return _build(h, linears, q_scale)
    key = (q_scale, *[(p.data_ptr(), p._version if not p.is_inference() else -1) for p in params])
    cached = h.__dict__.get(_PLAN)
    if cached is not None and cached[0] == key:
        return cached[1]
    # plain tensors (not inference tensors), so that a later call with autograd can read them
    with torch.inference_mode(False), torch.no_grad():
        plan = _build(h, linears, q_scale)
    if -1 not in (version for _, version in key[1:]):
        h.__dict__[_PLAN] = (key, plan)
    return plan


def _hooked(modules: list[nn.Module]) -> bool:
    if _global_forward_hooks or _global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _build(heads: nn.Module, linears: list[nn.Linear], q_scale: float) -> StepPlan:
    h = heads
    weight = torch.cat([lin.weight for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        parts = [
            lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias
            for lin in linears
        ]
        bias = torch.cat(parts)
    conv = None
    if h.conv_size > 0:
        conv = torch.cat([c.weight[:, 0] for c in (h.q_conv, h.k_conv, h.v_conv)])
    n_qk, n_v = h.n_heads * h.dk, h.n_heads * h.dv
    scales = torch.tensor([q_scale] * h.n_heads + [1.0] * h.n_heads, dtype=weight.dtype)
    sizes = [2 * n_qk + n_v, n_v, weight.shape[0] - 2 * n_qk - 2 * n_v]
    return StepPlan(weight, bias, conv, scales.to(weight.device)[:, None], sizes)


def conv_step(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of depthwise causal convs with silu: ``x [B, D]``, ``weight [D, w]``,
    ``state [B, D, w−1]`` (the last ``w − 1`` inputs) -> ``(silu(Σ_i weight[:, w−1−i] ⊙
    x_{t−i}) [B, D], window [B, D, w])`` (:func:`nestlearn.layers.short_conv.short_conv` for
    ``T = 1``); the new state is ``window[..., 1:]``."""
    window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [B, D, w]
    return F.silu((window * weight.to(x.dtype)).sum(-1)), window


def heads_step(
    heads: nn.Module, x: torch.Tensor, state: State, plan: StepPlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, State]:
    """:meth:`MemoryHeads.qkv` for one token ``x [B, d]`` plus the output gate's and the gates'
    pre-activations: ``q, k [B, H, dk]`` (norms ``q_scale`` and 1), ``v [B, H, dv]``,
    ``g [B, H·dv]``, the gates ``[B, Σ out]`` (with biases) and the new conv state."""
    h = heads
    B, H = x.shape[0], h.n_heads
    qkv, g, gates = F.linear(x, plan.weight, plan.bias).split(plan.sizes, -1)
    conv_state: State = {}
    if plan.conv is not None:
        old = state["conv_q"]
        carried = torch.cat([old, state["conv_k"], state["conv_v"]], dim=1)
        qkv, window = conv_step(qkv, plan.conv, carried)
        new = window[..., 1:].to(old.dtype).split([H * h.dk, H * h.dk, H * h.dv], dim=1)
        conv_state = {"conv_q": new[0], "conv_k": new[1], "conv_v": new[2]}
    qk = qkv[:, : 2 * H * h.dk].reshape(B, 2 * H, h.dk)
    norm = torch.linalg.vector_norm(qk, dim=-1, keepdim=True)
    qk = qk * (plan.scales.to(qk.dtype) / norm.clamp_min(1e-12))  # as l2_normalize (eps 1e-12)
    v = qkv[:, 2 * H * h.dk :].reshape(B, H, h.dv)
    return qk[:, :H], qk[:, H:], v, g, gates, conv_state


def matrix_token(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor | None,
    beta: torch.Tensor | None,
    l2: bool,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nestlearn.memory.matrix.forms.matrix_memory_step` (scale 1) on checked float32 or
    float64 inputs: ``q, k [B, H, dk]``, ``v [B, H, dv]``, gates ``[B, H]``, ``S [B, H, dk, dv]``.

    ``S ← α S``, then ``S ← S − β k (kᵀ S − vᵀ)`` (l2) or ``S + β k vᵀ`` (dot), ``o = qᵀ S``.
    """
    B, H, dk, dv = state.shape
    S = state.reshape(B * H, dk, dv)
    if log_alpha is not None:
        S = S * log_alpha.exp().view(B * H, 1, 1)
    e = v.reshape(B * H, 1, dv)
    if l2:
        e = torch.baddbmm(e, k.reshape(B * H, 1, dk), S, alpha=-1)  # vᵀ − kᵀ S
    bk = k if beta is None else k * beta.unsqueeze(-1)
    S = torch.baddbmm(S, bk.reshape(B * H, dk, 1), e)  # S + (β k) eᵀ
    o = torch.bmm(q.reshape(B * H, 1, dk), S)
    return o.view(B, H, dv), S.view(B, H, dk, dv)


def mlp_token(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor | None,
    alpha: torch.Tensor | None,
    memory: State,
    depth: int,
    opts: MLPOptions,
) -> tuple[torch.Tensor, State]:
    """:func:`nestlearn.memory.mlp.forms.mlp_memory_step` on checked float32 or float64 inputs
    (``q, k [B, H, Dk]``, ``v [B, H, Dv]``, gates ``[B, H]``, ``memory`` its state): per map,
    ``g = δ uᵀ`` at the chunk-start weights, ``S ← μ S − η g``, ``W ← α W + S``, then
    ``o = M_W(q)``; the chunk-start weights move to ``W`` after ``chunk_size`` tokens."""
    B, H = q.shape[:2]
    N = B * H
    w, s, wc = ([memory[f"{p}.{i}"].flatten(0, 1) for i in range(depth)] for p in ("w", "s", "wc"))
    pos = int(memory["pos"]) + 1
    rows = [x.reshape(N, 1, x.shape[-1]) for x in (q, k, v)]
    fused = not torch.is_grad_enabled()  # torch's activation backward: no autograd through it
    deltas, inputs, _ = surprise_saving(wc, rows[1], rows[2], opts, fused=fused)
    eta = eta.reshape(N, 1, 1)
    mu = None if mu is None else mu.reshape(N, 1, 1)
    alpha = None if alpha is None else alpha.reshape(N, 1, 1)
    new: State = {}
    for i, (W, S, delta, u) in enumerate(zip(w, s, deltas, inputs, strict=True)):
        step = (eta * delta).mT  # [N, out, 1]: −η g = −(η δ) uᵀ
        S = torch.bmm(step, u).neg_() if mu is None else torch.baddbmm(mu * S, step, u, alpha=-1)
        W = W + S if alpha is None else torch.addcmul(S, alpha, W)
        new[f"w.{i}"], new[f"s.{i}"] = W.unflatten(0, (B, H)), S.unflatten(0, (B, H))
        w[i] = W
    o = mlp_forward(w, rows[0], opts)[0][:, 0].unflatten(0, (B, H))
    if pos == opts.chunk_size:  # a chunk ends: its last weights are the next chunk's start
        pos = 0
        # no aliasing in a state (safetensors refuses shared memory, an in-place edit of one
        # entry must not change another)
        new.update({f"wc.{i}": new[f"w.{i}"].clone() for i in range(depth)})
    else:
        new.update({f"wc.{i}": memory[f"wc.{i}"] for i in range(depth)})
    new["pos"] = torch.tensor(pos, dtype=torch.long, device=q.device)
    return o, new


def read_out(heads: nn.Module, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """:meth:`MemoryHeads.output` for one token: ``o [B, H, dv]``, gate pre-activation
    ``g [B, H·dv]`` -> ``o_proj(RMSNorm(o) ⊙ silu(g)) [B, d]``."""
    h = heads
    B = o.shape[0]
    g = g.reshape(B, h.n_heads, h.dv)
    norm = h.o_norm
    if o.dtype == norm.weight.dtype:
        y = F.rms_norm(o, (h.dv,), norm.weight, norm.eps) * F.silu(g)
    else:
        y = norm(o) * F.silu(g)
    return h.o_proj(y.reshape(B, h.n_heads * h.dv))


def full_precision_step(*tensors: torch.Tensor) -> bool:
    """Whether the plain step applies: no autocast on the tensors' device and one dtype, float32
    or float64 (else the checked op runs: it computes in float32, or names the mismatch)."""
    dtype = tensors[0].dtype
    if torch.is_autocast_enabled(tensors[0].device.type):
        return False
    return dtype in (torch.float32, torch.float64) and all(t.dtype == dtype for t in tensors)
