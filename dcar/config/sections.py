"""Load one section of a YAML config (``model:``, ``text_encoder:``) into its dataclass, with the loader's checks.

Used by ``build_tokenizer`` / ``build_generator`` so that a model can be built from a full training YAML, a
model-only YAML, a dict or a config object, and an unknown key is reported with its dotted path and the closest
valid keys (the same checks as :func:`dcar.config.loader.load_config`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from dcar.config.loader import check_keys, schema_paths

T = TypeVar("T")


def load_section(source: Any, cls: type[T], section: str, *, prefix: str = "") -> T:
    """A validated ``cls`` from ``source``: a ``cls`` instance, a mapping / DictConfig, or a YAML path.

    If the mapping has a ``section`` entry (a full training YAML), that entry is used. Unknown keys are reported as
    ``<prefix><key>``. ``cls.validate()`` runs when it exists.
    """
    from dcar.models.hub import config_from_dict

    if isinstance(source, cls):
        return source
    where = "in the given mapping"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        source, where = OmegaConf.load(path), f"in {path}"
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=True)
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a {cls.__name__}, a mapping or a YAML path, got {type(source).__name__}")
    data = dict(source)
    if isinstance(data.get(section), Mapping):
        data = dict(data[section])
    paths: dict[str, Any] = {prefix + k: f for k, f in schema_paths(cls).items()}
    parts = prefix.rstrip(".").split(".") if prefix else []
    paths.update({".".join(parts[: i + 1]): None for i in range(len(parts))})  # the prefix's own nodes
    check_keys(data, paths, where, prefix=prefix)
    config = config_from_dict(cls, data)
    if hasattr(config, "validate"):
        config.validate()
    return config
