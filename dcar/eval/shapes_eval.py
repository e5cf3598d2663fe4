"""ShapesEval: dcar's exact text-alignment benchmark on the procedural shapes captions.

Each caption (by default the held-out captions of :class:`~dcar.data.shapes.ShapesDataset`: compositions of seen
words never shown in training) is parsed back into its scene spec (:func:`~dcar.data.shapes.parse_caption`), the
pipeline draws ``n_per_caption`` images for it, and the programmatic detector
(:func:`~dcar.eval.shapes_detector.detect_objects`, exact on clean renders) scores every image with
:func:`~dcar.eval.shapes_detector.score_scene`: per-attribute correctness ``color`` / ``shape`` / ``count`` /
``relation`` (relation captions only) and ``full`` (the multiset of detected (colour, shape) pairs equals the
caption's, and the relation holds); ``lighting`` (captions that name it, "... in dim light": the background's
brightness, :func:`detect_lighting`; not part of ``full``). :func:`aggregate` averages them over images
(``relation`` over relation images, ``lighting`` over lit captions), overall and per caption family.
:func:`validate_scorer` checks the scorer itself: on the dataset's own renders it must give a full-caption rate
>= 0.99 for their captions and <= 0.05 for shuffled captions (:func:`write_scorer_validation` saves that report as
``<out>/scorer_validation.json``).

Layout of ``out_dir`` (:func:`evaluate_shapes`): ``images/<caption index:05d>_<sample:02d>.png``, ``generation.json``
(settings; a resumed run must use the same), ``per_image.jsonl``, ``failures.png`` (captioned grid of failed images,
with the failed attributes in brackets) and ``shapes_eval.json``. Images are generated in fixed batches of
``batch_size`` images (batch ``b`` sampled with ``seed + b``, :mod:`dcar.eval.generate`), generated and scored
round robin over accelerate processes (:mod:`dcar.eval.runner`); PNGs already on disk are reused, so an interrupted
run resumes with identical results.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dcar.data.shapes import Scene, ShapesDataset, layout_spec, parse_caption, split_lighting
from dcar.eval import runner as R
from dcar.eval.generate import GenJob, generate_missing
from dcar.eval.shapes_detector import detect_objects, score_scene, to_uint8_rgb

__all__ = ["ATTRIBUTES", "DIM_THRESHOLD", "aggregate", "detect_lighting", "evaluate_shapes", "heldout_captions",
           "scene_for", "score_shapes_image", "validate_scorer", "write_scorer_validation"]

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "count", "relation", "full", "lighting")
# A caption's lighting ("... in dim light", ShapesDataset(lighting=True)) is scored from the white background's
# brightness: the median over pixels of the brightest channel, dim below this fraction of 255 (the midpoint of the
# shapes configs' levels 1 and 1 - 0.12).
DIM_THRESHOLD = 0.94
RESULTS_NAME = "shapes_eval.json"
VALIDATION_NAME = "scorer_validation.json"
MIN_TRUE_FULL_RATE, MAX_SHUFFLED_FULL_RATE = 0.99, 0.05  # what validate_scorer must give


def scene_for(item: str | Scene | Mapping[str, Any], resolution: int = 64) -> Scene:
    """Ground-truth scene of a caption (its parsed spec with a fixed layout; only the spec is scored; the caption is
    kept as given, lighting suffix included), or a :class:`Scene` / ``Scene.to_dict()`` as is."""
    if isinstance(item, Scene):
        return item
    if isinstance(item, Mapping):
        return Scene.from_dict(dict(item))
    scene = layout_spec(np.random.default_rng(0), parse_caption(item), resolution)
    return dataclasses.replace(scene, caption=item.strip())


def heldout_captions(num_captions: int = 0, seed: int = 0, data_seed: int = 0, max_objects: int = 4) -> list[str]:
    """The held-out captions of ``ShapesDataset(seed=data_seed)`` in sorted order, or a seeded random subset of
    ``num_captions`` of them (kept in sorted order)."""
    caps = sorted(ShapesDataset("heldout", size=1, seed=data_seed, max_objects=max_objects).heldout_captions())
    if 0 < num_captions < len(caps):
        pick = np.random.default_rng(seed).choice(len(caps), size=num_captions, replace=False)
        caps = [caps[i] for i in sorted(pick.tolist())]
    return caps


def detect_lighting(image: Image.Image | np.ndarray | torch.Tensor) -> str:
    """"bright" or "dim": the median of the per-pixel brightest channel (the white background on most pixels)
    against :data:`DIM_THRESHOLD` (any image form :func:`~dcar.eval.shapes_detector.to_uint8_rgb` takes)."""
    arr = to_uint8_rgb(image)
    return "dim" if float(np.median(arr.max(axis=-1))) < DIM_THRESHOLD * 255 else "bright"


def score_shapes_image(image: Image.Image | np.ndarray | torch.Tensor, scene: Scene) -> dict[str, Any]:
    """Detect the shapes of ``image`` and score them against ``scene``: the attribute flags plus the detections;
    ``lighting`` is scored when the scene's caption names it (else None)."""
    dets = detect_objects(image)
    want = split_lighting(scene.caption)[1]
    lighting = None if want is None else detect_lighting(image) == want
    return {**score_scene(dets, scene), "lighting": lighting,
            "detections": [[d.color, d.shape, list(d.box)] for d in dets]}


def _mean(flags: Sequence[bool | None]) -> float | None:
    vals = [bool(f) for f in flags if f is not None]
    return float(np.mean(vals)) if vals else None


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-attribute accuracy (``relation`` over relation images only) and full-caption rate, overall and per
    caption family (``kind``), plus the fraction of captions with at least one fully correct sample."""
    if not records:
        raise ValueError("no records to aggregate")
    scores: dict[str, Any] = {a: _mean([r.get(a) for r in records]) for a in ATTRIBUTES}
    per_caption: dict[int, bool] = {}
    for r in records:
        per_caption[r["index"]] = per_caption.get(r["index"], False) or bool(r["full"])
    scores.update(full_any_sample=float(np.mean(list(per_caption.values()))), num_images=len(records),
                  num_captions=len(per_caption), num_relation_images=sum(r["relation"] is not None for r in records))
    by_kind: dict[str, Any] = {}
    for kind in sorted({r["kind"] for r in records}):
        sub = [r for r in records if r["kind"] == kind]
        by_kind[kind] = {**{a: _mean([r.get(a) for r in sub]) for a in ATTRIBUTES}, "num_images": len(sub)}
    return {"scores": scores, "by_kind": by_kind}


def validate_scorer(num_images: int = 200, resolution: int = 64, data_seed: int = 0,
                    split: str = "heldout") -> dict[str, float]:
    """Full-caption rate of the scorer on ``num_images`` of the dataset's own renders for their own captions
    (``true_full_rate``, should be >= 0.99) and for the caption of the next image (``shuffled_full_rate``, <= 0.05)."""
    ds = ShapesDataset(split, resolution=resolution, size=num_images, seed=data_seed)
    samples = [ds[i] for i in range(num_images)]
    scenes = [scene_for(s["caption"], resolution) for s in samples]
    true = [score_shapes_image(s["image"], sc)["full"] for s, sc in zip(samples, scenes, strict=True)]
    shuffled = [score_shapes_image(s["image"], scenes[(i + 1) % num_images])["full"] for i, s in enumerate(samples)]
    return {"true_full_rate": float(np.mean(true)), "shuffled_full_rate": float(np.mean(shuffled)),
            "num_images": num_images}


def write_scorer_validation(out_dir: str | os.PathLike, num_images: int = 500, resolution: int = 64,
                            data_seed: int = 0, split: str = "heldout") -> dict[str, Any]:
    """:func:`validate_scorer`, with its settings, the thresholds, ``passed`` and the provenance block
    (``dcar_version``, ``environment``), written atomically to ``<out_dir>/scorer_validation.json``; returns it."""
    report = validate_scorer(num_images, resolution, data_seed, split)
    env = R.environment()
    result: dict[str, Any] = {
        "protocol": "shapes-eval-scorer-validation", **report, "resolution": resolution, "data_seed": data_seed,
        "split": split, "min_true_full_rate": MIN_TRUE_FULL_RATE, "max_shuffled_full_rate": MAX_SHUFFLED_FULL_RATE,
        "passed": report["true_full_rate"] >= MIN_TRUE_FULL_RATE
        and report["shuffled_full_rate"] <= MAX_SHUFFLED_FULL_RATE,
        "scorer": "dcar.eval.shapes_detector.detect_objects + score_scene (programmatic)",
        "dcar_version": env["dcar"], "environment": env,
    }
    R.atomic_write_json(Path(out_dir) / VALIDATION_NAME, result)
    return result


def _load_tensor(path: Path) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def evaluate_shapes(pipe: Callable[..., Any] | None, captions_or_scenes: Sequence[str | Scene | Mapping[str, Any]],
                    out_dir: str | os.PathLike, *, n_per_caption: int = 1, seed: int = 0, batch_size: int = 16,
                    num_steps: int = 12, guidance_scale: float | None = None, use_head: bool = True,
                    pipe_kwargs: Mapping[str, Any] | None = None, max_failures: int = 64, pipeline_path: str = "",
                    source: str = "given", inference: Mapping[str, Any] | None = None,
                    ctx: R.DistContext | None = None, progress: bool = True) -> dict[str, Any]:
    """Generate (or reuse) ``n_per_caption`` images per caption, score them, write the grid of failures and
    ``<out_dir>/shapes_eval.json``; returns that dict. ``guidance_scale=None``: the pipeline's default
    (recorded).
    ``use_head=False`` samples discrete tokens only (hybrid-vs-discrete ablation). ``pipe=None``: score existing images.
    ``inference``: how the pipeline runs (:func:`dcar.inference.inference_settings`), recorded with the images."""
    from dcar.train.logging import save_image_grid

    if n_per_caption < 1 or batch_size < 1:
        raise ValueError("n_per_caption and batch_size must be >= 1")
    if ctx is None:
        ctx = R.dist_context()
    out = Path(out_dir)
    scenes = [scene_for(c) for c in captions_or_scenes]
    if not scenes:
        raise ValueError("no captions to evaluate")
    kwargs: dict[str, Any] = {"num_steps": num_steps, "use_head": use_head, **(pipe_kwargs or {})}
    if guidance_scale is None:
        from dcar.pipeline import DEFAULT_GUIDANCE_SCALE as guidance_scale
    kwargs["guidance_scale"] = float(guidance_scale)
    if pipe is not None:
        R.check_settings(ctx, out / "generation.json", {
            "pipeline": pipeline_path, "n_per_caption": n_per_caption, "seed": seed, "batch_size": batch_size,
            "sampler": kwargs, "captions": [s.caption for s in scenes], **R.inference_record(inference)}, holds="images")
    items = [(i, k) for i in range(len(scenes)) for k in range(n_per_caption)]
    path = {(i, k): out / "images" / f"{i:05d}_{k:02d}.png" for i, k in items}
    jobs = [GenJob(tuple(scenes[i].caption for i, _ in chunk), tuple(path[ik] for ik in chunk), seed + b)
            for b, chunk in enumerate(items[s : s + batch_size] for s in range(0, len(items), batch_size))]
    counts = generate_missing(pipe, jobs, kwargs, ctx, desc="shapes sampling", progress=progress)

    def score(item: tuple[int, int]) -> dict[str, Any]:
        i, k = item
        with Image.open(path[i, k]) as im:
            scored = score_shapes_image(im.convert("RGB"), scenes[i])
        return {"file": str(path[i, k].relative_to(out)), "index": i, "sample": k, "caption": scenes[i].caption,
                "kind": scenes[i].kind, **scored}

    records = sorted(R.map_share(ctx, items, score, "scoring", progress), key=lambda r: (r["index"], r["sample"]))
    summary = aggregate(records)
    failures = [r for r in records if not r["full"]]
    env = R.environment()
    result: dict[str, Any] = {
        "protocol": "shapes-eval", "dcar_version": env["dcar"], "pipeline": pipeline_path,
        "pipeline_fingerprint": R.optional_fingerprint(pipeline_path), **R.inference_record(inference),
        "captions_source": source, "num_captions": len(scenes), "n_per_caption": n_per_caption,
        "num_images": len(records), "seed": seed, "batch_size": batch_size,
        "seeding": "images in fixed batches of batch_size (caption-major order); batch b sampled with seed + b",
        "sampler": kwargs, "scorer": "dcar.eval.shapes_detector.detect_objects + score_scene (programmatic)",
        **summary, "num_failures": len(failures), "failures_grid": "failures.png" if failures else None,
        "per_image_results": "per_image.jsonl", "environment": env,
    }
    if ctx.is_main:
        R.atomic_write_bytes(out / "per_image.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
        if failures:
            shown = failures[:max_failures]
            caps = [f"{r['caption']} [{', '.join(a for a in ATTRIBUTES[:4] if r[a] is False) or 'pairs'}]" for r in shown]
            tiles = torch.stack([_load_tensor(out / r["file"]) for r in shown])
            scale = -(-192 // tiles.shape[-1])  # small images are enlarged (nearest) so that the captions fit
            if scale > 1:
                tiles = torch.nn.functional.interpolate(tiles, scale_factor=scale, mode="nearest")
            save_image_grid(tiles, out / "failures.png", None, caps)
        R.atomic_write_json(out / RESULTS_NAME, result)
        s = summary["scores"]
        print(f"shapes eval: {counts['generated']} images generated, {counts['reused']} reused; full {s['full']:.3f} "
              f"color {s['color']:.3f} shape {s['shape']:.3f} count {s['count']:.3f} relation {s['relation']}; "
              f"wrote {out / RESULTS_NAME}")
    ctx.barrier()
    return result


@torch.no_grad()
def score_reconstructions(tokenizer: Any, dataset: Any, batch_size: int = 32) -> dict[str, dict[str, float | None]]:
    """ShapesEval of a DC-HT's reconstructions of shapes images against their own scenes, per decoding path
    (``continuous``, ``discrete``): the ceiling of a generator that decodes through this tokenizer."""
    flags: dict[str, list[dict[str, Any]]] = {"continuous": [], "discrete": []}
    device = next(tokenizer.parameters()).device
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([it["image"] for it in items]).to(device)
        enc = tokenizer.encode(images)
        for path, latent in (("continuous", enc.z), ("discrete", enc.zq)):
            recon = tokenizer.decode(latent).float().clamp(-1, 1).cpu()
            flags[path] += [score_shapes_image(r, Scene.from_dict(it["scene"])) for r, it in zip(recon, items,
                                                                                                 strict=True)]
    return {path: {a: _mean([f[a] for f in fs]) for a in ATTRIBUTES} for path, fs in flags.items()}
