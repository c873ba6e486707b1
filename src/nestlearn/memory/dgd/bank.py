"""A bank of 2-layer DGD MLP memories that share their input, gates and chunk grid.

Self-modifying Titans (SPEC §5) writes ``M_k, M_v, (M_q), M_η, M_α`` on the same keys, the same
``v`` (the input of their self-generated targets), the same ``η_t, μ_t, α_t``, every chunk of
``other_chunk_size`` tokens. Each memory ``M_m(z) = W_{1,m} σ(W_{0,m} z) + skip_m(z)`` (skip: the
identity, or a linear map ``W_{s,m}`` written like the others). The maps that read the input
``z`` directly — every ``W_{0,m}`` and every linear skip — have the same input, hence the same
gradient input ``u = k`` and DGD input ``x = k / ‖k‖``; their rows evolve independently, so they
are written as **one** map ``F`` (rows concatenated); the second maps ``W_{1,m}`` (inputs
``σ(W_{0,m} k)``, one per memory) are stacked along the batch as ``G``, their outputs padded to
the widest (a zero row has zero error and stays zero: exact). One segment of the chunk form is
then two maps' worth of :mod:`nestlearn.memory.dgd.forms` machinery for all the memories at once,
instead of two per memory; the numbers are those of :func:`nestlearn.memory.dgd.forms.segment`
run per memory (tested against the per-token reference).

The layout of ``F`` and ``G`` and the packing of the memories' weights into them:
:mod:`nestlearn.memory.dgd.bank_layout`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nestlearn.memory.dgd import bank_fused
from nestlearn.memory.dgd import gates as dgd_gates
from nestlearn.memory.dgd.bank_layout import Layout
from nestlearn.memory.dgd.forms import Coefficients, Options, coefficients, end_map, write_map


def forward(
    lay: Layout, bank: Sequence[torch.Tensor], z: torch.Tensor, opts: Options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every memory on ``z [N, n, D]``: outputs ``[M, N, n, O]`` (padded), the second maps'
    inputs ``σ(pre)`` and the pre-activations, both ``[M·N, n, h]``."""
    first, second = bank
    M, h, width = len(lay.names), lay.hidden, lay.out
    N, n = z.shape[:2]
    skip_widths = [o for o, lin in zip(lay.outs, lay.linear, strict=True) if lin]
    # split, not slicing: one backward concatenation instead of zero-filled tensors.
    pre, *linear = torch.bmm(z, first.mT).split([M * h, *skip_widths], dim=-1)  # [N, n, R]
    pre = pre.unflatten(-1, (M, h)).movedim(-2, 0).reshape(M * N, n, h)
    hidden = opts.sigma(pre)
    out = torch.bmm(hidden, second.mT).view(M, N, n, width)
    linear = iter(linear)
    skips = [
        F.pad(next(linear), (0, width - o)) if lin else z
        for o, lin in zip(lay.outs, lay.linear, strict=True)
    ]
    return out + torch.stack(skips), hidden, pre


def read(
    lay: Layout, bank: Sequence[torch.Tensor], z: torch.Tensor, opts: Options, *, fused: bool = True
) -> list[torch.Tensor]:
    """Per memory, its output ``[N, n, out_m]`` on ``z [N, n, D]``: :func:`forward`'s numbers;
    by default (``fused``, when :func:`nestlearn.memory.dgd.bank_fused.supported`) as one autograd
    node, :func:`nestlearn.memory.dgd.bank_fused.read`."""
    if fused and bank_fused.supported(opts):
        return bank_fused.read(lay, list(bank), z, opts)
    out = forward(lay, bank, z, opts)[0]  # [M, N, n, O]
    # unbind, not indexing: the backward of each index would fill a zero tensor of all of out.
    return [o[..., :width] for o, width in zip(out.unbind(0), lay.outs, strict=True)]


def segment(
    lay: Layout,
    w: list[torch.Tensor],
    s: list[torch.Tensor],
    wc: list[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    targets: torch.Tensor | None,
    gates: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    opts: Options,
    *,
    fused: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`segment_autograd`'s numbers from the gates ``η, μ, α [N, n]`` (``μ``, ``α`` may be
    None); by default (``fused``, when :func:`nestlearn.memory.dgd.bank_fused.supported`) as two
    autograd nodes with hand-written backwards, the coefficients
    (:func:`nestlearn.memory.dgd.gates.gate_coefficients`) and the write
    (:func:`nestlearn.memory.dgd.bank_fused.segment`)."""
    if fused and bank_fused.supported(opts):
        c = dgd_gates.gate_coefficients(*gates, ema=opts.ema_momentum)
        return bank_fused.segment(lay, w, s, wc, k, v, targets, c, opts)
    coeffs = coefficients(*gates, ema=opts.ema_momentum)
    return segment_autograd(lay, w, s, wc, k, v, targets, coeffs, opts)


def segment_autograd(
    lay: Layout,
    w: list[torch.Tensor],
    s: list[torch.Tensor],
    wc: list[torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    targets: torch.Tensor | None,
    coeffs: Coefficients,
    opts: Options,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One segment of :func:`nestlearn.memory.dgd.forms.segment` (no reads) for every memory of
    the bank: keys ``k [N, n, D]``; targets ``M_{m,c}(v)`` (``targets=None``, ``v [N, n, D]``)
    or given, ``[M, N, n, O]``. Returns the bank's weights and momenta after the segment."""
    M, n = len(lay.names), k.shape[1]
    grad_at = wc
    if opts.detach_inner:
        grad_at, k, v = [x.detach() for x in wc], k.detach(), v.detach()
        targets = None if targets is None else targets.detach()
    if targets is None:
        out, hidden, pre = forward(lay, grad_at, torch.cat([k, v], dim=1), opts)
        # split, not slicing: one backward concatenation instead of zero-filled tensors.
        (pred, targets), (hidden, _), (pre, _) = (t.split(n, dim=-2) for t in (out, hidden, pre))
    else:
        pred, hidden, pre = forward(lay, grad_at, k, opts)
    error = opts.objective.error(pred, targets)  # [M, N, n, O]
    second_error = error.flatten(0, 1)  # [M·N, n, O]
    hidden_error = torch.bmm(second_error, grad_at[1]) * opts.sigma_grad(pre)  # [M·N, n, h]
    first_error = [hidden_error.unflatten(0, (M, -1)).movedim(0, -2).flatten(-2)]
    per_memory = zip(error.unbind(0), lay.outs, lay.linear, strict=True)
    first_error += [e[..., :o] for e, o, lin in per_memory if lin]
    stacked = coeffs.repeat(M)
    first = write_map(w[0], s[0], torch.cat(first_error, dim=-1), k, coeffs, opts.dgd)
    second = write_map(w[1], s[1], second_error, hidden, stacked, opts.dgd)
    (w0, s0), (w1, s1) = end_map(first, coeffs), end_map(second, stacked)
    return [w0, w1], [s0, s1]
