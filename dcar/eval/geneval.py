"""GenEval for dcar: prompt metadata, GenEval's image layout, GenEval's scoring rules and summary.

Protocol (djghosh13/geneval@af4902f, MIT; file paths are in that repository):

- Metadata ``prompts/evaluation_metadata.jsonl`` (553 lines, 6 tasks): one JSON object per line with ``tag``,
  ``prompt``, ``include`` (clauses ``{class, count, [color], [position: [relation, index]]}``) and, for counting,
  ``exclude`` (``{class, count: N+1}``). :func:`load_metadata` reads and validates it.
- Layout (README, ``generation/diffusers_generate.py``): ``<out>/<5-digit prompt index>/metadata.jsonl`` holding that
  prompt's metadata line (one object, ``json.dump``), ``<out>/<index>/samples/0000.png`` ... and an optional
  ``grid.png``. The evaluator (``evaluation/evaluate_images.py:main``) keeps all-digit folder names and files that
  ``re.match(r"\\d+\\.png")``; :func:`list_samples` applies the same rules.
- Rules (``evaluate_images.py``), reproduced by :func:`filter_detections`, :func:`relative_position`,
  :func:`evaluate_clauses` and :func:`score_image` with the defaults of :class:`GenEvalRules`:
  ``evaluate_image``: per class, sort detections by score, keep score > 0.3 (> 0.9 for every class of a ``counting``
  prompt), the 16 most confident, then greedy NMS at ``max_overlap`` (1.0 = off; IoU as ``compute_iou``, with +1 pixel
  sizes). ``evaluate``: each ``include`` clause takes the ``count`` most confident objects of its class and fails
  with fewer; ``color``: the masked crops of those objects (over ``#999``, cropped to the box,
  :func:`masked_crop` = ``ImageCrops``) go to the colour classifier, and fail unless all ``count`` get the colour;
  ``position`` (only if the clause matched so far): each found object must have the relation to every object of the
  referenced earlier clause, whose failure fails this one too. ``relative_position(A, B)``: centre offset
  ``o = c_A - c_B``, ``r = max(|o| - 0.1 (d_A + d_B), 0) sign(o)`` per axis with box sizes ``d = (w, h)``; no relation
  if ``|r| < 1e-3`` on both axes, else ``(dx, dy) = r / |o|`` and ``dx < -0.5`` left of, ``dx > 0.5`` right of,
  ``dy < -0.5`` above, ``dy > 0.5`` below (image y points down). ``exclude`` clauses fail if the number of kept
  detections of the class is ``>= count`` (so counting means exactly N). An image is correct if no clause fails.
- Summary (``evaluation/summary_scores.py``), :func:`summarize`: per task, the mean of ``correct`` over its images;
  overall = unweighted mean of the task scores; also the fractions of correct images and of prompts with any.

Official scoring, in GenEval's own environment (mmdet 2.x, mmcv-full, open_clip, clip_benchmark, CUDA) with the mmdet
2.x checkpoint (``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth`` from
download.openmmlab.com/mmdetection/v2.0/mask2former/..., saved by ``evaluation/download_models.sh <MODEL_DIR>`` as
``<MODEL_DIR>/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth``), printed by :func:`official_command`::

    cd <GENEVAL_REPO> && python evaluation/evaluate_images.py <IMAGE_DIR> --outfile <IMAGE_DIR>/results.jsonl \\
        --model-path <MODEL_DIR> [--model-config <mmdet>/.mim/configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py]
    cd <GENEVAL_REPO>/evaluation && python summary_scores.py <IMAGE_DIR>/results.jsonl

(``summary_scores.py`` opens ``object_names.txt`` in the working directory, hence the ``cd``.) dcar's scorer runs
the same rules behind :class:`~dcar.eval.geneval_detector.Detector` / ``ColorClassifier`` and writes per-image rows
in the official ``results.jsonl`` format (``results_dcar.jsonl``, readable by ``summary_scores.py``). Generation and
scoring are sharded over processes (:func:`shard`; also used by :mod:`dcar.eval.shapes_eval`) and resume from the
PNGs on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from dcar.config.loader import ConfigError

from .geneval_detector import GENEVAL_COLORS, ColorClassifier, Detection, Detector

__all__ = [
    "GENEVAL_COLORS", "RELATIONS", "TASKS", "GenEvalRules", "GenJob", "check_manifest", "compute_iou",
    "evaluate_clauses", "filter_detections", "generate_missing", "list_samples", "load_metadata", "masked_crop",
    "official_command", "process_state", "relative_position", "run_geneval", "sample_path", "score_image",
    "score_image_dir", "shard", "summarize", "write_layout",
]  # fmt: skip

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RESULTS_NAME = "geneval_results.json"
ROWS_NAME = "results_dcar.jsonl"


@dataclass(frozen=True)
class GenEvalRules:
    """``evaluate_images.py`` options (``--options k=v``) and their defaults."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1
    bgcolor: str = "#999"
    crop: bool = True


# ----------------------------------------------------------------------------------------------- metadata, layout
def load_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a GenEval ``evaluation_metadata.jsonl`` (one JSON object per non-blank line), checking its clauses."""
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
            _check_metadata(meta)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{path}:{n}: bad GenEval metadata line: {err}") from None
        rows.append(meta)
    if not rows:
        raise ValueError(f"{path} holds no metadata lines")
    return rows


def _check_metadata(meta: Any) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("tag"), str) or not isinstance(meta.get("prompt"), str):
        raise ValueError("expected an object with string 'tag' and 'prompt'")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError("'include' must be a non-empty list")
    for i, req in enumerate(include + list(meta.get("exclude", []))):
        if not isinstance(req.get("class"), str) or not isinstance(req.get("count"), int) or req["count"] < 1:
            raise ValueError(f"clause {req} needs a string 'class' and an integer 'count' >= 1")
        if "color" in req and req["color"] not in GENEVAL_COLORS:
            raise ValueError(f"unknown colour {req['color']!r}")
        if "position" in req:
            rel, target = req["position"]
            if rel not in RELATIONS or not isinstance(target, int) or not 0 <= target < i:
                raise ValueError(f"bad position {req['position']} (relation in {RELATIONS}, earlier clause index)")


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
            with open(meta_file, "w") as fp:
                json.dump(dict(meta), fp)
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


# ---------------------------------------------------------------------------------------------------------- rules
def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with inclusive pixel boxes (sizes ``x1 - x0 + 1``), as ``evaluate_images.py:compute_iou``."""
    def area(b: Sequence[float]) -> float:
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def filter_detections(detections: Sequence[Detection | tuple], threshold: float, max_objects: int = 16,
                      max_overlap: float = 1.0) -> dict[str, list[Detection]]:
    """Per class: sort by score (descending), keep score > ``threshold``, the top ``max_objects``, then greedy NMS
    (drop IoU >= ``max_overlap``; off at 1.0). Classes with no kept detection are absent."""
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        d = Detection(*d)
        by_class.setdefault(d.class_name, []).append(d)
    kept_all: dict[str, list[Detection]] = {}
    for name, dets in by_class.items():
        scores = np.array([d.score for d in dets], dtype=np.float64)
        order = np.argsort(scores)[::-1]
        order = order[scores[order] > threshold][:max_objects].tolist()
        kept: list[Detection] = []
        while order:
            best = order.pop(0)
            kept.append(dets[best])
            if max_overlap != 1:
                order = [j for j in order if compute_iou(dets[best].box, dets[j].box) < max_overlap]
        if kept:
            kept_all[name] = kept
    return kept_all


def relative_position(box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = 0.1) -> set[str]:
    """Relations of box A to box B (``"left of"`` ... ``"below"``) with the size-relative margin (module docstring)."""
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - position_threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    hits = (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5))
    return {name for name, hit in hits if hit}


def masked_crop(image: Image.Image, box: Sequence[float], mask: np.ndarray | None, bgcolor: str = "#999",
                crop: bool = True) -> Image.Image:
    """The object pasted on a ``bgcolor`` canvas through its mask (``"original"``: keep the image) and cropped to
    its box (PIL rounds the box), as ``evaluate_images.py:ImageCrops``."""
    image = image.convert("RGB")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask shape {mask.shape} does not match image size {image.size[::-1]}")
        blank = image.copy() if bgcolor == "original" else Image.new("RGB", image.size, color=bgcolor)
        image = Image.composite(image, blank, Image.fromarray(mask))
    return image.crop(tuple(float(v) for v in box[:4])) if crop else image


def evaluate_clauses(image: Image.Image, objects: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any],
                     color_classifier: ColorClassifier | None = None,
                     rules: GenEvalRules = GenEvalRules()) -> tuple[bool, str]:
    """Apply the include / exclude clauses of ``metadata`` to the kept detections ``objects`` (per class, most
    confident first); returns ``(correct, reason)`` with the official reason strings."""
    correct, reasons = True, []
    groups: list[Sequence[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = list(objects.get(name, []))[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                if color_classifier is None:
                    raise ValueError("a colour clause needs a ColorClassifier")
                crops = [masked_crop(image, d.box, d.mask, rules.bgcolor, rules.crop) for d in found]
                colors = list(color_classifier.classify(crops, name))
                hits = colors.count(req["color"])
                if hits < count:
                    ok = False
                    others = ", ".join(f"{colors.count(c)} {c}" for c in GENEVAL_COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {name}>={count}, found {hits} {req['color']}; and {others}")
            if "position" in req and ok:
                rel, target = req["position"]
                if groups[target] is None:
                    ok = False
                    reasons.append(f"no target for {name} to be {rel}")
                else:
                    for d in found:
                        for t in groups[target]:  # type: ignore[union-attr]
                            true_rels = relative_position(d.box, t.box, rules.position_threshold)
                            if rel not in true_rels:
                                ok = False
                                reasons.append(f"expected {name} {rel} target, found {' and '.join(true_rels)} target")
                                break
                        if not ok:
                            break
        correct = correct and ok
        groups.append(found if ok else None)
    for req in metadata.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reasons)


def score_image(image: Image.Image | str | os.PathLike, metadata: Mapping[str, Any], detector: Detector,
                color_classifier: ColorClassifier | None = None, rules: GenEvalRules = GenEvalRules(),
                filename: str | None = None) -> dict[str, Any]:
    """Detect, filter and evaluate one image; a row in the official ``results.jsonl`` format."""
    if isinstance(image, (str, os.PathLike)):
        filename = filename or str(image)
        source: Image.Image | str = str(image)
        pil = ImageOps.exif_transpose(Image.open(image))
    else:
        source = pil = image
    threshold = rules.counting_threshold if metadata["tag"] == "counting" else rules.threshold
    objects = filter_detections(detector.detect(source), threshold, rules.max_objects, rules.max_overlap)
    correct, reason = evaluate_clauses(pil, objects, metadata, color_classifier, rules)
    details = {k: [[float(v) for v in d.box] + [float(d.score)] for d in v] for k, v in objects.items()}
    return {"filename": filename, "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": bool(correct),
            "reason": reason, "metadata": json.dumps(dict(metadata)), "details": json.dumps(details)}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``summary_scores.py``: per-task accuracy over images, overall = mean over the tasks present, plus the
    fractions of correct images and of prompts (grouped by metadata) with any correct image."""
    if not rows:
        raise ValueError("no results to summarise")
    tasks: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    for r in rows:
        tasks.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts[r["metadata"]] = prompts.get(r["metadata"], False) or bool(r["correct"])
    per_task = {t: {"accuracy": float(np.mean(v)), "correct": int(sum(v)), "images": len(v)} for t, v in tasks.items()}
    return {
        "overall": float(np.mean([t["accuracy"] for t in per_task.values()])),
        "tasks": per_task,
        "missing_tasks": [t for t in TASKS if t not in tasks],
        "num_images": len(rows),
        "num_prompts": len(prompts),
        "correct_images": float(np.mean([bool(r["correct"]) for r in rows])),
        "correct_prompts": float(np.mean(list(prompts.values()))),
    }


# ------------------------------------------------------------------------------------- sharded, resumable running
def shard(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """Contiguous slice ``index`` of ``count`` disjoint slices covering ``items`` (sizes differ by at most one)."""
    n = len(items)
    return list(items[index * n // count : (index + 1) * n // count])


def process_state(state: Any = None) -> Any:
    """``state`` or accelerate's ``PartialState`` (process index / count, barriers): GPUs under ``accelerate launch``;
    gloo CPU processes under ``torchrun`` when CUDA is absent or ``ACCELERATE_USE_CPU=1``."""
    if state is not None:
        return state
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def _save_png(image: Image.Image, path: Path) -> None:
    """Write via a hidden temporary file and an atomic rename, so an interrupted run leaves no partial PNG."""
    tmp = path.parent / f".{path.name}.tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@dataclass(frozen=True)
class GenJob:
    """One pipeline call: ``prompts[i]`` is written to ``paths[i]``; sampled with ``seed``; optional grid."""

    prompts: tuple[str, ...]
    paths: tuple[Path, ...]
    seed: int
    grid: Path | None = None
    captions: tuple[str, ...] = field(default=())


def generate_missing(pipe: Callable[..., Any] | None, jobs: Sequence[GenJob], pipe_kwargs: Mapping[str, Any],
                     state: Any = None, desc: str = "sampling", progress: bool = True) -> dict[str, int]:
    """Run the jobs of this process's shard whose PNGs are not all on disk (existing PNGs are kept); returns the
    number of images generated and reused over all processes. ``pipe=None`` requires every PNG to exist."""
    from accelerate.utils import gather_object
    from tqdm import tqdm

    from dcar.train.logging import save_image_grid, to_uint8

    state = process_state(state)
    mine = shard(jobs, state.process_index, state.num_processes)
    todo = [j for j in mine if not all(p.is_file() for p in j.paths)]
    if todo and pipe is None:
        raise ConfigError(f"{len(todo)} prompt(s) lack images (e.g. {todo[0].paths[0]}) and no pipeline is given")
    made = 0
    for job in tqdm(todo, desc=desc, unit="call", disable=not (progress and state.is_local_main_process)):
        images = pipe(list(job.prompts), seed=job.seed, **pipe_kwargs)  # type: ignore[misc]
        for path, pixels in zip(job.paths, to_uint8(images).numpy(), strict=True):
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                _save_png(Image.fromarray(pixels), path)
                made += 1
        if job.grid is not None:
            save_image_grid(images, job.grid, len(job.paths), list(job.captions) or None)
    counts = gather_object([(made, sum(len(j.paths) for j in mine) - made)])
    state.wait_for_everyone()
    return {"generated": sum(c[0] for c in counts), "reused": sum(c[1] for c in counts)}


def check_manifest(path: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Write ``settings`` to ``path`` (JSON), or check that an earlier run used the same ones (``ConfigError``)."""
    path = Path(path)
    settings = json.loads(json.dumps(dict(settings)))
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ConfigError(f"{path.parent} holds images made with other settings ({', '.join(diff)} differ); "
                             "use a fresh output folder")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def score_image_dir(image_dir: str | os.PathLike, detector: Detector, color_classifier: ColorClassifier | None,
                    rules: GenEvalRules = GenEvalRules(), state: Any = None, progress: bool = True) -> list[dict]:
    """Score every sample of a GenEval layout folder, sharded over processes and gathered (sorted by filename)."""
    from accelerate.utils import gather_object
    from tqdm import tqdm

    state = process_state(state)
    mine = shard(list_samples(image_dir), state.process_index, state.num_processes)
    rows = [score_image(p, m, detector, color_classifier, rules)
            for p, m in tqdm(mine, desc="scoring", unit="img", disable=not (progress and state.is_local_main_process))]
    return sorted(gather_object(rows), key=lambda r: r["filename"])


def run_geneval(pipe: Callable[..., Any] | None, metadata_path: str | os.PathLike, out: str | os.PathLike, *,
                n_per_prompt: int = 4, seed: int = 42, pipe_kwargs: Mapping[str, Any] | None = None,
                detector: Detector | None = None, color_classifier: ColorClassifier | None = None,
                rules: GenEvalRules = GenEvalRules(), backend: str = "", pipeline_path: str = "", grid: bool = True,
                state: Any = None, progress: bool = True) -> dict[str, Any]:
    """Generate ``n_per_prompt`` images per prompt in GenEval's layout (every prompt reseeded with ``seed``, as
    GenEval's reference generator; existing PNGs reused), score them if a ``detector`` is given, and write
    ``<out>/geneval_results.json`` (see the schema in the report / script docstring). Returns that dict."""
    from dcar import __version__

    state = process_state(state)
    meta_path = Path(metadata_path)
    metadata = load_metadata(meta_path)
    out = Path(out)
    kwargs = dict(pipe_kwargs or {})
    if state.is_main_process:
        write_layout(out, metadata)
        if pipe is not None:
            check_manifest(out / "generation.json", {"pipeline": pipeline_path, "n_per_prompt": n_per_prompt,
                                                     "seed": seed, "sampler": kwargs,
                                                     "metadata_sha256": _sha256(meta_path)})
    state.wait_for_everyone()
    jobs = [GenJob((m["prompt"],) * n_per_prompt, tuple(sample_path(out, i, k) for k in range(n_per_prompt)), seed,
                   out / f"{i:05d}" / "grid.png" if grid else None) for i, m in enumerate(metadata)]
    counts = generate_missing(pipe, jobs, kwargs, state, desc="geneval sampling", progress=progress)
    command = official_command(out)
    result: dict[str, Any] = {
        "protocol": "geneval", "dcar_version": __version__, "pipeline": pipeline_path, "metadata": str(meta_path),
        "metadata_sha256": _sha256(meta_path), "image_dir": str(out), "num_prompts": len(metadata),
        "n_per_prompt": n_per_prompt, "num_images": len(metadata) * n_per_prompt, "seed": seed,
        "seeding": "every prompt's n_per_prompt images in one pipeline call with seed=seed (GenEval reseeds per prompt)",
        "sampler": kwargs, "official_command": command, "rules": asdict(rules), "detector": backend or None,
        "scores": None, "per_image_results": None,
    }
    if detector is None:
        result["message"] = ("no detector backend: images written in GenEval's layout but not scored. Score them with "
                             f"the official evaluator in its own environment: {command}")
    else:
        rows = score_image_dir(out, detector, color_classifier, rules, state, progress)
        result["scores"] = summarize(rows)
        result["per_image_results"] = ROWS_NAME
        result["message"] = f"scored with dcar's GenEval rules and detector backend {backend or 'given in Python'}"
        if state.is_main_process:
            (out / ROWS_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if state.is_main_process:
        (out / RESULTS_NAME).write_text(json.dumps(result, indent=2) + "\n")
        print(f"geneval: {counts['generated']} images generated, {counts['reused']} reused; wrote {out / RESULTS_NAME}")
    state.wait_for_everyone()
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
