"""Dataset registry: ``data.kind`` -> reader. Presets for each kind live in ``configs/data/``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from dcar.config.schema import DataConfig


def shapes_dataset(cfg: DataConfig, split: str, size: int | None = None, seed: int | None = None) -> Dataset:
    """The shapes split that ``cfg`` describes (resolution, layout and rendering from ``cfg.shapes``); ``size`` and
    ``seed`` default to the config's (``shapes.size`` / ``shapes.heldout_size``, ``seed``)."""
    from dcar.data.shapes import ShapesDataset

    s = cfg.shapes
    if size is None:
        size = s.size if split == "train" else s.heldout_size
    return ShapesDataset(split, cfg.resolution, size=size, seed=cfg.seed if seed is None else seed,
                         max_objects=s.max_objects, background=s.background, grid=s.grid, align=s.align,
                         shadow=s.shadow, size_scale=s.size_scale, exposure=s.exposure,
                         lighting=s.lighting)


def run_data_config(model_dir: str | os.PathLike, kind: str | None = None) -> DataConfig | None:
    """The ``data`` section of the training run that saved ``model_dir`` (a run's ``final/`` folder, with the
    resolved ``config.yaml`` one level up), or ``None`` when the folder carries no run config (e.g. a Hub download)
    or, with ``kind``, when the run read another kind of data. Evaluation scripts use it to rebuild the shapes layout
    a tokenizer was trained on."""
    from omegaconf import OmegaConf

    path = Path(model_dir).parent / "config.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.select(OmegaConf.load(path), "data")
    if node is None:
        return None
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node))
    return data if kind is None or data.kind == kind else None


def _shapes(cfg: DataConfig, split: str, rank: int, world_size: int) -> Dataset:
    return shapes_dataset(cfg, split)


def _path(cfg: DataConfig, split: str) -> str:
    path = cfg.path if split == "train" or not cfg.heldout_path else cfg.heldout_path
    if not path:
        raise ValueError(f"data.kind={cfg.kind} needs data.path (the dataset location)")
    return path


def _imagefolder(cfg: DataConfig, split: str, rank: int, world_size: int) -> Dataset:
    from dcar.data.imagefolder import ImageFolderDataset

    return ImageFolderDataset(_path(cfg, split), cfg.resolution, random_flip=cfg.random_flip and split == "train")


def _jsonl(cfg: DataConfig, split: str, rank: int, world_size: int) -> Dataset:
    from dcar.data.captioned import JsonlCaptionDataset

    return JsonlCaptionDataset(_path(cfg, split), cfg.resolution, image_root=cfg.image_root or None,
                               random_flip=cfg.random_flip and split == "train",
                               max_caption_chars=cfg.max_caption_chars)


def _webdataset(cfg: DataConfig, split: str, rank: int, world_size: int) -> Dataset:
    from dcar.data.shards import WebDatasetCaptions

    train = split == "train"
    return WebDatasetCaptions(_path(cfg, split), cfg.resolution, random_flip=cfg.random_flip and train,
                              max_caption_chars=cfg.max_caption_chars, shuffle=train,
                              shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, rank=rank, world_size=world_size)


def _tokens(cfg: DataConfig, split: str, rank: int, world_size: int) -> Dataset:
    from dcar.data.token_cache import TokenCacheDataset

    return TokenCacheDataset(_path(cfg, split))


DATASETS: dict[str, Callable[[DataConfig, str, int, int], Dataset]] = {
    "shapes": _shapes,
    "imagefolder": _imagefolder,
    "jsonl": _jsonl,
    "webdataset": _webdataset,
    "tokens": _tokens,
}


def build_dataset(cfg: DataConfig, split: str = "train", rank: int = 0, world_size: int = 1) -> Dataset:
    """The dataset ``cfg`` describes; ``split`` is ``train`` or ``heldout`` (``data.heldout_path`` for files)."""
    if cfg.kind not in DATASETS:
        raise ValueError(f"unknown data.kind {cfg.kind!r}; valid choices: {', '.join(sorted(DATASETS))}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return DATASETS[cfg.kind](cfg, split, rank, world_size)
