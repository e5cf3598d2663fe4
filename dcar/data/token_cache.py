"""Pre-tokenised training data for DC-AR: DC-HT indices + residual tokens (+ optional text features) in shards.

The generator trains on a frozen tokenizer, so encoding every image at every epoch repeats the same work (HART and
MAR both cache latents for this reason). :func:`write_token_cache` encodes a dataset once into
``<dir>/shard-00000.safetensors`` ... (``indices`` (N, h, w) int64, ``residual`` (N, D, h, w), optionally
``text_states`` (N, L, C) and ``text_mask`` (N, L) bool-as-uint8) with the captions in ``shard-00000.json``, and a
``cache.json`` describing the whole cache (sample count, token grid, dtypes, the tokenizer it came from). Each shard
is written to a temporary name and renamed, and ``cache.json`` is written last, so an interrupted run resumes at the
first missing shard and a reader never sees a partial cache. :class:`TokenCacheDataset` reads it (``data.kind=tokens``,
``data.path=<dir>``); nothing pickled is ever loaded. Random flips cannot be applied to cached tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dcar.data.collate import collate
from dcar.utils.atomic import atomic_save_safetensors, atomic_write_text

__all__ = ["CACHE_META", "TokenCacheDataset", "read_cache_meta", "write_token_cache"]

CACHE_META = "cache.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _write_shard(out: Path, i: int, tensors: dict[str, Tensor], captions: list[str]) -> None:
    name = _shard_name(i)
    atomic_write_text(out / f"{name}.json", json.dumps(captions))
    # written last: the safetensors file is the shard's commit marker
    atomic_save_safetensors({k: v.contiguous() for k, v in tensors.items()}, out / f"{name}.safetensors")


@torch.no_grad()
def write_token_cache(
    tokenizer: Any,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    *,
    num_samples: int | None = None,
    shard_size: int = 4096,
    batch_size: int = 64,
    residual_dtype: str = "float32",
    text_encoder: Any | None = None,
    source: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Encode the first ``num_samples`` items of ``dataset`` (all by default) into a cache in ``out_dir``.

    Samples the reader skips (unreadable images) are dropped and counted in ``cache.json`` (``skipped``).
    ``text_encoder`` (a :class:`~dcar.models.generator.TextEncoder`) also stores caption features. ``source``
    is recorded in ``cache.json`` (e.g. the tokenizer path). Complete shards from an earlier run are kept."""
    from tqdm.auto import tqdm

    if residual_dtype not in _DTYPES:
        raise ValueError(f"residual_dtype must be one of {sorted(_DTYPES)}, got {residual_dtype!r}")
    if shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a multiple of batch_size ({batch_size})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(dataset) if num_samples is None else min(int(num_samples), len(dataset))  # type: ignore[arg-type]
    device = next(tokenizer.parameters()).device
    num_shards = -(-total // shard_size)
    meta: dict[str, Any] = {"num_samples": 0, "skipped": 0, "shards": [], "residual_dtype": residual_dtype,
                            "text_features": text_encoder is not None, "source": source or {}}
    bar = tqdm(total=total, desc="pretokenize", unit="img", disable=not progress)
    for i in range(num_shards):
        lo, hi = i * shard_size, min(total, (i + 1) * shard_size)
        path = out / f"{_shard_name(i)}.safetensors"
        if not path.is_file():
            subset = torch.utils.data.Subset(dataset, range(lo, hi))
            parts: dict[str, list[Tensor]] = {}
            captions: list[str] = []
            skipped = 0
            for batch in DataLoader(subset, batch_size=batch_size, collate_fn=collate):
                skipped += batch["num_skipped"]
                if "image" not in batch:
                    continue
                if "caption" not in batch:
                    raise ValueError("the dataset has no captions; a token cache is for caption-conditioned training")
                enc = tokenizer.encode(batch["image"].to(device))
                parts.setdefault("indices", []).append(enc.indices.cpu())
                parts.setdefault("residual", []).append(enc.residual.to(_DTYPES[residual_dtype]).cpu())
                if text_encoder is not None:
                    states, mask = text_encoder.encode(batch["caption"])
                    parts.setdefault("text_states", []).append(states.float().cpu())
                    parts.setdefault("text_mask", []).append(mask.to(torch.uint8).cpu())
                captions += list(batch["caption"])
                bar.update(len(batch["caption"]) + batch["num_skipped"])
            tensors = {k: torch.cat(v) for k, v in parts.items()}
            tensors["skipped"] = torch.tensor([skipped])
            _write_shard(out, i, tensors, captions)
        else:
            bar.update(hi - lo)
        with safe_open(str(path), framework="pt") as f:
            n = f.get_slice("indices").get_shape()[0]
            grid = f.get_slice("indices").get_shape()[1:]
            meta["skipped"] += int(f.get_tensor("skipped")[0])
        meta["shards"].append({"name": _shard_name(i), "num_samples": n})
        meta["num_samples"] += n
        meta["grid"] = list(grid)
    bar.close()
    atomic_write_text(out / CACHE_META, json.dumps(meta, indent=2))
    return out


def read_cache_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``cache.json`` of a complete token cache (``FileNotFoundError`` with the remedy if it is missing)."""
    meta_path = Path(path) / CACHE_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a complete token cache (no {CACHE_META}); run "
                                "scripts/pretokenize.py (it resumes an interrupted cache)")
    return json.loads(meta_path.read_text())


class TokenCacheDataset(Dataset):
    """Map-style reader of a :func:`write_token_cache` folder: items ``{"indices", "residual", "caption",
    "index"}`` plus ``"text_states"``/``"text_mask"`` when the cache has text features. Loads every shard into
    memory (token caches are small: 4 KB per 512 px image at fp32 residuals)."""

    def __init__(self, path: str | os.PathLike) -> None:
        root = Path(path)
        self.meta = read_cache_meta(root)
        tensors: dict[str, list[Tensor]] = {}
        self.captions: list[str] = []
        for shard in self.meta["shards"]:
            with safe_open(str(root / f"{shard['name']}.safetensors"), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if key != "skipped":
                        tensors.setdefault(key, []).append(f.get_tensor(key))
            self.captions += json.loads((root / f"{shard['name']}.json").read_text())
        self.tensors = {k: torch.cat(v) for k, v in tensors.items()}
        if len(self.captions) != len(self.tensors["indices"]):
            raise ValueError(f"{root}: {len(self.captions)} captions for {len(self.tensors['indices'])} samples")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"indices": self.tensors["indices"][i], "residual": self.tensors["residual"][i].float(),
                                "caption": self.captions[i], "index": int(i)}
        if "text_states" in self.tensors:
            item["text_states"] = self.tensors["text_states"][i]
            item["text_mask"] = self.tensors["text_mask"][i].bool()
        return item
