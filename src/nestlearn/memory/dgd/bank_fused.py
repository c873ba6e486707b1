"""One segment of a memory bank's write as a single autograd node, with a hand-written backward.

The same numbers as :func:`nestlearn.memory.dgd.bank.segment_autograd` (SPEC §5): the surprise of
every memory of the bank at its chunk-start weights ``F_c, G_c`` (one forward of ``[k; v]``, the
manual backprop to ``δ``), then the two DGD writes of :mod:`nestlearn.memory.dgd.write`. The
other memories' segments are most of the time of self-modifying Titans on the CPU: ``T / C``
sequential segments of small products, where autograd records ~200 operations forward and runs
~400 backward, many of them full-size temporaries of the weights. Here the forward runs without
recording and the backward is the chain rule written out once, accumulating in place. The
second-order terms of the surprise (the outer gradient of ``δ = (E G_c) ⊙ σ'(pre)``) need
``σ''``: SiLU and GELU are supported.

Forward, per memory ``m`` (rows of ``F`` and ``G`` as :mod:`nestlearn.memory.dgd.bank`),
``Z = [k; v]`` (self targets) or ``k`` (given targets ``T``):

    pre, lin = Z F_cᵀ;   hid = σ(pre);   out = hid G_cᵀ + skip(Z)      skip: Z, or lin (padded)
    E = out_k − out_v (or out_k − T);    δ_G = E;   δ_F = [(E G_c) ⊙ σ'(pre_k), E_lin]
    F_n, S_F,n = write(F_0, S_F,0, δ_F, k);   G_n, S_G,n = write(G_0, S_G,0, δ_G, hid_k)

The second maps of memories of one output width are written together at that width (a run),
not padded to the widest: ``G``'s padding rows are zero by construction (``bank_layout.pack``)
and stay zero (zero error), so they are left out of the products and written as zeros, gradients
too.

What a write computes from its inputs alone (``X``, the Gram matrices, the UT inverse, the
inputs scaled by the coefficients: :class:`nestlearn.memory.dgd.write.Inputs`) is computed once
for ``F`` and every run of ``G`` when ``D == h`` (``U = [k; σ(pre_k)]`` stacked on the batch, as
``M + 1`` maps), else once for ``F`` and once for ``G``; the backward gathers their gradients
and runs the inputs' part once too. A segment that starts a chunk has ``F_c = F_0`` (the same
tensor): the gradient through the surprise is accumulated into the start weights' in place
instead of returned apart. :func:`read` (the memories' reads of the segment's tokens at
``F_c, G_c``) is a second node with a hand-written backward.

Supported: the L2 inner objective (the bank falls back to autograd otherwise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from nestlearn.memory.core.precision import backward_without_autocast
from nestlearn.memory.dgd.bank_layout import Layout
from nestlearn.memory.dgd.forms import Options
from nestlearn.memory.dgd.write import (
    WriteCoefficients,
    concat,
    inputs_backward,
    inputs_forward,
    map_backward,
    map_forward,
    rows,
)


def _silu(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_second(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    # GELU(x) = x Φ(x): σ' = Φ + x φ, σ'' = φ (2 − x²).
    cdf = 0.5 * (1 + torch.erf(x * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def _gelu_second(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) * (2 - x * x)


# σ -> σ' (the forward) and σ'' (the backward, on the keys only).
SIGMA = {F.silu: _silu, F.gelu: _gelu}
SECOND = {F.silu: _silu_second, F.gelu: _gelu_second}


def supported(opts: Options) -> bool:
    """Whether :func:`segment` handles these :class:`~nestlearn.memory.dgd.forms.Options`."""
    return opts.objective.name == "l2" and opts.sigma in SIGMA


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


def _places(lay: Layout, N: int, shared: bool) -> list[tuple[int, slice]]:
    """Per map (``F``, then the runs of ``G``): which :class:`~nestlearn.memory.dgd.write.Inputs`
    it reads and its rows there. ``shared`` (``D == h``): one for all, ``[k; σ(pre_k)]``;
    else one for ``F`` (``k``) and one for ``G`` (``σ(pre_k)``)."""
    offset, group = (N, 0) if shared else (0, 1)
    return [(0, slice(0, N))] + [
        (group, slice(offset + a * N, offset + b * N)) for a, b, _ in runs(lay)
    ]


class _BankSegment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, config, k, v, targets, F0, G0, SF0, SG0, FC, GC, *coefficients):
        lay, opts = config
        c = WriteCoefficients(*coefficients)
        M, h, n, N = len(lay.names), lay.hidden, k.shape[1], k.shape[0]
        skip_widths = [o for o, lin in zip(lay.outs, lay.linear, strict=True) if lin]
        offsets = _skip_offsets(lay)  # memory -> first column of its linear skip in Z F_cᵀ
        spans = [(slice(a * N, b * N), o) for a, b, o in runs(lay)]
        self_target = targets is None
        z = torch.cat([k, v], dim=1) if self_target else k  # [N, m, D]
        pre, hid, outs = _outputs(lay, opts, z, FC, GC)
        d1 = SIGMA[opts.sigma](pre)
        errors, backs = [], []
        for (a, b, o), (rows_, _), out in zip(runs(lay), spans, outs, strict=True):
            # [m, N, n, o]
            error = out[:, :, :n] - out[:, :, n:] if self_target else out - targets[a:b, ..., :o]
            errors.append(error.flatten(0, 1))
            backs.append(torch.bmm(errors[-1], GC[rows_, :o]))
        back = backs[0] if len(backs) == 1 else torch.cat(backs)  # [M·N, n, h]
        first_error = [(back * d1[:, :n]).unflatten(0, (M, N)).movedim(0, -2).flatten(-2)]
        for (a, b, _), error in zip(runs(lay), errors, strict=True):
            per_memory = error.unflatten(0, (b - a, N))
            first_error += [per_memory[i - a] for i in range(a, b) if lay.linear[i]]
        first_error = torch.cat(first_error, dim=-1)  # [N, n, R]
        # The writes: what depends on the inputs only once for every map of one input width.
        hid_k = hid[:, :n]
        shared = k.shape[-1] == h
        if shared:
            inputs = [inputs_forward(torch.cat([k, hid_k]), c, M + 1, opts.dgd)]
        else:
            inputs = [inputs_forward(k, c, 1, opts.dgd), inputs_forward(hid_k, c, M, opts.dgd)]
        places = _places(lay, N, shared)
        group, part = places[0]
        F_n, SF_n, p = map_forward(F0, SF0, first_error, rows(inputs[group], part), c, 1)
        ps = [p]
        # G's padding rows stay zero; the runs are written in place, at their own width.
        G_n, SG_n = torch.empty_like(G0), torch.empty_like(G0)
        for (rows_, o), error, (group, part) in zip(spans, errors, places[1:], strict=True):
            maps = (G0[rows_, :o], None if SG0 is None else SG0[rows_, :o])
            out = (G_n[rows_, :o], SG_n[rows_, :o])
            M_run = (rows_.stop - rows_.start) // N
            ps.append(map_forward(*maps, error, rows(inputs[group], part), c, M_run, out)[2])
            _zero_padding((G_n, SG_n), rows_, o)
        # Chunk-start weights that are the start weights (a segment that starts a chunk): their
        # two gradients are one sum, accumulated in place into the start weights' (below).
        same = (F0 is FC, G0 is GC)
        ctx.config = (lay, opts, M, N, n, skip_widths, offsets, spans, self_target, places, same)
        ctx.saved = (inputs, ps, c, errors, first_error, targets)
        ctx.save_for_backward(z, F0, G0, SF0, SG0, FC, GC, hid, d1, pre, back)
        return F_n, G_n, SF_n, SG_n

    @staticmethod
    @once_differentiable
    @backward_without_autocast
    def backward(ctx, gF, gG, gSF, gSG):
        lay, opts, M, N, n, skip_widths, offsets, spans, self_target, places = ctx.config[:-1]
        same_F, same_G = ctx.config[-1]
        inputs, ps, c, errors, first_error, targets = ctx.saved
        z, F0, G0, SF0, SG0, FC, GC, hid, d1, pre, back = ctx.saved_tensors
        h = lay.hidden
        group, part = places[0]
        grads = [
            map_backward(gF, gSF, F0, SF0, first_error, ps[0], rows(inputs[group], part), c, 1)
        ]
        d_G = torch.empty_like(G0)
        d_SG = None if SG0 is None else torch.empty_like(G0)
        for (rows_, o), error, p, (group, part) in zip(
            spans, errors, ps[1:], places[1:], strict=True
        ):
            maps = (G0[rows_, :o], None if SG0 is None else SG0[rows_, :o])
            out = (d_G[rows_, :o], None if d_SG is None else d_SG[rows_, :o])
            M_run = (rows_.stop - rows_.start) // N
            read = rows(inputs[group], part)
            grads.append(
                map_backward(gG[rows_, :o], gSG[rows_, :o], *maps, error, p, read, c, M_run, out)
            )
            _zero_padding((d_G, d_SG), rows_, o)
        if len(inputs) == 1:
            d_u, coefficient_grads = inputs_backward(inputs[0], concat(grads), c, M + 1)
            d_u_F, d_u_G = d_u[:N], d_u[N:]
        else:
            d_u_F, coefficient_grads = inputs_backward(inputs[0], grads[0], c, 1)
            d_u_G, more = inputs_backward(inputs[1], concat(grads[1:]), c, M)
            coefficient_grads = [_add(a, b) for a, b in zip(coefficient_grads, more, strict=True)]
        coefficient_grads = list(coefficient_grads)
        for name in ("e_decay", "e_carry", "s_decay"):
            i = WriteCoefficients._fields.index(name)
            for g in grads:
                coefficient_grads[i] = _add(coefficient_grads[i], getattr(g, name))
        # detach_inner: δ and u come from detached inputs, only the writes carry gradients.
        d_k = d_v = d_targets = d_FC = d_GC = None
        if not opts.detach_inner:
            # δ_F = [(E G_c) ⊙ σ'(pre_k), E_lin]
            d_hidden_error, *d_lin_error = grads[0].delta.split([M * h, *skip_widths], dim=-1)
            d_lin = dict(zip(offsets, d_lin_error, strict=True))
            d_hidden_error = d_hidden_error.unflatten(-1, (M, h)).movedim(-2, 0).flatten(0, 1)
            d_back = d_hidden_error * d1[:, :n]  # [M·N, n, h]
            d_pre_k = d_hidden_error * back * SECOND[opts.sigma](pre[:, :n])
            d_targets = None if self_target else torch.zeros_like(targets)
            d_GC = d_G if same_G else torch.empty_like(GC)
            d_hid, d_out = [], {}
            for (a, b, o), (rows_, _), g, error in zip(
                runs(lay), spans, grads[1:], errors, strict=True
            ):
                GC_run = GC[rows_, :o]
                d_error = g.delta  # [m·N, n, o], ours to accumulate into
                per_memory = d_error.unflatten(0, (b - a, N))
                for i in range(a, b):
                    if lay.linear[i]:
                        per_memory[i - a] += d_lin[i]
                d_error.baddbmm_(d_back[rows_], GC_run.mT)
                # E = out_k − out_v (or − T)
                if self_target:
                    d_out_run = torch.cat([d_error, -d_error], dim=1)
                else:
                    d_out_run = d_error
                    d_targets[a:b, ..., :o] = -per_memory
                d_hid.append(torch.bmm(d_out_run, GC_run))
                # d G_c = Eᵀ dδ_G + d outᵀ hid, one product: [E; d out]ᵀ [dδ_G; hid]  [m·N, o, h]
                left = torch.cat([error, d_out_run], dim=1).mT
                right = torch.cat([d_back[rows_], hid[rows_]], dim=1)
                if same_G:
                    d_GC[rows_, :o].baddbmm_(left, right)
                else:
                    torch.bmm(left, right, out=d_GC[rows_, :o])
                    _zero_padding((d_GC,), rows_, o)
                per_memory = d_out_run.unflatten(0, (b - a, N))
                d_out.update({i: per_memory[i - a] for i in range(a, b)})
            d_hid = d_hid[0] if len(d_hid) == 1 else torch.cat(d_hid)  # [M·N, m, h]
            d_hid[:, :n] += d_u_G
            d_pre = d_hid * d1
            d_pre[:, :n] += d_pre_k
            parts = [d_pre.unflatten(0, (M, N)).movedim(0, -2).flatten(-2)]
            parts += [d_out[i] for i in offsets]
            d_projected = torch.cat(parts, dim=-1)  # [N, m, R]
            d_z = torch.bmm(d_projected, FC)
            for i, lin in enumerate(lay.linear):
                if not lin:
                    d_z += d_out[i]
            if same_F:
                grads[0].W.baddbmm_(d_projected.mT, z)
            else:
                d_FC = torch.bmm(d_projected.mT, z)
            d_k = d_u_F + d_z[:, :n]
            d_v = d_z[:, n:] if self_target else None
        return (
            None,
            d_k,
            d_v,
            d_targets,
            grads[0].W,
            d_G,
            grads[0].S,
            d_SG,
            d_FC,
            None if same_G else d_GC,
            *coefficient_grads,
        )


def _zero_padding(tensors, rows: slice, width: int) -> None:
    """Zero the rows ``width:`` of the second maps ``rows`` (a run narrower than the bank)."""
    for t in tensors:
        if t is not None and width < t.shape[-2]:
            t[rows, width:].zero_()


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return a if b is None else b if a is None else a + b


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
    """:func:`nestlearn.memory.dgd.bank.segment_autograd`'s numbers as one autograd node (arguments
    as there, coefficients as :class:`~nestlearn.memory.dgd.write.WriteCoefficients`)."""
    has_momentum = c.s_decay is not None
    SF0, SG0 = (s[0], s[1]) if has_momentum else (None, None)
    F_n, G_n, SF_n, SG_n = _BankSegment.apply(
        (lay, opts), k, v, targets, w[0], w[1], SF0, SG0, wc[0], wc[1], *c
    )
    return [F_n, G_n], [SF_n, SG_n]


class _BankRead(torch.autograd.Function):
    """Every memory of the bank read at ``F, G`` on ``z [N, n, D]``: per run of memories of one
    output width ``[m, N, n, o]`` (``hid = σ(z Fᵀ)``, ``out = hid Gᵀ + skip(z)``); the backward
    is the chain rule written out (``σ'`` recomputed from the saved pre-activations)."""

    @staticmethod
    def forward(ctx, config, z, FC, GC):
        pre, hid, outs = _outputs(*config, z, FC, GC)
        ctx.config = config
        ctx.save_for_backward(z, FC, GC, pre, hid)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    @backward_without_autocast
    def backward(ctx, *grads):
        lay, opts = ctx.config
        z, FC, GC, pre, hid = ctx.saved_tensors
        M, N = len(lay.names), z.shape[0]
        d_GC = torch.empty_like(GC)
        d_hid, d_lin, d_z = [], [], None
        for (a, b, o), g in zip(runs(lay), grads, strict=True):
            rows_ = slice(a * N, b * N)
            flat = g.flatten(0, 1)  # [m·N, n, o]
            d_hid.append(torch.bmm(flat, GC[rows_, :o]))
            torch.bmm(flat.mT, hid[rows_], out=d_GC[rows_, :o])
            _zero_padding((d_GC,), rows_, o)
            for i in range(a, b):
                if lay.linear[i]:
                    d_lin.append(g[i - a])
                else:
                    d_z = g[i - a] if d_z is None else d_z + g[i - a]
        d_hid = d_hid[0] if len(d_hid) == 1 else torch.cat(d_hid)  # [M·N, n, h]
        d_pre = d_hid * SIGMA[opts.sigma](pre)
        parts = [d_pre.unflatten(0, (M, N)).movedim(0, -2).flatten(-2), *d_lin]
        d_projected = torch.cat(parts, dim=-1)  # [N, n, R]
        d_z = torch.bmm(d_projected, FC) if d_z is None else torch.baddbmm(d_z, d_projected, FC)
        return None, d_z, torch.bmm(d_projected.mT, z), d_GC


def _outputs(
    lay: Layout, opts: Options, z: torch.Tensor, FC: torch.Tensor, GC: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Every memory on ``z [N, m, D]`` at ``F_c, G_c``: the pre-activations and hidden units
    ``[M·N, m, h]`` and per run of one output width ``out [run, N, m, o] = σ(z F_cᵀ) G_cᵀ +
    skip(z)`` (:func:`nestlearn.memory.dgd.bank.forward`'s numbers, unpadded)."""
    M, h, N, m = len(lay.names), lay.hidden, z.shape[0], z.shape[1]
    offsets = _skip_offsets(lay)
    projected = torch.bmm(z, FC.mT)  # [N, m, R]
    pre = projected[..., : M * h].unflatten(-1, (M, h)).movedim(-2, 0).reshape(M * N, m, h)
    hid = opts.sigma(pre)
    outs = []
    for a, b, o in runs(lay):
        out = torch.bmm(hid[a * N : b * N], GC[a * N : b * N, :o].mT).view(b - a, N, m, o)
        for i in range(a, b):
            if lay.linear[i]:
                out[i - a] += projected[..., offsets[i] : offsets[i] + o]
            else:
                out[i - a] += z
        outs.append(out)
    return pre, hid, outs


def _skip_offsets(lay: Layout) -> dict[int, int]:
    """Memory -> first column of its linear skip in ``z Fᵀ`` (after the ``M·h`` hidden ones)."""
    offsets: dict[int, int] = {}
    for i, lin in enumerate(lay.linear):
        if lin:
            offsets[i] = len(lay.names) * lay.hidden + sum(lay.outs[j] for j in offsets)
    return offsets


def read(lay: Layout, wc: list[torch.Tensor], z: torch.Tensor, opts: Options) -> list[torch.Tensor]:
    """Every memory of the bank on ``z [N, n, D]`` at the weights ``wc = [F, G]``: per memory its
    output ``[N, n, out_m]``; the numbers of :func:`nestlearn.memory.dgd.bank.forward` (unpadded) as
    one autograd node (σ of :data:`SIGMA`)."""
    outs = _BankRead.apply((lay, opts), z, wc[0], wc[1])
    return [x for out in outs for x in out.unbind(0)]
