"""Titans' Memory as a Context (MAC, Behrouz et al. 2024, §4.1) as a ``[B, T, d]`` mixer.

The sequence is cut into segments of ``C`` tokens, ``C`` = the memory's chunk size, aligned to
absolute positions (segment ``n`` = positions ``nC .. nC+C−1``). For each segment ``S`` with
the memory ``M`` as it was before the segment (weights ``W_c``, the chunk-start weights of
:mod:`nestlearn.memory.mlp`):

    h_t = M_{W_c}(q_t),    q_t = normalize(x_t W_Q)              retrieve (no write)
    y   = Attn([P; h; S])                                         causal: t sees P, h_{≤t}, S_{≤t}
    m_t = M_t(y_t)         M written with y, chunk = segment       read after write (dual form)
    o_t = W_o (RMSNorm(y_t) ⊙ σ(RMSNorm(m_t)))

``P`` are the persistent tokens (always visible). Causality forces the mask on ``h``: ``h_s``
is computed from ``x_s``, so a query sees only ``h_s`` for ``s ≤ t`` of its segment. The write
and the read ``m`` are :class:`~nestlearn.layers.neural_memory.NeuralMemoryMixer` applied to
``y`` (projections, short convs, gates, chunked GD with all gradients at ``W_c``, per-token
reads); the retrieval ``h`` reuses its read-out (``RMSNorm ⊙ silu gate, o_proj``).

Segments depend on each other through the memory, so the forward is a loop over segments
(``⌈T/C⌉`` steps), each parallel inside. Decoding state (constant in the context length):
``cache.{k,v}`` and ``cache.{k_mem,v_mem}`` ``[B, H, C, D]`` (the current segment's rotated
keys/values of ``S`` and ``h``, slot = offset in the segment), ``pos`` and the memory's
``lmm.*``. A call may start and end anywhere inside a segment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from nestlearn.layers.neural_memory import NeuralMemoryMixer
from nestlearn.layers.sliding_attention import AttentionCore
from nestlearn.layers.titans import MemoryGate, join_state, split_state
from nestlearn.levels import Level

State = dict[str, torch.Tensor]
CACHE = ("k", "v", "k_mem", "v_mem")


def memory_read(weights: list[torch.Tensor], q: torch.Tensor, residual: bool) -> torch.Tensor:
    """``M_W(q)`` without a write: ``q [B, H, n, Dk]``, ``weights`` ``[B, H, out, in]`` (a
    state's ``wc.{i}``), SiLU between maps as in :class:`NeuralMemoryMixer`."""
    # In the state's dtype (float32 under autocast or with 16-bit parameters), back to q's.
    dtype = torch.promote_types(q.dtype, weights[0].dtype)
    h = q.to(dtype)
    for i, weight in enumerate(weights):
        h = h @ weight.to(dtype).mT  # [B, H, n, out]
        if i < len(weights) - 1:
            h = F.silu(h)
    return (h + q if residual else h).to(q.dtype)


class SegmentAttention(AttentionCore):
    """Attention over ``[persistent; h; segment]``, causal inside the current segment."""

    def __init__(
        self, d_model: int, n_heads: int, head_dim: int, *, segment: int, n_persistent: int
    ) -> None:
        super().__init__(d_model, n_heads, head_dim, n_persistent=n_persistent)
        self.segment = segment

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        start: int,
        offset: int,
        cache: State | None,
    ) -> tuple[torch.Tensor, State | None]:
        """``x, h [B, n, d]``: tokens and their retrieved memories at positions
        ``start .. start+n−1``, offsets ``offset .. offset+n−1`` of one segment; ``cache`` holds
        the segment's first ``offset`` keys/values. Returns ``y [B, n, d]`` and the cache."""
        n = x.shape[1]
        q_rot, q, k, v = self.project(x, start)
        _, _, k_mem, v_mem = self.project(h, start, queries=False)
        new = {"k": k, "v": v, "k_mem": k_mem, "v_mem": v_mem}
        seen = new
        if offset:
            seen = {
                name: torch.cat([cache[name][:, :, :offset].to(t), t], 2) for name, t in new.items()
            }
        # Offset i of the segment sees offsets ≤ i, among h and among the segment alike.
        offsets = torch.arange(offset + n, device=x.device)
        causal = offsets[None, :] <= offsets[offset:, None]  # [n, offset + n]
        mask = torch.cat([causal, causal], dim=-1)
        keys = torch.cat([seen["k_mem"], seen["k"]], dim=2)
        values = torch.cat([seen["v_mem"], seen["v"]], dim=2)
        y = self.merge(self.attend(q_rot, q, keys, values, mask))
        if cache is None:
            return y, None
        # Fixed shape [B, H, C, D]: slots past offset + n keep stale entries, never read.
        # The cache keeps its own dtype (under autocast k, v may be bf16).
        return y, {
            name: torch.cat([seen[name].to(cache[name]), cache[name][:, :, offset + n :]], 2)
            for name in new
        }

    def inner_levels(self) -> list[Level]:
        persistent = f"{self.n_persistent} persistent + " if self.n_persistent else ""
        return [
            Level(
                "",
                f"{self.n_heads} x segment KV cache [{persistent}retrieved h + tokens], "
                f"segment {self.segment} (non-parametric)",
                "Σ_i softmax(qᵀk_i)·‖v_i − m‖²",
                "closed form (softmax-weighted mean), cleared every segment",
                1,
            )
        ]


class MemoryAsContext(nn.Module):
    """MAC: per segment, retrieve from the memory, attend over it, write the attention output."""

    def __init__(
        self,
        memory: NeuralMemoryMixer,
        d_model: int,
        n_heads: int,
        head_dim: int,
        *,
        n_persistent: int = 0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.memory = memory
        self.segment = memory.chunk_size
        self.attn = SegmentAttention(
            d_model, n_heads, head_dim, segment=self.segment, n_persistent=n_persistent
        )
        heads = memory.heads
        self.retrieve_q = nn.Linear(d_model, heads.n_heads * heads.dk, bias=False)
        self.gate = MemoryGate(d_model, eps)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        a = self.attn
        shape = (batch_size, a.n_heads, self.segment, a.head_dim)
        cache = {name: torch.zeros(shape, device=device, dtype=dtype) for name in CACHE}
        state = join_state(
            {"cache": cache, "lmm": self.memory.init_state(batch_size, device, dtype)}
        )
        state["pos"] = torch.zeros((), dtype=torch.long, device=device)
        return state

    def forward(
        self, x: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State | None]:
        if x.ndim != 3 or x.shape[1] < 1:
            raise ValueError(f"MAC input must be [B, T >= 1, d], got {tuple(x.shape)}")
        parts = split_state(state, ("cache", "lmm"), "MAC", own=("pos",))
        B, T = x.shape[:2]
        C = self.segment
        pos = 0 if state is None else int(parts["pos"])
        cache = parts["cache"]
        if cache is not None:
            self._check_cache(cache, B)
        # Training carries the memory across segments too; only the caller's state is optional.
        memory = parts["lmm"] or self.memory.init_state(B, x.device, x.dtype)
        outputs = []
        start = 0
        while start < T:
            offset = (pos + start) % C
            n = min(C - offset, T - start)
            seg = x[:, start : start + n]
            h = self._retrieve(seg, memory)
            y, cache = self.attn(seg, h, pos + start, offset, cache)
            m, memory = self.memory(y, memory)
            outputs.append(self.gate(y, m))
            start += n
        o = torch.cat(outputs, dim=1)
        if state is None:
            return o, None
        new_state = join_state({"cache": cache, "lmm": memory})
        new_state["pos"] = parts["pos"] + T
        return o, new_state

    def _retrieve(self, x: torch.Tensor, memory: State) -> torch.Tensor:
        """``h = M_{W_c}(normalize(x W_Q))`` through the memory's read-out: ``[B, n, d]``."""
        heads = self.memory.heads
        q = F.normalize(
            rearrange(self.retrieve_q(x), "b t (h d) -> b h t d", h=heads.n_heads), dim=-1
        )
        depth = len(self.memory.memory_weights)
        weights = [memory[f"memory.wc.{i}"] for i in range(depth)]
        return heads.output(memory_read(weights, q, self.memory.residual), x)

    def _check_cache(self, cache: State, batch: int) -> None:
        shape = [batch, self.attn.n_heads, self.segment, self.attn.head_dim]
        for name in CACHE:
            got = cache.get(name)
            if got is None or list(got.shape) != shape:
                described = "missing" if got is None else f"shape {list(got.shape)}"
                raise ValueError(
                    f"MAC state['cache.{name}'] must be [B, H, segment, D] = {shape}, got "
                    f"{described}: a state from another model or batch size? Make one with "
                    "model.init_state(batch_size)"
                )

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.gate.o_proj]

    def reset_memory_parameters(self) -> None:
        self.attn.reset_memory_parameters()
        self.memory.reset_memory_parameters()

    def flops_per_token(self, seq_len: int) -> float:
        """Attention scores (offset ``i`` of a segment sees ``2(i+1)`` keys), the retrieval read,
        the second use of the k/v projections (on ``h``) and of the memory read-out, and the
        memory itself. Projections applied once per token are counted by the model."""
        L, C = max(seq_len, 1), self.segment
        keys = sum(2 * (t % C + 1) for t in range(min(L, C))) / min(L, C)
        heads = self.memory.heads
        read = 2 * heads.n_heads * sum(w[0].numel() for w in self.memory.memory_weights)
        kv = self.attn.qkv.weight.numel() * 2 // 3
        again = 2 * (kv + heads.g_proj.weight.numel() + heads.o_proj.weight.numel())
        return self.attn.score_flops(keys) + read + again + self.memory.flops_per_token(seq_len)
