"""The layout of a memory bank (:mod:`nestlearn.memory.dgd.bank`): which memories, in which
order, with which widths, and the packing of their weights into the bank's two maps.

Layout: ``F [N, R, D]`` with ``R = M·h + Σ_{linear m} out_m`` (the hidden blocks in memory
order, then the skips), ``G [M·N, O, h]`` memory-major, ``O = max out_m``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Layout(NamedTuple):
    """Which memories, in which order, with which widths."""

    names: tuple[str, ...]
    hidden: int  # h, the hidden width of every memory
    outs: tuple[int, ...]  # output width per memory
    linear: tuple[bool, ...]  # linear skip (else the identity, out = D)

    @property
    def out(self) -> int:
        return max(self.outs)


def layout(memories: Mapping[str, Sequence[torch.Tensor]], names: Sequence[str]) -> Layout:
    """The layout of ``memories[name] = [W_0 [.., h, D], W_1 [.., out, h], (W_s [.., out, D])]``;
    all hidden widths equal."""
    hidden = {memories[n][0].shape[-2] for n in names}
    if len(hidden) != 1:
        raise ValueError(f"a memory bank needs one hidden width, got {sorted(hidden)} for {names}")
    return Layout(
        tuple(names),
        hidden.pop(),
        tuple(memories[n][1].shape[-2] for n in names),
        tuple(len(memories[n]) == 3 for n in names),
    )


def pack(lay: Layout, weights: Mapping[str, Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-memory tensors ``[N, out, in]`` -> the bank's ``[F, G]``."""
    first = [weights[n][0] for n in lay.names]
    first += [weights[n][2] for n, lin in zip(lay.names, lay.linear, strict=True) if lin]
    second = [
        F.pad(weights[n][1], (0, 0, 0, lay.out - o))
        for n, o in zip(lay.names, lay.outs, strict=True)
    ]
    return [torch.cat(first, dim=-2), torch.cat(second, dim=0)]


def unpack(lay: Layout, bank: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The inverse of :func:`pack`."""
    first, second = bank
    M, h = len(lay.names), lay.hidden
    skips = [o for o, lin in zip(lay.outs, lay.linear, strict=True) if lin]
    blocks = first.split([h] * M + skips, dim=-2)
    out, skip_blocks = {}, iter(blocks[M:])
    for m, (name, o, lin) in enumerate(zip(lay.names, lay.outs, lay.linear, strict=True)):
        maps = [blocks[m], second.chunk(M)[m][..., :o, :]]
        out[name] = maps + ([next(skip_blocks)] if lin else [])
    return out
