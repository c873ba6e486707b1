"""``NestlearnConfig``: a Hugging Face config that carries one nestlearn model config.

The nestlearn model config (``model.*`` of a run, ``name`` included) is stored whole, as the dict
``nestlearn``; it is the only source of truth. The usual Hugging Face fields (``vocab_size``,
``hidden_size``, ``num_hidden_layers``, ``max_position_embeddings``, ``tie_word_embeddings``) are
derived from it on construction, for tools that read them; changing them afterwards changes
nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from nestlearn.config.schema import ModelConfig


class NestlearnConfig(PretrainedConfig):
    """``config.json`` of a nestlearn model: ``{"model_type": "nestlearn", "nestlearn": {...}}``."""

    model_type = "nestlearn"

    nestlearn: dict[str, Any] | None = None  # the model.* section, name included
    vocab_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0
    max_position_embeddings: int = 0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.nestlearn = dict(self.nestlearn or {})
        defaults = dataclasses.asdict(ModelConfig())
        values = {**defaults, **self.nestlearn}
        self.vocab_size = int(values["vocab_size"])
        self.hidden_size = int(values["d_model"])
        self.num_hidden_layers = int(values["n_layers"])
        self.max_position_embeddings = int(values["max_seq_len"])
        self.tie_word_embeddings = bool(values["tie_embeddings"])
        super().__post_init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> NestlearnConfig:
        """Wrap a nestlearn :class:`~nestlearn.config.schema.ModelConfig` (any architecture)."""
        return cls(nestlearn=dataclasses.asdict(config), **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """Nothing: a saved nestlearn folder carries its own remote code
        (:mod:`nestlearn.hf.remote_code`), not a copy of this file."""

    def to_model_config(self) -> ModelConfig:
        """The nestlearn model config, validated against its architecture's config class.

        Raises :class:`~nestlearn.errors.ConfigError` for an unknown ``name`` or key.
        """
        from nestlearn.config.loader import build_section, model_config_class

        name = str(self.nestlearn.get("name", ModelConfig().name))
        return build_section("model", model_config_class(name), self.nestlearn)
