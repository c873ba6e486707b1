"""One linear map written over a segment by chunked DGD: forward and hand-derived backward.

The write of :func:`nestlearn.memory.dgd.forms.write_map` +
:func:`~nestlearn.memory.dgd.forms.end_map` (SPEC §5; ``docs/self-modifying-titans.md`` §2) as
plain tensor maths, without autograd, for the fused segment of
:mod:`nestlearn.memory.dgd.bank_fused`. Per map, from ``W_0, S_0 [B, O, I]``, the errors
``Δ [B, n, O]`` and inputs ``U [B, n, I]`` of the surprise, ``X = U / ‖U‖`` (rows):

    R   = diag(G_b) X W_0ᵀ + diag(c_b) X S_0ᵀ + (W_b ⊙ X Uᵀ) Δ       reads before each token
    P   = (I + L)⁻¹ R,   L = lower ⊙ X Xᵀ (strictly lower)             the UT transform
    W_n = G_n W_0 + c_n S_0 + Δᵀ (w_n ⊙ U) + Pᵀ (p_n ⊙ X)             the weights after
    S_n = m_n S_0 + Δᵀ (s_n ⊙ U)                                       the momentum after

(without DGD: no ``P`` term). The backward, with ``A = (I + L)⁻¹``: ``dR = Aᵀ dP`` and
``dL = −tril(dR Pᵀ, −1)`` (from ``dA = −Aᵀ (dP Rᵀ) Aᵀ`` and ``P = A R``), the rest products
of the same few matrices. ``M`` memories may be stacked on the batch (``B = M·N``, memory-major)
against coefficients of ``N`` rows: the coefficients broadcast, their gradients sum over ``M``.

A write is split in two: :func:`inputs_forward` (what depends on ``U`` only: ``X``, ``X Uᵀ``,
``X Xᵀ``, ``A``, the scaled inputs), once for every map of one input width stacked on the batch,
and :func:`map_forward` per map (``R``, ``P``, ``W_n``, ``S_n``); backward
:func:`map_backward` per map, then :func:`inputs_backward` once on their gathered gradients
(:func:`concat`). The coefficients from the gates, as one autograd node:
:func:`nestlearn.memory.dgd.gates.gate_coefficients`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

EPS = 1e-12  # F.normalize's


class WriteCoefficients(NamedTuple):
    """The coefficient tensors of one segment of ``n`` tokens (``N`` rows; see
    :func:`nestlearn.memory.dgd.forms.coefficients`); ``None`` where momentum is off."""

    b_decay: torch.Tensor  # G_t, t = 0..n−1, [N, n, 1]
    b_carry: torch.Tensor | None  # c_t, [N, n, 1]
    b_write: torch.Tensor  # −D[t, s] η_s, [N, n, n]
    lower: torch.Tensor  # A[j−1, i] η_i, [N, n, n] (strictly lower part read)
    e_decay: torch.Tensor  # G_n, [N, 1, 1]
    e_carry: torch.Tensor | None  # c_n, [N, 1, 1]
    e_write: torch.Tensor  # −D[n, s] η_s, [N, n, 1]
    e_project: torch.Tensor  # −A[n, j] η_j, [N, n, 1]
    s_decay: torch.Tensor | None  # M[n, 0], [N, 1, 1]
    s_write: torch.Tensor  # −M[n, s] η_s, [N, n, 1]


def scale(
    coef: torch.Tensor, t: torch.Tensor, M: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``coef ⊙ t`` with ``coef [N, ...]`` broadcast over the ``M`` memories of ``t [M·N, ...]``
    (into ``out`` when given)."""
    if M == 1:
        return coef * t if out is None else torch.mul(t, coef, out=out)
    if out is None:
        return (t.unflatten(0, (M, -1)) * coef).flatten(0, 1)
    torch.mul(t.unflatten(0, (M, -1)), coef, out=out.unflatten(0, (M, -1)))
    return out


def add_scaled(out: torch.Tensor, coef: torch.Tensor, t: torch.Tensor, M: int) -> torch.Tensor:
    """``out += coef ⊙ t`` in place (broadcast as :func:`scale`)."""
    if M == 1:
        return out.addcmul_(t, coef)
    out.unflatten(0, (M, -1)).addcmul_(t.unflatten(0, (M, -1)), coef)
    return out


def reduce(g: torch.Tensor, M: int, dims: tuple[int, ...]) -> torch.Tensor:
    """The gradient of a broadcast coefficient: ``g [M·N, ...]`` summed over ``dims`` (kept)
    and over the memories."""
    if dims:
        g = g.sum(dims, keepdim=True)
    return g if M == 1 else g.unflatten(0, (M, -1)).sum(0)


def dot(a: torch.Tensor, b: torch.Tensor, M: int) -> torch.Tensor:
    """``Σ a ⊙ b`` per matrix, ``[M·N, O, I]`` -> ``[N, 1, 1]`` (summed over the memories)."""
    g = (a * b).sum((-1, -2), keepdim=True)
    return g if M == 1 else g.unflatten(0, (M, -1)).sum(0)


class Inputs(NamedTuple):
    """The parts of a write that depend on its inputs ``U`` only, not on the map: the same for
    every map of one input width, so computed once for all of them stacked on the batch
    (``[B, ·, ·]``, ``B = M·N`` rows, memory-major). ``None`` where not used (no DGD, no
    momentum)."""

    u: torch.Tensor | None  # U [B, n, I] (None in one map's rows)
    x: torch.Tensor | None  # X = U / ‖U‖
    norm: torch.Tensor | None  # ‖U‖ (clamped) [B, n, 1]
    gram_xu: torch.Tensor | None  # X Uᵀ [B, n, n]
    gram_xx: torch.Tensor | None  # X Xᵀ
    inverse: torch.Tensor | None  # A = (I + L)⁻¹, L = lower ⊙ X Xᵀ
    bx: torch.Tensor | None  # diag(G_b) X
    cx: torch.Tensor | None  # diag(c_b) X
    wxu: torch.Tensor | None  # W_b ⊙ X Uᵀ
    right: torch.Tensor  # [w_n ⊙ U; p_n ⊙ X] [B, 2n, I] (without DGD: w_n ⊙ U [B, n, I])
    su: torch.Tensor  # s_n ⊙ U


def rows(inputs: Inputs, part: slice) -> Inputs:
    """What one map reads of the :class:`Inputs`: the batch rows ``part`` of the fields
    :func:`map_forward` and :func:`map_backward` use (the others None)."""
    if part == slice(0, len(inputs.u)):
        return inputs
    return inputs._replace(
        u=None,
        x=None,
        norm=None,
        gram_xu=None,
        gram_xx=None,
        **{
            f: None if getattr(inputs, f) is None else getattr(inputs, f)[part]
            for f in ("inverse", "bx", "cx", "wxu", "right", "su")
        },
    )


def inputs_forward(u: torch.Tensor, c: WriteCoefficients, M: int, dgd: bool) -> Inputs:
    """The :class:`Inputs` of ``U [M·N, n, I]`` (``M`` maps stacked against ``N`` rows of
    coefficients)."""
    su = scale(c.s_write, u, M)
    eu = scale(c.e_write, u, M)
    if not dgd:
        return Inputs(u, None, None, None, None, None, None, None, None, eu, su)
    norm = u.norm(dim=-1, keepdim=True).clamp_min(EPS)
    x = u / norm
    gram_xu = torch.bmm(x, u.mT)  # [B, n, n]
    gram_xx = torch.bmm(x, x.mT)
    lower = scale(c.lower, gram_xx, M)
    eye = _eye(lower.shape[-1], lower.dtype, lower.device)
    inverse = torch.linalg.solve_triangular(
        lower, eye.expand_as(lower), upper=False, unitriangular=True
    )
    return Inputs(
        u,
        x,
        norm,
        gram_xu,
        gram_xx,
        inverse,
        scale(c.b_decay, x, M),
        None if c.b_carry is None else scale(c.b_carry, x, M),
        scale(c.b_write, gram_xu, M),
        torch.cat([eu, scale(c.e_project, x, M)], dim=1),
        su,
    )


# The Inputs fields that are the inputs scaled by coefficients: cheap to remake, so a backward
# that is called much later (a whole sequence of segments apart) need not hold them.
_SCALED = ("bx", "cx", "wxu", "right", "su")


def slim(inputs: Inputs) -> Inputs:
    """``inputs`` without the fields scaled by coefficients (about half its memory); see
    :func:`restore`."""
    return inputs._replace(**dict.fromkeys(_SCALED))


def restore(inputs: Inputs, c: WriteCoefficients, M: int) -> Inputs:
    """The fields :func:`slim` dropped, remade from ``U``, ``X``, ``X Uᵀ`` and the coefficients
    by the operations of :func:`inputs_forward` (the same numbers)."""
    u, x = inputs.u, inputs.x
    su = scale(c.s_write, u, M)
    eu = scale(c.e_write, u, M)
    if x is None:
        return inputs._replace(right=eu, su=su)
    return inputs._replace(
        bx=scale(c.b_decay, x, M),
        cx=None if c.b_carry is None else scale(c.b_carry, x, M),
        wxu=scale(c.b_write, inputs.gram_xu, M),
        right=torch.cat([eu, scale(c.e_project, x, M)], dim=1),
        su=su,
    )


def map_forward(
    W: torch.Tensor,
    S: torch.Tensor | None,
    delta: torch.Tensor,
    inputs: Inputs,
    c: WriteCoefficients,
    M: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``W_n, S_n`` of the module docstring for one map ``W, S [M·N, O, I]`` with errors
    ``Δ [M·N, n, O]``, and ``P`` (None without DGD); ``out``: tensors to write ``W_n, S_n``
    into. ``S`` may be None without momentum (then ``c.b_carry``, ``c.e_carry``, ``c.s_decay``
    are)."""
    out_W, out_S = (None, None) if out is None else out
    W_n = scale(c.e_decay, W, M, out_W)
    if c.e_carry is not None:
        add_scaled(W_n, c.e_carry, S, M)
    p = None
    if inputs.inverse is None:
        W_n.baddbmm_(delta.mT, inputs.right)
    else:
        rhs = torch.bmm(inputs.bx, W.mT)  # [B, n, O]
        if inputs.cx is not None:
            rhs.baddbmm_(inputs.cx, S.mT)
        rhs.baddbmm_(inputs.wxu, delta)
        p = torch.bmm(inputs.inverse, rhs)  # [B, n, O]
        # Both rank-n writes in one product: [Δ P]ᵀ [w_n ⊙ U; p_n ⊙ X].
        W_n.baddbmm_(torch.cat([delta, p], dim=1).mT, inputs.right)
    if c.s_decay is None:
        S_n = torch.bmm(delta.mT, inputs.su, out=out_S)
    else:
        S_n = scale(c.s_decay, S, M, out_S).baddbmm_(delta.mT, inputs.su)
    return W_n, S_n, p


_EYES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _eye(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``I_n``, made once per size, dtype and device (the right side of the triangular solve)."""
    key = (n, dtype, device)
    if key not in _EYES:
        _EYES[key] = torch.eye(n, dtype=dtype, device=device)
    return _EYES[key]


class MapGrads(NamedTuple):
    """Gradients from one map's backward: of its ``W_0, S_0, Δ``, of the :class:`Inputs` it
    read (``right, su, bx, cx, wxu`` and ``L``), and of the coefficients it scaled itself."""

    W: torch.Tensor | None
    S: torch.Tensor | None
    delta: torch.Tensor | None
    right: torch.Tensor
    su: torch.Tensor
    bx: torch.Tensor | None
    cx: torch.Tensor | None
    wxu: torch.Tensor | None
    lower: torch.Tensor | None  # dL [B, n, n]
    e_decay: torch.Tensor | None  # [N, 1, 1]
    e_carry: torch.Tensor | None
    s_decay: torch.Tensor | None


def map_backward(
    gW: torch.Tensor,
    gS: torch.Tensor,
    W: torch.Tensor,
    S: torch.Tensor | None,
    delta: torch.Tensor,
    p: torch.Tensor | None,
    inputs: Inputs,
    c: WriteCoefficients,
    M: int,
    out: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    d_p: torch.Tensor | None = None,
) -> MapGrads:
    """Gradients of :func:`map_forward`'s inputs from those of ``W_n`` and ``S_n`` (and of ``P``,
    ``d_p``, where the caller also read ``P``: the per-token reads of a segment); ``out``:
    tensors to write the gradients of ``W`` and ``S`` into."""
    out_W, out_S = (None, None) if out is None else out
    # S_n = m_n S_0 + Δᵀ (s_n ⊙ U)
    d_su = torch.bmm(delta, gS)  # [B, n, I]
    d_delta = torch.bmm(inputs.su, gS.mT)
    d_S = d_s_decay = d_e_carry = None
    if c.s_decay is not None:
        d_S = scale(c.s_decay, gS, M, out_S)
        d_s_decay = dot(S, gS, M)
    # W_n = G_n W_0 + c_n S_0 + [Δ P]ᵀ [w_n ⊙ U; p_n ⊙ X]
    d_W = scale(c.e_decay, gW, M, out_W)
    d_e_decay = dot(W, gW, M)
    if c.e_carry is not None:
        if d_S is None:
            d_S = scale(c.e_carry, gW, M, out_S)
        else:
            add_scaled(d_S, c.e_carry, gW, M)
        d_e_carry = dot(S, gW, M)
    if inputs.inverse is None:
        d_right = torch.bmm(delta, gW)  # [B, n, I]
        d_delta.baddbmm_(inputs.right, gW.mT)
        return MapGrads(
            d_W,
            d_S,
            d_delta,
            d_right,
            d_su,
            None,
            None,
            None,
            None,
            d_e_decay,
            d_e_carry,
            d_s_decay,
        )
    n = delta.shape[1]
    d_right = torch.bmm(torch.cat([delta, p], dim=1), gW)  # [B, 2n, I]
    d_left = torch.bmm(inputs.right, gW.mT)  # [B, 2n, O]
    d_delta += d_left[:, :n]
    # P = A R, A = (I + L)⁻¹: dR = Aᵀ dP, dL = −tril(dR Pᵀ, −1)
    d_p_total = d_left[:, n:] if d_p is None else d_left[:, n:] + d_p
    d_rhs = torch.bmm(inputs.inverse.mT, d_p_total)  # [B, n, O]
    d_lower = torch.bmm(d_rhs, p.mT).tril_(-1).neg_()
    # R = diag(G_b) X W_0ᵀ + diag(c_b) X S_0ᵀ + (W_b ⊙ X Uᵀ) Δ
    d_delta.baddbmm_(inputs.wxu.mT, d_rhs)
    d_wxu = torch.bmm(d_rhs, delta.mT)  # [B, n, n]
    d_bx = torch.bmm(d_rhs, W)  # [B, n, I]
    d_W.baddbmm_(d_rhs.mT, inputs.bx)
    d_cx = None
    if inputs.cx is not None:
        d_cx = torch.bmm(d_rhs, S)
        d_S.baddbmm_(d_rhs.mT, inputs.cx)
    return MapGrads(
        d_W,
        d_S,
        d_delta,
        d_right,
        d_su,
        d_bx,
        d_cx,
        d_wxu,
        d_lower,
        d_e_decay,
        d_e_carry,
        d_s_decay,
    )


def concat(grads: list[MapGrads]) -> MapGrads:
    """The :class:`Inputs` gradients of maps that read consecutive rows of one :class:`Inputs`,
    concatenated along the batch (the other fields None)."""
    if len(grads) == 1:
        return grads[0]
    fields = [
        None if parts[0] is None else torch.cat(parts)
        for parts in zip(*(g[3:9] for g in grads), strict=True)
    ]
    return MapGrads(None, None, None, *fields, None, None, None)


def inputs_backward(
    inputs: Inputs, grads: MapGrads, c: WriteCoefficients, M: int
) -> tuple[torch.Tensor, WriteCoefficients]:
    """The gradient of ``U`` and of the coefficients the :class:`Inputs` scaled, from the
    gradients of the :class:`Inputs` (:func:`concat` of the :class:`MapGrads` of the maps that
    read them)."""
    u, x, n = inputs.u, inputs.x, inputs.u.shape[1]
    d_eu = grads.right[:, :n]
    d_e_write = reduce(d_eu * u, M, (-1,))
    d_u = scale(c.e_write, d_eu, M)
    d_s_write = reduce(grads.su * u, M, (-1,))
    add_scaled(d_u, c.s_write, grads.su, M)
    if x is None:
        return d_u, WriteCoefficients(
            None, None, None, None, None, None, d_e_write, None, None, d_s_write
        )
    d_px = grads.right[:, n:]
    d_e_project = reduce(d_px * x, M, (-1,))
    d_x = scale(c.e_project, d_px, M)
    d_lower_coef = reduce(grads.lower * inputs.gram_xx, M, ())
    d_gram_xx = scale(c.lower, grads.lower, M)
    d_x.baddbmm_(d_gram_xx + d_gram_xx.mT, x)
    d_b_write = reduce(grads.wxu * inputs.gram_xu, M, ())
    d_gram_xu = scale(c.b_write, grads.wxu, M)
    d_x.baddbmm_(d_gram_xu, u)
    d_u.baddbmm_(d_gram_xu.mT, x)
    d_b_decay = reduce(grads.bx * x, M, (-1,))
    add_scaled(d_x, c.b_decay, grads.bx, M)
    d_b_carry = None
    if grads.cx is not None:
        d_b_carry = reduce(grads.cx * x, M, (-1,))
        add_scaled(d_x, c.b_carry, grads.cx, M)
    # X = U / max(‖U‖, eps): the projection term only where the norm was not clamped.
    radial = (x * d_x).sum(-1, keepdim=True) * (inputs.norm > EPS)
    d_u += (d_x - x * radial) / inputs.norm
    coefficients = WriteCoefficients(
        b_decay=d_b_decay,
        b_carry=d_b_carry,
        b_write=d_b_write,
        lower=d_lower_coef,
        e_decay=None,
        e_carry=None,
        e_write=d_e_write,
        e_project=d_e_project,
        s_decay=None,
        s_write=d_s_write,
    )
    return d_u, coefficients
