"""The coefficients of a DGD segment's write from its gates, as one autograd node.

:func:`gate_coefficients` gives the :class:`~nestlearn.memory.dgd.write.WriteCoefficients` of
:func:`nestlearn.memory.dgd.forms.coefficients` (SPEC §5; ``docs/self-modifying-titans.md`` §2) for
the fused bank segment (:mod:`nestlearn.memory.dgd.bank_fused`), with a hand-written backward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from nestlearn.memory.core.precision import backward_without_autocast
from nestlearn.memory.core.segments import products_forward, rows_backward
from nestlearn.memory.dgd.write import WriteCoefficients


def gate_coefficients(
    eta: torch.Tensor, mu: torch.Tensor | None, alpha: torch.Tensor | None, *, ema: bool = False
) -> WriteCoefficients:
    """The :class:`WriteCoefficients` of gates ``[N, n]`` (``mu``, ``alpha`` None: no momentum,
    no retention): the write coefficients among :func:`nestlearn.memory.dgd.forms.coefficients`'s
    numbers (``before.{decay, carry, write}``, ``lower``, ``end.{decay, carry, write, project}``,
    ``s_decay``, ``s_write``), as one autograd node.

    With ``A[t, j] = Π_{r=j+1..t} α_r``, ``P[t, s] = Π_{r=s+1..t} μ_r`` (``[N, n+1, n+1]``),
    ``C = A[:, 1:] P[1:, :]`` (``c_t = C[t, 0]``, ``D[t, s] = C[t, s]``; without momentum
    ``D = A``, no ``c``): ``G_t = A[t, 0]``, write ``−D[t, s] η_s``, lower ``A[j−1, i] η_i``,
    project ``−A[n, j] η_j``, ``M[n, 0] = P[n, 0]``, ``s_write = −P[n, s] η_s``. Backward: the
    product rule without division (gates may be 0), ``∂P[t, s] / ∂a_r = P[t, r] P[r−1, s]`` for
    ``s < r ≤ t``, so ``∂L/∂a_r = (Pᵀ dP Pᵀ)[r, r−1]``. ``ema`` (with momentum): the gradient's
    step ``(1 − μ_s) η_s`` replaces ``η_s`` in ``write`` and ``s_write`` (not in the projection).
    """
    flags = (mu is not None, alpha is not None, ema and mu is not None)
    gates = [g for g in (eta, mu, alpha) if g is not None]
    return WriteCoefficients(*_WriteCoefficients.apply(flags, *gates))


def _segment_products(gates: torch.Tensor) -> torch.Tensor:
    """:func:`nestlearn.memory.core.segments.segment_products` without autograd:
    ``gates [..., n]`` -> ``[..., n+1, n+1]``."""
    return products_forward(gates)


class _WriteCoefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flags, eta, *gates):
        has_mu, has_alpha, ema = flags
        N, n = eta.shape
        products = None
        if gates:
            products = _segment_products(torch.stack(gates) if len(gates) > 1 else gates[0][None])
        if has_alpha:
            A = products[-1]  # [N, n+1, n+1]
        else:
            A = _segment_products(torch.ones_like(eta[:1]))[0].expand(N, -1, -1)
        e = eta.unsqueeze(-2)  # [N, 1, n]
        project = A[..., 1:] * e  # A[t, j] η_j, [N, n+1, n]
        P = mixed = None
        if has_mu:
            P = products[0]
            mixed = torch.bmm(A[..., 1:], P[:, 1:])  # [N, n+1, n+1]: c, then D
            step = (1 - gates[0]) * eta if ema else eta  # the gradient's step
            write, carry = -mixed[..., 1:] * step.unsqueeze(-2), mixed[..., :1]
            b_carry, e_carry, s_decay = carry[:, :n], carry[:, n:], P[:, n:, :1]
            s_write = (-P[:, n, 1:] * step).unsqueeze(-1)
        else:
            write, b_carry, e_carry, s_decay = -project, None, None, None
            s_write = torch.cat([torch.zeros_like(eta[:, :-1]), -eta[:, -1:]], dim=-1)
            s_write = s_write.unsqueeze(-1)
        ctx.flags = flags
        ctx.save_for_backward(eta, A, P, mixed, gates[0] if ema else None)
        return (
            A[:, :n, :1],
            b_carry,
            write[:, :n],
            project[:, :n],
            A[:, n:, :1],
            e_carry,
            write[:, n:].mT,
            -project[:, n:].mT,
            s_decay,
            s_write,
        )

    @staticmethod
    @once_differentiable
    @backward_without_autocast
    def backward(ctx, *grads):
        has_mu, has_alpha, ema = ctx.flags
        eta, A, P, mixed, mu = ctx.saved_tensors
        g = WriteCoefficients(*grads)
        e = eta.unsqueeze(-2)
        d_mu = d_alpha = None
        if has_mu:
            # write = −C[:, 1:] s, C = A[:, 1:] P[1:]; s_decay = P[n, 0], s_write = −P[n, 1:] s,
            # s the gradient's step: η, or (1 − μ) η with ema
            step = (1 - mu) * eta if ema else eta
            d_write = torch.cat([g.b_write, g.e_write.mT], dim=1)  # [N, n+1, n]
            d_carry = torch.cat([g.b_carry, g.e_carry], dim=1)
            d_step = (d_write * mixed[..., 1:]).sum(-2).neg_()
            d_step -= g.s_write[..., 0] * P[:, -1, 1:]
            d_project = torch.cat([g.lower, -g.e_project.mT], dim=1)  # [N, n+1, n]
            # dA = [dG | dC P[1:]ᵀ + dproject ⊙ η] (rows 1..n): one product Y = A[1:, 1:]ᵀ
            # [dG | dC | dproject ⊙ η] gives dP's rows 1..n (the dC columns) and, with the row
            # before each r of [A[:, 0] | C | A[:, 1:]], dα (C's row 0 is zero):
            # (Aᵀ dA Aᵀ)[r, r−1] = Σ_c Y[r, c] [A[r−1, 0] | C[r−1] | A[r−1, 1:]]_c.
            d_ext = [d_carry[:, 1:], d_write[:, 1:] * -step.unsqueeze(-2)]
            d_ext += [d_project[:, 1:] * e] if has_alpha else []
            if has_alpha:
                d_decay = torch.cat([g.b_decay, g.e_decay], dim=1)  # [N, n+1, 1]
                d_ext.insert(0, d_decay[:, 1:])
            y = torch.bmm(A[:, 1:, 1:].mT, torch.cat(d_ext, dim=-1))  # [N, n, ·]
            n, first = eta.shape[-1], 1 if has_alpha else 0
            d_P = y[..., first : first + n + 1]  # rows 1..n of dP
            if has_alpha:
                prev = torch.cat([A[:, :-1, :1], mixed[:, :-1], A[:, :-1, 1:]], dim=-1)
                d_alpha = (y * prev).sum(-1)
            d_P[:, -1] += torch.cat([g.s_decay[:, 0], g.s_write[..., 0] * -step], dim=-1)
            d_mu = rows_backward(P, d_P)
            d_eta = d_step
            if ema:
                d_mu -= d_step * eta
                d_eta = d_step * (1 - mu)
        else:
            # write = −project, s_write = −η_n at s = n
            d_project = torch.cat([g.lower - g.b_write, -(g.e_project + g.e_write).mT], dim=1)
            d_eta = torch.zeros_like(eta)
            d_eta[:, -1] -= g.s_write[:, -1, 0]
            if has_alpha:
                d_decay = torch.cat([g.b_decay, g.e_decay], dim=1)  # [N, n+1, 1]
                d_A = torch.cat([d_decay, d_project * e], dim=-1)[:, 1:]
                d_alpha = rows_backward(A, d_A)
        d_eta += (d_project * A[..., 1:]).sum(-2)
        return None, d_eta, *[x for x, on in ((d_mu, has_mu), (d_alpha, has_alpha)) if on]
