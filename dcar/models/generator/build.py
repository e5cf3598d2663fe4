"""``build_generator`` / ``build_text_encoder``: DC-AR models from config objects, dicts or YAML files.

A YAML file holds the model under ``model:`` (and, optionally, the text encoder under ``text_encoder:``); other
top-level sections (training settings) are ignored here. Unknown keys inside those sections raise a ``ValueError``
naming the key. Models are built with random init, which is meta-safe (``with torch.device("meta"):``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dcar.config.sections import load_section

from .config import DCARConfig, TextEncoderConfig
from .dcar import DCAR
from .text_encoder import TextEncoder

__all__ = ["build_generator", "build_text_encoder", "load_generator_config", "load_text_encoder_config"]

Source = Any  # a config dataclass, a mapping / DictConfig, or a YAML path


def load_generator_config(source: Source) -> DCARConfig:
    """A validated :class:`DCARConfig` from a config, a (``model:``-wrapped or bare) mapping or a YAML path."""
    return load_section(source, DCARConfig, "model", prefix="model.")


def load_text_encoder_config(source: Source) -> TextEncoderConfig:
    """A :class:`TextEncoderConfig` from a config, a (``text_encoder:``-wrapped or bare) mapping or a YAML path."""
    return load_section(source, TextEncoderConfig, "text_encoder", prefix="text_encoder.")


def build_generator(source: Source) -> DCAR:
    """A randomly initialised :class:`DCAR` (works under ``with torch.device("meta"):``, where init is skipped)."""
    return DCAR(load_generator_config(source))


def build_text_encoder(source: Source, **overrides: Any) -> TextEncoder:
    """A frozen :class:`TextEncoder`; ``overrides`` replace config fields (e.g. ``tokenizer_path=...``)."""
    config = dataclasses.replace(load_text_encoder_config(source), **overrides)
    return TextEncoder(config)
