"""Typed configs: dataclass schemas, YAML presets and CLI overrides."""

from dcar.config.loader import ConfigError, Preset, load_config, to_container, to_yaml
from dcar.config.schema import (
    DataConfig,
    LogConfig,
    LoopConfig,
    OptimConfig,
    RunConfig,
    ShapesConfig,
    TrainConfig,
    choice,
)

__all__ = [
    "ConfigError", "DataConfig", "LogConfig", "LoopConfig", "OptimConfig", "Preset", "RunConfig", "ShapesConfig",
    "TrainConfig", "choice", "load_config", "to_container", "to_yaml",
]
