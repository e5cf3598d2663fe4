"""MJHQ-30K text-to-image eval: one image per prompt, FID overall and per category, CLIP score.

Protocol (EVAL_PROTOCOLS.md section 2.2, Sana ``scripts/inference.py`` and ``tools/metrics/pytorch-fid``; CLIP
score section 2.3):

* data: ``meta_data.json`` is one dict ``{image_id: {"category": str, "prompt": str}}`` (dict order is the prompt
  order); the reference images are ``<images>/<category>/<image_id>.jpg`` (1024 x 1024, 10 categories of 3,000);
* generation: **one image per prompt for the first 30,000 keys** at the model's resolution R. Here each image is
  kept as a lossless ``<samples>/<image_id>.png`` (resumable); Sana saves ``.jpg`` with PIL's default quality 75, so
  by default (``jpeg_quality=75``) every sample is JPEG-encoded at quality 75 in memory before it is measured. The
  prompts are generated in fixed batches of the prompt order, batch ``b`` with seed ``seed + b``, so an image
  does not depend on the number of processes or on where a run was interrupted;
* FID preprocessing, the same for references and samples: RGB, ``Resize(R)`` (PIL bilinear, antialiased) then
  ``CenterCrop(R)`` (torchvision); 1024 px references are downsampled to R, R px samples pass unchanged. Features
  and Fréchet distance: :mod:`dcar.eval.fid`. Reference statistics over **all** reference images (overall and per
  category) are computed once and cached as ``.npz``;
* per-category FID (Playground style): each category's samples against that category's references (3,000 vs
  3,000; not comparable in scale with the 30K overall FID);
* CLIP score: :class:`dcar.eval.metrics.ClipScorer` on the (JPEG-encoded) samples and their prompts.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dcar.eval import generate as G
from dcar.eval import runner as R
from dcar.eval.fid import FeatureStats

MJHQ_CATEGORIES: tuple[str, ...] = ("animals", "art", "fashion", "food", "indoor", "landscape", "logo", "people",
                                    "plants", "vehicles")
MJHQ_NUM_PROMPTS = 30_000
PROTOCOL = "mjhq30k"
PROTOCOL_SOURCE = ("EVAL_PROTOCOLS.md sections 2.2 (Sana tools/metrics/pytorch-fid, xin-ran-w/Sana@11fcc75) and 2.3 "
                   "(Sana tools/metrics/clip-score)")


@dataclass(frozen=True)
class MJHQItem:
    """One MJHQ entry: ``key`` (image id, file stem), ``category``, ``prompt``."""

    key: str
    category: str
    prompt: str


def load_meta(path: str | os.PathLike) -> list[MJHQItem]:
    """The entries of an MJHQ ``meta_data.json`` in file order; raises ``ValueError`` on another layout."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object {{image_id: {{category, prompt}}}}")
    items = []
    for key, value in data.items():
        if not isinstance(value, dict) or not isinstance(value.get("category"), str) \
                or not isinstance(value.get("prompt"), str):
            raise ValueError(f"{path}: entry {key!r} must be an object with string 'category' and 'prompt'")
        items.append(MJHQItem(str(key), value["category"], value["prompt"]))
    return items


def reference_path(images: str | os.PathLike, item: MJHQItem) -> Path:
    """``<images>/<category>/<image_id>.jpg``."""
    return Path(images) / item.category / f"{item.key}.jpg"


def check_references(images: str | os.PathLike, items: Sequence[MJHQItem]) -> None:
    """Raise ``FileNotFoundError`` naming the missing reference images (count and the first few)."""
    missing = [str(reference_path(images, it)) for it in items if not reference_path(images, it).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(items)} MJHQ reference images are missing, e.g. "
                                f"{', '.join(missing[:3])} (expected <images>/<category>/<image_id>.jpg)")


def sample_path(samples: str | os.PathLike, key: str) -> Path:
    """``<samples>/<image_id>.png``."""
    return Path(samples) / f"{key}.png"


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """``img`` after a PIL JPEG encode/decode at ``quality`` (what saving a ``.jpg`` sample does); 0 = unchanged."""
    if quality <= 0:
        return img
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def fid_transform(img: Image.Image, resolution: int) -> Tensor:
    """Sana's FID preprocessing: RGB, ``Resize(R)`` (PIL bilinear) + ``CenterCrop(R)`` -> uint8 tensor (3, R, R)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = TF.center_crop(TF.resize(img.convert("RGB"), resolution, interpolation=InterpolationMode.BILINEAR),
                         resolution)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class MJHQImages(torch.utils.data.Dataset):
    """Images of ``paths`` as ``{"image": FID uint8 (3, R, R)}``, plus ``"clip"`` (uint8 (3, H, W), the image as
    measured) with ``with_clip``; ``jpeg_quality`` > 0 JPEG-encodes first (generated samples)."""

    def __init__(self, paths: Sequence[Path], resolution: int, jpeg_quality: int = 0, with_clip: bool = False) -> None:
        self.paths, self.resolution, self.jpeg_quality, self.with_clip = list(paths), resolution, jpeg_quality, with_clip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        with Image.open(self.paths[i]) as f:
            img = jpeg_roundtrip(f.convert("RGB"), self.jpeg_quality)
        out = {"image": fid_transform(img, self.resolution)}
        if self.with_clip:
            out["clip"] = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return out


def image_arrays(paths: Sequence[Path], resolution: int, extractor: Any, *, jpeg_quality: int = 0,
                 clip: Any = None, prompts: Sequence[str] | None = None, clip_key: str = "clip",
                 batch_size: int = 50, num_workers: int = 0) -> dict[str, np.ndarray]:
    """FID features ``feat`` (N, D) of ``paths`` and, with a ``clip`` scorer, CLIP scores ``<clip_key>`` (N,)."""
    ds = MJHQImages(paths, resolution, jpeg_quality, with_clip=clip is not None)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    feats, scores, start = [], [], 0
    for batch in loader:
        feats.append(extractor(batch["image"]))
        if clip is not None:
            n = batch["image"].shape[0]
            pil = [Image.fromarray(a) for a in batch["clip"].permute(0, 2, 3, 1).numpy()]
            scores.append(clip(pil, list(prompts[start:start + n])).double().numpy())
            start += n
    out = {"feat": np.concatenate(feats, axis=0)}
    if clip is not None:
        out[clip_key] = np.concatenate(scores)
    return out


def generate_missing(load_pipeline: Callable[[], Any], items: Sequence[MJHQItem], count: int,
                     samples: str | os.PathLike, ctx: R.DistContext, *, batch_size: int, num_steps: int,
                     guidance_scale: float, seed: int, resolution: int, progress: bool = True) -> int:
    """Make sure the PNGs of the first ``count`` items exist; returns how many were written (all processes).

    Batches are fixed over the whole prompt list (batch ``b`` = items ``b * batch_size ...``, sampled with seed
    ``seed + b``), so an image does not depend on ``count``, the number of processes or an interruption. A batch
    whose PNGs (below ``count``) all exist is skipped; the pipeline is loaded only if some batch is incomplete.
    PNGs are written atomically and existing ones are never rewritten (:func:`dcar.eval.generate.generate_missing`).
    Waits for all processes at the end.
    """
    batches = R.chunk_ranges(len(items), batch_size)[: -(-count // batch_size)]
    jobs = [G.GenJob(tuple(items[i].prompt for i in batch), tuple(sample_path(samples, items[i].key) for i in batch),
                   seed + b, required=sum(i < count for i in batch)) for b, batch in enumerate(batches)]
    kwargs = {"num_steps": num_steps, "guidance_scale": guidance_scale, "height": resolution, "width": resolution}
    counts = G.generate_missing(None, jobs, kwargs, ctx, load_pipeline=load_pipeline, desc="mjhq samples",
                                progress=progress)
    return counts["generated"]


def reference_stats(ctx: R.DistContext, items: Sequence[MJHQItem], images: str | os.PathLike, resolution: int,
                    extractor: Any, path: str | os.PathLike, meta: dict[str, Any], work_dir: str | os.PathLike,
                    chunk_size: int = 1000, progress: bool = True, **load: Any) -> dict[str, FeatureStats]:
    """Reference statistics (``"all"`` and per category) of every item's reference image, cached at ``path``.

    When ``path`` does not exist yet, the features are computed over the processes in resumable chunks
    (``work_dir``) and the main process saves the statistics with ``meta``; an existing file is checked against
    ``meta`` (``ValueError`` on a mismatch). ``load``: ``batch_size`` / ``num_workers`` of :func:`image_arrays`.
    """
    from dcar.eval.fid import reuse_stats, save_stats

    stats = reuse_stats(path, meta)
    if stats is not None:
        return stats
    chunks = R.chunk_ranges(len(items), chunk_size)
    work = R.prepare_work_dir(ctx, work_dir, {**meta, "chunk_size": chunk_size})
    R.run_chunks(ctx, work, chunks, lambda c: image_arrays(
        [reference_path(images, items[i]) for i in c], resolution, extractor, **load), ["feat"],
        "mjhq reference", progress)
    if ctx.is_main:
        feats = R.concat(R.load_parts(work, len(chunks), ["feat"]), "feat")
        save_stats(path, category_stats(feats, [it.category for it in items]), meta)
    ctx.barrier()
    return reuse_stats(path, meta)


def category_stats(feats: np.ndarray, categories: Sequence[str]) -> dict[str, FeatureStats]:
    """Statistics of all features (``"all"``) and of each category with at least 2 images."""
    cats = np.asarray(categories)
    stats = {"all": FeatureStats.from_features(feats)}
    for cat in sorted(set(categories)):
        if (cats == cat).sum() >= 2:
            stats[cat] = FeatureStats.from_features(feats[cats == cat])
    return stats


def summarize(feats: np.ndarray, items: Sequence[MJHQItem], reference: dict[str, FeatureStats],
              clip_scores: np.ndarray | None = None) -> dict[str, Any]:
    """Overall and per-category FID against ``reference`` (from :func:`category_stats`), sample counts per
    category, and CLIP score means (None without scores). A category with fewer than 2 samples gets FID None."""
    cats = [it.category for it in items]
    samples = category_stats(feats, cats)
    per_cat = {c: (samples[c].fid(reference[c]) if c in samples and c in reference else None)
               for c in sorted(set(cats))}
    out: dict[str, Any] = {
        "fid": samples["all"].fid(reference["all"]),
        "fid_per_category": per_cat,
        "counts_per_category": {c: {"samples": cats.count(c), "reference": reference[c].n if c in reference else 0}
                                for c in sorted(set(cats))},
        "clip_score": None, "clip_score_per_category": None,
    }
    if clip_scores is not None:
        arr, c_arr = np.asarray(clip_scores, dtype=np.float64), np.asarray(cats)
        out["clip_score"] = float(arr.mean())
        out["clip_score_per_category"] = {c: float(arr[c_arr == c].mean()) for c in sorted(set(cats))}
    return out


__all__ = [
    "MJHQ_CATEGORIES", "MJHQ_NUM_PROMPTS", "PROTOCOL", "PROTOCOL_SOURCE", "MJHQImages", "MJHQItem",
    "category_stats", "check_references", "reference_stats", "fid_transform", "generate_missing", "image_arrays", "jpeg_roundtrip",
    "load_meta", "reference_path", "sample_path", "summarize",
]
