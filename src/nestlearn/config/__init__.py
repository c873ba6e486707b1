"""Typed run configuration: schema, named configs and overrides."""

from nestlearn.config.loader import (
    find_config,
    from_dict,
    load_config,
    named_configs,
    parse_overrides,
    replace,
    save_config,
    to_dict,
)
from nestlearn.config.schema import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SampleConfig",
    "TrainConfig",
    "find_config",
    "from_dict",
    "load_config",
    "named_configs",
    "parse_overrides",
    "replace",
    "save_config",
    "to_dict",
]
