"""A Llama-style decoder-only Transformer (Transformer++): RMSNorm, RoPE, SwiGLU, no biases.

tokens -> embed -> n_layers x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> head -> logits
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nestlearn.config.schema import ModelConfig
from nestlearn.errors import ConfigError, DataError
from nestlearn.layers import CausalSelfAttention, RMSNorm, SwiGLU, rope_tables
from nestlearn.models.base import LanguageModel, State
from nestlearn.models.common import check_tokens, init_decoder_weights
from nestlearn.models.finite import FiniteCheck, check_memory_finite
from nestlearn.models.padding import PAD_KEY, padding_of, state_pad, zero_pads
from nestlearn.models.registry import register_model


@dataclass(kw_only=True)
class TransformerConfig(ModelConfig):
    """The Transformer's fields on top of :class:`ModelConfig`."""

    n_heads: int = 4  # query heads; d_model / n_heads is the head dimension
    n_kv_heads: int = 0  # key/value heads for grouped-query attention (0 = n_heads)
    mlp_hidden: int = 0  # SwiGLU width (0 = 8/3 * d_model rounded up to a multiple of 32)
    rope_theta: float = 10000.0  # RoPE base: position p rotates channel pair i by p·θ^(-2i/D)
    check_finite: bool = False  # raise naming the first layer/token whose output went non-finite


def default_mlp_hidden(d_model: int) -> int:
    """``8/3 · d_model`` (same parameters as a 4x GELU MLP) rounded up to a multiple of 32."""
    return 32 * math.ceil(8 * d_model / 3 / 32)


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: TransformerConfig, n_kv_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, n_kv_heads)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, mlp_hidden)
        # model.check_finite: the attention's and the MLP's checks (set by the model), when on
        self.checks: tuple[FiniteCheck, FiniteCheck] | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        pos: int = 0,
        lead: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.attn_norm(x)
        y = self.attn(h, cos, sin, cache, pos, lead)
        if self.checks is not None:
            check_memory_finite(self.checks[0], h, y, None, pos)
        x = x + y
        h = self.mlp_norm(x)
        y = self.mlp(h)
        if self.checks is not None:
            check_memory_finite(self.checks[1], h, y, None, pos)
        return x + y


@register_model("transformer", TransformerConfig)
class Transformer(LanguageModel):
    """Decoder-only Transformer; ``forward(tokens [B, T]) -> logits [B, T, vocab]``.

    Decoding state (:meth:`init_state`): ``"pos"`` (0-d long tensor, tokens seen so far) and, per
    block ``i``, ``"k.{i}"`` / ``"v.{i}"``: RoPE-rotated keys and values ``[B, H_kv,
    max_seq_len, D]``, valid at positions ``< pos``.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        _validate(config)
        self.config = config
        self.n_kv_heads = config.n_kv_heads or config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.mlp_hidden = config.mlp_hidden or default_mlp_hidden(config.d_model)

        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config, self.n_kv_heads, self.mlp_hidden) for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One Parameter under two names: named_parameters() lists it once (as embed.weight),
            # state_dict() twice; safetensors' save_model/load_model handle the sharing.
            self.head.weight = self.embed.weight

        # Computed, never saved: checkpoints stay valid if the table code changes.
        cos, sin = rope_tables(self.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, D]
        self.register_buffer("rope_sin", sin, persistent=False)  # [max_seq_len, D]
        if config.check_finite:
            for i, block in enumerate(self.blocks):
                block.checks = (
                    FiniteCheck(f"block {i} (attention)", what="its output"),
                    FiniteCheck(f"block {i} (MLP)", what="its output"),
                )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Depth-scaled normal init (:func:`~nestlearn.models.common.init_decoder_weights`)."""
        outputs = [p for block in self.blocks for p in (block.attn.out, block.mlp.w2)]
        init_decoder_weights(self, self.config.init_std, self.config.n_layers, outputs)

    def forward(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State | None]:
        """Logits ``[B, T, vocab]`` for ``tokens [B, T]``; with a state, continue from it.

        With a state the new keys/values are written *in place* into the state's cache tensors,
        which the returned state shares; the input dict itself is not modified (its ``"pos"``
        keeps the old value). Continuing twice from the same state (branching) overwrites the
        shared cache, so clone a state first to keep it (``{k: v.clone() for k, v in ...}``).

        ``attention_mask [B, T]`` with left padding runs batched: pad keys are masked and RoPE
        counts positions from each row's first real token; the state records each row's pads
        (``state["pad"]``, :mod:`nestlearn.models.padding`) so decoding continues as unpadded.
        Right padding needs no mask without a state; with one it is refused (the pads would sit
        between the prompt and the next tokens).
        """
        pos = 0 if state is None else int(state["pos"])
        tokens = zero_pads(tokens, attention_mask)
        check_tokens(
            tokens, self.config.vocab_size, self.config.max_seq_len, pos, state is not None
        )
        T = tokens.shape[1]
        lead = self._lead(tokens, state, pos, attention_mask)

        x = self.embed(tokens)  # [B, T, d_model]
        for i, block in enumerate(self.blocks):
            cache = None if state is None else (state[f"k.{i}"], state[f"v.{i}"])
            x = block(x, self.rope_cos, self.rope_sin, cache, pos, lead)
        logits = self.head(self.norm(x))  # [B, T, vocab]

        if state is None:
            return logits, None
        new_state = {**state, "pos": state["pos"] + T}
        if lead is not None:
            new_state[PAD_KEY] = lead
        return logits, new_state

    def _lead(
        self,
        tokens: torch.Tensor,
        state: State | None,
        pos: int,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Each row's left pads from the stream's start (``[B]``), or None when no row has any
        (the unpadded code runs). Pads are allowed only before a row's first real token."""
        padding = padding_of(attention_mask, tokens)
        before = state_pad(state, tokens.shape[0])
        if padding is None or (state is None and not padding.has_left()):
            return before
        if state is not None and padding.has_right(tokens.shape[1]):
            raise DataError(
                "attention_mask has right padding (zeros after real tokens) in a call with a "
                "decoding state: the pads would sit between these tokens and the next ones. "
                "Left-pad prompts for generation (tokenizer.padding_side='left')"
            )
        if before is None:
            before = torch.zeros_like(padding.lead)
        started = (pos - before) > 0  # rows that already hold real tokens
        if bool((started & (padding.lead > 0)).any()):
            raise DataError(
                "attention_mask has pads after real tokens of the state (a hole in the row): "
                "only the start of a sequence may be padded"
            )
        return before + padding.lead

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """An empty KV cache (zeros) for ``batch_size`` sequences, in the parameters' dtype."""
        param = self.embed.weight
        device = param.device if device is None else device
        shape = (batch_size, self.n_kv_heads, self.config.max_seq_len, self.head_dim)
        state: State = {"pos": torch.zeros((), dtype=torch.long, device=device)}
        for i in range(self.config.n_layers):
            state[f"k.{i}"] = torch.zeros(shape, dtype=param.dtype, device=device)
            state[f"v.{i}"] = torch.zeros(shape, dtype=param.dtype, device=device)
        return state

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token, PaLM (Chowdhery et al. 2022, App. B).

        ``6·N + 12·n_layers·d_model·seq_len``: ``N`` counts the weights of every matmul (q/k/v,
        attention output, the three SwiGLU maps and the output head, which costs its matmul even
        when tied) but not the embedding lookup or norm gains; each weight costs 2 FLOPs forward
        and 4 backward. The second term is ``q kᵀ`` and ``attn·v`` (2·2·d_model·seq_len forward
        per layer, x3 with backward), counted over the full ``seq_len`` as PaLM does (no causal
        halving).
        """
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        cfg = self.config
        return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def _validate(cfg: TransformerConfig) -> None:
    """Raise a :class:`ConfigError` naming the field and the fix for an impossible config."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"model.{name}={getattr(cfg, name)} must be > 0")
    for name in ("n_kv_heads", "mlp_hidden"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"model.{name}={getattr(cfg, name)} must be >= 0 (0 = default)")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(
            f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}; "
            "choose n_heads dividing d_model"
        )
    n_kv_heads = cfg.n_kv_heads or cfg.n_heads
    if cfg.n_heads % n_kv_heads:
        raise ConfigError(
            f"model.n_heads={cfg.n_heads} is not divisible by model.n_kv_heads={n_kv_heads}; "
            "each key/value head serves a whole group of query heads"
        )
    if cfg.rope_theta <= 0:
        raise ConfigError(f"model.rope_theta={cfg.rope_theta} must be > 0")
    if cfg.norm_eps <= 0:
        raise ConfigError(f"model.norm_eps={cfg.norm_eps} must be > 0")
    if cfg.init_std < 0:
        raise ConfigError(f"model.init_std={cfg.init_std} must be >= 0")
