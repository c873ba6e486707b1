"""Titans' compositions of attention and neural memory (Behrouz et al. 2024, §4): MAG and MAL.

Both pair a :class:`~nestlearn.layers.sliding_attention.SlidingWindowAttention` (short-term
memory, with persistent tokens) and a :class:`~nestlearn.layers.neural_memory.NeuralMemoryMixer`
(long-term memory trained in context by chunked GD) over the same ``[B, T, d]`` input ``x`` (the
block's pre-normed stream). Exact forms (``docs/titans-compositions.md``):

    MAG   o = W_o (RMSNorm(SWA(x)) ⊙ σ(RMSNorm(M(x))))          memory gates attention
    MAL   m = M(x);  o = m + SWA(RMSNorm(x + m))                 memory layer, then attention

``σ`` is the logistic sigmoid; each RMSNorm has its own learned gain (Titans' "normalize with
learnable vector-valued weights, then a non-linearity"). MAC, which interleaves the two per
segment, is in :mod:`nestlearn.layers.titans_mac`.

State: the parts' states under ``attn.*`` (ring buffer, position) and ``lmm.*`` (memory weights,
momentum, short-conv state); constant in the context length. Levels are reported by the parts.
"""

from __future__ import annotations

import torch
from torch import nn

from nestlearn.layers.neural_memory import NeuralMemoryMixer
from nestlearn.layers.norm import RMSNorm
from nestlearn.layers.sliding_attention import SlidingWindowAttention

State = dict[str, torch.Tensor]


def split_state(
    state: State | None, parts: tuple[str, ...], owner: str, own: tuple[str, ...] = ()
) -> dict:
    """``{"attn.k": ..., "lmm.pos": ...}`` -> ``{"attn": {"k": ...}, "lmm": {"pos": ...}}``,
    plus the ``own`` keys as they are; a key of no part (a state from another layer) is
    refused with the fix."""
    if state is None:
        return dict.fromkeys((*parts, *own))
    out: dict[str, State] = {part: {} for part in parts}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part in out and rest:
            out[part][rest] = value
        elif key in own:
            out[key] = value
        else:
            expected = ", ".join([f"'{p}.*'" for p in parts] + [f"'{k}'" for k in own])
            raise ValueError(
                f"{owner} state has an unexpected entry '{key}' (expected {expected}): a state "
                "from another model? Make one with model.init_state(batch_size)"
            )
    missing = [p for p in parts if not out[p]] + [k for k in own if k not in out]
    if missing:
        raise ValueError(
            f"{owner} state lacks its {', '.join(missing)} entries: a state from another model? "
            "Make one with model.init_state(batch_size)"
        )
    return out


def join_state(parts: dict[str, State]) -> State:
    """The inverse of :func:`split_state` for the parts."""
    return {f"{part}.{key}": value for part, sub in parts.items() for key, value in sub.items()}


class MemoryGate(nn.Module):
    """``W_o (RMSNorm(y) ⊙ σ(RMSNorm(m)))``: the long-term memory's read ``m`` gates ``y``."""

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.y_norm = RMSNorm(d_model, eps)
        self.m_norm = RMSNorm(d_model, eps)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.y_norm(y) * torch.sigmoid(self.m_norm(m)))


class _AttentionMemoryPair(nn.Module):
    """What MAG and MAL share: a sliding-window attention and a neural memory, their joined
    state (``attn.*``, ``lmm.*``), init and FLOPs."""

    def __init__(self, attn: SlidingWindowAttention, memory: NeuralMemoryMixer) -> None:
        super().__init__()
        self.attn, self.memory = attn, memory

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return join_state(
            {
                "attn": self.attn.init_state(batch_size, device, dtype),
                "lmm": self.memory.init_state(batch_size, device, dtype),
            }
        )

    def reset_memory_parameters(self) -> None:
        self.attn.reset_memory_parameters()
        self.memory.reset_memory_parameters()

    def flops_per_token(self, seq_len: int) -> float:
        return self.attn.flops_per_token(seq_len) + self.memory.flops_per_token(seq_len)


class MemoryAsGate(_AttentionMemoryPair):
    """MAG: attention and memory read the same input; the memory gates the attention output."""

    def __init__(
        self,
        attn: SlidingWindowAttention,
        memory: NeuralMemoryMixer,
        d_model: int,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(attn, memory)
        self.gate = MemoryGate(d_model, eps)

    def forward(
        self, x: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State | None]:
        parts = split_state(state, ("attn", "lmm"), "MAG")
        y, attn_state = self.attn(x, parts["attn"])
        m, memory_state = self.memory(x, parts["lmm"])
        o = self.gate(y, m)
        if state is None:
            return o, None
        return o, join_state({"attn": attn_state, "lmm": memory_state})

    def residual_outputs(self) -> list[nn.Linear]:
        """The projections writing into the residual stream (depth-scaled at init)."""
        return [self.gate.o_proj]


class MemoryAsLayer(_AttentionMemoryPair):
    """MAL: the memory as a residual layer, then sliding-window attention over its output."""

    def __init__(
        self,
        attn: SlidingWindowAttention,
        memory: NeuralMemoryMixer,
        d_model: int,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(attn, memory)
        self.attn_norm = RMSNorm(d_model, eps)

    def forward(
        self, x: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State | None]:
        parts = split_state(state, ("attn", "lmm"), "MAL")
        m, memory_state = self.memory(x, parts["lmm"])
        a, attn_state = self.attn(self.attn_norm(x + m), parts["attn"])
        if state is None:
            return m + a, None
        return m + a, join_state({"attn": attn_state, "lmm": memory_state})

    def residual_outputs(self) -> list[nn.Linear]:
        return [self.memory.heads.o_proj, self.attn.o_proj]
