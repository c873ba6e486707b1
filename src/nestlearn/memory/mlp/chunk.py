"""The MLP memory's chunk form over a whole call, as one autograd node (SPEC §2.3).

Only part of the chunk form is sequential: each segment's surprise is taken at the weights the
previous segment ends with, and its end-of-segment weights and momentum feed the next one. The
gate coefficients of every segment, and all the reads once the segment-start weights and the
surprises are known, are independent across segments. :class:`MLPChunks` therefore

* forward: computes the coefficients of all segments at once, runs the sequential loop
  (surprise, end of segment) and, after each block of consecutive segments, the block's reads
  (its segments folded into the batch: one ``bmm`` over ``segments × B × H`` per product);
* backward (hand-written, :mod:`nestlearn.memory.mlp.segment`): the reverse loop over segments
  (end of segment and surprise, carrying ``dW, dS`` back), entering each block with its reads'
  gradients (they need no gradient from later segments), then the gates' gradients at once.

Blocks rather than all segments at once: on a CPU a ``bmm`` over all segments (operands of a few
MiB) runs at about a third of the FLOP rate of one whose operands fit in a core's L2, and the
block's tensors are still in cache when its reads run right after its surprises. A block holds
as many segments as keep its largest per-token tensor within :data:`BLOCK_ELEMENTS` floats per
thread (one segment of 8 rows × 64 tokens × 128 wide in the default layer). Segments of equal
length share their coefficients (a state starting mid-chunk and ``T`` not a multiple of ``C``
give at most two shorter ones). The backward is exact but not differentiable itself
(``once_differentiable``); ``mlp._segment_autograd`` is the same forward left to autograd.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from nestlearn.memory.core.precision import backward_without_autocast
from nestlearn.memory.mlp.segment import (
    Grads,
    Weights,
    add_grads,
    coefficients,
    coefficients_backward,
    end_backward,
    end_coefficients,
    end_forward,
    has_manual_surprise_backward,
    reads_backward,
    reads_forward,
    surprise,
    surprise_backward,
    surprise_saving,
)


class Group(NamedTuple):
    """``count`` consecutive segments of ``size`` tokens from token ``start`` (segment
    ``first``)."""

    start: int
    size: int
    count: int
    first: int


def groups(sizes: list[int]) -> list[Group]:
    """Runs of equal segment lengths, in order."""
    out: list[Group] = []
    start = 0
    for j, size in enumerate(sizes):
        if out and out[-1].size == size:
            out[-1] = out[-1]._replace(count=out[-1].count + 1)
        else:
            out.append(Group(start, size, 1, j))
        start += size
    return out


def to_group(x: torch.Tensor, g: Group) -> torch.Tensor:
    """``[N, T, ...]`` -> the group's segments in the batch, segment-major: ``[count·N, size,
    ...]``."""
    N, rest = x.shape[0], x.shape[2:]
    part = x[:, g.start : g.start + g.size * g.count]
    if g.count == 1:
        return part
    part = part.reshape(N, g.count, g.size, *rest).transpose(0, 1)
    return part.reshape(g.count * N, g.size, *rest)


def from_group(x: torch.Tensor, g: Group, N: int) -> torch.Tensor:
    """Inverse of :func:`to_group`: ``[count·N, size, ...]`` -> ``[N, count·size, ...]``."""
    if g.count == 1:
        return x
    rest = x.shape[2:]
    x = x.reshape(g.count, N, g.size, *rest).transpose(0, 1)
    return x.reshape(N, g.count * g.size, *rest)


def _cat_time(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def chunk_forward(
    opts: Any,
    sizes: list[int],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor | None,
    alpha: torch.Tensor | None,
    w: Weights,
    s: Weights,
    wc: Weights,
    surprise_grad: str | None = None,
) -> tuple[torch.Tensor, Weights, Weights, Weights, dict[str, Any]]:
    """``o [N, T, Dv]``, the weights and momentum after the last token, the weights at the start
    of the last segment, and what the backward needs.

    ``N`` = batch × heads; ``q, k [N, T, Dk]``, ``v [N, T, Dv]``, gates ``[N, T]``, matrices
    ``[N, out, in]``; ``sizes`` the segment lengths (the first segment takes its gradients at
    ``wc``, every later one at its own start). ``surprise_grad``: None (no gradient through the
    surprise), ``"manual"`` or ``"graph"`` (autograd of the surprise, for other objectives).
    """
    N = q.shape[0]
    parts = groups(sizes)
    gates = [[None if x is None else to_group(x, g) for x in (eta, mu, alpha)] for g in parts]
    coefs = [coefficients(*gx) for gx in gates]
    segs: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    outputs = []
    w_cur, s_cur = list(w), list(s)
    for gi, g in enumerate(parts):
        ends = end_coefficients(coefs[gi], gates[gi][0])
        for block in split(g, block_segments(N, g.size, w, block_budget())):
            first = block.first - g.first  # the block's first segment within the group
            block_segs = []
            for jb in range(block.count):
                rows = slice((first + jb) * N, (first + jb + 1) * N)  # of the group
                span = slice(block.start + jb * g.size, block.start + (jb + 1) * g.size)
                at = wc if block.first + jb == 0 else w_cur
                end = {key: None if x is None else x[rows] for key, x in ends.items()}
                seg = _segment_forward(opts, surprise_grad, k[:, span], v[:, span], at, end)
                seg.update(w0=w_cur, s0=s_cur, group=gi, rows=rows, block=len(blocks))
                seg["block_rows"] = slice(jb * N, (jb + 1) * N)
                w_cur, s_cur, seg["scaled"] = end_forward(
                    w_cur, s_cur, seg["deltas"], seg["inputs"], end
                )
                segs.append(seg)
                block_segs.append(seg)
            # The block's reads, right after its surprises while their tensors are in cache.
            rows = slice(first * N, (first + block.count) * N)
            coef = {key: None if coefs[gi][key] is None else coefs[gi][key][rows] for key in _READ}
            # The first map's inputs are the keys themselves: no need to gather them.
            keys = to_group(k, block) if surprise_grad != "graph" else None
            stacked = _stack(block_segs, keys)
            o, saved = reads_forward(to_group(q, block), *stacked, coef, opts)
            outputs.append(from_group(o, block, N))
            blocks.append({"group": gi, "block": block, "rows": rows, "coef": coef})
            blocks[-1].update(stacked=stacked, saved=saved)
    saved_all = {"groups": parts, "gates": gates, "coefs": coefs, "segs": segs, "blocks": blocks}
    return _cat_time(outputs), w_cur, s_cur, segs[-1]["w0"], saved_all


def _segment_forward(
    opts: Any,
    surprise_grad: str | None,
    k: torch.Tensor,
    v: torch.Tensor,
    at: Weights,
    end: dict[str, torch.Tensor | None],
) -> dict[str, Any]:
    """One segment's surprise at the weights ``at``: its ``deltas`` and map ``inputs`` and what
    the backward needs of it (``graph`` of autograd's surprise or ``aux`` of the manual one)."""
    seg: dict[str, Any] = {"end": end, "at": at, "v": v}
    if surprise_grad == "graph":
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (k, v, *at)]
            graph = surprise(leaves[2:], leaves[0], leaves[1], opts)
        seg["graph"] = (leaves, *graph)
        seg["deltas"] = [d.detach() for d in graph[0]]
        seg["inputs"] = [u.detach() for u in graph[1]]
    else:
        seg["deltas"], seg["inputs"], seg["aux"] = surprise_saving(at, k, v, opts)
    return seg


# Reads are batched over blocks of consecutive segments whose largest per-token tensor holds at
# most this many floats per thread (256 KiB in float32: one segment of 8 rows × 64 tokens × 128
# wide): on a CPU a bmm whose operands fit in each core's L2 runs ~3x faster per FLOP than one
# over all segments at once.
BLOCK_ELEMENTS = 65536

# The coefficients the reads use (the end of a segment uses those of :func:`end_coefficients`).
_READ = ("decay", "carry", "write")


def block_budget() -> int:
    """Floats per block of reads: :data:`BLOCK_ELEMENTS` per intra-op thread."""
    return BLOCK_ELEMENTS * torch.get_num_threads()


def block_segments(rows: int, size: int, weights: Weights, target: int) -> int:
    """Segments per block of reads: as many as keep the block's largest per-token tensor
    (``rows × size × widest map``, float elements) within ``target`` (at least one)."""
    widest = max(max(W.shape[-2:]) for W in weights)
    return max(1, target // max(1, rows * size * widest))


def split(g: Group, count: int) -> list[Group]:
    """The group ``g`` in consecutive blocks of at most ``count`` segments."""
    return [
        Group(g.start + j * g.size, g.size, min(count, g.count - j), g.first + j)
        for j in range(0, g.count, count)
    ]


def _stack(segs: list[dict[str, Any]], keys: torch.Tensor | None) -> list[Weights]:
    """``w0, s0, deltas, inputs`` per map, the segments' tensors concatenated along the batch
    (segment-major); ``keys`` (the block's keys) stands for the first map's inputs if given."""
    out = []
    for name in ("w0", "s0", "deltas", "inputs"):
        per_map = []
        for i, parts in enumerate(zip(*(seg[name] for seg in segs), strict=True)):
            if name == "inputs" and i == 0 and keys is not None:
                per_map.append(keys)
            else:
                per_map.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        out.append(per_map)
    return out


def chunk_backward(
    opts: Any,
    saved: dict[str, Any],
    has_mu: bool,
    d_o: torch.Tensor | None,
    d_w_end: Grads,
    d_s_end: Grads,
    d_w_last: Grads,
) -> tuple[Any, ...]:
    """Gradients of :func:`chunk_forward` (module docstring): ``dq, dk, dv, dη, dμ, dα`` and per
    map ``dw, ds, dwc`` (None where zero or not wanted)."""
    parts, gates, coefs, segs = saved["groups"], saved["gates"], saved["coefs"], saved["segs"]
    blocks = saved["blocks"]
    N = segs[0]["w0"][0].shape[0]
    if d_o is not None:
        # Dense: ``o.sum().backward()`` hands an expanded (stride-0) gradient, whose slices would
        # send every bmm of the reads' backward down torch's per-matrix path.
        d_o = d_o.contiguous()
    depth = len(d_w_end)
    d_coefs = []
    for gi in range(len(parts)):
        eta_g = gates[gi][0]
        d_coefs.append(
            {
                "decay": torch.zeros_like(coefs[gi]["decay"]),
                "carry": None if not has_mu else torch.zeros_like(coefs[gi]["carry"]),
                "write": torch.zeros_like(coefs[gi]["write"]),
                "last": None if not has_mu else torch.zeros_like(eta_g),
                "m0": None if not has_mu else eta_g.new_zeros(eta_g.shape[0]),
                "eta": torch.zeros_like(eta_g),
            }
        )

    gw, gs = list(d_w_end), list(d_s_end)
    dq_parts: list[torch.Tensor | None] = [None] * len(blocks)
    dk_parts: list[torch.Tensor | None] = [None] * len(segs)
    dv_parts: list[torch.Tensor | None] = [None] * len(segs)
    reads: Any = None
    dwc: Grads = [None] * depth
    for j in reversed(range(len(segs))):
        seg = segs[j]
        gi, rows = seg["group"], seg["rows"]
        d_coef = d_coefs[gi]
        bi = seg["block"]
        if d_o is not None and (j == len(segs) - 1 or segs[j + 1]["block"] != bi):
            # Entering a block (from its end): its reads' gradients first. They need no
            # gradient from later segments; the ends of its segments add to them in place.
            blk = blocks[bi]
            dq, *reads, d_read = reads_backward(
                to_group(d_o, blk["block"]), *blk["stacked"], blk["coef"], blk["saved"], opts
            )
            dq_parts[bi] = from_group(dq, blk["block"], N)
            for key, x in d_read.items():
                if x is not None:
                    d_coef[key][blk["rows"]] += x
        into = None
        if reads is not None:
            # This segment's rows of the block's gradients, owned here: accumulated in place.
            into = tuple([None if x is None else x[seg["block_rows"]] for x in g] for g in reads)
        dw, ds, d_deltas, d_inputs, d_end = end_backward(
            seg["w0"], seg["s0"], seg["deltas"], seg["inputs"], seg["end"], seg["scaled"], gw, gs,
            into,
        )  # fmt: skip
        for key, x in d_end.items():
            if x is None:
                continue
            target = d_coef[key]
            # decay, carry, eta [M, n] and write [M, n, n] get the last token's row; m0, last all.
            if key in ("decay", "carry", "eta", "write"):
                target[rows, -1] += x
            else:
                target[rows] += x
        d_at: Grads = [None] * depth
        if "graph" in seg:
            dk, dv, d_at = _graph_backward(seg["graph"], d_deltas, d_inputs)
            dk_parts[j], dv_parts[j] = dk, dv
        elif "aux" in seg and saved.get("surprise_grad"):
            dk_parts[j], dv_parts[j], d_at = surprise_backward(
                seg["at"], seg["v"], seg["deltas"], seg["inputs"], seg["aux"], d_deltas,
                d_inputs, opts,
            )  # fmt: skip
        if j == len(segs) - 1:
            dw = [_add(a, b) for a, b in zip(dw, d_w_last, strict=True)]
        if j == 0:
            dwc = d_at
        else:
            dw = [_add(a, b) for a, b in zip(dw, d_at, strict=True)]
        gw, gs = dw, (ds if has_mu else [None] * depth)

    deta_parts, dmu_parts, dalpha_parts = [], [], []
    for gi, g in enumerate(parts):
        deta, dmu, dalpha = coefficients_backward(coefs[gi], gates[gi][0], d_coefs[gi])
        deta_parts.append(from_group(deta.unsqueeze(-1), g, N).squeeze(-1))
        dalpha_parts.append(from_group(dalpha.unsqueeze(-1), g, N).squeeze(-1))
        if dmu is not None:
            dmu_parts.append(from_group(dmu.unsqueeze(-1), g, N).squeeze(-1))
    dq = None if d_o is None else _cat_time(dq_parts)
    dk = _cat_segments(dk_parts, segs, 1)
    dv = _cat_segments(dv_parts, segs, 2)
    return (
        dq,
        dk,
        dv,
        _cat_time(deta_parts),
        _cat_time(dmu_parts) if dmu_parts else None,
        _cat_time(dalpha_parts),
        gw,
        gs,
        dwc,
    )


def _add(total: torch.Tensor | None, x: torch.Tensor | None) -> torch.Tensor | None:
    """``total + x`` in place into ``total`` (a gradient buffer owned by the backward)."""
    if total is None:
        return x
    return total if x is None else total.add_(x)


def _cat_segments(
    parts: list[torch.Tensor | None], segs: list[dict[str, Any]], index: int
) -> torch.Tensor | None:
    """Per-segment gradients ``[N, n, D]`` (None: zero) joined along time, or None if all are;
    ``index`` 1 for keys (shaped as the segment's first map input), 2 for values."""
    if all(x is None for x in parts):
        return None
    full = []
    for x, seg in zip(parts, segs, strict=True):
        if x is None:
            x = torch.zeros_like(seg["inputs"][0] if index == 1 else seg["v"])
        full.append(x)
    return _cat_time(full)


def _graph_backward(
    graph: tuple, d_deltas: Grads, d_inputs: Grads
) -> tuple[torch.Tensor | None, torch.Tensor | None, Grads]:
    """``dk, dv, dW_c`` by autograd of a surprise recorded in the forward (other objectives)."""
    leaves, deltas, inputs = graph
    pairs = [
        (x, g)
        for x, g in zip([*deltas, *inputs[1:]], [*d_deltas, *d_inputs[1:]], strict=True)
        if g is not None
    ]
    got: Grads = [None] * len(leaves)
    if pairs:
        outs, outs_grad = zip(*pairs, strict=True)
        # retain_graph: a backward with retain_graph=True may run this node again.
        got = list(
            torch.autograd.grad(outs, leaves, outs_grad, allow_unused=True, retain_graph=True)
        )
    return add_grads(got[0], d_inputs[0]), got[1], got[2:]


class MLPChunks(torch.autograd.Function):
    """``(q, k, v, η, μ, α, w…, s…, wc…) -> (o, w_end…, s_end…[, w_last…])`` for a whole call:
    :func:`chunk_forward` with :func:`chunk_backward` as its backward. ``w_last`` (the weights at
    the start of the last segment) is returned when ``with_last`` is set."""

    @staticmethod
    def forward(
        ctx: Any, opts: Any, sizes: tuple[int, ...], with_last: bool, *args: Any
    ) -> tuple[torch.Tensor, ...]:
        q, k, v, eta, mu, alpha, *mats = args
        depth = len(mats) // 3
        w, s, wc = mats[:depth], mats[depth : 2 * depth], mats[2 * depth :]
        ctx.set_materialize_grads(False)
        needs = ctx.needs_input_grad[3:]
        wants = not opts.detach_inner and (needs[1] or needs[2] or any(needs[6 + 2 * depth :]))
        mode = None
        if wants:
            mode = "manual" if has_manual_surprise_backward(opts) else "graph"
        o, w_end, s_end, w_last, saved = chunk_forward(
            opts, list(sizes), q, k, v, eta, mu, alpha, list(w), list(s), list(wc), mode
        )
        saved["surprise_grad"] = mode
        ctx.opts, ctx.saved, ctx.depth, ctx.with_last = opts, saved, depth, with_last
        ctx.has_mu, ctx.has_alpha = mu is not None, alpha is not None
        last = [x.clone() for x in w_last] if with_last else []
        return (o, *w_end, *s_end, *last)

    @staticmethod
    @once_differentiable
    @backward_without_autocast
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        depth = ctx.depth
        d_o, rest = grads[0], list(grads[1:])
        d_w_end, d_s_end = rest[:depth], rest[depth : 2 * depth]
        d_w_last = rest[2 * depth :] if ctx.with_last else [None] * depth
        dq, dk, dv, deta, dmu, dalpha, dw, ds, dwc = chunk_backward(
            ctx.opts, ctx.saved, ctx.has_mu, d_o, d_w_end, d_s_end, d_w_last
        )
        if not ctx.has_alpha:
            dalpha = None
        if not ctx.has_mu:
            ds = [None] * depth
        return (None, None, None, dq, dk, dv, deta, dmu, dalpha, *dw, *ds, *dwc)
