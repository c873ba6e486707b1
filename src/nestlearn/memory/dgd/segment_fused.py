"""One segment of a DGD MLP memory (surprise, write, per-token reads) as one autograd node.

The numbers of :func:`nestlearn.memory.dgd.forms.segment` (SPEC §5; ``M_mem`` of self-modifying
Titans, ``docs/self-modifying-titans.md`` §2) with a hand-written backward: the forward runs
without recording, keeps the segment's start weights and the few within-segment tensors the
backward needs (no autograd graph of ~100 operations per segment), and the backward is the chain
rule written out. Per segment of ``n`` tokens, a chain of ``L`` maps ``W_i`` (``σ`` between them,
skip: the identity or none), chunk-start weights ``W_{i,c}``, start weights and momenta
``W_{i,0}, S_{i,0}``:

    surprise   h_0 = Z (= [k; v] for self targets, else k);  pre_i = h_i W_{i,c}ᵀ;
               h_{i+1} = σ(pre_i);  out = pre_{L−1} (+ Z);  E = out_k − out_v (or out_k − v)
               δ_{L−1} = E,  δ_i = (δ_{i+1} W_{i+1,c}) ⊙ σ'(pre_i,k),  u_i = h_{i,k}
    write      W_{i,n}, S_{i,n}, P_i = :func:`nestlearn.memory.dgd.write.map_forward`
    reads      z_0 = q;  y_i = diag(a_d) z_i W_{i,0}ᵀ + diag(a_c) z_i S_{i,0}ᵀ
                              + (a_w ⊙ z_i U_iᵀ) Δ_i + (a_p ⊙ z_i X_iᵀ) P_i
               z_{i+1} = σ(y_i);  o = y_{L−1} (+ q)

with ``a_d, a_c, a_w, a_p`` the coefficients of the states *after* each token (rows ``1..n``:
:func:`after_rows` of the :class:`~nestlearn.memory.dgd.write.WriteCoefficients`). Backward:
the reads in reverse (their gradients w.r.t. ``W_0, S_0, Δ, U, X, P`` and the coefficients), the
writes (:func:`~nestlearn.memory.dgd.write.map_backward` with ``P``'s gradient from the reads,
:func:`~nestlearn.memory.dgd.write.inputs_backward`), then the surprise: the reverse of the ``δ``
recursion (``σ''`` enters), the error and the forward at ``W_c``.

Supported (:func:`supported`): the L2 inner objective, SiLU or GELU, skip identity or none,
per-token reads, the gradient through the surprise (not ``detach_inner``); other options use
plain autograd. Once differentiable.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from nestlearn.memory.core.precision import backward_without_autocast
from nestlearn.memory.dgd.bank_fused import SECOND, SIGMA
from nestlearn.memory.dgd.forms import Options
from nestlearn.memory.dgd.write import (
    EPS,
    WriteCoefficients,
    inputs_backward,
    inputs_forward,
    map_backward,
    map_forward,
    restore,
    slim,
)
from nestlearn.memory.mlp.segment import times_slope


def supported(opts: Options) -> bool:
    """Whether :func:`segment` handles these :class:`~nestlearn.memory.dgd.forms.Options`."""
    return (
        opts.objective.name == "l2"
        and opts.sigma in SIGMA
        and opts.skip in ("identity", "none")
        and opts.read == "per_token"
        and not opts.detach_inner
        and not opts.fused
    )


def after_rows(
    c: WriteCoefficients,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The coefficients of the states after tokens ``1..n``: ``a_d, a_c [N, n, 1]`` (decay,
    carry), ``a_w, a_p [N, n, n]`` (write ``−D[t, s] η_s``, projection ``−A[t, j] η_j``), from the
    rows ``0..n−1`` and ``n`` of the :class:`~nestlearn.memory.dgd.write.WriteCoefficients`."""
    decay = torch.cat([c.b_decay[:, 1:], c.e_decay], dim=1)
    carry = None if c.b_carry is None else torch.cat([c.b_carry[:, 1:], c.e_carry], dim=1)
    write = torch.cat([c.b_write[:, 1:], c.e_write.mT], dim=1)
    project = torch.cat([-c.lower[:, 1:], c.e_project.mT], dim=1)
    return decay, carry, write, project


def _after_rows_backward(
    c: WriteCoefficients,
    grads: list[torch.Tensor | None],
    d_decay: torch.Tensor,
    d_carry: torch.Tensor | None,
    d_write: torch.Tensor,
    d_project: torch.Tensor | None,
) -> None:
    """Add the gradients of :func:`after_rows`' outputs into ``grads`` (a list indexed like
    :class:`~nestlearn.memory.dgd.write.WriteCoefficients`, entries owned by the caller, zeros
    made where None)."""
    f = WriteCoefficients._fields

    def add(name: str, rows: slice, x: torch.Tensor) -> None:
        i = f.index(name)
        if grads[i] is None:
            grads[i] = torch.zeros_like(getattr(c, name))
        grads[i][:, rows] += x

    add("b_decay", slice(1, None), d_decay[:, :-1])
    grads[f.index("e_decay")] = _add(grads[f.index("e_decay")], d_decay[:, -1:])
    if d_carry is not None:
        add("b_carry", slice(1, None), d_carry[:, :-1])
        grads[f.index("e_carry")] = _add(grads[f.index("e_carry")], d_carry[:, -1:])
    add("b_write", slice(1, None), d_write[:, :-1])
    grads[f.index("e_write")] = _add(grads[f.index("e_write")], d_write[:, -1:].mT)
    if d_project is not None:
        add("lower", slice(1, None), -d_project[:, :-1])
        grads[f.index("e_project")] = _add(grads[f.index("e_project")], d_project[:, -1:].mT)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return a if b is None else b if a is None else a + b


def _chain(opts: Options, weights: list[torch.Tensor], z: torch.Tensor):
    """``M_W(z)`` for ``z [N, m, D]``: the output, each map's input ``h_i`` and the hidden
    pre-activations ``pre_i`` (``i < L−1``)."""
    inputs, pre = [], []
    h = z
    for i, W in enumerate(weights):
        inputs.append(h)
        h = torch.bmm(h, W.mT)
        if i < len(weights) - 1:
            pre.append(h)
            h = opts.sigma(h)
    return (h + z if opts.skip == "identity" else h), inputs, pre


class _MemSegment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, opts, depth, q, k, v, *rest):
        W0, S0, WC = rest[:depth], rest[depth : 2 * depth], rest[2 * depth : 3 * depth]
        c = WriteCoefficients(*rest[3 * depth :])
        n = k.shape[1]
        self_target = opts.target == "self"
        # Surprise at the chunk-start weights.
        z = torch.cat([k, v], dim=1) if self_target else k
        out, h, pre = _chain(opts, list(WC), z)
        error = out[:, :n] - (out[:, n:] if self_target else v)
        deltas: list[torch.Tensor] = [error]
        backs: list[torch.Tensor] = []
        for i in reversed(range(depth - 1)):
            backs.append(torch.bmm(deltas[-1], WC[i + 1]))
            deltas.append(times_slope(opts, backs[-1], pre[i][:, :n]))  # ⊙ σ'(pre_i,k)
        deltas, backs = deltas[::-1], backs[::-1]  # δ_i, b_i = δ_{i+1} W_{i+1,c}
        us = [hi[:, :n] for hi in h]
        # Writes.
        has_mu = c.s_decay is not None
        inputs, W_n, S_n, ps = [], [], [], []
        for i in range(depth):
            inputs.append(inputs_forward(us[i], c, 1, opts.dgd))
            w_end, s_end, p = map_forward(
                W0[i], S0[i] if has_mu else None, deltas[i], inputs[i], c, 1
            )
            W_n.append(w_end)
            S_n.append(s_end)
            ps.append(p)
        # Per-token reads.
        a_d, a_c, a_w, a_p = after_rows(c)
        x = q
        reads = []
        for i in range(depth):
            zu = torch.bmm(x, us[i].mT)  # [N, n, n]
            wzu = a_w * zu
            y = torch.bmm(a_d * x, W0[i].mT)
            if a_c is not None:
                y.baddbmm_(a_c * x, S0[i].mT)
            y.baddbmm_(wzu, deltas[i])
            zx = pzx = None
            if ps[i] is not None:
                zx = torch.bmm(x, inputs[i].x.mT)
                pzx = a_p * zx
                y.baddbmm_(pzx, ps[i])
            reads.append((x, zu, zx, y))
            x = opts.sigma(y) if i < depth - 1 else y
        o = x + q if opts.skip == "identity" else x
        ctx.opts, ctx.depth, ctx.self_target, ctx.has_mu = opts, depth, self_target, has_mu
        # Held until the backward: what is cheap to remake (the inputs scaled by coefficients,
        # the reads' coefficients) is remade there.
        inputs = [slim(x) for x in inputs]
        ctx.saved = (W0, S0, WC, c, h, pre, deltas, backs, inputs, ps, reads)
        return (o, *W_n, *S_n)

    @staticmethod
    @once_differentiable
    @backward_without_autocast
    def backward(ctx, d_o, *grads):
        opts, depth, self_target, has_mu = ctx.opts, ctx.depth, ctx.self_target, ctx.has_mu
        W0, S0, WC, c, h, pre, deltas, backs, inputs, ps, reads = ctx.saved
        n = deltas[0].shape[1]
        a_d, a_c, a_w, a_p = after_rows(c)
        inputs = [restore(x, c, 1) for x in inputs]
        g_wn, g_sn = list(grads[:depth]), list(grads[depth:])
        g_wn = [torch.zeros_like(W) if g is None else g for g, W in zip(g_wn, W0, strict=True)]
        g_sn = [torch.zeros_like(W) if g is None else g for g, W in zip(g_sn, W0, strict=True)]
        d_o = torch.zeros_like(reads[-1][3]) if d_o is None else d_o.contiguous()
        # Reads, in reverse.
        d_ad, d_aw = torch.zeros_like(a_d), torch.zeros_like(a_w)
        d_ac = None if a_c is None else torch.zeros_like(a_c)
        d_ap = torch.zeros_like(a_p) if ps[0] is not None else None
        dW: list[torch.Tensor | None] = [None] * depth
        dS: list[torch.Tensor | None] = [None] * depth
        d_delta: list[torch.Tensor] = [None] * depth  # type: ignore[list-item]
        d_u_read: list[torch.Tensor] = [None] * depth  # type: ignore[list-item]
        d_x_read: list[torch.Tensor | None] = [None] * depth
        d_p: list[torch.Tensor | None] = [None] * depth
        dq = d_o if opts.skip == "identity" else None
        dy = d_o
        for i in reversed(range(depth)):
            x, zu, zx, _ = reads[i]
            dW[i] = torch.bmm(dy.mT, a_d * x)
            dy_w = torch.bmm(dy, W0[i])  # [N, n, in]
            d_ad += (dy_w * x).sum(-1, keepdim=True)
            dx = dy_w.mul_(a_d)
            if a_c is not None:
                dS[i] = torch.bmm(dy.mT, a_c * x)
                dy_s = torch.bmm(dy, S0[i])
                d_ac += (dy_s * x).sum(-1, keepdim=True)
                dx.addcmul_(dy_s, a_c)
            g1 = torch.bmm(dy, deltas[i].mT)  # [N, n, n]
            d_aw.addcmul_(g1, zu)
            m1 = g1.mul_(a_w)
            d_delta[i] = torch.bmm((a_w * zu).mT, dy)
            d_u_read[i] = torch.bmm(m1.mT, x)
            dx.baddbmm_(m1, inputs[i].u)
            if ps[i] is not None:
                g2 = torch.bmm(dy, ps[i].mT)
                d_ap.addcmul_(g2, zx)
                m2 = g2.mul_(a_p)
                d_p[i] = torch.bmm((a_p * zx).mT, dy)
                d_x_read[i] = torch.bmm(m2.mT, x)
                dx.baddbmm_(m2, inputs[i].x)
            if i > 0:
                dy = times_slope(opts, dx, reads[i - 1][3])
            else:
                dq = dx if dq is None else dq + dx
        # Writes.
        coefficient_grads: list[torch.Tensor | None] = [None] * len(WriteCoefficients._fields)
        d_us = []
        for i in range(depth):
            g = map_backward(
                g_wn[i], g_sn[i], W0[i], S0[i] if has_mu else None, deltas[i], ps[i],
                inputs[i], c, 1, None, d_p[i],
            )  # fmt: skip
            dW[i] = _add(dW[i], g.W)
            dS[i] = _add(dS[i], g.S)
            d_delta[i] = d_delta[i] + g.delta
            d_u, coef = inputs_backward(inputs[i], g, c, 1)
            for j, x in enumerate(coef):
                coefficient_grads[j] = _add(coefficient_grads[j], x)
            for name in ("e_decay", "e_carry", "s_decay"):
                j = WriteCoefficients._fields.index(name)
                coefficient_grads[j] = _add(coefficient_grads[j], getattr(g, name))
            d_u = d_u + d_u_read[i]
            if d_x_read[i] is not None:
                # X = U / max(‖U‖, eps): the projection term only where the norm was not clamped.
                xi, norm = inputs[i].x, inputs[i].norm
                radial = (xi * d_x_read[i]).sum(-1, keepdim=True) * (norm > EPS)
                d_u = d_u + (d_x_read[i] - xi * radial) / norm
            d_us.append(d_u)
        _after_rows_backward(c, coefficient_grads, d_ad, d_ac, d_aw, d_ap)
        # Surprise: the δ recursion in reverse (δ_i = b_i ⊙ σ'(pre_i,k), b_i = δ_{i+1} W_{i+1,c}).
        dWC: list[torch.Tensor | None] = [None] * depth
        d_pre_k: list[torch.Tensor | None] = [None] * depth
        for i in range(depth - 1):
            g_b = times_slope(opts, d_delta[i], pre[i][:, :n])
            d_pre_k[i] = d_delta[i] * backs[i] * SECOND[opts.sigma](pre[i][:, :n])
            d_delta[i + 1] = d_delta[i + 1].baddbmm(g_b, WC[i + 1].mT)
            dWC[i + 1] = torch.bmm(deltas[i + 1].mT, g_b)
        # E = out_k − out_v (or − v), then the forward at W_c on z.
        d_error = d_delta[depth - 1]
        dv = None
        if self_target:
            d_out = torch.cat([d_error, -d_error], dim=1)
        else:
            d_out, dv = d_error, -d_error
        dz = d_out if opts.skip == "identity" else None
        g_pre = d_out
        for i in reversed(range(depth)):
            dWC[i] = _add(dWC[i], torch.bmm(g_pre.mT, h[i]))
            g_h = torch.bmm(g_pre, WC[i])  # [N, m, in]
            if i > 0:
                g_h[:, :n] += d_us[i]
                g_pre = times_slope(opts, g_h, pre[i - 1])
                g_pre[:, :n] += d_pre_k[i - 1]
            else:
                dz = g_h if dz is None else dz + g_h
        dk = dz[:, :n] + d_us[0]
        if self_target:
            dv = dz[:, n:]
        if not has_mu:
            dS = [None] * depth
        return (None, None, dq, dk, dv, *dW, *dS, *dWC, *coefficient_grads)


def segment(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: list[torch.Tensor],
    s: list[torch.Tensor],
    wc: list[torch.Tensor],
    c: WriteCoefficients,
    opts: Options,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """:func:`nestlearn.memory.dgd.forms.segment`'s ``o, W_n, S_n`` as one autograd node
    (coefficients as :class:`~nestlearn.memory.dgd.write.WriteCoefficients`, from
    :func:`nestlearn.memory.dgd.gates.gate_coefficients`)."""
    depth = len(w)
    o, *ends = _MemSegment.apply(opts, depth, q, k, v, *w, *s, *wc, *c)
    return o, list(ends[:depth]), list(ends[depth:])
