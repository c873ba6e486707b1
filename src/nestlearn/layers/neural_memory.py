"""Titans' neural long-term memory (LMM) as a sequence mixer (SPEC §2.2, last memory row).

Per head, an MLP memory ``M`` (``depth`` linear maps, SiLU between them, optional residual
``M(x) = x + MLP(x)``) is trained online on the sequence's key→value pairs by chunked gradient
descent with data-dependent momentum and retention (:mod:`nestlearn.memory.mlp`):

    S_t = μ_t S_{t−1} − η_t ∇ ½‖M_{W_c}(k_t) − v_t‖²
    W_t = α_t W_{t−1} + S_t
    o_t = M_{W_t}(q_t)

with ``μ_t = sigmoid(x_t W_μ)`` (momentum), ``α_t = 1 − sigmoid(x_t W_f)`` (retention; Titans'
forget gate is ``1 − α_t``) and the step

    η_t = (1 − μ_t) · η̂_t,   η̂_t = max_lr · sigmoid(x_t W_η) / C       (the defaults)

(biases at initialization: ``W_η`` 0, ``W_μ`` 0, ``W_f`` −4). The initial memory weights are
meta-parameters learned by the outer optimizer through the inner updates. The gates only
parameterize S-1's ``η_t, μ_t, α_t`` (SPEC §2.1): the op's forms agree whatever they are (§2.3).

Stability on long streams (``docs/titans-stability.md``). Chunked GD takes a chunk's gradients at
its start weights, so a chunk is one GD step on its summed loss; unbounded, that step reached
``C · η/(1 − μ) ≈ 16`` on nearly aligned keys and the MLP memory diverged (weight norms cubed per
chunk). Two options bound it for any gate values, chunk size and stream length:

- ``step_scale="chunk"`` (default): ``η̂_t ≤ max_lr / C``. A chunk's total step (the sum over its
  tokens of each gradient's coefficient in the chunk's last weights) is then ``≤ max_lr``, so with
  unit keys its curvature along the keys is ``≤ max_lr``; for a linear memory without momentum
  and ``max_lr ≤ 1`` the chunk update is non-expansive. At ``C = 1`` (S-1 per token) it changes
  nothing; larger chunks write each token more weakly. ``"token"``: ``η̂_t ≤ max_lr`` (with
  ``ema_momentum`` stable at ``C = 1``; for ``C > 1`` it diverges once a chunk's keys align).
- ``ema_momentum=True`` (default): ``S_t = μ_t S_{t−1} − (1 − μ_t) η̂_t g_t``, a convex
  combination of past steps (``‖S_t‖ ≤ max(‖S_0‖, max_s η̂_s ‖g_s‖)``, gain 1 for every ``μ_t``);
  ``False``: ``S_t = μ_t S_{t−1} − η̂_t g_t`` (gain up to ``1/(1 − μ)``).

``step_scale="token", ema_momentum=False`` is the earlier parameterization. A bound on the MLP's
weights for every stream also needs a bounded surprise ``‖g_t‖``: an op option (see the doc).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from nestlearn.layers.decode_step import (
    full_precision_step,
    heads_step,
    mlp_token,
    read_out,
    step_plan,
)
from nestlearn.layers.memory_heads import MemoryHeads, State, gate_projection
from nestlearn.levels import Level
from nestlearn.memory.mlp.forms import (
    init_mlp_memory_state,
    mlp_memory_chunk,
    mlp_memory_reference,
    mlp_memory_step,
    mlp_options,
)

MODES = ("chunk", "reference")
STEP_SCALES = ("chunk", "token")


class NeuralMemoryMixer(nn.Module):
    """Multi-head MLP memory trained in context: ``[B, T, d] -> [B, T, d]``."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        *,
        depth: int = 2,
        hidden_mult: int = 2,
        residual: bool = True,
        momentum: bool = True,
        objective: str = "l2",
        max_lr: float = 1.0,
        conv_size: int = 4,
        chunk_size: int = 64,
        mode: str = "chunk",
        detach_inner: bool = False,
        step_scale: str = "chunk",
        ema_momentum: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if step_scale not in STEP_SCALES:
            raise ValueError(f"step_scale={step_scale!r}; choose one of {STEP_SCALES}")
        if depth < 1:
            raise ValueError(f"memory depth must be >= 1, got {depth}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; choose one of {MODES}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.heads = MemoryHeads(d_model, n_heads, head_dim, head_dim, conv_size, eps)
        self.depth, self.residual, self.objective = depth, residual, objective
        self.max_lr, self.chunk_size, self.mode = max_lr, chunk_size, mode
        self.detach_inner = detach_inner
        self.step_scale, self.ema_momentum = step_scale, ema_momentum
        hidden = head_dim * hidden_mult
        widths = [head_dim] + [hidden] * (depth - 1) + [head_dim]
        self.memory_weights = nn.ParameterList(
            nn.Parameter(torch.empty(n_heads, d_out, d_in))
            for d_in, d_out in itertools.pairwise(widths)
        )
        self.eta_proj = gate_projection(d_model, n_heads, 0.0)
        self.mu_proj = gate_projection(d_model, n_heads, 0.0) if momentum else None
        self.forget_proj = gate_projection(d_model, n_heads, -4.0)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Memory weights ~ N(0, 1/fan_in) (the last map small when residual); gate biases."""
        for i, weight in enumerate(self.memory_weights):
            std = 1.0 / math.sqrt(weight.shape[-1])
            if self.residual and i == len(self.memory_weights) - 1:
                std *= 0.1
            nn.init.normal_(weight, std=std)
        for proj, bias in ((self.eta_proj, 0.0), (self.mu_proj, 0.0), (self.forget_proj, -4.0)):
            if proj is not None:
                nn.init.normal_(proj.weight, std=0.02)
                nn.init.constant_(proj.bias, bias)

    def _gates(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Per-head, per-token ``eta, mu, alpha``, each ``[B, H, T]`` (module docstring):
        ``η_t = [1 − μ_t] · max_lr · sigmoid(x W_η) [/ C]``."""
        scale = self.max_lr / (self.chunk_size if self.step_scale == "chunk" else 1)
        eta = scale * torch.sigmoid(self.eta_proj(x)).transpose(1, 2)
        mu = None
        if self.mu_proj is not None:
            logit = self.mu_proj(x).transpose(1, 2)
            mu = torch.sigmoid(logit)
            if self.ema_momentum:
                eta = eta * torch.sigmoid(-logit)  # 1 − μ_t, accurate as μ_t → 1
        alpha = 1.0 - torch.sigmoid(self.forget_proj(x)).transpose(1, 2)
        return {"eta": eta, "mu": mu, "alpha": alpha}

    def _options(self) -> dict:
        return {
            "objective": self.objective,
            "activation": "silu",
            "residual": self.residual,
            "chunk_size": self.chunk_size,
        }

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        state = self.heads.init_state(batch_size, device, dtype)
        memory = init_mlp_memory_state(list(self.memory_weights), batch_size)
        state.update({f"memory.{k}": v.to(device=device) for k, v in memory.items()})
        return state

    def forward(
        self, x: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State | None]:
        if state is not None and x.shape[1] == 1:
            out = self.step(x, state)
            if out is not None:
                return out
        q, k, v, conv_state = self.heads.qkv(x, state)
        gates = self._gates(x)
        weights = list(self.memory_weights)
        memory = None
        if state is not None:
            memory = {k[len("memory.") :]: t for k, t in state.items() if k.startswith("memory.")}
        if memory is not None and x.shape[1] == 1:
            step_gates = {name: None if g is None else g[..., 0] for name, g in gates.items()}
            o, memory = mlp_memory_step(
                q[:, :, 0],
                k[:, :, 0],
                v[:, :, 0],
                weights,
                **step_gates,
                **self._options(),
                state=memory,
            )
            o = o.unsqueeze(2)
        else:
            run = mlp_memory_chunk if self.mode == "chunk" else mlp_memory_reference
            o, memory = run(
                q,
                k,
                v,
                weights,
                **gates,
                **self._options(),
                initial_state=memory,
                output_final_state=state is not None,
                detach_inner=self.detach_inner,
            )
        y = self.heads.output(o, x)
        if state is None:
            return y, None
        return y, {**conv_state, **{f"memory.{k}": t for k, t in memory.items()}}

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State] | None:
        """One decoded token ``x [B, 1, d]`` from ``state``: :meth:`forward`'s values (float
        rounding aside) in a few large ops (:mod:`nestlearn.layers.decode_step`); None where a
        forward hook needs the sequence form."""
        projections = [p for p in (self.eta_proj, self.mu_proj, self.forget_proj) if p is not None]
        plan = step_plan(self.heads, projections)
        if plan is None:
            return None
        q, k, v, g, pre, conv_state = heads_step(self.heads, x[:, 0], state, plan)
        gates = dict(zip(("eta", "mu", "alpha") if self.mu_proj is not None else ("eta", "alpha"),
                         pre.split(self.heads.n_heads, dim=-1), strict=True))  # fmt: skip
        eta = self.max_lr / (self.chunk_size if self.step_scale == "chunk" else 1)
        eta = eta * torch.sigmoid(gates["eta"])
        mu = None
        if self.mu_proj is not None:
            mu = torch.sigmoid(gates["mu"])
            if self.ema_momentum:
                eta = eta * torch.sigmoid(-gates["mu"])
        alpha = 1.0 - torch.sigmoid(gates["alpha"])
        memory = {k[len("memory.") :]: t for k, t in state.items() if k.startswith("memory.")}
        if full_precision_step(q, memory["w.0"]):
            opts = mlp_options(**self._options(), detach_inner=False)
            o, memory = mlp_token(q, k, v, eta, mu, alpha, memory, self.depth, opts)
        else:
            o, memory = mlp_memory_step(
                q, k, v, list(self.memory_weights), eta=eta, mu=mu, alpha=alpha,
                **self._options(), state=memory,
            )  # fmt: skip
        y = read_out(self.heads, o, g)[:, None]
        return y, {**conv_state, **{f"memory.{k}": t for k, t in memory.items()}}

    def inner_levels(self) -> list[Level]:
        h = self.heads
        dims = " -> ".join(str(w.shape[-1]) for w in self.memory_weights) + f" -> {h.dv}"
        optimizer = "chunked GD" + (" + momentum μ_t" if self.mu_proj is not None else "")
        return [
            Level(
                "",
                f"{h.n_heads} x MLP {dims}" + (" (residual)" if self.residual else ""),
                f"{self.objective}: ½‖M(k) − v‖²" if self.objective == "l2" else self.objective,
                optimizer + ", retention α_t",
                self.chunk_size,
            )
        ]

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the memory: its forward and backward at the chunk start
        (``6·P`` for ``P`` weights per head), the dual-form reads (``2·C·(in + out)`` per map) and
        the end-of-chunk weight update (``2·P`` amortized)."""
        C = min(self.chunk_size, seq_len)
        per_head = 0
        for weight in self.memory_weights:
            d_out, d_in = weight.shape[-2:]
            per_head += 8 * d_out * d_in + 2 * C * (d_in + d_out)
        return float(self.heads.n_heads * per_head)
