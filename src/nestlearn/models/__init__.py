"""Language models: the common interface, the registry and the built-in architectures.

Importing an architecture's module registers it (``memory_lm``, ``transformer``).
"""

from nestlearn.models.base import LanguageModel, State
from nestlearn.models.hope import HopeAttentionConfig  # noqa: F401 (registers hope_attention)
from nestlearn.models.hope_titans import HopeConfig  # noqa: F401 (registers hope)
from nestlearn.models.memory_lm import MemoryLMConfig, TitansLMMConfig
from nestlearn.models.registry import available_models, build_model, register_model
from nestlearn.models.state_io import load_state, reset_state, save_state
from nestlearn.models.titans import TitansCompositionConfig  # noqa: F401 (registers MAC/MAG/MAL)
from nestlearn.models.transformer import Transformer, TransformerConfig

__all__ = [
    "LanguageModel",
    "MemoryLMConfig",
    "State",
    "TitansLMMConfig",
    "Transformer",
    "TransformerConfig",
    "available_models",
    "build_model",
    "load_state",
    "register_model",
    "reset_state",
    "save_state",
]
