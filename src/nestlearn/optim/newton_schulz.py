"""Output nonlinearities ``σ`` of NL-24, Newton–Schulz first, and Muon's lr adjustment by shape.

``σ`` maps the momentum's read-out (a matrix) to the applied update. Newton–Schulz approximates the
orthogonal factor ``U Vᵀ`` of ``X = U S Vᵀ`` by iterating the odd quintic
``X ← a X + b (X Xᵀ) X + c (X Xᵀ)² X`` after scaling ``X`` to Frobenius norm 1 (so every singular
value is ≤ 1). With Keller Jordan's coefficients ``(3.4445, −4.7750, 2.0315)`` five steps push
every singular value into roughly ``[0.7, 1.2]``: the slope at 0 is maximal, convergence to
exactly 1 is traded for speed, which does not hurt training (Muon). The arithmetic here is
``torch.optim.Muon``'s (same operations in the same dtype, bfloat16 by default), so the two agree
to the bit for the same input.

Newton–Schulz as inner GD (arXiv Eqs 43–44, an option): one GD step of size ``γ`` on
``¼‖X Xᵀ − I‖²_F`` is ``X ← X − γ (X Xᵀ − I) X``, i.e. the iteration above with coefficients
``(1 + γ, −γ, 0)``; ``γ = ½`` is the classical cubic Newton–Schulz (:func:`ns_gd_coefficients`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def newton_schulz(
    x: torch.Tensor,
    *,
    steps: int = 5,
    coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: str = "bfloat16",
) -> torch.Tensor:
    """``NS(X) ≈ U Vᵀ`` for a matrix ``x [n, d]``, computed in ``dtype`` and returned in it.

    ``dtype``: ``"bfloat16"`` (Muon's), ``"float32"``, ``"float64"`` or ``"input"`` (keep x's).
    Odd: ``NS(−X) = −NS(X)`` exactly; scale-free up to ``eps``: ``NS(cX) ≈ NS(X)`` for ``c > 0``.

    A DTensor ``x`` (FSDP2 shards, docs/distributed.md) is orthogonalised *globally*: the whole
    matrix is gathered (``full_tensor()``), every rank iterates on it and keeps its own shard of
    the result, which is therefore the single-process ``NS(X)`` exactly (one all-gather per call).
    """
    if x.ndim != 2:
        raise ValueError(f"newton_schulz: expected a matrix [n, d], got shape {list(x.shape)}")
    if is_dtensor(x):
        # A shard's orthogonal factor is not a piece of the matrix's: gather, iterate, re-shard.
        full = newton_schulz(
            x.full_tensor(), steps=steps, coefficients=coefficients, eps=eps, dtype=dtype
        )
        return shard_like(full, x)
    if dtype != "input" and dtype not in DTYPES:
        raise ValueError(f"newton_schulz: dtype={dtype!r}; choose one of {[*DTYPES, 'input']}")
    a, b, c = coefficients
    y = x if dtype == "input" else x.to(DTYPES[dtype])
    tall = x.size(0) > x.size(1)
    if tall:
        # Iterate on the wide side: the Gram matrix X Xᵀ is then the smaller one.
        y = y.T
    y = y / y.norm().clamp(min=eps)
    for _ in range(steps):
        gram = y @ y.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.addmm(y, poly, y, beta=a)
    return y.T if tall else y


def is_dtensor(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter shard)."""
    return type(x) is not torch.Tensor and hasattr(x, "device_mesh") and hasattr(x, "placements")


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor ``full`` (the same on every rank) laid out as the DTensor ``like``:
    each rank keeps its own shard of it (no communication: Replicate -> Shard is a local slice).
    ``full`` keeps its dtype."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    whole = DTensor.from_local(
        full.to(like.device), mesh, [Replicate()] * mesh.ndim, run_check=False
    )
    return whole.redistribute(mesh, like.placements)


def ns_gd_coefficients(gamma: float) -> tuple[float, float, float]:
    """Coefficients that make :func:`newton_schulz` GD of size γ on ``¼‖X Xᵀ − I‖²_F``."""
    return (1.0 + gamma, -gamma, 0.0)


def adjust_lr(lr: float, shape: tuple[int, int], rule: str | None) -> float:
    """Muon's per-shape learning rate for a matrix ``[A, B]`` (``torch.optim.Muon``'s options).

    ``None``/``"original"``: ``lr·√max(1, A/B)`` (Keller Jordan); ``"match_rms_adamw"``:
    ``0.2·lr·√max(A, B)`` (Moonshot: reuse AdamW's lr); ``"spectral_unclamped"``: ``lr·√(A/B)``;
    ``"none"``: ``lr``.
    """
    rows, cols = shape
    if rule is None or rule == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if rule == "spectral_unclamped":
        return lr * math.sqrt(rows / cols)
    if rule == "none":
        return lr
    raise ValueError(
        f"adjust_lr_fn={rule!r}; choose None, 'original', 'match_rms_adamw', "
        "'spectral_unclamped' or 'none'"
    )


ADJUST_RULES = (None, "original", "match_rms_adamw", "spectral_unclamped", "none")


def sign(x: torch.Tensor, **_: object) -> torch.Tensor:
    """``σ = sign``: signSGD-style output (elementwise)."""
    return torch.sign(x)


def identity(x: torch.Tensor, **_: object) -> torch.Tensor:
    """``σ = id``: NL-24 reduces to linear momentum."""
    return x


SIGMAS: dict[str, Callable[..., torch.Tensor]] = {
    "newton_schulz": newton_schulz,
    "sign": sign,
    "identity": identity,
}
