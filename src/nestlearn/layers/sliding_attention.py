"""Sliding-window causal attention with persistent memory tokens (Titans §4, SPEC §2.2 last row).

Query ``t`` attends over the ``window`` most recent tokens ``t − window < s ≤ t`` plus ``P``
persistent tokens: learned, input-independent key/value pairs per head that every query sees and
that are never evicted (Titans' persistent memory). Per head, with ``D`` the head width,

    o_t = Σ_{j∈P ∪ (t−window, t]} softmax_j(s_{tj}) v_j,   s_{ts} = ⟨R_t q_t, R_s k_s⟩ / √D,
                                                          s_{tp} = ⟨q_t, k_p⟩ / √D

``R_p`` is RoPE at the *absolute* position ``p``, so ``s_{ts}`` depends on ``t − s`` only.
Persistent keys have no position; they sit at the query's own position (relative offset 0), so
their scores are unrotated and also translation invariant. Both score kinds go through one
``scaled_dot_product_attention`` call by widening the head: ``q̂ = [R_t q_t ; q_t]``,
``k̂_s = [R_s k_s ; 0]``, ``k̂_p = [0 ; k_p]``, so ``⟨q̂, k̂⟩`` is the right score for each.

Forms: the training/prefill form splits the queries into blocks of ``Bq = min(window, T)``; block
``b`` attends over the ``window + Bq`` keys before and inside it with an explicit boolean mask
(``O(T·window)``, never ``O(T²)``). Decoding keeps a ring buffer of the last ``window`` rotated
keys and values (slot ``s mod window`` holds position ``s``) and a position counter: a fixed-size
state, whatever the context length. Any ``T`` continues from a state with the same code, so a
prefill followed by one-token steps equals the full forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from nestlearn.layers.rope import apply_rope
from nestlearn.levels import Level

State = dict[str, torch.Tensor]


def rope_at(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ``cos, sin [T, head_dim]`` for arbitrary absolute ``positions [T]`` (int64).

    The same numbers as the rows ``positions`` of :func:`nestlearn.layers.rope.rope_tables`
    (angles in float64, rounded once), without a table from position 0: a stream can be
    arbitrarily long.
    """
    half = head_dim // 2
    inv_freq = theta ** (
        -torch.arange(half, dtype=torch.float64, device=positions.device) * 2 / head_dim
    )
    angles = torch.outer(positions.to(torch.float64), inv_freq)  # [T, half]
    rest = head_dim - 2 * half
    ones = angles.new_ones(len(positions), rest)
    cos = torch.cat([angles.cos(), angles.cos(), ones], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin(), ones - 1], dim=-1)
    dtype = dtype or torch.get_default_dtype()
    return cos.to(dtype), sin.to(dtype)


class AttentionCore(nn.Module):
    """Projections of a multi-head attention with persistent tokens: ``x -> (q, k, v)`` rotated
    at absolute positions, scores with the persistent keys, and ``o -> y`` back to ``d_model``.

    The building block of :class:`SlidingWindowAttention` and of Titans' MAC segment attention;
    it decides no mask (callers pass one) and holds no state.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int = 0,
        *,
        n_persistent: int = 0,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        head_dim = head_dim or (d_model // n_heads if n_heads > 0 else 0)
        if min(d_model, n_heads, head_dim) < 1:
            raise ValueError(
                f"d_model={d_model}, n_heads={n_heads}, head_dim={head_dim} must be >= 1 "
                "(head_dim=0 takes d_model / n_heads)"
            )
        if n_persistent < 0:
            raise ValueError(f"n_persistent must be >= 0 (0 = none), got {n_persistent}")
        self.n_heads, self.head_dim, self.n_persistent = n_heads, head_dim, n_persistent
        self.rope_theta = rope_theta
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.persistent_k = nn.Parameter(torch.empty(n_heads, n_persistent, head_dim))
        self.persistent_v = nn.Parameter(torch.empty(n_heads, n_persistent, head_dim))
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Persistent keys ~ N(0, 1) (unit-scale like a normalized query's partner), values
        ~ N(0, 1/D); the projections follow the model's initialization."""
        nn.init.normal_(self.persistent_k)
        nn.init.normal_(self.persistent_v, std=1.0 / math.sqrt(self.head_dim))

    def project(
        self, x: torch.Tensor, start: int, queries: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``x [B, T, d]`` at positions ``start .. start+T-1`` -> ``q_rot, q, k_rot, v``, each
        ``[B, H, T, D]`` (``q_rot, q`` are None when ``queries=False``)."""
        if x.ndim != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(
                f"attention input must be [B, T, {self.qkv.in_features}], got {tuple(x.shape)}"
            )
        H, D = self.n_heads, self.head_dim
        weight = self.qkv.weight if queries else self.qkv.weight[H * D :]
        parts = rearrange(F.linear(x, weight), "b t (n h d) -> n b h t d", h=H, d=D)
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        cos, sin = rope_at(positions, D, self.rope_theta, x.dtype)
        k, v = apply_rope(parts[-2], cos, sin), parts[-1]
        if not queries:
            return None, None, k, v
        return apply_rope(parts[0], cos, sin), parts[0], k, v

    def attend(
        self,
        q_rot: torch.Tensor,
        q: torch.Tensor,
        k_rot: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Softmax attention over the persistent tokens and ``k_rot, v [N, H, S, D]`` for
        ``q_rot, q [N, H, Tq, D]``; ``mask [..., Tq, S]`` (True = visible) covers the ``S``
        keys only, the persistent ones are always visible. Returns ``[N, H, Tq, D]``."""
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.n_persistent == 0:
            return F.scaled_dot_product_attention(q_rot, k_rot, v, attn_mask=mask, scale=scale)
        N, H, P = q.shape[0], self.n_heads, self.n_persistent
        pk = self.persistent_k.to(q.dtype).expand(N, H, P, self.head_dim)
        pv = self.persistent_v.to(q.dtype).expand(N, H, P, self.head_dim)
        # Widened heads: [R q; q]·[R k; 0] is the rotated score, [R q; q]·[0; k_p] the
        # unrotated persistent one (module docstring).
        queries = torch.cat([q_rot, q], dim=-1)  # [N, H, Tq, 2D]
        keys = torch.cat(
            [
                torch.cat([torch.zeros_like(pk), pk], dim=-1),
                torch.cat([k_rot, torch.zeros_like(k_rot)], dim=-1),
            ],
            dim=-2,
        )  # [N, H, P + S, 2D]
        values = torch.cat([pv, v], dim=-2)  # [N, H, P + S, D]
        always = mask.new_ones(*mask.shape[:-1], P)
        mask = torch.cat([always, mask], dim=-1)  # [..., Tq, P + S]
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """``o [B, H, T, D]`` -> ``[B, T, d_model]`` through the output projection."""
        return self.o_proj(rearrange(o, "b h t d -> b t (h d)"))

    def score_flops(self, keys_per_query: float) -> float:
        """Forward FLOPs of ``softmax(q kᵀ) v`` per query, all heads (projections excluded)."""
        return 4.0 * self.n_heads * self.head_dim * (keys_per_query + self.n_persistent)


class SlidingWindowAttention(AttentionCore):
    """Causal multi-head sliding-window attention with persistent tokens: ``[B, T, d]`` mixer.

    State (decoding): ``k, v [B, H, window, D]`` (a ring buffer of rotated keys and values,
    position ``s`` in slot ``s mod window``) and ``pos []`` int64 (tokens seen).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int = 0,
        *,
        window: int,
        n_persistent: int = 0,
        rope_theta: float = 10000.0,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (tokens each query sees), got {window!r}")
        super().__init__(
            d_model, n_heads, head_dim, n_persistent=n_persistent, rope_theta=rope_theta
        )
        self.window = window

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        shape = (batch_size, self.n_heads, self.window, self.head_dim)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "pos": torch.zeros((), dtype=torch.long, device=device),
        }

    def forward(
        self, x: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State | None]:
        """``x [B, T, d]`` -> ``y [B, T, d]``; with a state, continue from it and return the
        new one."""
        if x.ndim != 3 or x.shape[1] < 1:
            raise ValueError(f"attention input must be [B, T >= 1, d], got {tuple(x.shape)}")
        B, T = x.shape[:2]
        if state is not None:
            self._check_state(state, B)
        W = self.window
        pos = 0 if state is None else int(state["pos"])
        q_rot, q, k, v = self.project(x, pos)
        ring_k = ring_v = None  # no state: an empty ring
        if state is not None:
            ring_k, ring_v = state["k"].to(k.dtype), state["v"].to(v.dtype)
        # Position held by each slot: the latest s < pos with s ≡ slot (mod W); < 0 = empty.
        slots = torch.arange(W, device=x.device)
        ring_pos = pos - 1 - torch.remainder(pos - 1 - slots, W)
        o = self._blocked(q_rot, q, ring_k, ring_v, ring_pos, k, v, pos)
        y = self.merge(o)
        if state is None:
            return y, None
        # The last min(T, W) new tokens overwrite their slots; older new ones are out of reach.
        n = min(T, W)
        where = torch.remainder(torch.arange(pos + T - n, pos + T, device=x.device), W)
        # The state keeps its own dtype (under autocast k, v may be bf16).
        new_k = state["k"].index_copy(2, where, k[:, :, T - n :].to(state["k"].dtype))
        new_v = state["v"].index_copy(2, where, v[:, :, T - n :].to(state["v"].dtype))
        return y, {"k": new_k, "v": new_v, "pos": state["pos"] + T}

    def _blocked(
        self,
        q_rot: torch.Tensor,
        q: torch.Tensor,
        ring_k: torch.Tensor | None,
        ring_v: torch.Tensor | None,
        ring_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: int,
    ) -> torch.Tensor:
        """Block ``b`` of ``Bq`` queries attends over keys ``[b·Bq, b·Bq + W + Bq)`` of the
        extended sequence ``[ring (W); new (T, padded)]``: every key a query of the block can
        see (the ring is only in block 0, whose keys cover it all, so its slot order is free).
        ``ring_k = ring_v = None``: an empty ring (no state). One block (``T ≤ W``) attends
        over its keys directly, without the empty ring's ``W`` masked keys."""
        B, T = q.shape[0], q.shape[2]
        W = self.window
        Bq = min(W, T)
        nb = -(-T // Bq)
        if nb == 1:
            return self._one_block(q_rot, q, ring_k, ring_v, ring_pos, k, v, pos)
        if ring_k is None:
            ring_k = ring_v = k.new_zeros(B, k.shape[1], W, k.shape[-1])
        pad = nb * Bq - T
        if pad:
            q_rot, q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q_rot, q, k, v))
        new_pos = torch.arange(pos, pos + nb * Bq, device=q.device)
        key_pos = torch.cat([ring_pos, new_pos])  # [W + nb·Bq]
        # Empty slots and padding are never visible.
        key_ok = torch.cat([ring_pos >= 0, new_pos < pos + T])

        def blocks(t: torch.Tensor) -> torch.Tensor:
            # [..., W + nb·Bq] -> [..., nb, W + Bq] (overlapping windows, stride Bq)
            return t.unfold(-1, W + Bq, Bq)

        kp, ok = blocks(key_pos), blocks(key_ok)  # [nb, W + Bq]
        qp = new_pos.view(nb, Bq)
        mask = (kp[:, None] <= qp[..., None]) & (kp[:, None] > qp[..., None] - W) & ok[:, None]
        # Padded queries see everything: a row with no visible key would be NaN in backward.
        mask = mask | (qp >= pos + T)[..., None]  # [nb, Bq, W + Bq]
        keys = blocks(torch.cat([ring_k, k], dim=2).transpose(-1, -2))  # [B, H, D, nb, W+Bq]
        values = blocks(torch.cat([ring_v, v], dim=2).transpose(-1, -2))
        keys, values = (rearrange(t, "b h d n s -> (b n) h s d") for t in (keys, values))
        q_rot, q = (rearrange(t, "b h (n r) d -> (b n) h r d", n=nb) for t in (q_rot, q))
        mask = mask.unsqueeze(1).repeat(B, 1, 1, 1)  # [B·nb, 1, Bq, W + Bq]
        o = self.attend(q_rot, q, keys, values, mask)  # [B·nb, H, Bq, D]
        return rearrange(o, "(b n) h r d -> b h (n r) d", b=B)[:, :, :T]

    def _one_block(
        self,
        q_rot: torch.Tensor,
        q: torch.Tensor,
        ring_k: torch.Tensor | None,
        ring_v: torch.Tensor | None,
        ring_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: int,
    ) -> torch.Tensor:
        """:meth:`_blocked` for ``T ≤ W`` (one block of all the queries): the keys are the
        ring's (if any) and the new ones, visible where ``t − W < s ≤ t``."""
        new_pos = torch.arange(pos, pos + q.shape[2], device=q.device)
        key_pos, keys, values = new_pos, k, v
        if ring_k is not None:
            key_pos = torch.cat([ring_pos, new_pos])
            keys, values = torch.cat([ring_k, k], dim=2), torch.cat([ring_v, v], dim=2)
        mask = (key_pos <= new_pos[:, None]) & (key_pos > new_pos[:, None] - self.window)
        mask = mask & (key_pos >= 0)  # empty ring slots
        return self.attend(q_rot, q, keys, values, mask)

    def _check_state(self, state: State, batch: int) -> None:
        expected = {"k", "v", "pos"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"sliding-window attention state must have keys {sorted(expected)}, got {got}: "
                "a state from another layer? Make one with init_state(batch_size)"
            )
        shape = (batch, self.n_heads, self.window, self.head_dim)
        for name in ("k", "v"):
            if tuple(state[name].shape) != shape:
                raise ValueError(
                    f"sliding-window attention state['{name}'] must be [B, H, window, D] = "
                    f"{list(shape)}, got {list(state[name].shape)} (another batch size or window?)"
                )
        pos = state["pos"]
        if pos.ndim != 0 or pos.is_floating_point() or int(pos) < 0:
            raise ValueError(f"state['pos'] must be a non-negative integer scalar, got {pos}")

    def inner_levels(self) -> list[Level]:
        """Attention as a non-parametric memory (SPEC §2.2, last row) whose "update" appends a
        key/value per token and evicts the one ``window`` tokens back."""
        persistent = f" + {self.n_persistent} persistent tokens" if self.n_persistent else ""
        return [
            Level(
                "",
                f"{self.n_heads} x sliding KV cache, window {self.window}{persistent} "
                "(non-parametric)",
                "Σ_i softmax(qᵀk_i)·‖v_i − m‖²",
                "closed form (softmax-weighted mean), evict after window",
                1,
            )
        ]

    def flops_per_token(self, seq_len: int) -> float:
        """Score and value FLOPs per token, averaged over positions ``0 .. seq_len−1`` (query
        ``t`` sees ``min(t+1, window)`` tokens); the projections are counted by the model."""
        W, L = self.window, max(seq_len, 1)
        full = max(L - W, 0)
        # Σ_{t<L} min(t+1, W) = Σ_{i≤min(L,W)} i + W·max(L−W, 0)
        m = min(L, W)
        return self.score_flops((m * (m + 1) / 2 + W * full) / L)
