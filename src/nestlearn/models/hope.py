"""HOPE language models: a sequence mixer then a Continuum Memory System per block (SPEC §5).

tokens -> embed -> n_layers x [x + mixer(norm(x)); x + cms(x)] -> norm -> head -> logits

:class:`HopeLM` is generic in the mixer (:meth:`HopeLM.build_mixer`); ``hope_attention`` uses
softmax attention (a Transformer whose MLP is a CMS). Each CMS level carries its own pre-norm
inside the CMS (:mod:`nestlearn.layers.cms`), so with one level this is exactly
``x + mlp(norm(x))``. Decoding state: ``pos`` and, per block ``i``, ``blocks.{i}.mixer.*`` and
``blocks.{i}.cms.*``.

Defaults are Llama-style (RMSNorm, SwiGLU, RoPE, no biases). Switches make a GPT-2 block exactly:
``norm=layer`` (LayerNorm with bias everywhere), ``cms_mlp=gelu_tanh`` with ``cms_bias``,
``attn_bias`` and ``positions=learned`` (an embedding table added to the token embeddings);
``nestlearn convert`` uses them (docs/level-stacking.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from nestlearn.config.schema import ModelConfig
from nestlearn.errors import ConfigError
from nestlearn.layers import CausalSelfAttention, rope_tables
from nestlearn.layers.cms import (
    ContinuumMemory,
    LevelHook,
    Teacher,
    check_block_options,
    check_cms_options,
    updating_fraction,
)
from nestlearn.layers.norm import make_norm
from nestlearn.models.base import LanguageModel, State
from nestlearn.models.common import block_state, check_tokens, init_decoder_weights
from nestlearn.models.finite import (
    FiniteCheck,
    check_memory_finite,
    inner_lr_fixes,
    sequential_reference,
)
from nestlearn.models.padding import forward_padded
from nestlearn.models.registry import register_model
from nestlearn.models.transformer import default_mlp_hidden


@dataclass(kw_only=True)
class CMSFields:
    """The CMS part of a HOPE config; mix into any model config that uses :class:`HopeLM`."""

    cms_chunk_sizes: list[int] = field(default_factory=lambda: [64, 16])  # C(l) per level
    cms_lrs: list[float] = field(default_factory=lambda: [0.5, 0.5])  # inner lr η(l) ∈ (0, 1]
    cms_hidden: int = 0  # MLP width per level (0 = 8/3·d_model / k, or 4·d_model / k for
    # gelu_tanh, rounded up to a multiple of 32)
    cms_variant: str = "sequential"  # "sequential", "nested" or "independent"
    cms_objective: str = "teach"  # error source: "teach" or "local" (docs/cms.md)
    cms_optimizer: str = "gd"  # inner optimizer: "gd", "momentum" or "dgd"
    cms_momentum: float = 0.9  # μ of the "momentum" inner optimizer
    cms_step: str = "normalized"  # inner step: "normalized" (η/(1+E), ours) or "plain" (NL-31's
    # summed step at rate η: the paper's, cms_lrs on the paper's scale; docs/cms.md)
    cms_detach_inner: bool = False  # stop-gradient through the inner error terms
    cms_mode: str = "chunk"  # "chunk" (training form) or "reference" (token loop, for checks)
    cms_mlp: str = "swiglu"  # level block: "swiglu" (Llama) or "gelu_tanh" (GPT-2, ungated)
    cms_bias: bool = False  # biases in the level blocks (GPT-2)
    norm: str = "rms"  # every norm of the model: "rms" or "layer" (LayerNorm with bias, GPT-2)
    check_finite: bool = False  # raise naming the first layer/memory/token that went non-finite
    # backward recomputes each CMS level's chunk chain from its inputs (the teach errors
    # replayed, not recomputed): one level's activations alive at a time, same gradients
    cms_recompute: bool = False


@dataclass(kw_only=True)
class HopeAttentionConfig(CMSFields, ModelConfig):
    """HOPE-attention: softmax attention as the mixer, a CMS as the MLP."""

    n_heads: int = 4  # query heads; d_model / n_heads is the head dimension
    n_kv_heads: int = 0  # key/value heads for grouped-query attention (0 = n_heads)
    rope_theta: float = 10000.0  # RoPE base
    positions: str = "rope"  # "rope" or "learned" (absolute embeddings added to the input, GPT-2)
    attn_bias: bool = False  # biases in the qkv and output projections (GPT-2)


def cms_hidden(config: CMSFields, d_model: int) -> int:
    """``cms_hidden``, or ``8/3·d_model / k`` rounded up to 32: k levels with the parameters of
    one Transformer MLP."""
    if config.cms_hidden:
        return config.cms_hidden
    k = max(1, len(config.cms_chunk_sizes))
    width = 4 * d_model if config.cms_mlp == "gelu_tanh" else default_mlp_hidden(d_model)
    return 32 * math.ceil(width / k / 32)


class HopeBlock(nn.Module):
    """``x + mixer(norm(x))``, then ``x + cms(x)`` (the CMS normalizes per level).

    With ``checks`` set (by the model, from ``model.check_finite``), the mixer's and every CMS
    level's outputs and new states are checked after each call (:func:`check_memory_finite`);
    ``start`` is the absolute position of ``x[:, 0]`` so the error can name the token.
    """

    def __init__(
        self, mixer: nn.Module, cms: ContinuumMemory, d_model: int, eps: float, norm: str = "rms"
    ) -> None:
        super().__init__()
        self.mixer_norm = make_norm(norm, d_model, eps)
        self.mixer = mixer
        self.cms = cms
        self.checks: HopeBlockChecks | None = None

    def forward(
        self,
        x: torch.Tensor,
        state: State | None,
        teacher: Teacher | None = None,
        start: int = 0,
    ) -> tuple[torch.Tensor, State | None]:
        mixer_state = cms_state = None
        if state is not None:
            mixer_state, cms_state = _split(state, "mixer."), _split(state, "cms.")
            if not cms_state:
                raise ValueError(
                    "state has no CMS entries ('cms.*') for this block: a state from another "
                    "model? Make one with model.init_state(batch_size)"
                )
        h = self.mixer_norm(x)
        checks = self.checks
        # the sequential form locates the token: chunkwise forms spread a NaN in its chunk
        reference = None if checks is None else sequential_reference(self.mixer, mixer_state)
        y, mixer_state = self.mixer(h, mixer_state)
        if checks is not None:
            check_memory_finite(checks.mixer, h, y, mixer_state, start, reference)
        x = x + y
        on_level = None if checks is None else checks.on_cms_level(start)
        y, cms_state = self.cms(x, cms_state, teacher, on_level)
        if state is None:
            return x + y, None
        new = {f"mixer.{k}": v for k, v in mixer_state.items()}
        new.update({f"cms.{k}": v for k, v in cms_state.items()})
        return x + y, new


class HopeBlockChecks(NamedTuple):
    """``model.check_finite`` for one block: its mixer's check and one per CMS level."""

    mixer: FiniteCheck
    cms_levels: list[FiniteCheck]

    def on_cms_level(self, start: int) -> LevelHook:
        """The CMS's ``on_level`` hook for a call at absolute position ``start``. A level reads
        each token with the weights of its chunk's start, so its outputs locate the token
        without a sequential pass."""

        def check(level: int, z: torch.Tensor, y: torch.Tensor, state: State | None) -> None:
            check_memory_finite(self.cms_levels[level], z, y, state, start)

        return check


class HopeLM(LanguageModel):
    """Embedding, HOPE blocks, final norm, tied or untied head; subclasses pick the mixer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        validate_hope(config)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            HopeBlock(
                self.build_mixer(config),
                self.build_cms(config),
                config.d_model,
                config.norm_eps,
                config.norm,
            )
            for _ in range(config.n_layers)
        )
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        if config.check_finite:
            for i, block in enumerate(self.blocks):
                cms_fixes = inner_lr_fixes("model.cms_lrs")
                levels = [
                    FiniteCheck(f"block {i} (CMS level {level})", fixes=cms_fixes)
                    for level in range(len(config.cms_chunk_sizes))
                ]
                block.checks = HopeBlockChecks(self.mixer_check(config, i), levels)
        self.reset_parameters()

    def build_mixer(self, config: ModelConfig) -> nn.Module:
        """The sequence mixer of one block: ``forward(x, state) -> (y, state)``, ``init_state``."""
        raise NotImplementedError

    def mixer_check(self, config: ModelConfig, block: int) -> FiniteCheck:
        """``model.check_finite``'s name and advice for block ``block``'s mixer."""
        raise NotImplementedError

    def build_cms(self, config: ModelConfig) -> ContinuumMemory:
        return ContinuumMemory(
            config.d_model,
            cms_hidden(config, config.d_model),
            config.cms_chunk_sizes,
            config.cms_lrs,
            variant=config.cms_variant,
            objective=config.cms_objective,
            optimizer=config.cms_optimizer,
            momentum=config.cms_momentum,
            detach_inner=config.cms_detach_inner,
            mode=config.cms_mode,
            eps=config.norm_eps,
            mlp=config.cms_mlp,
            bias=config.cms_bias,
            norm=config.norm,
            step=config.cms_step,
            recompute=config.cms_recompute,
        )

    def mixer_outputs(self, mixer: nn.Module) -> list[nn.Linear]:
        """The mixer's maps that write into the residual stream (their init is depth-scaled)."""
        heads = getattr(mixer, "heads", None)
        return [heads.o_proj] if heads is not None else []

    def reset_parameters(self) -> None:
        cfg = self.config
        outputs = [p for block in self.blocks for p in self.mixer_outputs(block.mixer)]
        init_decoder_weights(self, cfg.init_std, cfg.n_layers, outputs)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for block in self.blocks:
            block.cms.reset_parameters(cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers))
            if hasattr(block.mixer, "reset_memory_parameters"):
                block.mixer.reset_memory_parameters()

    @property
    def context_limit(self) -> int | None:
        return None

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        param = self.embed.weight
        device = param.device if device is None else device
        state: State = {"pos": torch.zeros((), dtype=torch.long, device=device)}
        for i, block in enumerate(self.blocks):
            parts = (("mixer", block.mixer), ("cms", block.cms))
            for name, module in parts:
                for key, value in module.init_state(batch_size, device, param.dtype).items():
                    state[f"blocks.{i}.{name}.{key}"] = value
        return state

    def forward(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State | None]:
        """Logits ``[B, T, vocab]``. A padded ``attention_mask`` runs each row's real tokens from
        position 0 (:func:`~nestlearn.models.padding.forward_padded`: aligned in one batch
        without a state, row by row with one), so the CMS levels and chunked memories keep
        their chunk boundaries where the unpadded row has them."""
        return forward_padded(self, self.forward_unpadded, tokens, state, attention_mask)

    def forward_unpadded(
        self, tokens: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State | None]:
        """Every token real: the batched form."""
        pos = 0 if state is None else int(state["pos"])
        check_tokens(tokens, self.config.vocab_size, self.context_limit, pos, state is not None)
        x = self.embed_inputs(tokens, pos)  # [B, T, d_model]
        teacher = None
        if self.config.cms_objective == "teach":
            teacher = Teacher(self.next_token_error, tokens)
        new_state: State | None = None if state is None else {"pos": state["pos"] + tokens.shape[1]}
        for i, block in enumerate(self.blocks):
            x, sub = block(x, block_state(state, i), teacher, pos)
            if new_state is not None:
                new_state.update({f"blocks.{i}.{k}": v for k, v in sub.items()})
        return self.head(self.norm(x)), new_state

    def embed_inputs(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """The residual stream's input for tokens at positions ``pos ..``: ``[B, T, d_model]``."""
        return self.embed(tokens)

    def next_token_error(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The teach signal: ``∂ CE(head(norm(h_s)), targets_s) / ∂h_s`` per position, through
        the final norm (RMSNorm or LayerNorm) and the head only, computed by hand (no autograd:
        it also runs under ``torch.inference_mode``) and detached. ``h [B, n, d]``,
        ``targets [B, n]``."""
        dtype = h.dtype  # that of the CMS level's computation: float32 under autocast
        with torch.no_grad():
            h = h.detach().to(torch.promote_types(h.dtype, torch.float32))
            gain, weight = self.norm.weight.to(h.dtype), self.head.weight.to(h.dtype)
            layer = isinstance(self.norm, nn.LayerNorm)
            if layer:
                h = h - h.mean(-1, keepdim=True)
            # RMSNorm: r = 1/sqrt(mean(h²) + eps); LayerNorm: the same of the centred h.
            r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.norm.eps)  # [B, n, 1]
            normed = h * r * gain
            if layer and self.norm.bias is not None:
                normed = normed + self.norm.bias.to(h.dtype)
            probs = torch.softmax(normed @ weight.mT, dim=-1)  # [B, n, V]
            probs.scatter_add_(-1, targets.unsqueeze(-1), -torch.ones_like(probs[..., :1]))
            e = (probs @ weight) * gain  # ∂CE/∂(h·r) [B, n, d]
            # RMSNorm backward: r·e − h·r³·mean(h ⊙ e); LayerNorm: the same at the centred h,
            # then centred (the mean's backward).
            delta = r * e - h * r.pow(3) * (h * e).mean(-1, keepdim=True)
            if layer:
                delta = delta - delta.mean(-1, keepdim=True)
        return delta.to(dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """``6·N`` for the linear maps (head included), 3x each mixer's and CMS's forward FLOPs,
        and with ``teach`` a forward and a hand-written backward of the head (``4·V·d``) per
        block and level, for the tokens whose error an update uses (not differentiated:
        stop-gradient)."""
        cfg = self.config
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        inner = sum(
            block.mixer.flops_per_token(seq_len) + block.cms.flops_per_token(seq_len)
            for block in self.blocks
        )
        teach = 0.0
        if cfg.cms_objective == "teach":
            updating = sum(updating_fraction(c, seq_len) for c in cfg.cms_chunk_sizes)
            teach = cfg.n_layers * updating * 4.0 * cfg.vocab_size * cfg.d_model
        return 6.0 * n_matmul + 3.0 * inner + teach


class AttentionMixer(nn.Module):
    """Causal softmax attention with RoPE and a KV cache in a plain state dict (``k``, ``v``
    ``[B, H_kv, max_seq_len, D]``, written in place like the Transformer's, and ``pos``)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        max_seq_len: int,
        rope_theta: float | None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(d_model, n_heads, n_kv_heads, bias=bias)
        self.max_seq_len = max_seq_len
        # rope_theta None: no rotation (positions enter as learned embeddings).
        cos = sin = None
        if rope_theta is not None:
            cos, sin = rope_tables(self.attn.head_dim, max_seq_len, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, D]
        self.register_buffer("rope_sin", sin, persistent=False)  # [max_seq_len, D]

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        shape = (batch_size, self.attn.n_kv_heads, self.max_seq_len, self.attn.head_dim)
        return {
            "k": torch.zeros(shape, dtype=dtype, device=device),
            "v": torch.zeros(shape, dtype=dtype, device=device),
            "pos": torch.zeros((), dtype=torch.long, device=device),
        }

    def forward(
        self, x: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State | None]:
        if state is None:
            return self.attn(x, self.rope_cos, self.rope_sin), None
        pos = int(state["pos"])
        y = self.attn(x, self.rope_cos, self.rope_sin, (state["k"], state["v"]), pos)
        return y, {"k": state["k"], "v": state["v"], "pos": state["pos"] + x.shape[1]}

    def flops_per_token(self, seq_len: int) -> float:
        """``q kᵀ`` and ``attn·v``: ``4·d·seq_len`` forward (PaLM's count, no causal halving)."""
        return 4.0 * self.attn.n_heads * self.attn.head_dim * seq_len


@register_model("hope_attention", HopeAttentionConfig)
class HopeAttentionLM(HopeLM):
    """HOPE-attention (SPEC §5): a Transformer++ whose MLPs are Continuum Memory Systems."""

    def __init__(self, config: HopeAttentionConfig) -> None:
        if config.positions not in ("rope", "learned"):
            raise ConfigError(f"model.positions: unknown '{config.positions}'; use rope or learned")
        super().__init__(config)
        if config.positions == "learned":
            # Created after the base init so the default (RoPE) model's init draws are unchanged.
            self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
            nn.init.normal_(self.pos_embed.weight, std=config.init_std)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "pos_embed"):
            nn.init.normal_(self.pos_embed.weight, std=self.config.init_std)

    def embed_inputs(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        x = self.embed(tokens)
        if hasattr(self, "pos_embed"):
            x = x + self.pos_embed.weight[pos : pos + tokens.shape[1]]
        return x

    def build_mixer(self, config: HopeAttentionConfig) -> nn.Module:
        if config.n_heads <= 0 or config.n_kv_heads < 0:
            raise ConfigError("model.n_heads must be > 0 and model.n_kv_heads >= 0")
        n_kv = config.n_kv_heads or config.n_heads
        if config.d_model % config.n_heads or config.n_heads % n_kv:
            raise ConfigError(
                f"model.d_model={config.d_model} must be divisible by model.n_heads="
                f"{config.n_heads}, and n_heads by model.n_kv_heads={n_kv}"
            )
        if config.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta={config.rope_theta} must be > 0")
        theta = config.rope_theta if config.positions == "rope" else None
        return AttentionMixer(
            config.d_model, config.n_heads, n_kv, config.max_seq_len, theta, config.attn_bias
        )

    def mixer_outputs(self, mixer: nn.Module) -> list[nn.Linear]:
        return [mixer.attn.out]

    def mixer_check(self, config: HopeAttentionConfig, block: int) -> FiniteCheck:
        return FiniteCheck(f"block {block} (attention)", what="its output")

    @property
    def context_limit(self) -> int | None:
        return self.config.max_seq_len


def validate_hope(cfg: ModelConfig) -> None:
    """ConfigError naming the ``model.*`` field for an impossible HOPE config."""
    for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"model.{name}={getattr(cfg, name)} must be > 0")
    if cfg.norm_eps <= 0 or cfg.init_std < 0:
        raise ConfigError("model.norm_eps must be > 0 and model.init_std >= 0")
    if cfg.cms_hidden < 0:
        raise ConfigError(f"model.cms_hidden={cfg.cms_hidden} must be >= 0 (0 = default)")
    try:
        check_cms_options(
            cfg.d_model,
            cms_hidden(cfg, cfg.d_model),
            cfg.cms_chunk_sizes,
            cfg.cms_lrs,
            cfg.cms_variant,
            cfg.cms_objective,
            cfg.cms_optimizer,
            cfg.cms_momentum,
            cfg.cms_mode,
            prefix="model.cms_",
            step=cfg.cms_step,
        )
        check_block_options(cfg.cms_mlp, "rms", prefix="model.cms_")
        check_block_options("swiglu", cfg.norm, prefix="model.")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _split(state: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
