"""One linear map written over a segment by chunked DGD: forward and hand-derived backward.

The write of :func:`nestlearn.memory.dgd_mlp.write_map` + :func:`~nestlearn.memory.dgd_mlp.end_map`
(SPEC §5; ``docs/self-modifying-titans.md`` §2) as plain tensor maths, without autograd, for the
fused segment of :mod:`nestlearn.memory.bank_fused`. Per map, from ``W_0, S_0 [B, O, I]``, the
errors ``Δ [B, n, O]`` and inputs ``U [B, n, I]`` of the surprise, ``X = U / ‖U‖`` (rows):

    R   = diag(G_b) X W_0ᵀ + diag(c_b) X S_0ᵀ + (W_b ⊙ X Uᵀ) Δ       reads before each token
    P   = (I + L)⁻¹ R,   L = lower ⊙ X Xᵀ (strictly lower)             the UT transform
    W_n = G_n W_0 + c_n S_0 + Δᵀ (w_n ⊙ U) + Pᵀ (p_n ⊙ X)             the weights after
    S_n = m_n S_0 + Δᵀ (s_n ⊙ U)                                       the momentum after

(without DGD: no ``P`` term). The backward, with ``A = (I + L)⁻¹``: ``dR = Aᵀ dP`` and
``dL = −tril(dR Pᵀ, −1)`` (from ``dA = −Aᵀ (dP Rᵀ) Aᵀ`` and ``P = A R``), the rest products
of the same few matrices. ``M`` memories may be stacked on the batch (``B = M·N``, memory-major)
against coefficients of ``N`` rows: the coefficients broadcast, their gradients sum over ``M``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

EPS = 1e-12  # F.normalize's


class WriteCoefficients(NamedTuple):
    """The coefficient tensors of one segment of ``n`` tokens (``N`` rows; see
    :func:`nestlearn.memory.dgd_mlp.coefficients`); ``None`` where momentum is off."""

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


class Saved(NamedTuple):
    """What the backward of one map needs."""

    W: torch.Tensor
    S: torch.Tensor | None
    delta: torch.Tensor
    u: torch.Tensor
    x: torch.Tensor | None
    norm: torch.Tensor | None
    gram_xu: torch.Tensor | None  # X Uᵀ
    gram_xx: torch.Tensor | None  # X Xᵀ
    inverse: torch.Tensor | None  # A = (I + L)⁻¹
    p: torch.Tensor | None


def scale(coef: torch.Tensor, t: torch.Tensor, M: int) -> torch.Tensor:
    """``coef ⊙ t`` with ``coef [N, ...]`` broadcast over the ``M`` memories of ``t [M·N, ...]``."""
    if M == 1:
        return coef * t
    return (t.unflatten(0, (M, -1)) * coef).flatten(0, 1)


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


def write_forward(
    W: torch.Tensor,
    S: torch.Tensor | None,
    delta: torch.Tensor,
    u: torch.Tensor,
    c: WriteCoefficients,
    M: int,
    dgd: bool,
) -> tuple[torch.Tensor, torch.Tensor, Saved]:
    """``W_n, S_n`` of the module docstring and what :func:`write_backward` needs.
    ``S`` may be None without momentum (then ``c.b_carry``, ``c.e_carry``, ``c.s_decay`` are)."""
    W_n = scale(c.e_decay, W, M)
    if c.e_carry is not None:
        add_scaled(W_n, c.e_carry, S, M)
    saved = Saved(W, S, delta, u, None, None, None, None, None, None)
    if not dgd:
        W_n.baddbmm_(delta.mT, scale(c.e_write, u, M))
    else:
        norm = u.norm(dim=-1, keepdim=True).clamp_min(EPS)
        x = u / norm
        rhs = torch.bmm(scale(c.b_decay, x, M), W.mT)  # [B, n, O]
        if c.b_carry is not None:
            rhs.baddbmm_(scale(c.b_carry, x, M), S.mT)
        gram_xu = torch.bmm(x, u.mT)  # [B, n, n]
        rhs.baddbmm_(scale(c.b_write, gram_xu, M), delta)
        gram_xx = torch.bmm(x, x.mT)
        lower = scale(c.lower, gram_xx, M)
        eye = _eye(lower.shape[-1], lower.dtype, lower.device)
        inverse = torch.linalg.solve_triangular(
            lower, eye.expand_as(lower), upper=False, unitriangular=True
        )
        p = torch.bmm(inverse, rhs)  # [B, n, O]
        # Both rank-n writes in one product: [Δ P]ᵀ [w_n ⊙ U; p_n ⊙ X].
        left = torch.cat([delta, p], dim=1)
        right = torch.cat([scale(c.e_write, u, M), scale(c.e_project, x, M)], dim=1)
        W_n.baddbmm_(left.mT, right)
        saved = Saved(W, S, delta, u, x, norm, gram_xu, gram_xx, inverse, p)
    s_in = scale(c.s_write, u, M)
    if c.s_decay is None:
        S_n = torch.bmm(delta.mT, s_in)
    else:
        S_n = scale(c.s_decay, S, M).baddbmm_(delta.mT, s_in)
    return W_n, S_n, saved


_EYES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _eye(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``I_n``, made once per size, dtype and device (the right side of the triangular solve)."""
    key = (n, dtype, device)
    if key not in _EYES:
        _EYES[key] = torch.eye(n, dtype=dtype, device=device)
    return _EYES[key]


class WriteGrads(NamedTuple):
    W: torch.Tensor
    S: torch.Tensor | None
    delta: torch.Tensor
    u: torch.Tensor
    coefficients: WriteCoefficients  # gradients, None where the coefficient is None


def write_backward(
    gW: torch.Tensor, gS: torch.Tensor, saved: Saved, c: WriteCoefficients, M: int
) -> WriteGrads:
    """Gradients of :func:`write_forward`'s inputs from those of ``W_n`` and ``S_n``."""
    W, S, delta, u, x = saved.W, saved.S, saved.delta, saved.u, saved.x
    n = u.shape[1]
    dgd = x is not None
    # S_n = m_n S_0 + Δᵀ (s_n ⊙ U)
    d_s_in = torch.bmm(delta, gS)  # [B, n, I]
    d_s_write = reduce(d_s_in * u, M, (-1,))
    d_u = scale(c.s_write, d_s_in, M)
    d_delta = torch.bmm(scale(c.s_write, u, M), gS.mT)
    d_S = None
    d_s_decay = None
    if c.s_decay is not None:
        d_S = scale(c.s_decay, gS, M)
        d_s_decay = dot(S, gS, M)
    # W_n = G_n W_0 + c_n S_0 + [Δ P]ᵀ [w_n ⊙ U; p_n ⊙ X]
    d_W = scale(c.e_decay, gW, M)
    d_e_decay = dot(W, gW, M)
    d_e_carry = None
    if c.e_carry is not None:
        d_S = scale(c.e_carry, gW, M) if d_S is None else add_scaled(d_S, c.e_carry, gW, M)
        d_e_carry = dot(S, gW, M)
    if not dgd:
        d_right = torch.bmm(delta, gW)  # [B, n, I]
        d_delta.baddbmm_(scale(c.e_write, u, M), gW.mT)
        d_e_write = reduce(d_right * u, M, (-1,))
        add_scaled(d_u, c.e_write, d_right, M)
        grads = c._replace(
            b_decay=None,
            b_carry=None,
            b_write=None,
            lower=None,
            e_decay=d_e_decay,
            e_carry=d_e_carry,
            e_write=d_e_write,
            e_project=None,
            s_decay=d_s_decay,
            s_write=d_s_write,
        )
        return WriteGrads(d_W, d_S, d_delta, d_u, grads)
    p, inverse = saved.p, saved.inverse
    right = torch.cat([scale(c.e_write, u, M), scale(c.e_project, x, M)], dim=1)
    d_right = torch.bmm(torch.cat([delta, p], dim=1), gW)  # [B, 2n, I]
    d_left = torch.bmm(right, gW.mT)  # [B, 2n, O]
    d_ru, d_rx = d_right[:, :n], d_right[:, n:]
    d_e_write = reduce(d_ru * u, M, (-1,))
    d_e_project = reduce(d_rx * x, M, (-1,))
    add_scaled(d_u, c.e_write, d_ru, M)
    d_x = scale(c.e_project, d_rx, M)
    d_delta += d_left[:, :n]
    # P = A R, A = (I + L)⁻¹: dR = Aᵀ dP, dL = −tril(dR Pᵀ, −1)
    d_rhs = torch.bmm(inverse.mT, d_left[:, n:])  # [B, n, O]
    d_lower = -torch.bmm(d_rhs, p.mT).tril(-1)
    d_lower_coef = reduce(d_lower * saved.gram_xx, M, ())
    d_gram_xx = scale(c.lower, d_lower, M)
    d_x.baddbmm_(d_gram_xx + d_gram_xx.mT, x)
    # R = diag(G_b) X W_0ᵀ + diag(c_b) X S_0ᵀ + (W_b ⊙ X Uᵀ) Δ
    weighted = scale(c.b_write, saved.gram_xu, M)
    d_delta.baddbmm_(weighted.mT, d_rhs)
    d_weighted = torch.bmm(d_rhs, delta.mT)  # [B, n, n]
    d_b_write = reduce(d_weighted * saved.gram_xu, M, ())
    d_gram_xu = scale(c.b_write, d_weighted, M)
    d_x.baddbmm_(d_gram_xu, u)
    d_u.baddbmm_(d_gram_xu.mT, x)
    read_w = torch.bmm(d_rhs, W)  # [B, n, I]
    d_b_decay = reduce(read_w * x, M, (-1,))
    add_scaled(d_x, c.b_decay, read_w, M)
    d_W.baddbmm_(d_rhs.mT, scale(c.b_decay, x, M))
    d_b_carry = None
    if c.b_carry is not None:
        read_s = torch.bmm(d_rhs, S)
        d_b_carry = reduce(read_s * x, M, (-1,))
        add_scaled(d_x, c.b_carry, read_s, M)
        d_S.baddbmm_(d_rhs.mT, scale(c.b_carry, x, M))
    # X = U / max(‖U‖, eps): the projection term only where the norm was not clamped.
    radial = (x * d_x).sum(-1, keepdim=True) * (saved.norm > EPS)
    d_u += (d_x - x * radial) / saved.norm
    grads = WriteCoefficients(
        b_decay=d_b_decay,
        b_carry=d_b_carry,
        b_write=d_b_write,
        lower=d_lower_coef,
        e_decay=d_e_decay,
        e_carry=d_e_carry,
        e_write=d_e_write,
        e_project=d_e_project,
        s_decay=d_s_decay,
        s_write=d_s_write,
    )
    return WriteGrads(d_W, d_S, d_delta, d_u, grads)
