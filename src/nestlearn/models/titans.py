"""Titans' attention + memory compositions as language models: ``titans_mac``, ``titans_mag``,
``titans_mal`` (Behrouz et al. 2024, §4; ``docs/titans-compositions.md``).

The stack is :class:`~nestlearn.models.memory_lm.MemoryLM`'s (embed -> blocks of
``[x + mixer(norm(x)); x + swiglu(norm(x))]`` -> norm -> head); the mixer of each block is a
composition of sliding-window / segment attention with persistent tokens and Titans' neural
memory, built exactly as ``titans_lmm`` builds its memory. Training runs the chunkwise memory
form; decoding carries per block a fixed-size KV cache and the memory state, so the models have
no context limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from nestlearn.errors import ConfigError
from nestlearn.layers.neural_memory import NeuralMemoryMixer
from nestlearn.layers.sliding_attention import SlidingWindowAttention
from nestlearn.layers.titans import MemoryAsGate, MemoryAsLayer
from nestlearn.layers.titans_mac import MemoryAsContext
from nestlearn.models.common import init_decoder_weights
from nestlearn.models.memory_lm import TitansLM, TitansLMMConfig
from nestlearn.models.registry import register_model


@dataclass(kw_only=True)
class TitansCompositionConfig(TitansLMMConfig):
    """Titans MAC / MAG / MAL: the neural memory's fields plus the attention's."""

    window: int = 128  # sliding-window span of MAG / MAL attention (MAC attends per chunk_size)
    n_persistent: int = 4  # learned persistent key/value tokens per attention head (0 = none)


class TitansCompositionLM(TitansLM):
    """A ``titans_lmm`` stack whose mixer composes the memory with attention (:meth:`compose`)."""

    def build_mixer(self, config: TitansCompositionConfig) -> nn.Module:
        if config.window < 1 or config.n_persistent < 0:
            raise ConfigError(
                f"model.window={config.window} must be >= 1 and "
                f"model.n_persistent={config.n_persistent} >= 0"
            )
        return self.compose(config, super().build_mixer(config))

    def compose(self, config: TitansCompositionConfig, memory: NeuralMemoryMixer) -> nn.Module:
        raise NotImplementedError

    def sliding_attention(self, config: TitansCompositionConfig) -> SlidingWindowAttention:
        return SlidingWindowAttention(
            config.d_model,
            config.n_heads,
            self.head_dim,
            window=config.window,
            n_persistent=config.n_persistent,
        )

    def reset_parameters(self) -> None:
        outputs = [p for b in self.blocks for p in (*b.mixer.residual_outputs(), b.mlp.w2)]
        init_decoder_weights(self, self.config.init_std, self.config.n_layers, outputs)
        for block in self.blocks:
            block.mixer.reset_memory_parameters()


@register_model("titans_mac", TitansCompositionConfig)
class TitansMAC(TitansCompositionLM):
    """Memory as a Context: attention per segment over retrieved memory, then written into it."""

    def compose(self, config: TitansCompositionConfig, memory: NeuralMemoryMixer) -> nn.Module:
        return MemoryAsContext(
            memory,
            config.d_model,
            config.n_heads,
            self.head_dim,
            n_persistent=config.n_persistent,
            eps=config.norm_eps,
        )


@register_model("titans_mag", TitansCompositionConfig)
class TitansMAG(TitansCompositionLM):
    """Memory as a Gate: sliding-window attention gated by the memory's read."""

    def compose(self, config: TitansCompositionConfig, memory: NeuralMemoryMixer) -> nn.Module:
        return MemoryAsGate(self.sliding_attention(config), memory, config.d_model, config.norm_eps)


@register_model("titans_mal", TitansCompositionConfig)
class TitansMAL(TitansCompositionLM):
    """Memory as a Layer: the memory, then sliding-window attention on its output."""

    def compose(self, config: TitansCompositionConfig, memory: NeuralMemoryMixer) -> nn.Module:
        return MemoryAsLayer(
            self.sliding_attention(config), memory, config.d_model, config.norm_eps
        )
