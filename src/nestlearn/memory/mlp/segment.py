"""The pieces of the MLP memory's chunk form, each with its hand-written backward (SPEC §2.3).

For ``n`` tokens that take their gradients at the chunk-start weights ``W_c`` (a segment), the
dual form derived in ``memory/README.md`` ("MLP memories", "The chunk form"):

    Y_i  = diag(G) X_i W_iᵀ + diag(c) X_i S_iᵀ + (Ŵ ⊙ X_i U_iᵀ) Δ_i       reads, map by map
    W_i' = G_n W_i + c_n S_i + Δ_iᵀ (ŵ_n ⊙ U_i)                             end of segment
    S_i' = M(n, 0) S_i + Δ_iᵀ (m̂_n ⊙ U_i)

with ``Ŵ = −D ⊙ 𝟙ηᵀ`` (``D = A M``, ``c = A M[:, 0]``, ``G = A[:, 0]``), ``ŵ_n`` its last row,
``m̂_n = −M[n, 1:] ⊙ η``, and ``(Δ_i, U_i)`` each map's errors and inputs when the keys go through
the MLP at ``W_c`` (the surprise). Pieces: :func:`coefficients`, :func:`surprise_saving`,
:func:`reads_forward`, :func:`end_forward`, each with a ``*_backward`` that writes the chain rule
out with batched matmuls (README, "Backward"); :mod:`nestlearn.memory.mlp.chunk` assembles them
into one autograd node per call, and :func:`segment_forward` composes the forwards for autograd
(the reference the hand-written backward is tested against). Shapes: ``M`` rows (sequences ×
heads, or segments × sequences × heads), ``n`` tokens, matrices ``[M, out, in]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from nestlearn.memory.core.rules import L2, DotProduct, Huber
from nestlearn.memory.core.segments import products_backward, rows_backward, segment_products

Weights = list[torch.Tensor]
Grads = list[torch.Tensor | None]


def _silu_grad2(x: torch.Tensor) -> torch.Tensor:
    # d²/dx² x s(x) = s (1 − s) (2 + x (1 − 2 s)).
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _gelu_grad2(x: torch.Tensor) -> torch.Tensor:
    # d²/dx² x Φ(x) = φ(x) (2 − x²) for the exact (erf) GELU.
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) * (2 - x * x)


SECOND_DERIVATIVES: dict[Callable, Callable[[torch.Tensor], torch.Tensor]] = {
    F.silu: _silu_grad2,
    F.gelu: _gelu_grad2,
}


# ``g ⊙ σ'(x)`` in one kernel (torch's own activation backward) for the built-in activations.
_FUSED_SLOPES: dict[Callable, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    F.silu: torch.ops.aten.silu_backward,
    F.gelu: torch.ops.aten.gelu_backward,
}


def times_slope(opts: Any, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g ⊙ σ'(x)``."""
    fused = _FUSED_SLOPES.get(opts.sigma)
    return fused(g, x) if fused is not None else g * opts.sigma_grad(x)


def mlp_forward(
    weights: Weights, x: torch.Tensor, opts: Any
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``M_W(x)`` for ``x [N, n, Dk]`` and weights ``[N, out, in]``: the output ``[N, n, Dv]``,
    each map's input and each hidden pre-activation (for the backward)."""
    inputs, pre = [], []
    h = x
    for i, W in enumerate(weights):
        inputs.append(h)
        h = torch.bmm(h, W.mT)  # [N, n, out]
        if i < len(weights) - 1:
            pre.append(h)
            h = opts.sigma(h)
    return (h + x if opts.residual else h), inputs, pre


def surprise(
    weights: Weights, k: torch.Tensor, v: torch.Tensor, opts: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per map i, ``δ_i [N, n, out]`` and ``u_i [N, n, in]`` with
    ``∇_{W_i} L̃(M_W(k_t); v_t) = δ_{i,t} u_{i,t}ᵀ``: manual backprop, never per-token matrices."""
    deltas, inputs, _ = surprise_saving(weights, k, v, opts, fused=False)
    return deltas, inputs


def surprise_saving(
    weights: Weights, k: torch.Tensor, v: torch.Tensor, opts: Any, fused: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]]:
    """:func:`surprise` and its intermediates: hidden pre-activations ``z_i``, the
    back-propagated ``p_i = δ_{i+1} W_{i+1}`` (so ``δ_i = p_i ⊙ σ'(z_i)``), the prediction.
    ``fused``: ``p ⊙ σ'(z)`` by torch's activation backward, which autograd cannot differentiate
    (for the hand-written backward and the no-gradient path only)."""
    pred, inputs, pre = mlp_forward(weights, k, opts)
    delta = opts.objective.error(pred, v)
    # The residual adds k, which does not depend on W: it changes the error, not the backward.
    deltas, back = [delta], []
    for W, z in zip(reversed(weights[1:]), reversed(pre), strict=True):
        p = torch.bmm(delta, W)
        delta = times_slope(opts, p, z) if fused else p * opts.sigma_grad(z)
        deltas.append(delta)
        back.append(p)
    aux = {"pre": pre, "back": back[::-1], "pred": pred}
    return deltas[::-1], inputs, aux


def has_manual_surprise_backward(opts: Any) -> bool:
    """Objectives and activations whose derivatives are written out below; others use autograd."""
    # Exact types: a subclass may change the error, whose derivative is written out below.
    return type(opts.objective) in (L2, DotProduct, Huber) and opts.sigma in SECOND_DERIVATIVES


def surprise_backward(
    weights: Weights,
    v: torch.Tensor,
    deltas: Weights,
    inputs: Weights,
    aux: dict[str, Any],
    d_deltas: Grads,
    d_inputs: Grads,
    opts: Any,
) -> tuple[torch.Tensor | None, torch.Tensor | None, Grads]:
    """``dk, dv, dW_c`` from the gradients w.r.t. ``δ_i`` and ``u_i`` (:func:`surprise`);
    ``d_inputs`` are added to in place.

    Reverse of the backprop chain ``δ_i = (δ_{i+1} W_{i+1}) ⊙ σ'(z_i)`` first (second derivative
    ``σ''`` enters here), then of the objective's error, then of the MLP forward.
    """
    depth = len(weights)
    pre, back = aux["pre"], aux["back"]
    dw: Grads = [None] * depth
    dz: Grads = [None] * depth
    g = d_deltas[0]
    for i in range(depth - 1):
        if g is not None:
            dp = times_slope(opts, g, pre[i])
            dz[i] = g * back[i] * SECOND_DERIVATIVES[opts.sigma](pre[i])
            dw[i + 1] = torch.bmm(deltas[i + 1].mT, dp)
            g_next = torch.bmm(dp, weights[i + 1].mT)
            g = g_next if d_deltas[i + 1] is None else g_next + d_deltas[i + 1]
        else:
            g = d_deltas[i + 1]
    dk = dv = dpred = None
    if g is not None:
        if isinstance(opts.objective, DotProduct):
            dv = -g
        else:
            if isinstance(opts.objective, Huber):
                r = aux["pred"] - v
                g = g * ((r >= -opts.objective.delta) & (r <= opts.objective.delta))
            dpred, dv = g, -g
    # From here on, every gradient buffer is fresh or given (d_inputs): accumulate in place.
    dh = d_inputs[depth - 1]
    if dpred is not None:
        dk = dpred if opts.residual else None
        dw[depth - 1] = _add_mm(dw[depth - 1], dpred.mT, inputs[depth - 1])
        dh = _add_mm(dh, dpred, weights[depth - 1])
    for i in reversed(range(depth - 1)):
        dzi = dz[i] if dh is None else add_grads(dz[i], times_slope(opts, dh, pre[i]))
        dh = d_inputs[i]
        if dzi is not None:
            dw[i] = _add_mm(dw[i], dzi.mT, inputs[i])
            dh = _add_mm(dh, dzi, weights[i])
    return add_grads(dk, dh), dv, dw


def segment_products_backward(products: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the gates ``a [..., L]`` of ``P = segment_products(a)`` given ``dP``:
    :func:`nestlearn.memory.core.segments.products_backward` (one matmul, no division)."""
    return products_backward(products, grad)


def add_grads(total: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
    if total is None:
        return x
    return total if x is None else total + x


def _add_mul(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``total + a ⊙ b``, in place into ``total`` (a gradient buffer the caller owns)."""
    return a * b if total is None else total.addcmul_(a, b)


def _add_mm(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``total + a b`` (batched), in place into ``total`` (a gradient buffer the caller owns)."""
    return torch.bmm(a, b) if total is None else total.baddbmm_(a, b)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_{ij} a[:, i, j] b[:, i, j]`` -> ``[N]`` as one matmul, without an ``a ⊙ b`` temporary."""
    N = a.shape[0]
    return torch.bmm(a.reshape(N, 1, -1), b.reshape(N, -1, 1)).view(N)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A per-token vector ``[N, n]`` as a column ``[N, n, 1]`` that scales rows."""
    return x.unsqueeze(-1)


def _mats(x: torch.Tensor) -> torch.Tensor:
    """A per-sequence scalar ``[N]`` as ``[N, 1, 1]`` that scales matrices."""
    return x[:, None, None]


def coefficients(
    eta: torch.Tensor, mu: torch.Tensor | None, alpha: torch.Tensor | None
) -> dict[str, Any]:
    """The segment coefficients from gates ``[M, n]`` (README): ``G = A[:, 0]`` (decay),
    ``c = A M[:, 0]`` (carry), ``D = A M`` (or ``A``), ``Ŵ = −D ⊙ 𝟙ηᵀ`` (write) and
    ``m̂_n = −M[n, 1:] ⊙ η`` (last); ``M`` stands for ``N`` segments × sequences here."""
    gates = [torch.ones_like(eta) if alpha is None else alpha, *([] if mu is None else [mu])]
    products = segment_products(torch.stack(gates))  # [1 or 2, M, n+1, n+1]
    decay, coupling = products[0, :, 1:, 0], products[0, :, 1:, 1:]  # G [M, n], A [M, n, n]
    carry = last = None
    if mu is not None:
        mixed = torch.bmm(coupling, products[1, :, 1:])  # [M, n, n+1]: column 0 is c, the rest D
        carry, coupling = mixed[..., 0], mixed[..., 1:]
        last = products[1, :, -1, 1:] * -eta
    write = (coupling * -eta.unsqueeze(-2)).contiguous()  # Ŵ [M, n, n]
    return {
        "products": products,
        "mixed": mixed if mu is not None else None,
        "decay": decay,
        "carry": carry,
        "coupling": coupling,
        "write": write,
        "last": last,
    }


def coefficients_backward(
    coef: dict[str, Any], eta: torch.Tensor, grads: dict[str, torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``dη, dμ, dα`` from the gradients of :func:`coefficients`' outputs: ``decay, carry,
    write, last`` and ``m0 = M(n, 0)``, plus ``eta`` (a direct gradient w.r.t. ``η``).

    Two matmuls with momentum (README, "Segment products"; ``A``, ``M`` the products of ``α``
    and ``μ``, ``C = A[1:, 1:] M[1:, :]`` the mixed coefficients ``[c | D]``, ``dC`` its
    gradient, ``dG`` the decay's): ``Y = A[1:, 1:]ᵀ [dG | dC]`` gives ``dM``'s rows ``1..n``
    (``Y``'s columns of ``dC``) and ``dα_r = Σ_c Y[r, c] [A[r−1, 0] | C[r−1, :]]_c``, since
    ``Aᵀ dA Aᵀ = Aᵀ dC (A[:, 1:] M[1:])ᵀ`` (``C`` with a zero row 0); then
    ``dμ_r = Σ_s (Mᵀ dM)[r, s] M[r−1, s]``. No division: exact for zero gates."""
    products, coupling = coef["products"], coef["coupling"]
    has_mu = coef["carry"] is not None
    d_write = grads["write"]
    deta = (d_write * coupling).sum(-2).neg_()
    if grads["eta"] is not None:
        deta += grads["eta"]
    d_coupling = d_write * -eta.unsqueeze(-2)
    retention = products[0]
    if not has_mu:
        d_retention = torch.cat([grads["decay"].unsqueeze(-1), d_coupling], dim=-1)  # rows 1..n
        return deta, None, rows_backward(retention, d_retention)
    persistence, mixed = products[1], coef["mixed"]
    d_last = grads["last"]
    deta -= d_last * persistence[:, -1, 1:]
    # [dG | dC] [M, n, n+2], and the row before each r of [A[:, 0] | C] (C's row 0 is zero).
    d_ext = torch.cat([grads["decay"].unsqueeze(-1), grads["carry"].unsqueeze(-1), d_coupling], -1)
    prev = torch.cat([retention[:, :-1, :1], F.pad(mixed[:, :-1], (0, 0, 1, 0))], dim=-1)
    y = torch.bmm(retention[:, 1:, 1:].mT, d_ext)  # [M, n, n+2]
    d_alpha = (y * prev).sum(-1)
    d_persistence = y[..., 1:]  # dM rows 1..n, plus the direct terms of the last row
    d_persistence[:, -1, 1:] -= d_last * eta
    d_persistence[:, -1, 0] += grads["m0"]
    d_mu = rows_backward(persistence, d_persistence)
    return deta, d_mu, d_alpha


def reads_forward(
    q: torch.Tensor, w: Weights, s: Weights, deltas: Weights, inputs: Weights, coef: dict, opts: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``o`` from ``Y_i = diag(G) X_i W_iᵀ + diag(c) X_i S_iᵀ + (Ŵ ⊙ X_i U_iᵀ) Δ_i`` map by map
    (``X_0 = q``, ``X_{i+1} = σ(Y_i)``), and what :func:`reads_backward` needs."""
    decay, carry, write = coef["decay"], coef["carry"], coef["write"]
    scaled, reads, ys = [], [], []
    x = q
    for i, (W, S, delta, u) in enumerate(zip(w, s, deltas, inputs, strict=True)):
        gx = _rows(decay) * x
        y = torch.bmm(gx, W.mT)  # [M, n, out]
        cx = None
        if carry is not None:
            cx = _rows(carry) * x
            y = torch.baddbmm(y, cx, S.mT)
        xu = torch.bmm(x, u.mT)  # [M, n, n]
        r = write * xu
        y = torch.baddbmm(y, r, delta)
        scaled.append((x, gx, cx))
        reads.append((xu, r))
        ys.append(y)
        x = opts.sigma(y) if i < len(w) - 1 else y
    o = x + q if opts.residual else x
    return o, {"scaled": scaled, "reads": reads, "ys": ys}


def reads_backward(
    d_o: torch.Tensor,
    w: Weights,
    s: Weights,
    deltas: Weights,
    inputs: Weights,
    coef: dict[str, Any],
    saved: dict[str, Any],
    opts: Any,
) -> tuple[torch.Tensor, Grads, Grads, Grads, Grads, dict[str, torch.Tensor | None]]:
    """Gradients of :func:`reads_forward`: ``dq``, per map ``dW, dS, dΔ, dU``, and the
    coefficients' ``decay, carry, write`` (module docstring for the formulas)."""
    decay, carry, write = coef["decay"], coef["carry"], coef["write"]
    depth = len(w)
    dw: Grads = [None] * depth
    ds: Grads = [None] * depth
    d_deltas: Grads = [None] * depth
    d_inputs: Grads = [None] * depth
    d_decay = torch.zeros_like(decay)
    d_carry = None if carry is None else torch.zeros_like(carry)
    d_write = torch.zeros_like(write)
    dq = d_o if opts.residual else None
    dy = d_o
    for i in reversed(range(depth)):
        W, S, delta, u = w[i], s[i], deltas[i], inputs[i]
        (x, gx, cx), (xu, r) = saved["scaled"][i], saved["reads"][i]
        dw[i] = torch.bmm(dy.mT, gx)
        dy_w = torch.bmm(dy, W)  # [M, n, in]
        d_decay += (dy_w * x).sum(-1)
        dx = _rows(decay) * dy_w
        if carry is not None:
            ds[i] = torch.bmm(dy.mT, cx)
            dy_s = torch.bmm(dy, S)
            d_carry += (dy_s * x).sum(-1)
            dx = torch.addcmul(dx, _rows(carry), dy_s)
        d_r = torch.bmm(dy, delta.mT)  # [M, n, n]
        d_deltas[i] = torch.bmm(r.mT, dy)
        d_write.addcmul_(d_r, xu)
        d_xu = d_r * write
        d_inputs[i] = torch.bmm(d_xu.mT, x)
        dx = torch.baddbmm(dx, d_xu, u)
        if i > 0:
            dy = times_slope(opts, dx, saved["ys"][i - 1])
        else:
            dq = add_grads(dq, dx)
    return dq, dw, ds, d_deltas, d_inputs, {"decay": d_decay, "carry": d_carry, "write": d_write}


def end_coefficients(coef: dict[str, Any], eta: torch.Tensor) -> dict[str, Any]:
    """What the end of a segment needs from :func:`coefficients`: ``G_n, c_n, ŵ_n, M(n, 0),
    m̂_n`` and ``η_n``."""
    has_mu = coef["carry"] is not None
    return {
        "decay": coef["decay"][:, -1],
        "carry": coef["carry"][:, -1] if has_mu else None,
        "write": coef["write"][:, -1],
        "m0": coef["products"][1, :, -1, 0] if has_mu else None,
        "last": coef["last"],
        "eta": eta[:, -1],
    }


def end_forward(
    w: Weights, s: Weights, deltas: Weights, inputs: Weights, end: dict[str, Any]
) -> tuple[Weights, Weights, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """``W' = G_n W + c_n S + Δᵀ(ŵ_n ⊙ U)`` and ``S' = M(n, 0) S + Δᵀ(m̂_n ⊙ U)`` (without
    momentum ``S' = −η_n δ_n u_nᵀ``), and the scaled ``U`` for the backward."""
    new_w, new_s, scaled = [], [], []
    for W, S, delta, u in zip(w, s, deltas, inputs, strict=True):
        kept = _mats(end["decay"]) * W
        if end["carry"] is not None:
            kept = torch.addcmul(kept, _mats(end["carry"]), S)
        u_w = _rows(end["write"]) * u
        new_w.append(torch.baddbmm(kept, delta.mT, u_w))
        u_s = None
        if end["carry"] is None:
            g = delta[:, -1].unsqueeze(-1) * u[:, -1].unsqueeze(-2)
            new_s.append(_mats(-end["eta"]) * g)
        else:
            u_s = _rows(end["last"]) * u
            new_s.append(torch.baddbmm(_mats(end["m0"]) * S, delta.mT, u_s))
        scaled.append((u_w, u_s))
    return new_w, new_s, scaled


def end_backward(
    w: Weights,
    s: Weights,
    deltas: Weights,
    inputs: Weights,
    end: dict[str, Any],
    scaled: list[tuple[torch.Tensor, torch.Tensor | None]],
    d_w_end: Grads,
    d_s_end: Grads,
    into: tuple[Grads, Grads, Grads, Grads] | None = None,
) -> tuple[Grads, Grads, Grads, Grads, dict[str, torch.Tensor | None]]:
    """Gradients of :func:`end_forward`: per map ``dW, dS, dΔ, dU``, and those of the end
    coefficients ``decay, carry, write, m0, last, eta`` (keys of :func:`end_coefficients`).

    ``into``: per map ``dW, dS, dΔ, dU`` gradients that the caller owns, which are added to in
    place (saves one full-size add per term)."""
    depth = len(w)
    has_mu = end["carry"] is not None
    dw, ds, d_deltas, d_inputs = (
        [list(x) for x in into] if into is not None else [[None] * depth for _ in range(4)]
    )
    d_end: dict[str, torch.Tensor | None] = dict.fromkeys(end)
    for i in range(depth):
        W, S, delta, u = w[i], s[i], deltas[i], inputs[i]
        (u_w, u_s), gw, gs = scaled[i], d_w_end[i], d_s_end[i]
        if gw is not None:
            dw[i] = _add_mul(dw[i], _mats(end["decay"]), gw)
            d_end["decay"] = add_grads(d_end["decay"], _dot(gw, W))
            if has_mu:
                ds[i] = _add_mul(ds[i], _mats(end["carry"]), gw)
                d_end["carry"] = add_grads(d_end["carry"], _dot(gw, S))
            delta_gw = torch.bmm(delta, gw)  # [N, n, in]
            d_inputs[i] = _add_mul(d_inputs[i], _rows(end["write"]), delta_gw)
            d_end["write"] = add_grads(d_end["write"], (delta_gw * u).sum(-1))
            d_deltas[i] = _add_mm(d_deltas[i], u_w, gw.mT)
        if gs is not None and has_mu:
            ds[i] = _add_mul(ds[i], _mats(end["m0"]), gs)
            d_end["m0"] = add_grads(d_end["m0"], _dot(gs, S))
            delta_gs = torch.bmm(delta, gs)
            d_inputs[i] = _add_mul(d_inputs[i], _rows(end["last"]), delta_gs)
            d_end["last"] = add_grads(d_end["last"], (delta_gs * u).sum(-1))
            d_deltas[i] = _add_mm(d_deltas[i], u_s, gs.mT)
        elif gs is not None:
            # S' = −η_n δ_n u_nᵀ (no momentum): only the last token enters.
            e = _rows(end["eta"])
            gs_u = torch.bmm(gs, u[:, -1].unsqueeze(-1)).squeeze(-1)  # [N, out]
            dd = torch.zeros_like(delta)
            dd[:, -1] = -e * gs_u
            d_deltas[i] = add_grads(d_deltas[i], dd)
            du = torch.zeros_like(u)
            du[:, -1] = -e * torch.bmm(delta[:, -1].unsqueeze(-2), gs).squeeze(-2)
            d_inputs[i] = add_grads(d_inputs[i], du)
            d_end["eta"] = add_grads(d_end["eta"], -(gs_u * delta[:, -1]).sum(-1))
    return dw, ds, d_deltas, d_inputs, d_end


def segment_forward(
    q: torch.Tensor,
    w: Weights,
    s: Weights,
    deltas: Weights,
    inputs: Weights,
    eta: torch.Tensor,
    mu: torch.Tensor | None,
    alpha: torch.Tensor | None,
    opts: Any,
) -> tuple[torch.Tensor, Weights, Weights]:
    """One segment's reads and end state, composed from the pieces above (autograd
    differentiates this in ``mlp._segment_autograd``, the reference for the backward)."""
    coef = coefficients(eta, mu, alpha)
    o, _ = reads_forward(q, w, s, deltas, inputs, coef, opts)
    new_w, new_s, _ = end_forward(w, s, deltas, inputs, end_coefficients(coef, eta))
    return o, new_w, new_s
