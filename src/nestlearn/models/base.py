"""The contract every language model of nestlearn follows.

Training, evaluation, generation, checkpoints and the CLI only use this interface, so a new
architecture (a memory layer, HOPE, ...) plugs in by subclassing :class:`LanguageModel` and
registering itself (:func:`nestlearn.models.registry.register_model`).

A *state* is a plain ``dict[str, Tensor]``: a KV cache for attention, memory weights for recurrent
models. It can be saved with safetensors, copied and restored; ``forward(x, state)`` continues a
sequence from it (SPEC §2.3, recurrent form).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from nestlearn.config.schema import ModelConfig

State = dict[str, torch.Tensor]


class LanguageModel(nn.Module, ABC):
    """Token ids ``[B, T]`` -> next-token logits ``[B, T, vocab]``."""

    config: ModelConfig

    @abstractmethod
    def forward(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State | None]:
        """Logits for every position; with a ``state``, continue from it and return the new one.

        ``state=None`` is the training form (whole sequences, no cache); it returns
        ``(logits, None)``. ``attention_mask [B, T]`` (1 = real token, 0 = padding; left or right
        padding, no holes): each row's logits at real positions and its state equal those of its
        real tokens run alone (:mod:`nestlearn.models.padding`, docs/padding.md); no mask or an
        all-ones mask runs exactly the unpadded code.
        """

    @abstractmethod
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """An empty decoding state for ``batch_size`` sequences."""

    @property
    def context_limit(self) -> int | None:
        """Longest context the model can read (``None``: unbounded, for recurrent models)."""
        return self.config.max_seq_len

    def levels(self, outer_optimizer: str = "AdamW") -> list:
        """Every learning component with its objective, optimizer and update frequency."""
        from nestlearn.levels import model_levels

        return model_levels(self, outer_optimizer)

    @abstractmethod
    def flops_per_token(self, seq_len: int) -> float:
        """Forward + backward FLOPs per trained token at context ``seq_len`` (for MFU)."""
