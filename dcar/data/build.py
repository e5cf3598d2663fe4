"""Dataset registry: ``data.kind`` -> reader. Presets for each kind live in ``configs/data/``."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from dcar.config.schema import DataConfig


def _shapes(cfg: DataConfig, split: str, rank: int, world_size: int) -> Dataset:
    from dcar.data.shapes import ShapesDataset

    size = cfg.shapes.size if split == "train" else cfg.shapes.heldout_size
    return ShapesDataset(split, cfg.resolution, size=size, seed=cfg.seed, max_objects=cfg.shapes.max_objects,
                         background=cfg.shapes.background, grid=cfg.shapes.grid,
                         align=cfg.shapes.align, shadow=cfg.shapes.shadow,
                         size_scale=cfg.shapes.size_scale, exposure=cfg.shapes.exposure)


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
