"""Encode a captioned dataset once with a trained DC-HT: indices + residual tokens (+ text features) in shards.

    python scripts/pretokenize.py tokenizer=runs/tok/alternate/final data=shapes data.resolution=128 \
        num_samples=20000 out=runs/tokens/train
    python scripts/pretokenize.py tokenizer=PATH data=webdataset data.path='shards/{000..099}.tar' \
        data.resolution=256 out=runs/tokens/cc text_encoder.kind=t5 text_encoder.name_or_path=/models/t5-base

Then train the generator on the cache: ``scripts/train_generator.py ... data.kind=tokens data.path=runs/tokens/train``
(``data.heldout_path`` = a cache of the held-out split for the preview grids, e.g. ``split=heldout``). Text features
are stored only with ``text_features=true`` (the generator config's ``text_encoder`` section encodes them).
Interrupted runs resume at the first missing shard. Format: :mod:`dcar.data.token_cache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dcar.cli import data_preset, run_cli
from dcar.config import ConfigError, choice, load_config
from dcar.config.schema import DataConfig
from dcar.models.generator import TextEncoderConfig


@dataclass
class PretokenizeConfig:
    """Keys of ``scripts/pretokenize.py``."""

    config: str = ""  # optional YAML with these keys
    tokenizer: str = ""  # DC-HT save_pretrained folder (required)
    data: DataConfig = field(default_factory=DataConfig)  # data=<preset> picks configs/data/<preset>.yaml
    split: str = choice("train", "train", "heldout")
    out: str = "runs/tokens"
    num_samples: int = 0  # 0: the whole dataset
    shard_size: int = 4096
    batch_size: int = 64
    residual_dtype: str = choice("float32", "float32", "float16", "bfloat16")
    text_features: bool = False
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    device: str = "auto"  # auto: cuda if available, else cpu
    progress: bool = True


def main(argv: Sequence[str]) -> None:
    cfg = load_config(PretokenizeConfig, argv, presets=[data_preset()])
    if not cfg.tokenizer:
        raise ConfigError("tokenizer=PATH is required (a DC-HT save_pretrained folder, e.g. a run's final/)")
    if cfg.data.kind == "tokens":
        raise ConfigError("data.kind=tokens is already a token cache; pretokenize images (shapes, jsonl, ...)")
    if cfg.shard_size % cfg.batch_size:
        raise ConfigError(f"shard_size ({cfg.shard_size}) must be a multiple of batch_size ({cfg.batch_size})")
    from dcar.data.build import build_dataset
    from dcar.data.token_cache import write_token_cache
    from dcar.models.generator import TextEncoder
    from dcar.models.tokenizer import DCHT

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    tokenizer = DCHT.from_pretrained(cfg.tokenizer).to(device).eval()
    text = TextEncoder(cfg.text_encoder).to(device) if cfg.text_features else None
    dataset = build_dataset(cfg.data, cfg.split)
    out = write_token_cache(tokenizer, dataset, cfg.out, num_samples=cfg.num_samples or None,
                            shard_size=cfg.shard_size, batch_size=cfg.batch_size, residual_dtype=cfg.residual_dtype,
                            text_encoder=text, progress=cfg.progress,
                            source={"tokenizer": cfg.tokenizer, "data": cfg.data.name or cfg.data.kind,
                                    "split": cfg.split, "resolution": cfg.data.resolution})
    print(f"token cache written to {out}")


if __name__ == "__main__":
    run_cli(main)
