"""GenEval runs for dcar: GenEval's image layout, sharded resumable generation and scoring, the official command.

Protocol (djghosh13/geneval@af4902f, MIT; file paths are in that repository). The scoring rules themselves are in
:mod:`dcar.eval.geneval_rules` (re-exported here, so ``dcar.eval.geneval`` is the one entry point).

- Layout (README, ``generation/diffusers_generate.py``): ``<out>/<5-digit prompt index>/metadata.jsonl`` holding that
  prompt's metadata line (one object, ``json.dump``), ``<out>/<index>/samples/0000.png`` ... and an optional
  ``grid.png``. The evaluator (``evaluation/evaluate_images.py:main``) keeps all-digit folder names and files that
  ``re.match(r"\\d+\\.png")``; :func:`list_samples` applies the same rules.
- Generation (:func:`run_geneval`): each prompt's ``n_per_prompt`` images come from one pipeline call seeded with
  ``seed`` (GenEval's reference generator reseeds every prompt).

Official scoring, in GenEval's own environment (mmdet 2.x, mmcv-full, open_clip, clip_benchmark, CUDA) with the mmdet
2.x checkpoint (``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth`` from
download.openmmlab.com/mmdetection/v2.0/mask2former/..., saved by ``evaluation/download_models.sh <MODEL_DIR>`` as
``<MODEL_DIR>/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth``), printed by :func:`official_command`::

    cd <GENEVAL_REPO> && python evaluation/evaluate_images.py <IMAGE_DIR> --outfile <IMAGE_DIR>/results.jsonl \\
        --model-path <MODEL_DIR> [--model-config <mmdet>/.mim/configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py]
    cd <GENEVAL_REPO>/evaluation && python summary_scores.py <IMAGE_DIR>/results.jsonl

(``summary_scores.py`` opens ``object_names.txt`` in the working directory, hence the ``cd``.) dcar's scorer runs
the same rules behind :class:`~dcar.eval.geneval_detector.Detector` / ``ColorClassifier`` and writes per-image rows
in the official ``results.jsonl`` format (``results_dcar.jsonl``, readable by ``summary_scores.py``). Generation
(:mod:`dcar.eval.generate`) and scoring are sharded round robin over accelerate processes
(:class:`~dcar.eval.runner.DistContext`) and resume from the PNGs on disk; ``generation.json`` records the sampling
settings, and a rerun with other settings is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dcar.config.loader import ConfigError
from dcar.eval import runner as R
from dcar.eval.generate import GenJob, generate_missing

from .geneval_detector import ColorClassifier, Detector
from .geneval_rules import (
    GENEVAL_COLORS,
    RELATIONS,
    TASKS,
    GenEvalRules,
    compute_iou,
    evaluate_clauses,
    filter_detections,
    load_metadata,
    masked_crop,
    relative_position,
    score_image,
    summarize,
)

__all__ = [
    "GENEVAL_COLORS", "RELATIONS", "RESULTS_NAME", "ROWS_NAME", "TASKS", "GenEvalRules", "compute_iou",
    "evaluate_clauses", "filter_detections", "list_samples", "load_metadata", "masked_crop", "official_command",
    "relative_position", "run_geneval", "sample_path", "score_image", "score_image_dir", "summarize", "write_layout",
]  # fmt: skip

RESULTS_NAME = "geneval_results.json"
ROWS_NAME = "results_dcar.jsonl"


# --------------------------------------------------------------------------------------------------------- layout
def sample_path(out: str | os.PathLike, index: int, k: int) -> Path:
    """``<out>/<index:05d>/samples/<k:04d>.png``."""
    return Path(out) / f"{index:05d}" / "samples" / f"{k:04d}.png"


def write_layout(out: str | os.PathLike, metadata: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Create ``<out>/<index:05d>/{metadata.jsonl, samples/}`` for every prompt; an existing folder must hold the
    same metadata (resuming into a folder made for other prompts raises ``ConfigError``). Returns the folders."""
    folders = []
    for i, meta in enumerate(metadata):
        folder = Path(out) / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        meta_file = folder / "metadata.jsonl"
        if meta_file.is_file():
            if json.loads(meta_file.read_text()) != dict(meta):
                raise ConfigError(f"{meta_file} holds other metadata; use a fresh output folder")
        else:
            R.atomic_write_bytes(meta_file, json.dumps(dict(meta)).encode())
        folders.append(folder)
    return folders


def list_samples(image_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """``(image path, metadata)`` of every sample the official evaluator would score, sorted by path."""
    found = []
    for sub in sorted(os.listdir(image_dir)):
        folder = Path(image_dir) / sub
        if not folder.is_dir() or not sub.isdigit():
            continue
        meta = json.loads((folder / "metadata.jsonl").read_text())
        samples = folder / "samples"
        for name in sorted(os.listdir(samples)) if samples.is_dir() else []:
            if (samples / name).is_file() and re.match(r"\d+\.png", name):
                found.append((samples / name, meta))
    return found


def official_command(image_dir: str | os.PathLike, geneval_repo: str = "<GENEVAL_REPO>",
                     model_path: str = "<MODEL_DIR>", model_config: str = "") -> str:
    """Shell command running GenEval's own evaluator and summary on ``image_dir`` (see the module docstring)."""
    d = Path(image_dir).resolve()
    cfg = f" --model-config {model_config}" if model_config else ""
    return (f"cd {geneval_repo} && python evaluation/evaluate_images.py {d} --outfile {d}/results.jsonl "
            f"--model-path {model_path}{cfg} && cd evaluation && python summary_scores.py {d}/results.jsonl")


# ------------------------------------------------------------------------------------- sharded, resumable running
def score_image_dir(image_dir: str | os.PathLike, detector: Detector, color_classifier: ColorClassifier | None,
                    rules: GenEvalRules = GenEvalRules(), ctx: R.DistContext | None = None,
                    progress: bool = True) -> list[dict]:
    """Score every sample of a GenEval layout folder, sharded over processes and gathered (sorted by filename)."""
    if ctx is None:
        ctx = R.dist_context()
    rows = R.map_share(ctx, list_samples(image_dir),
                       lambda s: score_image(s[0], s[1], detector, color_classifier, rules), "scoring", progress)
    return sorted(rows, key=lambda r: r["filename"])


def run_geneval(pipe: Callable[..., Any] | None, metadata_path: str | os.PathLike, out: str | os.PathLike, *,
                n_per_prompt: int = 4, seed: int = 42, pipe_kwargs: Mapping[str, Any] | None = None,
                detector: Detector | None = None, color_classifier: ColorClassifier | None = None,
                rules: GenEvalRules = GenEvalRules(), backend: str = "", pipeline_path: str = "", grid: bool = True,
                inference: Mapping[str, Any] | None = None, ctx: R.DistContext | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Generate ``n_per_prompt`` images per prompt in GenEval's layout (every prompt reseeded with ``seed``, as
    GenEval's reference generator; existing PNGs reused), score them if a ``detector`` is given, and write
    ``<out>/geneval_results.json`` (see the schema in the report / script docstring). Returns that dict.
    A folder laid out for other prompts raises the same :class:`ConfigError` on every process. ``inference``: how
    the pipeline runs (:func:`dcar.inference.inference_settings`), recorded with the images."""
    if ctx is None:
        ctx = R.dist_context()
    meta_path = Path(metadata_path)
    metadata = load_metadata(meta_path)
    metadata_sha256 = R.sha256_file(meta_path)
    out = Path(out)
    kwargs = dict(pipe_kwargs or {})
    error = None
    if ctx.is_main:
        try:
            write_layout(out, metadata)
        except ConfigError as err:
            error = str(err)
    errors = [e for e in ctx.gather([error]) if e]  # the main process's verdict, on every process (also a barrier)
    if errors:
        raise ConfigError(errors[0])
    if pipe is not None:
        R.check_settings(ctx, out / "generation.json", {"pipeline": pipeline_path, "n_per_prompt": n_per_prompt,
                                                        "seed": seed, "sampler": kwargs,
                                                        "metadata_sha256": metadata_sha256,
                                                        **R.inference_record(inference)}, holds="images")
    jobs = [GenJob((m["prompt"],) * n_per_prompt, tuple(sample_path(out, i, k) for k in range(n_per_prompt)), seed,
                   out / f"{i:05d}" / "grid.png" if grid else None) for i, m in enumerate(metadata)]
    counts = generate_missing(pipe, jobs, kwargs, ctx, desc="geneval sampling", progress=progress)
    command = official_command(out)
    env = R.environment()
    result: dict[str, Any] = {
        "protocol": "geneval", "dcar_version": env["dcar"], "pipeline": pipeline_path,
        "pipeline_fingerprint": R.optional_fingerprint(pipeline_path), **R.inference_record(inference),
        "metadata": str(meta_path),
        "metadata_sha256": metadata_sha256, "image_dir": str(out), "num_prompts": len(metadata),
        "n_per_prompt": n_per_prompt, "num_images": len(metadata) * n_per_prompt, "seed": seed,
        "seeding": "every prompt's n_per_prompt images in one pipeline call with seed=seed (GenEval reseeds per prompt)",
        "sampler": kwargs, "official_command": command, "rules": asdict(rules), "detector": backend or None,
        "scores": None, "per_image_results": None, "environment": env,
    }
    if detector is None:
        result["message"] = ("no detector backend: images written in GenEval's layout but not scored. Score them with "
                             f"the official evaluator in its own environment: {command}")
    else:
        rows = score_image_dir(out, detector, color_classifier, rules, ctx, progress)
        result["scores"] = summarize(rows)
        result["per_image_results"] = ROWS_NAME
        result["message"] = f"scored with dcar's GenEval rules and detector backend {backend or 'given in Python'}"
        if ctx.is_main:
            R.atomic_write_bytes(out / ROWS_NAME, "".join(json.dumps(r) + "\n" for r in rows).encode())
    if ctx.is_main:
        R.atomic_write_json(out / RESULTS_NAME, result)
        print(f"geneval: {counts['generated']} images generated, {counts['reused']} reused; wrote {out / RESULTS_NAME}")
    ctx.barrier()
    return result
