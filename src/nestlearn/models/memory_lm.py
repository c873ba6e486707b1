"""Language models whose sequence mixer is an associative memory (SPEC §2.2).

tokens -> embed -> n_layers x [x + mixer(norm(x)); x + swiglu(norm(x))] -> norm -> head

The mixer is a matrix memory (``linear_attention``, ``gla``, ``deltanet``, ``gated_deltanet``) or
Titans' MLP memory (``titans_lmm``). Training runs the chunkwise form; decoding carries each
layer's memory and short-conv state (``blocks.{i}.*`` keys), constant in the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nestlearn.config.schema import ModelConfig
from nestlearn.errors import ConfigError
from nestlearn.layers import RMSNorm, SwiGLU
from nestlearn.layers.matrix_memory import VARIANTS, MatrixMemoryMixer
from nestlearn.layers.neural_memory import STEP_SCALES, NeuralMemoryMixer
from nestlearn.memory.matrix.fla_kernels import check_kernel
from nestlearn.models.base import LanguageModel, State
from nestlearn.models.common import block_state, check_tokens, init_decoder_weights
from nestlearn.models.finite import (
    FiniteCheck,
    check_memory_finite,
    inner_lr_fixes,
    sequential_reference,
)
from nestlearn.models.padding import (
    PAD_KEY,
    Padding,
    forward_padded,
    padding_of,
    state_pad,
    zero_pads,
)
from nestlearn.models.registry import register_model
from nestlearn.models.transformer import default_mlp_hidden


@dataclass(kw_only=True)
class MemoryLMConfig(ModelConfig):
    """Fields of the memory-mixer models on top of :class:`ModelConfig`."""

    n_heads: int = 4  # memory heads
    head_dim: int = 0  # key/value width per head (0 = d_model / n_heads)
    mlp_hidden: int = 0  # SwiGLU width (0 = 8/3 * d_model rounded up to a multiple of 32)
    conv_size: int = 4  # short causal conv on q/k/v (0 = off)
    chunk_size: int = 64  # tokens per chunk of the chunkwise-parallel form
    mode: str = "chunk"  # "chunk" (training form) or "reference" (sequential loop, for checks)
    check_finite: bool = False  # raise naming the first layer/token whose memory went non-finite
    # Matrix memories' chunk form: "torch" (ours), "fla" (flash-linear-attention CUDA kernels,
    # optional extra) or "auto" (fla on CUDA when installed, else ours). docs/scale.md.
    kernel: str = "torch"


@dataclass(kw_only=True)
class TitansLMMConfig(MemoryLMConfig):
    """Titans' neural memory: an MLP per head trained in context by chunked GD."""

    memory_depth: int = 2  # linear maps in the memory MLP (>= 1)
    memory_hidden_mult: int = 2  # memory MLP hidden width = head_dim * this
    memory_residual: bool = True  # M(x) = x + MLP(x)
    memory_momentum: bool = True  # data-dependent inner momentum μ_t (False: plain GD)
    memory_objective: str = "l2"  # inner objective: "l2", "dot" or "huber"
    # Inner step η_t = (1 − μ_t)·memory_max_lr·sigmoid(x W_η)/C with the defaults below
    # (layers/neural_memory.py, docs/titans-stability.md).
    memory_max_lr: float = 1.0
    # "chunk": a chunk's total step ≤ memory_max_lr (stable on any stream); "token": no 1/C.
    memory_step_scale: str = "chunk"
    memory_ema_momentum: bool = True  # S_t = μ S_{t−1} − (1 − μ) η̂ g_t (gain 1 for any μ)
    detach_inner: bool = False  # stop-gradient through the inner gradients (cheaper)


class MemoryBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``.

    With ``check_finite`` set (by the model, from ``model.check_finite``), the mixer's output and
    new state are checked after every call (:func:`check_memory_finite`); ``start`` is the
    absolute position of ``x[:, 0]`` so the error can name the token.
    """

    def __init__(self, mixer: nn.Module, d_model: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)
        self.check_finite: FiniteCheck | None = None  # the mixer's check, when on

    def forward(
        self, x: torch.Tensor, state: State | None, start: int = 0, real: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State | None]:
        h = self.mixer_norm(x)
        y, new_state = self.mixer(h, state) if real is None else self.mixer(h, state, real)
        if self.check_finite is not None:
            # the sequential form locates the token: chunkwise forms spread a NaN in its chunk
            reference = sequential_reference(self.mixer, state)
            check_memory_finite(self.check_finite, h, y, new_state, start, reference)
        state = new_state
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state


class MemoryLM(LanguageModel):
    """A decoder LM with one memory mixer per block; subclasses say which (:meth:`build_mixer`)."""

    def __init__(self, config: MemoryLMConfig) -> None:
        super().__init__()
        _validate(config)
        self.config = config
        self.head_dim = config.head_dim or config.d_model // config.n_heads
        hidden = config.mlp_hidden or default_mlp_hidden(config.d_model)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            MemoryBlock(self.build_mixer(config), config.d_model, hidden, config.norm_eps)
            for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        if config.check_finite:
            for i, block in enumerate(self.blocks):
                block.check_finite = FiniteCheck(
                    f"block {i} ({config.name} mixer)", fixes=self.memory_fixes(config)
                )
        self.reset_parameters()

    def build_mixer(self, config: MemoryLMConfig) -> nn.Module:
        raise NotImplementedError

    def memory_fixes(self, config: MemoryLMConfig) -> tuple[str, ...]:
        """What a non-finite memory error advises to lower (keys this model has)."""
        return inner_lr_fixes()

    def reset_parameters(self) -> None:
        outputs = [p for b in self.blocks for p in (b.mixer.heads.o_proj, b.mlp.w2)]
        init_decoder_weights(self, self.config.init_std, self.config.n_layers, outputs)
        for block in self.blocks:
            block.mixer.reset_memory_parameters()

    @property
    def context_limit(self) -> int | None:
        return None

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        param = self.embed.weight
        device = param.device if device is None else device
        state: State = {"pos": torch.zeros((), dtype=torch.long, device=device)}
        for i, block in enumerate(self.blocks):
            for key, value in block.mixer.init_state(batch_size, device, param.dtype).items():
                state[f"blocks.{i}.{key}"] = value
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
        without a state, row by row with one), so chunk boundaries fall as unpadded."""
        return forward_padded(self, self.forward_unpadded, tokens, state, attention_mask)

    def forward_unpadded(
        self, tokens: torch.Tensor, state: State | None = None, real: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State | None]:
        """The batched form; ``real [B, T]`` (bool) marks the real tokens for mixers that mask
        pads themselves (matrix memories), None: every token is real."""
        check_tokens(tokens, self.config.vocab_size, None)
        x = self.embed(tokens)  # [B, T, d_model]
        new_state: State | None = None if state is None else {"pos": state["pos"] + tokens.shape[1]}
        start = 0 if state is None or not self.config.check_finite else int(state["pos"])
        for i, block in enumerate(self.blocks):
            x, sub = block(x, block_state(state, i), start, real)
            if new_state is not None:
                new_state.update({f"blocks.{i}.{k}": v for k, v in sub.items()})
        return self.head(self.norm(x)), new_state

    def flops_per_token(self, seq_len: int) -> float:
        """``6·N`` for the matmul weights (head included) plus 3x each mixer's forward FLOPs."""
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        mixers = sum(block.mixer.flops_per_token(seq_len) for block in self.blocks)
        return 6.0 * n_matmul + 3.0 * mixers


def _validate(cfg: MemoryLMConfig) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "chunk_size"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"model.{name}={getattr(cfg, name)} must be > 0")
    if cfg.head_dim == 0 and cfg.d_model % cfg.n_heads:
        raise ConfigError(
            f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}; "
            "choose n_heads dividing d_model or set model.head_dim"
        )
    if cfg.conv_size < 0 or cfg.head_dim < 0:
        raise ConfigError("model.conv_size and model.head_dim must be >= 0 (0 = off / default)")
    if cfg.mode not in ("chunk", "reference"):
        raise ConfigError(f"model.mode={cfg.mode!r}; choose one of chunk, reference")
    try:
        check_kernel(cfg.kernel)
    except ValueError as exc:
        raise ConfigError(f"model.{exc}") from exc


class MatrixMemoryLM(MemoryLM):
    """Linear attention, GLA, DeltaNet or Gated DeltaNet, by ``config.name``."""

    def forward(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State | None]:
        """Logits ``[B, T, vocab]``. Padding runs batched where it is exact: pads before a row's
        first token (from a fresh row) neither write nor decay the memory
        (:meth:`MatrixMemoryMixer.forward`), and the chunkwise form is exact wherever its chunk
        boundaries fall. Right padding with a state (the short convs would keep the pads) and
        ``check_finite`` take the row-wise fallback (:mod:`nestlearn.models.padding`)."""
        B, T = tokens.shape
        tokens = zero_pads(tokens, attention_mask)
        padding = padding_of(attention_mask, tokens)
        pad = state_pad(state, B)
        if (padding is None and pad is None) or not self._batches(tokens, padding, state, pad):
            return super().forward(tokens, state, attention_mask=attention_mask)
        real = None
        if padding is not None and (state is not None or padding.has_left()):
            real = attention_mask.to(tokens.device).bool()
        logits, new_state = self.forward_unpadded(tokens, state, real)
        if new_state is not None:
            before = torch.zeros(B, dtype=torch.long, device=tokens.device) if pad is None else pad
            new_state[PAD_KEY] = before if padding is None else before + (T - padding.real)
        return logits, new_state

    def _batches(
        self,
        tokens: torch.Tensor,
        padding: Padding | None,
        state: State | None,
        pad: torch.Tensor | None,
    ) -> bool:
        """Whether a padded call is exact batched (else the row-wise fallback runs): no
        ``check_finite`` (its sequential reference reads every token) and, with a state, no right
        padding and left pads only in rows without real tokens yet (the short convs' state then
        holds zeros, as a fresh one)."""
        if self.config.check_finite:
            return False
        if padding is None or state is None:
            return True
        if padding.has_right(tokens.shape[1]):
            return False
        seen = state["pos"] - (0 if pad is None else pad)  # real tokens per row so far
        return not bool(((seen > 0) & (padding.lead > 0)).any())

    def build_mixer(self, config: MemoryLMConfig) -> nn.Module:
        return MatrixMemoryMixer(
            config.name,
            config.d_model,
            config.n_heads,
            self.head_dim,
            conv_size=config.conv_size,
            chunk_size=config.chunk_size,
            mode=config.mode,
            eps=config.norm_eps,
            kernel=config.kernel,
        )


for _name in VARIANTS:
    register_model(_name, MemoryLMConfig)(MatrixMemoryLM)


@register_model("titans_lmm", TitansLMMConfig)
class TitansLM(MemoryLM):
    """Titans' neural long-term memory as the sequence mixer of every block (LMM variant)."""

    def memory_fixes(self, config: TitansLMMConfig) -> tuple[str, ...]:
        return inner_lr_fixes("model.memory_max_lr")

    def build_mixer(self, config: TitansLMMConfig) -> nn.Module:
        if config.memory_depth < 1 or config.memory_hidden_mult < 1:
            raise ConfigError("model.memory_depth and model.memory_hidden_mult must be >= 1")
        if config.memory_step_scale not in STEP_SCALES:
            raise ConfigError(
                f"model.memory_step_scale={config.memory_step_scale!r}; choose one of "
                f"{list(STEP_SCALES)}"
            )
        return NeuralMemoryMixer(
            config.d_model,
            config.n_heads,
            self.head_dim,
            depth=config.memory_depth,
            hidden_mult=config.memory_hidden_mult,
            residual=config.memory_residual,
            momentum=config.memory_momentum,
            objective=config.memory_objective,
            max_lr=config.memory_max_lr,
            step_scale=config.memory_step_scale,
            ema_momentum=config.memory_ema_momentum,
            conv_size=config.conv_size,
            chunk_size=config.chunk_size,
            mode=config.mode,
            detach_inner=config.detach_inner,
            eps=config.norm_eps,
        )
