"""One segment of a memory bank's write as a single autograd node, with a hand-written backward.

The same numbers as :func:`nestlearn.memory.bank.segment_autograd` (SPEC §5): the surprise of
every memory of the bank at its chunk-start weights ``F_c, G_c`` (one forward of ``[k; v]``, the
manual backprop to ``δ``), then the two DGD writes of :mod:`nestlearn.memory.dgd_write`. The
other memories' segments are most of the time of self-modifying Titans on the CPU: ``T / C``
sequential segments of small products, where autograd records ~200 operations forward and runs
~400 backward, many of them full-size temporaries of the weights. Here the forward runs without
recording and the backward is the chain rule written out once, accumulating in place. The
second-order terms of the surprise (the outer gradient of ``δ = (E G_c) ⊙ σ'(pre)``) need
``σ''``: SiLU and GELU are supported.

Forward, per memory ``m`` (rows of ``F`` and ``G`` as :mod:`nestlearn.memory.bank`), ``Z = [k; v]``
(self targets) or ``k`` (given targets ``T``):

    pre, lin = Z F_cᵀ;   hid = σ(pre);   out = hid G_cᵀ + skip(Z)      skip: Z, or lin (padded)
    E = out_k − out_v (or out_k − T);    δ_G = E;   δ_F = [(E G_c) ⊙ σ'(pre_k), E_lin]
    F_n, S_F,n = write(F_0, S_F,0, δ_F, k);   G_n, S_G,n = write(G_0, S_G,0, δ_G, hid_k)

The second maps of memories of one output width are written together at that width (a run),
not padded to the widest: ``G``'s padding rows are zero by construction (``bank.pack``) and stay
zero (zero error), so they are left out of the products and returned as zeros, gradients too.

Supported: the L2 inner objective (the bank falls back to autograd otherwise).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from nestlearn.memory.dgd_mlp import Options
from nestlearn.memory.dgd_write import WriteCoefficients, write_backward, write_forward

if TYPE_CHECKING:
    from nestlearn.memory.bank import Layout


def _silu_derivatives(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s)), s * (1 - s) * (2 + x * (1 - 2 * s))


def _gelu_derivatives(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # GELU(x) = x Φ(x): σ' = Φ + x φ, σ'' = φ (2 − x²).
    cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf, pdf * (2 - x * x)


# σ -> (σ'(x), σ''(x)) in one pass.
DERIVATIVES = {F.silu: _silu_derivatives, F.gelu: _gelu_derivatives}


def supported(opts: Options) -> bool:
    """Whether :func:`segment` handles these :class:`~nestlearn.memory.dgd_mlp.Options`."""
    return opts.objective.name == "l2" and opts.sigma in DERIVATIVES


def runs(lay: Layout) -> list[tuple[int, int, int]]:
    """Consecutive memories of one output width ``(first, end, width)``: each run's second maps
    are written at their own width, not padded to the widest (``M_η, M_α`` are 1 wide)."""
    out: list[tuple[int, int, int]] = []
    for i, o in enumerate(lay.outs):
        if out and out[-1][2] == o:
            out[-1] = (out[-1][0], i + 1, o)
        else:
            out.append((i, i + 1, o))
    return out


def _assemble(parts: list[torch.Tensor], spans, like: torch.Tensor) -> torch.Tensor:
    """Per-run blocks ``[m·N, o, h]`` -> the padded ``[M·N, O, h]`` (zero padding)."""
    if len(parts) == 1 and parts[0].shape == like.shape:
        return parts[0]
    out = like.new_zeros(like.shape)
    for part, (rows, o) in zip(parts, spans, strict=True):
        out[rows, :o] = part
    return out


class _BankSegment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, config, k, v, targets, F0, G0, SF0, SG0, FC, GC, *coefficients):
        lay, opts = config
        c = WriteCoefficients(*coefficients)
        M, h, n, N = len(lay.names), lay.hidden, k.shape[1], k.shape[0]
        skip_widths = [o for o, lin in zip(lay.outs, lay.linear, strict=True) if lin]
        offsets = {}  # memory -> first column of its linear skip in Z F_cᵀ
        for i, lin in enumerate(lay.linear):
            if lin:
                offsets[i] = M * h + sum(lay.outs[j] for j in offsets)
        spans = [(slice(a * N, b * N), o) for a, b, o in runs(lay)]
        self_target = targets is None
        z = torch.cat([k, v], dim=1) if self_target else k  # [N, m, D]
        m = z.shape[1]
        projected = torch.bmm(z, FC.mT)  # [N, m, R]
        pre = projected[..., : M * h].unflatten(-1, (M, h)).movedim(-2, 0).reshape(M * N, m, h)
        d1, d2 = DERIVATIVES[opts.sigma](pre)
        hid = opts.sigma(pre)
        errors, backs = [], []
        for (a, b, o), (rows, _) in zip(runs(lay), spans, strict=True):
            out = torch.bmm(hid[rows], GC[rows, :o].mT).view(b - a, N, m, o)
            for i in range(a, b):
                if lay.linear[i]:
                    out[i - a] += projected[..., offsets[i] : offsets[i] + o]
                else:
                    out[i - a] += z
            # [m, N, n, o]
            error = out[:, :, :n] - out[:, :, n:] if self_target else out - targets[a:b, ..., :o]
            errors.append(error.flatten(0, 1))
            backs.append(torch.bmm(errors[-1], GC[rows, :o]))
        back = backs[0] if len(backs) == 1 else torch.cat(backs)  # [M·N, n, h]
        first_error = [(back * d1[:, :n]).unflatten(0, (M, N)).movedim(0, -2).flatten(-2)]
        for (a, b, _), error in zip(runs(lay), errors, strict=True):
            per_memory = error.unflatten(0, (b - a, N))
            first_error += [per_memory[i - a] for i in range(a, b) if lay.linear[i]]
        first_error = torch.cat(first_error, dim=-1)  # [N, n, R]
        F_n, SF_n, saved_f = write_forward(F0, SF0, first_error, k, c, 1, opts.dgd)
        hid_k = hid[:, :n]
        written = [
            write_forward(
                G0[rows, :o],
                None if SG0 is None else SG0[rows, :o],
                error,
                hid_k[rows],
                c,
                (rows.stop - rows.start) // N,
                opts.dgd,
            )
            for (rows, o), error in zip(spans, errors, strict=True)
        ]
        G_n = _assemble([x[0] for x in written], spans, G0)
        SG_n = _assemble([x[1] for x in written], spans, G0)
        ctx.config = (lay, opts, M, N, n, skip_widths, offsets, spans, self_target)
        ctx.saved = (saved_f, [x[2] for x in written], c, errors, targets)
        ctx.save_for_backward(z, FC, GC, hid, d1, d2, back)
        ctx.presence = (SF0 is not None, SG0 is not None)
        return F_n, G_n, SF_n, SG_n

    @staticmethod
    @once_differentiable
    def backward(ctx, gF, gG, gSF, gSG):
        lay, opts, M, N, n, skip_widths, offsets, spans, self_target = ctx.config
        saved_f, saved_g, c, errors, targets = ctx.saved
        z, FC, GC, hid, d1, d2, back = ctx.saved_tensors
        h = lay.hidden
        grads_f = write_backward(gF, gSF, saved_f, c, 1)
        grads_g = [
            write_backward(gG[rows, :o], gSG[rows, :o], saved, c, (rows.stop - rows.start) // N)
            for (rows, o), saved in zip(spans, saved_g, strict=True)
        ]
        coefficient_grads = []
        for parts in zip(grads_f.coefficients, *(g.coefficients for g in grads_g), strict=True):
            present = [p for p in parts if p is not None]
            coefficient_grads.append(sum(present[1:], present[0]) if present else None)
        # detach_inner: δ and u come from detached inputs, only the writes carry gradients.
        d_k = d_v = d_targets = d_FC = d_GC = None
        if not opts.detach_inner:
            # δ_F = [(E G_c) ⊙ σ'(pre_k), E_lin]
            d_hidden_error, *d_lin_error = grads_f.delta.split([M * h, *skip_widths], dim=-1)
            d_lin = dict(zip(offsets, d_lin_error, strict=True))
            d_hidden_error = d_hidden_error.unflatten(-1, (M, h)).movedim(-2, 0).flatten(0, 1)
            d_back = d_hidden_error * d1[:, :n]  # [M·N, n, h]
            d_pre_k = d_hidden_error * back * d2[:, :n]
            d_targets = None if self_target else torch.zeros_like(targets)
            d_GC_parts, d_hid, d_out = [], [], {}
            for (a, b, o), (rows, _), grads, error in zip(
                runs(lay), spans, grads_g, errors, strict=True
            ):
                GC_run = GC[rows, :o]
                d_error = grads.delta  # [m·N, n, o], ours to accumulate into
                per_memory = d_error.unflatten(0, (b - a, N))
                for i in range(a, b):
                    if lay.linear[i]:
                        per_memory[i - a] += d_lin[i]
                d_error.baddbmm_(d_back[rows], GC_run.mT)
                d_GC_run = torch.bmm(error.mT, d_back[rows])  # [m·N, o, h]
                # E = out_k − out_v (or − T)
                if self_target:
                    d_out_run = torch.cat([d_error, -d_error], dim=1)
                else:
                    d_out_run = d_error
                    d_targets[a:b, ..., :o] = -per_memory
                d_hid.append(torch.bmm(d_out_run, GC_run))
                d_GC_run.baddbmm_(d_out_run.mT, hid[rows])
                d_GC_parts.append(d_GC_run)
                per_memory = d_out_run.unflatten(0, (b - a, N))
                d_out.update({i: per_memory[i - a] for i in range(a, b)})
            d_GC = _assemble(d_GC_parts, spans, GC)
            d_hid = d_hid[0] if len(d_hid) == 1 else torch.cat(d_hid)  # [M·N, m, h]
            for (rows, _), grads in zip(spans, grads_g, strict=True):
                d_hid[rows, :n] += grads.u
            d_pre = d_hid * d1
            d_pre[:, :n] += d_pre_k
            parts = [d_pre.unflatten(0, (M, N)).movedim(0, -2).flatten(-2)]
            parts += [d_out[i] for i in offsets]
            d_projected = torch.cat(parts, dim=-1)  # [N, m, R]
            d_z = torch.bmm(d_projected, FC)
            for i, lin in enumerate(lay.linear):
                if not lin:
                    d_z += d_out[i]
            d_FC = torch.bmm(d_projected.mT, z)
            d_k = grads_f.u + d_z[:, :n]
            d_v = d_z[:, n:] if self_target else None
        has_sf, has_sg = ctx.presence
        return (
            None,
            d_k,
            d_v,
            d_targets,
            grads_f.W,
            _assemble([g.W for g in grads_g], spans, gG),
            grads_f.S if has_sf else None,
            _assemble([g.S for g in grads_g], spans, gG) if has_sg else None,
            d_FC,
            d_GC,
            *coefficient_grads,
        )


def segment(
    lay: Layout,
    w: list[torch.Tensor],
    s: list[torch.Tensor],
    wc: list[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    targets: torch.Tensor | None,
    c: WriteCoefficients,
    opts: Options,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`nestlearn.memory.bank.segment_autograd`'s numbers as one autograd node (arguments
    as there, coefficients as :class:`~nestlearn.memory.dgd_write.WriteCoefficients`)."""
    has_momentum = c.s_decay is not None
    SF0, SG0 = (s[0], s[1]) if has_momentum else (None, None)
    F_n, G_n, SF_n, SG_n = _BankSegment.apply(
        (lay, opts), k, v, targets, w[0], w[1], SF0, SG0, wc[0], wc[1], *c
    )
    return [F_n, G_n], [SF_n, SG_n]
