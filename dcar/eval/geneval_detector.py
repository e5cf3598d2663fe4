"""Detector and colour-classifier interfaces for dcar's GenEval rules, and adapters for GenEval's own models.

GenEval (djghosh13/geneval@af4902f, MIT) scores an image with two models, both loaded in
``evaluation/evaluate_images.py:load_models``:

- an instance-segmentation detector, Mask2Former Swin-S trained on COCO, from mmdet 2.x
  (config ``configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py``, checkpoint
  ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth`` from ``evaluation/download_models.sh``), whose
  ``inference_detector(model, filepath)`` gives per-class ``(n, 5)`` box arrays ``[x0, y0, x1, y1, score]`` and
  per-class lists of ``(H, W)`` boolean masks, in the class order of ``evaluation/object_names.txt``;
- open_clip ``ViT-L-14`` (``pretrained="openai"``) as a zero-shot colour classifier
  (``evaluate_images.py:color_classification``, through ``clip_benchmark``'s ``zero_shot_classifier`` and
  ``run_classification``) with the three templates "a photo of a {c} {class}", "a photo of a {c}-colored
  {class}" and "a photo of a {c} object" over the 10 colours; the input is the object's masked crop
  (:func:`dcar.eval.geneval.masked_crop`).

dcar's rules engine (:mod:`dcar.eval.geneval`) only sees the two small interfaces below, so any backend can be
plugged in: :class:`Detector` (``detect(image) -> [(class_name, score, box, mask)]``) and :class:`ColorClassifier`
(``classify(crops, class_name) -> [colour]``). :class:`MMDetMask2Former` and :class:`OpenClipColorClassifier` wrap
GenEval's models; they need ``mmdet`` (2.x, as GenEval), ``mmcv-full``, ``open_clip_torch``, the detector checkpoint and
the CLIP weights, none of which dcar installs or downloads. :func:`load_backend` builds a backend by name
(``"mask2former"``) or from an import path ``"package.module:factory"`` whose factory returns
``(detector, color_classifier)``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
from PIL import Image

__all__ = [
    "COCO_CLASSES",
    "CLIP_TEMPLATES",
    "GENEVAL_COLORS",
    "ColorClassifier",
    "Detection",
    "Detector",
    "MMDetMask2Former",
    "OpenClipColorClassifier",
    "backend_available",
    "load_backend",
]

# The 80 COCO classes in detector-index order: GenEval's evaluation/object_names.txt (its names, e.g. "tv",
# "computer mouse", which differ from mmdet's own class names; the adapter maps by index).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# evaluate_images.py: COLORS (the argmax of the colour classifier is taken over these, in this order).
GENEVAL_COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")

# evaluate_images.py:color_classification; "{c}" is the colour, "{cls}" the detected class name.
CLIP_TEMPLATES: tuple[str, ...] = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")

ImageInput = Image.Image | str | Path


class Detection(NamedTuple):
    """One detected instance: class name, confidence, box ``(x0, y0, x1, y1)`` in pixels, ``(H, W)`` bool mask."""

    class_name: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None


@runtime_checkable
class Detector(Protocol):
    """Instance detector: all detections of an image (a PIL image or a file path), any order, unthresholded."""

    def detect(self, image: ImageInput) -> Sequence[Detection | tuple[str, float, Sequence[float], Any]]: ...


@runtime_checkable
class ColorClassifier(Protocol):
    """Zero-shot colour of objects: one of :data:`GENEVAL_COLORS` per crop (masked crop over grey, see
    :func:`dcar.eval.geneval.masked_crop`); ``class_name`` is the detected class (it enters CLIP's prompts)."""

    def classify(self, crops: Sequence[Image.Image], class_name: str) -> list[str]: ...


class MMDetMask2Former:
    """GenEval's detector through mmdet's API (``init_detector`` / ``inference_detector``, as
    ``evaluate_images.py:load_models`` / ``evaluate_image``).

    ``config``: the Mask2Former Swin-S COCO config (for the PyPI mmdet 2.28 wheel it ships at
    ``mmdet/.mim/configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py``); ``checkpoint``: the ``.pth``
    from GenEval's ``evaluation/download_models.sh``. mmdet 2.x results ``(bbox[80], segm[80])`` are read as GenEval
    does; mmdet 3.x ``DetDataSample`` results are also accepted (not GenEval's setup).
    """

    def __init__(self, config: str, checkpoint: str, device: str = "cuda",
                 class_names: Sequence[str] = COCO_CLASSES) -> None:
        from mmdet.apis import init_detector

        self.model = init_detector(str(config), str(checkpoint), device=device)
        self.class_names = tuple(class_names)

    def detect(self, image: ImageInput) -> list[Detection]:
        from mmdet.apis import inference_detector

        if isinstance(image, (str, Path)):
            source: Any = str(image)  # GenEval passes the file path (mmcv reads it, BGR)
        else:
            source = np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])
        result = inference_detector(self.model, source)
        if hasattr(result, "pred_instances"):  # mmdet 3.x
            inst = result.pred_instances
            masks = inst.masks.cpu().numpy() if hasattr(inst, "masks") else None
            return [
                Detection(self.class_names[int(c)], float(s), tuple(float(v) for v in b),
                          None if masks is None else masks[i].astype(bool))
                for i, (b, s, c) in enumerate(zip(inst.bboxes.cpu().numpy(), inst.scores.cpu().numpy(),
                                                  inst.labels.cpu().numpy(), strict=True))
            ]
        bbox = result[0] if isinstance(result, tuple) else result
        segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        out: list[Detection] = []
        for c, name in enumerate(self.class_names):
            for i, row in enumerate(np.asarray(bbox[c]).reshape(-1, 5)):
                mask = None if segm is None else np.asarray(segm[c][i]).astype(bool)
                out.append(Detection(name, float(row[4]), tuple(float(v) for v in row[:4]), mask))
        return out


class OpenClipColorClassifier:
    """GenEval's CLIP colour classifier: open_clip ``model_name`` (``pretrained`` is a tag such as "openai" or a
    local weights file), zero-shot weights per class = mean of the L2-normalised text embeddings of
    :data:`CLIP_TEMPLATES` per colour, renormalised (``clip_benchmark.zero_shot_classifier``); prediction = argmax of
    ``normalised image embedding @ weights`` (``run_classification``, autocast on CUDA)."""

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str = "openai", device: str | None = None,
                 batch_size: int = 16, colors: Sequence[str] = GENEVAL_COLORS) -> None:
        import open_clip
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, _, self.transform = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.batch_size = batch_size
        self.colors = tuple(colors)
        self._weights: dict[str, Any] = {}  # per class name, built on first use

    def _amp(self) -> Any:
        import contextlib

        import torch

        return torch.autocast("cuda") if str(self.device).startswith("cuda") else contextlib.nullcontext()

    def _class_weights(self, class_name: str) -> Any:
        import torch
        import torch.nn.functional as F

        if class_name not in self._weights:
            with torch.no_grad(), self._amp():
                cols = []
                for c in self.colors:
                    texts = self.tokenizer([t.format(c=c, cls=class_name) for t in CLIP_TEMPLATES]).to(self.device)
                    emb = F.normalize(self.model.encode_text(texts), dim=-1).mean(dim=0)
                    cols.append(emb / emb.norm())
                self._weights[class_name] = torch.stack(cols, dim=1)
        return self._weights[class_name]

    def classify(self, crops: Sequence[Image.Image], class_name: str) -> list[str]:
        import torch
        import torch.nn.functional as F

        weights = self._class_weights(class_name)
        preds: list[str] = []
        for s in range(0, len(crops), self.batch_size):
            batch = torch.stack([self.transform(c) for c in crops[s : s + self.batch_size]]).to(self.device)
            with torch.no_grad(), self._amp():
                logits = 100.0 * F.normalize(self.model.encode_image(batch), dim=-1) @ weights
            preds += [self.colors[int(i)] for i in logits.argmax(1).tolist()]
        return preds


def backend_available(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can be built here, and why not."""
    if name == "mask2former":
        missing = [m for m in ("mmdet", "mmcv", "open_clip") if importlib.util.find_spec(m) is None]
        if missing:
            return False, f"mask2former needs {', '.join(missing)} (GenEval's environment; see geneval.py's docstring)"
        return True, ""
    if ":" in name:
        module = name.split(":", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        return (True, "") if found else (False, f"module {module!r} not found")
    return False, f"unknown detector backend {name!r}; use 'mask2former' or 'package.module:factory'"


def load_backend(name: str, **options: Any) -> tuple[Detector, ColorClassifier]:
    """Build ``(detector, color_classifier)``.

    ``"mask2former"``: options ``detector_config``, ``detector_checkpoint`` (both required), ``clip_model``
    (ViT-L-14), ``clip_pretrained`` ("openai" or a local file), ``device``. ``"pkg.mod:factory"``: ``factory(**options)``
    must return the pair.
    """
    ok, why = backend_available(name)
    if not ok:
        raise RuntimeError(why)
    if name == "mask2former":
        config, ckpt = options.get("detector_config"), options.get("detector_checkpoint")
        if not config or not ckpt:
            raise ValueError("detector=mask2former needs detector_config=PATH and detector_checkpoint=PATH")
        for p in (config, ckpt):
            if not Path(p).is_file():
                raise FileNotFoundError(f"{p} does not exist")
        device = options.get("device") or "cuda"
        detector = MMDetMask2Former(config, ckpt, device=device)
        colors = OpenClipColorClassifier(options.get("clip_model") or "ViT-L-14",
                                         options.get("clip_pretrained") or "openai", device=device)
        return detector, colors
    module, attr = name.split(":", 1)
    pair = getattr(importlib.import_module(module), attr)(**options)
    detector, colors = pair
    if not isinstance(detector, Detector) or not isinstance(colors, ColorClassifier):
        raise TypeError(f"{name} must return (Detector, ColorClassifier)")
    return detector, colors
