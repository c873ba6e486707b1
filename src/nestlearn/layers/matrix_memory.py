"""Matrix-memory layers: linear attention, gated linear attention, DeltaNet, Gated DeltaNet.

One module, four settings of the same op (:mod:`nestlearn.memory.matrix`, SPEC §2.2):

| variant            | objective | retention α_t       | write strength β_t |
|--------------------|-----------|---------------------|--------------------|
| ``linear_attention`` | dot     | none                | 1                  |
| ``gla``              | dot     | Mamba-2 decay       | 1                  |
| ``deltanet``         | l2      | none                | sigmoid(x W_β)     |
| ``gated_deltanet``   | l2      | Mamba-2 decay       | sigmoid(x W_β)     |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.layers.decode_step import (
    full_precision_step,
    heads_step,
    matrix_token,
    read_out,
    step_plan,
)
from nestlearn.layers.memory_heads import MambaDecay, MemoryHeads, State, gate_projection
from nestlearn.levels import Level
from nestlearn.memory.matrix.fla_kernels import check_kernel, matrix_memory_fla, use_fla
from nestlearn.memory.matrix.forms import matrix_memory, matrix_memory_step


@dataclass(frozen=True)
class MatrixVariant:
    objective: str  # "dot" or "l2"
    decay: bool  # data-dependent retention α_t
    write_gate: bool  # data-dependent β_t (else 1)
    optimizer: str  # how the inner update reads, for levels()


VARIANTS: dict[str, MatrixVariant] = {
    "linear_attention": MatrixVariant("dot", False, False, "Hebbian write (GD on dot, η=1)"),
    "gla": MatrixVariant("dot", True, False, "Hebbian write + retention α_t"),
    "deltanet": MatrixVariant("l2", False, True, "delta rule (GD on l2, step β_t)"),
    "gated_deltanet": MatrixVariant("l2", True, True, "delta rule, step β_t, retention α_t"),
}

MODES = ("chunk", "reference")


class MatrixMemoryMixer(nn.Module):
    """Multi-head matrix associative memory as a sequence mixer: ``[B, T, d] -> [B, T, d]``.

    Each head keeps ``S ∈ R^{dk × dv}`` (read ``o_t = scale · S_tᵀ q_t`` after writing token t).
    Training uses the chunkwise-parallel form, decoding the one-token recurrent step; ``mode=
    "reference"`` runs the sequential loop (for checks, not for speed). ``kernel`` = ``"fla"`` or
    ``"auto"`` runs the chunk form with flash-linear-attention's CUDA kernels
    (:mod:`nestlearn.memory.matrix.fla_kernels`).
    """

    def __init__(
        self,
        variant: str,
        d_model: int,
        n_heads: int,
        head_dim: int,
        *,
        conv_size: int = 4,
        chunk_size: int = 64,
        mode: str = "chunk",
        eps: float = 1e-6,
        kernel: str = "torch",
    ) -> None:
        super().__init__()
        check_kernel(kernel)
        if variant not in VARIANTS:
            raise ValueError(f"unknown matrix memory '{variant}'; choose one of {list(VARIANTS)}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; choose one of {MODES}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.variant_name, self.variant = variant, VARIANTS[variant]
        self.chunk_size, self.mode, self.kernel = chunk_size, mode, kernel
        self.heads = MemoryHeads(d_model, n_heads, head_dim, head_dim, conv_size, eps)
        self.scale = head_dim**-0.5
        self.decay = MambaDecay(d_model, n_heads) if self.variant.decay else None
        self.beta_proj = gate_projection(d_model, n_heads, 0.0) if self.variant.write_gate else None

    def reset_memory_parameters(self) -> None:
        """Gates keep their own init after the model-wide normal init."""
        if self.decay is not None:
            self.decay.reset_parameters()
        if self.beta_proj is not None:
            nn.init.normal_(self.beta_proj.weight, std=0.02)
            nn.init.zeros_(self.beta_proj.bias)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        h = self.heads
        state = h.init_state(batch_size, device, dtype)
        state["memory"] = torch.zeros(batch_size, h.n_heads, h.dk, h.dv, device=device, dtype=dtype)
        return state

    def forward(
        self, x: torch.Tensor, state: State | None = None, real: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State | None]:
        """Mix ``x [B, T, d]``; with a state, continue from it and return the new one.

        ``real [B, T]`` (bool, False at left pads, :mod:`nestlearn.models.padding`): a pad's
        input is zeroed, so its q, k, v and short-conv inputs are 0 (``k = 0``: no write, for
        every variant), and its retention is ``log α = 0`` (no decay). Rows padded before their
        first token, from a fresh state, then read exactly what they would unpadded.
        """
        if state is not None and real is None and x.shape[1] == 1:
            out = self.step(x, state)
            if out is not None:
                return out
        if real is not None:
            x = x.masked_fill(~real[..., None], 0.0)
        # The read scale rides on q's normalization (SPEC §2.2); the op then reads with scale 1.
        q, k, v, conv_state = self.heads.qkv(x, state, q_scale=self.scale)
        log_alpha = self.decay(x) if self.decay is not None else None
        if log_alpha is not None and real is not None:
            log_alpha = log_alpha.masked_fill(~real[:, None, :], 0.0)  # [B, H, T]
        beta = (
            torch.sigmoid(self.beta_proj(x)).transpose(1, 2) if self.beta_proj is not None else None
        )
        memory_args = dict(
            log_alpha=log_alpha,
            beta=beta,
            objective=self.variant.objective,
            scale=1.0,
            initial_state=None if state is None else state["memory"],
            output_final_state=state is not None,
        )
        if (
            self.mode == "chunk"
            and q.shape[2] > 1
            and use_fla(self.kernel, q, objective=self.variant.objective, beta=beta)
        ):
            o, memory = matrix_memory_fla(q, k, v, **memory_args)
        else:
            # matrix_memory picks the form: chunkwise (or the reference loop) for sequences, the
            # recurrent step for a single decoded token.
            o, memory = matrix_memory(
                q, k, v, mode=self.mode, chunk_size=self.chunk_size, **memory_args
            )
        y = self.heads.output(o, x)
        if state is None:
            return y, None
        return y, {**conv_state, "memory": memory}

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State] | None:
        """One decoded token ``x [B, 1, d]`` from ``state``: :meth:`forward`'s values (float
        rounding aside) in a few large ops (:mod:`nestlearn.layers.decode_step`); None where a
        forward hook needs the sequence form."""
        decay = self.decay
        gates = [] if self.beta_proj is None else [self.beta_proj]
        gates += [] if decay is None else [decay.proj]
        plan = step_plan(self.heads, gates, self.scale, () if decay is None else (decay,))
        if plan is None:
            return None
        q, k, v, g, pre, conv_state = heads_step(self.heads, x[:, 0], state, plan)
        pre = pre.split(self.heads.n_heads, dim=-1)  # [B, H] each: β, then the decay's
        beta = None if self.beta_proj is None else torch.sigmoid(pre[0])
        log_alpha = None
        if decay is not None:
            log_alpha = -decay.A_log.exp() * F.softplus(pre[-1] + decay.dt_bias)
        memory = state["memory"]
        if full_precision_step(q, memory):
            o, memory = matrix_token(q, k, v, log_alpha, beta, self.variant.objective == "l2",
                                     memory)  # fmt: skip
        else:
            o, memory = matrix_memory_step(
                q, k, v, log_alpha=log_alpha, beta=beta, objective=self.variant.objective,
                state=memory,
            )  # fmt: skip
        return read_out(self.heads, o, g)[:, None], {**conv_state, "memory": memory}

    def inner_levels(self) -> list[Level]:
        h = self.heads
        objective = "dot: −⟨S q, v⟩" if self.variant.objective == "dot" else "l2: ½‖Sᵀk − v‖²"
        return [
            Level(
                "", f"{h.n_heads} x matrix [{h.dk} x {h.dv}]", objective, self.variant.optimizer, 1
            )
        ]

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of the chunkwise memory per token (projections counted by the model).

        Per head: intra-chunk ``q kᵀ`` and its product with values (``2·C·(dk + dv)``), the read
        of and write into the state (``4·dk·dv``), and for l2 the UT transform: ``β k kᵀ``
        (``2·C·dk``) and ``A`` times ``β v`` and ``β γ k`` (``2·C·(dv + dk)``), and the correction
        ``W S`` (``2·dk·dv``); the matmuls of :func:`~nestlearn.memory.matrix.chunk.chunk_forward`
        (the triangular solve, ``C²/3`` per token, not counted).
        """
        h, C = self.heads, min(self.chunk_size, seq_len)
        per_head = 2 * C * (h.dk + h.dv) + 4 * h.dk * h.dv
        if self.variant.objective == "l2":
            per_head += 2 * C * h.dk + 2 * C * (h.dv + h.dk) + 2 * h.dk * h.dv
        return float(h.n_heads * per_head)
