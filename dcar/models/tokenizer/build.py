"""``build_tokenizer``: a :class:`DCHT` from a config object, a dict or a YAML file (optionally under ``model:``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..hub import config_from_dict
from .config import DCHTConfig
from .dcht import DCHT


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the first key of ``data`` that is not a field of dataclass ``cls``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown {cls.__name__} key '{where}{key}'; valid keys: {sorted(fields)}")
        sub = fields[key].default_factory  # nested dataclass configs (the quantizer)
        if dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
            _check_keys(sub, value, f"{where}{key}.")


def load_tokenizer_config(source: DCHTConfig | Mapping[str, Any] | str | os.PathLike) -> DCHTConfig:
    """A :class:`DCHTConfig` from a config, a (possibly ``model:``-wrapped) dict/DictConfig, or a YAML path."""
    if isinstance(source, DCHTConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer config {path} does not exist")
        source = OmegaConf.load(path)
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=True)
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a DCHTConfig, a mapping or a YAML path, got {type(source).__name__}")
    data = dict(source)
    if "model" in data and isinstance(data["model"], Mapping):
        data = dict(data["model"])
    _check_keys(DCHTConfig, data, "")
    return config_from_dict(DCHTConfig, data)


def build_tokenizer(source: DCHTConfig | Mapping[str, Any] | str | os.PathLike) -> DCHT:
    """Build a randomly initialised DC-HT (works under ``with torch.device("meta"):``)."""
    return DCHT(load_tokenizer_config(source))
