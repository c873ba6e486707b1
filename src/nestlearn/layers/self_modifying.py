"""Self-modifying Titans as a sequence mixer: HOPE's sequence-mixing layer (SPEC §5).

``x [B, T, d]`` is projected to ``n_heads`` inputs of width ``head_dim`` (``x W_in``, then a
short causal depthwise conv of width 4 and an L2 norm per head); per head, the memories
``M_k, M_v, (M_q), M_η, M_α, M_mem`` generate keys, values, learning rates, retention and their
own targets and learn in context (:mod:`nestlearn.memory.self_modifying`); the read of ``M_mem``
is normalized per head, gated (``RMSNorm(o) ⊙ silu(x W_g)``) and projected back to ``d``, as in
:mod:`nestlearn.layers.memory_heads`.

The initial weights of every memory, the fixed maps (``W_q``; ``W_k``, ``W_v`` in the fixed-k/v
ablations), the gate biases and the per-head momentum are meta-parameters: the outer loss
back-propagates through the inner updates into them. SPEC §5's ablations are switches:
``dgd=False`` (plain GD), ``momentum=False``, ``retention=False``, ``fixed_k``, ``fixed_v``,
``fixed_eta``, ``fixed_alpha`` (the gate from a fixed learned linear map of the input,
``η_t = softplus(x_t w_η + b_η)·scale``, instead of the memory ``M_η``), ``objective="dot"``,
``variant="fully_adaptive"``; ``adaptive_q`` and ``read="chunk_start"`` are options.
``ema_momentum=True`` (default) writes the inner momentum as an average of past steps,
``S_t = μ S_{t−1} − (1 − μ) η_t g_t``, and ``normalize_v=True`` (default) normalizes ``v_t``, the
input of the self-generated targets, like ``k_t`` and ``q_t``; ``False`` for both is the earlier
form, which diverges on long runs of repeated tokens. ``recompute=True`` keeps only the memories'
input for backward and recomputes their forward there (less memory, one more forward).
Decisions: ``docs/self-modifying-titans.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from nestlearn.layers.memory_heads import State
from nestlearn.layers.norm import RMSNorm
from nestlearn.layers.short_conv import ShortConv
from nestlearn.levels import Level
from nestlearn.memory.dgd import forms as dgd_mlp
from nestlearn.memory.self_modifying import (
    GATES,
    VARIANTS,
    SelfModifyingOptions,
    SelfModifyingParams,
    _check_options,
    init_self_modifying_state,
    self_modifying_chunk,
    self_modifying_reference,
    self_modifying_step,
)

MODES = ("chunk", "reference")
# Gate biases at initialization: softplus(b_η) = 1 (η = eta_scale), sigmoid(b_α) ≈ 0.982.
ETA_BIAS = math.log(math.e - 1)
ALPHA_BIAS = 4.0


class SelfModifyingTitansMixer(nn.Module):
    """Multi-head self-modifying Titans: ``[B, T, d] -> [B, T, d]``."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        *,
        chunk_size: int = 64,
        other_chunk_size: int = 16,
        conv_size: int = 4,
        dgd: bool = True,
        momentum: bool = True,
        ema_momentum: bool = True,
        normalize_v: bool = True,
        retention: bool = True,
        adaptive_q: bool = False,
        fixed_k: bool = False,
        fixed_v: bool = False,
        fixed_eta: bool = False,
        fixed_alpha: bool = False,
        objective: str = "l2",
        variant: str = "self_modifying",
        read: str = "per_token",
        detach_inner: bool = False,
        mode: str = "chunk",
        eta_scale: float = 0.1,
        hidden_mult: int = 1,
        activation: str = "silu",
        eps: float = 1e-6,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{type(self).__name__}: {name} must be an int >= 1, got {value!r}"
                )
        if mode not in MODES:
            raise ValueError(f"{type(self).__name__}: mode={mode!r}; choose one of {MODES}")
        if variant not in VARIANTS:
            raise ValueError(
                f"{type(self).__name__}: variant={variant!r}; choose one of {VARIANTS}"
            )
        if isinstance(hidden_mult, bool) or not isinstance(hidden_mult, int) or hidden_mult < 1:
            raise ValueError(f"{type(self).__name__}: hidden_mult must be an int >= 1")
        if conv_size < 0:
            raise ValueError(f"{type(self).__name__}: conv_size must be >= 0 (0 = off)")
        self.options = SelfModifyingOptions(
            chunk_size=chunk_size,
            other_chunk_size=other_chunk_size,
            objective=objective,
            activation=activation,
            dgd=dgd,
            variant=variant,
            read=read,
            eta_scale=eta_scale,
            detach_inner=detach_inner,
            ema_momentum=ema_momentum,
            normalize_v=normalize_v,
        )
        try:
            _check_options(self.options)
            dgd_mlp.options(objective=objective, activation=activation, read=read)
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from None
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.conv_size, self.mode = conv_size, mode
        # Backward recomputes the memories' chunk chain from the layer's memory input instead of
        # keeping its intermediates: one layer's alive at a time, same gradients.
        self.recompute = bool(recompute)
        self.hidden = head_dim * hidden_mult
        width = n_heads * head_dim
        self.in_proj = nn.Linear(d_model, width, bias=False)
        self.conv = ShortConv(width, conv_size) if conv_size > 0 else None
        if fixed_k and fixed_v and fixed_eta and (fixed_alpha or not retention):
            raise ValueError(
                f"{type(self).__name__}: fixed_k, fixed_v, fixed_eta (and fixed_alpha) all set "
                "leaves no self-modifying memory besides M_mem; keep one of them adaptive"
            )
        adaptive = {"k": not fixed_k, "v": not fixed_v, "q": adaptive_q, "eta": not fixed_eta}
        if retention:
            adaptive["alpha"] = not fixed_alpha
        names = [n for n in ("k", "v", "q", "eta", "alpha") if adaptive.get(n)]
        self.memories = nn.ModuleDict(
            {name: self._memory(1 if name in GATES else head_dim) for name in [*names, "mem"]}
        )
        self.projections = nn.ParameterDict(
            {
                n: nn.Parameter(torch.empty(n_heads, 1 if n in GATES else head_dim, head_dim))
                for n in adaptive
                if not adaptive[n]
            }
        )
        self.eta_bias = nn.Parameter(torch.empty(n_heads))
        self.alpha_bias = nn.Parameter(torch.empty(n_heads)) if retention else None
        # μ = sigmoid(mu_logit) per head: the inner momentum, meta-learned.
        self.mu_logit = nn.Parameter(torch.empty(n_heads)) if momentum else None
        self.g_proj = nn.Linear(d_model, width, bias=False)
        self.o_norm = RMSNorm(head_dim, eps)
        self.o_proj = nn.Linear(width, d_model, bias=False)
        self.reset_memory_parameters()

    def _memory(self, out: int) -> nn.ParameterList:
        """``D -> hidden -> out`` bias-free, plus a linear skip ``[H, out, D]`` when ``out ≠ D``."""
        H, D = self.n_heads, self.head_dim
        shapes = [(H, self.hidden, D), (H, out, self.hidden)] + ([(H, out, D)] if out != D else [])
        return nn.ParameterList(nn.Parameter(torch.empty(*shape)) for shape in shapes)

    def reset_memory_parameters(self) -> None:
        """Memories start close to their skip: first map ``N(0, 1/D)``, the others 10x smaller;
        fixed maps ``N(0, 1/D)`` (a fixed gate's 10x smaller, as a gate memory's skip);
        ``η = eta_scale``, ``α ≈ 0.98``, ``μ = 0.5`` at start."""
        for weights in self.memories.values():
            for i, weight in enumerate(weights):
                std = 1.0 / math.sqrt(weight.shape[-1])
                nn.init.normal_(weight, std=std if i == 0 else 0.1 * std)
        for name, weight in self.projections.items():
            scale = 0.1 if name in GATES else 1.0
            nn.init.normal_(weight, std=scale / math.sqrt(self.head_dim))
        nn.init.constant_(self.eta_bias, ETA_BIAS)
        if self.alpha_bias is not None:
            nn.init.constant_(self.alpha_bias, ALPHA_BIAS)
        if self.mu_logit is not None:
            nn.init.zeros_(self.mu_logit)

    def params(self) -> SelfModifyingParams:
        """The meta-parameters in the functional op's form."""
        return SelfModifyingParams(
            memories={name: list(weights) for name, weights in self.memories.items()},
            projections=dict(self.projections.items()),
            eta_bias=self.eta_bias,
            alpha_bias=self.alpha_bias,
            mu=None if self.mu_logit is None else torch.sigmoid(self.mu_logit),
        )

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        state: State = {}
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch_size, device, dtype)
        memory = init_self_modifying_state(self.params(), batch_size)
        for key, value in memory.items():
            cast = dtype if value.is_floating_point() else None
            state[f"memory.{key}"] = value.to(device=device, dtype=cast)
        return state

    def forward(
        self, x: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State | None]:
        self._check_input(x, state)
        h = self.in_proj(x)
        conv_state = None
        if self.conv is not None:
            h, conv_state = self.conv(h, None if state is None else state["conv"])
        # [B, H, T, D]: each head's memories read a unit-norm input
        h = F.normalize(rearrange(h, "b t (h d) -> b h t d", h=self.n_heads), dim=-1)
        params = self.params()
        memory = None
        if state is not None:
            memory = {k[len("memory.") :]: t for k, t in state.items() if k.startswith("memory.")}
        if memory is not None and x.shape[1] == 1:
            y, memory = self_modifying_step(h[:, :, 0], params, self.options, state=memory)
            y = y.unsqueeze(2)
        else:
            run = self_modifying_chunk if self.mode == "chunk" else self_modifying_reference
            if self.recompute and state is None and torch.is_grad_enabled():
                y = _recomputed(run, h, params, self.options)
            else:
                y, memory = run(
                    h,
                    params,
                    self.options,
                    initial_state=memory,
                    output_final_state=state is not None,
                )
        gate = rearrange(self.g_proj(x), "b t (h d) -> b h t d", h=self.n_heads)
        out = self.o_proj(rearrange(self.o_norm(y) * F.silu(gate), "b h t d -> b t (h d)"))
        if state is None:
            return out, None
        new_state = {} if conv_state is None else {"conv": conv_state}
        new_state.update({f"memory.{k}": t for k, t in memory.items()})
        return out, new_state

    def _describe(self) -> str:
        return (
            f"{type(self).__name__}(d_model={self.d_model}, n_heads={self.n_heads}, "
            f"head_dim={self.head_dim})"
        )

    def _check_input(self, x: torch.Tensor, state: State | None) -> None:
        """Shapes of ``x`` and of every state entry, with errors naming this layer."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.d_model:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self._describe()}: expected x [B, T, {self.d_model}], got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{self._describe()}: expected a floating-point x, got {x.dtype}")
        if x.shape[1] < 1:
            raise ValueError(f"{self._describe()}: expected at least one token, got T = 0")
        if state is None:
            return
        if not isinstance(state, dict):
            raise ValueError(f"{self._describe()}: state must be a dict from init_state()")
        expected = self._state_shapes(x.shape[0])
        if set(state) != set(expected):
            missing, unexpected = (
                sorted(set(expected) - set(state)),
                sorted(set(state) - set(expected)),
            )
            raise ValueError(
                f"{self._describe()}: state keys do not match this layer's (a state from another "
                f"layer? build it with init_state): missing {_few(missing)}, unexpected "
                f"{_few(unexpected)}"
            )
        for key, shape in expected.items():
            value = state[key]
            if not isinstance(value, torch.Tensor) or list(value.shape) != shape:
                got = list(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(
                    f"{self._describe()}: state[{key!r}] expected shape {shape} (batch "
                    f"{x.shape[0]}), got {got} (a state from another layer or batch size?)"
                )

    def _state_shapes(self, batch: int) -> dict[str, list[int]]:
        """The shape of every entry of :meth:`init_state`'s state for ``batch`` sequences."""
        shapes = {}
        if self.conv is not None:
            shapes["conv"] = [batch, self.n_heads * self.head_dim, self.conv_size - 1]
        for name, weights in self.memories.items():
            for i, weight in enumerate(weights):
                for prefix in ("w", "s", "wc"):
                    shapes[f"memory.{name}.{prefix}.{i}"] = [batch, *weight.shape]
            shapes[f"memory.{name}.pos"] = []
        return shapes

    def inner_levels(self) -> list[Level]:
        """Every memory: what it maps, its inner objective and optimizer, its chunk size."""
        opts, H, D = self.options, self.n_heads, self.head_dim
        optimizer = ("DGD" if opts.dgd else "GD") + " at chunk start"
        if self.mu_logit is not None:
            optimizer += ", momentum μ" + (" (EMA)" if opts.ema_momentum else "")
        optimizer += ", retention α_t" if self.alpha_bias is not None else ""
        levels = []
        for name, weights in self.memories.items():
            out = weights[1].shape[-2]
            skip = "linear skip" if name in GATES else "residual"
            if opts.variant == "self_modifying":
                target = f"M_{name},c(v)"
            else:
                target = "mean(v)" if name in GATES else "v"
            objective = f"½‖M_{name}(k) − {target}‖²" if opts.objective == "l2" else opts.objective
            levels.append(
                Level(
                    f"memories.{name}",
                    f"{H} x MLP {D} -> {self.hidden} -> {out} ({skip})",
                    f"{opts.objective}: {objective}" if opts.objective == "l2" else objective,
                    optimizer,
                    opts.chunk_size if name == "mem" else opts.other_chunk_size,
                )
            )
        return levels

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: the projections, then per memory and head its reads at the
        chunk start (``2·P`` per read: ``x`` for the other memories, ``v`` for a self target),
        forward + backward on ``k`` (``6·P``), the end-of-chunk write (``2·P`` amortized), and
        per map the ``C×C`` products of the chunk form (``2·C·(in + out)`` each: the write and
        read terms, the DGD Gram matrices and the UT solve)."""
        opts = self.options
        total = 2.0 * self.d_model * self.n_heads * self.head_dim * 3  # in, gate, out projections
        total += 2.0 * sum(w.numel() for w in self.projections.values())
        for name, weights in self.memories.items():
            C = min(opts.chunk_size if name == "mem" else opts.other_chunk_size, seq_len)
            reads = (name != "mem") + (opts.variant == "self_modifying")
            per_head = 0.0
            for weight in weights:
                d_out, d_in = weight.shape[-2:]
                products = 2 * C * (d_in + d_out) * (3 if opts.dgd else 1)
                per_head += (8 + 2 * reads) * d_out * d_in + products
            total += self.n_heads * per_head
        return total


def _recomputed(
    run: Callable[..., tuple[torch.Tensor, State | None]],
    h: torch.Tensor,
    params: SelfModifyingParams,
    options: SelfModifyingOptions,
) -> torch.Tensor:
    """``run(h, params, options)[0]`` under non-reentrant :func:`torch.utils.checkpoint.
    checkpoint`: only ``h`` and the meta-parameters are kept for backward, which recomputes the
    memories' forward (every chunk's states and intermediates) when it reaches this layer. The
    same output and gradients, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(lambda h: run(h, params, options)[0], h, use_reentrant=False)


def _few(keys: list[str], n: int = 4) -> str:
    return "[" + ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")
