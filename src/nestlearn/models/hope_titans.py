"""HOPE (SPEC §5): self-modifying Titans as the sequence mixer, a Continuum Memory System as the
MLP of every block, each with pre-norm and residual.

    tokens -> embed -> n_layers x [x + SMT(norm(x)); x + CMS(x)] -> norm -> head

Training runs the chunkwise forms of both (self-modifying Titans: :mod:`nestlearn.memory.
self_modifying`; CMS: :mod:`nestlearn.memory.cms`); decoding carries every memory's state, so the
memory per token is constant in the context length. Every ablation of SPEC §5 is a ``model.*``
switch (``sm_dgd``, ``sm_momentum``, ``sm_retention``, ``fixed_k``, ``fixed_v``, ``fixed_eta``,
``fixed_alpha``, ``adaptive_q``, ``memory_objective``, ``variant``); "w/o CMS" is one CMS level
that never updates in context (``cms_lrs=[0]`` is refused, so use ``cms_chunk_sizes=[<longer than
any sequence>]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nestlearn.config.schema import ModelConfig
from nestlearn.errors import ConfigError
from nestlearn.layers.self_modifying import SelfModifyingTitansMixer
from nestlearn.models.finite import FiniteCheck, inner_lr_fixes
from nestlearn.models.hope import CMSFields, HopeLM
from nestlearn.models.registry import register_model


@dataclass(kw_only=True)
class HopeConfig(CMSFields, ModelConfig):
    """HOPE: self-modifying Titans fields (SPEC §5) on top of the CMS fields."""

    n_heads: int = 4  # memory heads
    head_dim: int = 0  # width per head (0 = d_model / n_heads)
    conv_size: int = 4  # causal depthwise conv on the input (0 = off)
    chunk_size: int = 64  # chunk of M_mem (SPEC §5 default 64)
    other_chunk_size: int = 16  # chunk of M_k, M_v, M_q, M_η, M_α (SPEC §5 default 16)
    memory_hidden_mult: int = 1  # hidden width of each memory MLP = head_dim * this
    memory_objective: str = "l2"  # inner objective: "l2" or "dot" (ablation)
    sm_dgd: bool = True  # delta gradient descent (False: plain GD, the "w/o DGD" ablation)
    sm_momentum: bool = True  # inner momentum (False: the "w/o momentum" ablation)
    # S_t = μ S − (1 − μ) η g (gain 1, stable on repeated tokens); False: S_t = μ S − η g
    sm_ema_momentum: bool = True
    # v_t normalized like k_t, q_t (the input of the self-generated targets); False: as read
    sm_normalize_v: bool = True
    sm_retention: bool = True  # retention α_t (False: the "w/o weight decay" ablation)
    adaptive_q: bool = False  # q from a memory M_q instead of a fixed projection
    fixed_k: bool = False  # k from a fixed projection (the "w/o inner k projection" ablation)
    fixed_v: bool = False  # v from a fixed projection (the "w/o inner v projection" ablation)
    fixed_eta: bool = False  # η_t from a fixed learned linear map of x instead of the memory M_η
    fixed_alpha: bool = False  # α_t from a fixed learned linear map of x instead of M_α
    variant: str = "self_modifying"  # or "fully_adaptive" (all memories regress onto (k, v))
    read: str = "per_token"  # M_mem read: "per_token" (dual form) or "chunk_start" (cheaper)
    eta_scale: float = 0.1  # η_t = softplus(M_η(x)) · eta_scale
    detach_inner: bool = False  # stop-gradient through the inner gradients (cheaper)
    mode: str = "chunk"  # "chunk" (training form) or "reference" (token loop, for checks)
    # backward recomputes the mixer's memories from its input: less memory, one more forward
    sm_recompute: bool = False


@register_model("hope", HopeConfig)
class HopeModel(HopeLM):
    """HOPE: self-modifying Titans -> CMS in every block (SPEC §5)."""

    def build_mixer(self, config: HopeConfig) -> nn.Module:
        if config.n_heads <= 0 or config.head_dim < 0:
            raise ConfigError("model.n_heads must be > 0 and model.head_dim >= 0 (0 = default)")
        if config.head_dim == 0 and config.d_model % config.n_heads:
            raise ConfigError(
                f"model.d_model={config.d_model} is not divisible by model.n_heads="
                f"{config.n_heads}; choose n_heads dividing d_model or set model.head_dim"
            )
        try:
            return SelfModifyingTitansMixer(
                config.d_model,
                config.n_heads,
                config.head_dim or config.d_model // config.n_heads,
                chunk_size=config.chunk_size,
                other_chunk_size=config.other_chunk_size,
                conv_size=config.conv_size,
                dgd=config.sm_dgd,
                momentum=config.sm_momentum,
                ema_momentum=config.sm_ema_momentum,
                normalize_v=config.sm_normalize_v,
                retention=config.sm_retention,
                adaptive_q=config.adaptive_q,
                fixed_k=config.fixed_k,
                fixed_v=config.fixed_v,
                fixed_eta=config.fixed_eta,
                fixed_alpha=config.fixed_alpha,
                objective=config.memory_objective,
                variant=config.variant,
                read=config.read,
                detach_inner=config.detach_inner,
                mode=config.mode,
                eta_scale=config.eta_scale,
                hidden_mult=config.memory_hidden_mult,
                eps=config.norm_eps,
                recompute=config.sm_recompute,
            )
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from exc

    def mixer_outputs(self, mixer: nn.Module) -> list[nn.Linear]:
        return [mixer.o_proj]

    def mixer_check(self, config: HopeConfig, block: int) -> FiniteCheck:
        return FiniteCheck(
            f"block {block} (hope mixer, self-modifying Titans)",
            what="one of its memories",
            fixes=inner_lr_fixes("model.eta_scale"),
        )
