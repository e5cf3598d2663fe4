"""GenEval's scoring rules for dcar: prompt metadata, detection filtering, the clauses of a prompt, the summary.

Rules of djghosh13/geneval@af4902f (MIT; file paths are in that repository), reproduced exactly:

- Metadata ``prompts/evaluation_metadata.jsonl`` (553 lines, 6 tasks): one JSON object per line with ``tag``,
  ``prompt``, ``include`` (clauses ``{class, count, [color], [position: [relation, index]]}``) and, for counting,
  ``exclude`` (``{class, count: N+1}``). :func:`load_metadata` reads and validates it.
- Rules (``evaluation/evaluate_images.py``), reproduced by :func:`filter_detections`, :func:`relative_position`,
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

The detector and the colour classifier are behind :class:`~dcar.eval.geneval_detector.Detector` /
``ColorClassifier``; :func:`score_image` returns a row in the official ``results.jsonl`` format. The image layout,
generation and sharded scoring of a whole run are in :mod:`dcar.eval.geneval`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .geneval_detector import GENEVAL_COLORS, ColorClassifier, Detection, Detector

__all__ = [
    "GENEVAL_COLORS", "RELATIONS", "TASKS", "GenEvalRules", "compute_iou", "evaluate_clauses", "filter_detections",
    "load_metadata", "masked_crop", "relative_position", "score_image", "summarize",
]  # fmt: skip

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


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


# ------------------------------------------------------------------------------------------------------ metadata
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
