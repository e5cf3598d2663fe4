"""``save_pretrained`` / ``from_pretrained`` for dcar models: a JSON config plus safetensors weights.

Written on top of ``huggingface_hub`` rather than with its ``PyTorchModelHubMixin`` because that mixin falls back
to ``torch.load`` of pickled ``pytorch_model.bin`` files; dcar never unpickles weights. The on-disk layout
(``config.json`` + ``model.safetensors``) is the mixin's, so the folders are Hub-compatible.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model

from dcar.utils.atomic import atomic_path, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound="HubMixin")


def config_to_dict(config: Any) -> dict:
    """A dataclass config as a plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type, data: dict) -> Any:
    """Rebuild a (nested) dataclass config from a dict, rejecting unknown keys and wrong types."""
    merged = OmegaConf.merge(OmegaConf.structured(cls), data)
    return OmegaConf.to_object(merged)


def resolve_pretrained_dir(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; anything else is treated as a Hub repo id and downloaded (config + safetensors)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained expects a directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            str(path_or_repo_id), revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "*.json"]
        )
    except Exception as err:  # offline machines, typos, private repos
        raise FileNotFoundError(
            f"{path_or_repo_id!r} is neither a local directory nor a reachable Hub repo id ({type(err).__name__}: "
            f"{err}). Pass a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}."
        ) from err
    return Path(local)


class HubMixin:
    """Mixin for ``nn.Module`` subclasses constructed as ``Cls(config)`` from a dataclass ``config_class``."""

    config_class: ClassVar[type]
    config: Any

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory`` (created if needed)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {"_class": type(self).__name__, **config_to_dict(self.config)}
        atomic_write_text(out / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True))
        with atomic_path(out / WEIGHTS_NAME) as tmp:
            save_model(self, str(tmp))  # handles shared tensors
        return out

    @classmethod
    def from_pretrained(
        cls: type[M], path_or_repo_id: str | os.PathLike, *, revision: str | None = None, strict: bool = True,
        map_location: str | torch.device = "cpu",
    ) -> M:
        """Build the model from ``config.json`` and load ``model.safetensors`` (a local directory or a Hub repo id)."""
        folder = resolve_pretrained_dir(path_or_repo_id, revision)
        cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing; a pretrained folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        data = json.loads(cfg_path.read_text())
        saved_class = data.pop("_class", cls.__name__)
        if saved_class != cls.__name__:
            raise ValueError(f"{folder} holds a {saved_class}, not a {cls.__name__}")
        model = cls(config_from_dict(cls.config_class, data))
        missing, unexpected = load_model(model, str(w_path), strict=False, device=str(map_location))
        if strict and (missing or unexpected):
            raise ValueError(
                f"weights in {w_path} do not match {cls.__name__}: missing keys {sorted(missing)}, "
                f"unexpected keys {sorted(unexpected)}"
            )
        return model
