"""``build_tokenizer``: a :class:`DCHT` from a config object, a dict or a YAML file (optionally under ``model:``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dcar.config.sections import load_section

from .config import DCHTConfig
from .dcht import DCHT


def load_tokenizer_config(source: DCHTConfig | Mapping[str, Any] | str | os.PathLike) -> DCHTConfig:
    """A :class:`DCHTConfig` from a config, a (possibly ``model:``-wrapped) dict/DictConfig, or a YAML path."""
    return load_section(source, DCHTConfig, "model")


def build_tokenizer(source: DCHTConfig | Mapping[str, Any] | str | os.PathLike) -> DCHT:
    """Build a randomly initialised DC-HT (works under ``with torch.device("meta"):``)."""
    return DCHT(load_tokenizer_config(source))
