"""Architectures by name: ``model.name`` in a config picks one.

Each architecture registers its model class together with its config dataclass (a subclass of
:class:`~nestlearn.config.schema.ModelConfig`), so the config loader can validate ``model.*`` keys
against the chosen architecture before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable

from nestlearn.config.schema import ModelConfig
from nestlearn.errors import ConfigError
from nestlearn.models.base import LanguageModel

_MODELS: dict[str, tuple[type[ModelConfig], type[LanguageModel]]] = {}


def register_model(
    name: str, config_cls: type[ModelConfig]
) -> Callable[[type[LanguageModel]], type[LanguageModel]]:
    """Class decorator: ``@register_model("transformer", TransformerConfig)``."""

    def wrap(model_cls: type[LanguageModel]) -> type[LanguageModel]:
        if name in _MODELS:
            raise ValueError(f"model '{name}' is registered twice")
        _MODELS[name] = (config_cls, model_cls)
        return model_cls

    return wrap


def _ensure_loaded() -> None:
    # Importing the package registers every built-in architecture.
    import nestlearn.models  # noqa: F401


def available_models() -> list[str]:
    _ensure_loaded()
    return sorted(_MODELS)


def _lookup(name: str) -> tuple[type[ModelConfig], type[LanguageModel]]:
    _ensure_loaded()
    if name not in _MODELS:
        raise ConfigError(f"unknown model.name '{name}'; available: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def model_config_class(name: str) -> type[ModelConfig]:
    return _lookup(name)[0]


def build_model(config: ModelConfig) -> LanguageModel:
    """Instantiate the architecture ``config.name`` (``config.vocab_size`` must be set)."""
    config_cls, model_cls = _lookup(config.name)
    if not isinstance(config, config_cls):
        raise ConfigError(
            f"model.name='{config.name}' expects {config_cls.__name__}, got {type(config).__name__}"
        )
    if config.vocab_size <= 0:
        raise ConfigError("model.vocab_size is 0: set it, or let the tokenizer set it")
    return model_cls(config)
