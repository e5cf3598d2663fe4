"""A text encoder as a folder: its ``TextEncoderConfig`` (``dcar_text_encoder.json``), the Hugging Face tokenizer
files and the encoder weights from ``transformers``' ``save_pretrained(safe_serialization=True)``; the
``text_encoder/`` part of a ``DCARPipeline`` folder. Loading never unpickles."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from dcar.utils.atomic import atomic_write_text

from .config import TextEncoderConfig
from .text_encoder import TextEncoder

__all__ = ["TEXT_ENCODER_CONFIG", "load_text_encoder", "save_text_encoder"]

TEXT_ENCODER_CONFIG = "dcar_text_encoder.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def save_text_encoder(text_encoder: TextEncoder, directory: str | os.PathLike) -> Path:
    """Write the encoder's config, its tokenizer files and its weights (safetensors) into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    text_encoder.model.save_pretrained(str(out), safe_serialization=True)
    text_encoder.tokenizer.save_pretrained(str(out))
    cfg = dataclasses.asdict(text_encoder.config)
    atomic_write_text(out / TEXT_ENCODER_CONFIG, json.dumps(cfg, indent=2, sort_keys=True))
    return out


def load_text_encoder(directory: str | os.PathLike) -> TextEncoder:
    """A :class:`TextEncoder` from a :func:`save_text_encoder` folder (a ``t5-random`` encoder loads as ``t5``)."""
    folder = Path(directory)
    cfg_path = folder / TEXT_ENCODER_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing; save the text encoder with DCARPipeline.save_pretrained")
    if not (folder / "model.safetensors").is_file() and not any(folder.glob("model-*.safetensors")):
        raise FileNotFoundError(f"{folder} holds no safetensors weights")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{folder} holds pickled files {pickles}; dcar only loads safetensors weights")
    saved = TextEncoderConfig(**json.loads(cfg_path.read_text()))
    config = dataclasses.replace(
        saved, kind="hf" if saved.kind == "hf" else "t5", name_or_path=str(folder), tokenizer_path=str(folder),
        t5_config={},
    )
    return TextEncoder(config)
