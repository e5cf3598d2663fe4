"""``build_generator`` / ``build_text_encoder``: DC-AR models from config objects, dicts or YAML files.

A YAML file holds the model under ``model:`` (and, optionally, the text encoder under ``text_encoder:``); other
top-level sections (training settings) are ignored here. Unknown keys inside those sections raise a ``ValueError``
naming the key. Models are built with random init, which is meta-safe (``with torch.device("meta"):``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..hub import config_from_dict
from .config import DCARConfig, TextEncoderConfig
from .dcar import DCAR
from .text_encoder import TextEncoder

__all__ = ["build_generator", "build_text_encoder", "load_generator_config", "load_text_encoder_config"]

Source = Any  # a config dataclass, a mapping / DictConfig, or a YAML path


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the first key of ``data`` that dataclass ``cls`` does not have."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown {cls.__name__} key '{where}{key}'; valid keys: {', '.join(sorted(fields))}")
        sub = fields[key].default_factory
        if dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
            _check_keys(sub, value, f"{where}{key}.")


def _section(source: Source, cls: type, section: str) -> Any:
    if isinstance(source, cls):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        source = OmegaConf.load(path)
        if section not in source:
            raise ValueError(f"{path} has no '{section}:' section")
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=True)
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a {cls.__name__}, a mapping or a YAML path, got {type(source).__name__}")
    data = dict(source)
    if section in data and isinstance(data[section], Mapping):
        data = dict(data[section])
    _check_keys(cls, data, f"{section}.")
    config = config_from_dict(cls, data)
    config.validate()
    return config


def load_generator_config(source: Source) -> DCARConfig:
    """A validated :class:`DCARConfig` from a config, a (``model:``-wrapped or bare) mapping or a YAML path."""
    return _section(source, DCARConfig, "model")


def load_text_encoder_config(source: Source) -> TextEncoderConfig:
    """A :class:`TextEncoderConfig` from a config, a (``text_encoder:``-wrapped or bare) mapping or a YAML path."""
    return _section(source, TextEncoderConfig, "text_encoder")


def build_generator(source: Source) -> DCAR:
    """A randomly initialised :class:`DCAR` (works under ``with torch.device("meta"):``, where init is skipped)."""
    return DCAR(load_generator_config(source))


def build_text_encoder(source: Source, **overrides: Any) -> TextEncoder:
    """A frozen :class:`TextEncoder`; ``overrides`` replace config fields (e.g. ``tokenizer_path=...``)."""
    config = dataclasses.replace(load_text_encoder_config(source), **overrides)
    return TextEncoder(config)
