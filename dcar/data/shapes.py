"""Procedural, seeded "shapes" captioned dataset for CPU-scale text-to-image work.

Each sample is one to four flat-coloured shapes (8 colours x 4 shapes: circle, square, triangle, diamond) on a plain
background, captioned with colour, shape, count and spatial relation: "a red circle", "a red circle above a blue
square", "three green triangles". The scene model, caption grammar, layout rules and the train/held-out split rule are
documented in :mod:`dcar.data.shapes_scene` (re-exported here). In short: the split is a sha256 hash of a canonical
scene key (a relation and its converse paraphrase share the key) salted with the seed; single-object captions are all
"train", 12.5% of relational/counting keys are "heldout", so held-out captions are unseen compositions of seen words.

Rendering is exact and alias-free by construction: each shape is a boolean mask decided at pixel centres and painted
with its palette colour directly at the target resolution (no supersampling, no antialiasing), so every pixel is
either the background or exactly one palette colour, at any resolution from 64 to 512 (objects scale with it; the
smallest object is 11 px at 64 px). Optionally (``shadow`` > 0) the objects cast soft drop shadows on the background
(:func:`shadow_alpha`); the objects themselves stay flat palette colours. ``exposure`` > 0 multiplies each image by
its own factor drawn uniformly in ``[1 - exposure, 1]`` (a global brightness the caption does not name: continuous
variation that a discrete codebook does not hold, which is what DC-HT's continuous path is for). With
``lighting=True`` the caption names it instead: each image is bright (factor 1) or dim (factor ``1 - exposure``),
one half each, and its caption ends with "in bright light" / "in dim light" (:data:`LIGHTING_PHRASES`). A codebook
that merges the two levels (``merge_codes``) then loses what the caption says, and the residual tokens carry it: the
case where DC-AR's residual head, conditioned on the caption through the transformer, has something to restore.

Determinism: sample ``i`` of a :class:`ShapesDataset` is a pure function of ``(seed, split, i, resolution,
max_objects)`` (plus ``background`` for the pixels): a ``numpy`` Generator seeded with ``[seed, split_id, i]`` draws
scene specs until one falls in the requested split, then lays it out. The caption of sample ``i`` does not depend on
the resolution.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

from dcar.data.shapes_layout import (
    check_align,
    check_grid,
    check_size_scale,
    layout_params,
    layout_spec,
    relation_holds,
    sample_scene,
    shape_mask,
)
from dcar.data.shapes_scene import (
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    FAMILIES,
    HELDOUT_FRACTION,
    LIGHTING_PHRASES,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    Scene,
    SceneSpec,
    ShapeObject,
    all_specs,
    caption_split,
    parse_caption,
    sample_spec,
    spec_of,
    split_captions,
    split_lighting,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "COUNT_WORDS",
    "FAMILIES",
    "HELDOUT_FRACTION",
    "LIGHTING_PHRASES",
    "RELATIONS",
    "RELATION_PHRASES",
    "SHAPES",
    "SPLITS",
    "Scene",
    "SceneSpec",
    "ShapeObject",
    "ShapesDataset",
    "all_specs",
    "caption_split",
    "check_align",
    "check_grid",
    "check_size_scale",
    "layout_params",
    "layout_spec",
    "parse_caption",
    "relation_holds",
    "render_array",
    "render_scene",
    "resolve_background",
    "sample_scene",
    "sample_spec",
    "shadow_alpha",
    "shape_mask",
    "spec_of",
    "split_captions",
    "split_lighting",
]

SPLITS: tuple[str, ...] = ("train", "heldout")
_MAX_SPLIT_TRIES = 100_000


def resolve_background(background: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """RGB of a background given by name (``BACKGROUNDS``) or as an RGB triple."""
    if isinstance(background, str):
        if background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {background!r}; expected one of {sorted(BACKGROUNDS)} or an RGB triple"
            )
        return BACKGROUNDS[background]
    rgb = tuple(int(v) for v in background)
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"bad background {background!r}")
    return rgb  # type: ignore[return-value]


def shadow_alpha(scene: Scene) -> np.ndarray:
    """Soft drop shadows of ``scene``'s objects, ``(R, R)`` float32 in [0, 1]: the union of the object masks moved
    ``round(0.04 R)`` px right and down, box-blurred twice with side ``2 round(0.02 R) + 1`` (a Gaussian-like
    penumbra). Low-amplitude detail that follows from the objects' positions: what DC-HT's residual tokens hold."""
    r = scene.resolution
    off, rad = max(1, round(0.04 * r)), max(1, round(0.02 * r))
    alpha = np.zeros((r, r), dtype=np.float32)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        mask = shape_mask(obj.shape, y1 - y0, x1 - x0)
        h, w = min(y1 + off, r) - (y0 + off), min(x1 + off, r) - (x0 + off)
        if h > 0 and w > 0:
            region = alpha[y0 + off : y0 + off + h, x0 + off : x0 + off + w]
            np.maximum(region, mask[:h, :w], out=region)
    for _ in range(2):
        alpha = ndimage.uniform_filter(alpha, size=2 * rad + 1, mode="constant")
    return alpha


def _render_chw(scene: Scene, background: tuple[int, int, int], shadow: float = 0.0) -> np.ndarray:
    """Channel-first ``(3, R, R)`` uint8 rendering of ``scene`` at ``scene.resolution``; ``shadow`` > 0 darkens the
    background under the objects' drop shadows by up to that fraction (objects are painted on top, unshaded)."""
    r = scene.resolution
    canvas = np.empty((3, r, r), dtype=np.uint8)
    for c in range(3):
        canvas[c].fill(background[c])
    if shadow > 0:
        shade = 1.0 - shadow * shadow_alpha(scene)
        for c in range(3):
            canvas[c] = np.rint(background[c] * shade).astype(np.uint8)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        mask = shape_mask(obj.shape, y1 - y0, x1 - x0)
        color = np.array(COLORS[obj.color], dtype=np.uint8).reshape(3, 1, 1)
        np.copyto(canvas[:, y0:y1, x0:x1], color, where=mask)
    return canvas


def render_array(
    scene: Scene, resolution: int | None = None, background: str | tuple[int, int, int] = "white",
    shadow: float = 0.0,
) -> np.ndarray:
    """Render ``scene`` to a ``(R, R, 3)`` uint8 array (``R`` must equal ``scene.resolution`` when given)."""
    r = scene.resolution if resolution is None else int(resolution)
    if r != scene.resolution:
        raise ValueError(f"scene was laid out for {scene.resolution} px, asked to render at {r} px")
    return np.ascontiguousarray(_render_chw(scene, resolve_background(background), shadow).transpose(1, 2, 0))


def render_scene(
    scene: Scene, resolution: int | None = None, background: str | tuple[int, int, int] = "white",
    shadow: float = 0.0,
) -> Image.Image:
    """Render ``scene`` to an RGB PIL image (flat colours, no antialiasing; optional soft shadows)."""
    return Image.fromarray(render_array(scene, resolution, background, shadow), mode="RGB")


class ShapesDataset(Dataset):
    """Seeded captioned shapes dataset; ``__getitem__`` returns image in [-1, 1], caption, scene dict and index."""

    def __init__(
        self,
        split: str = "train",
        resolution: int = 64,
        size: int = 50_000,
        seed: int = 0,
        max_objects: int = 4,
        background: str | tuple[int, int, int] = "white",
        grid: int = 0,
        align: int = 0,
        shadow: float = 0.0,
        size_scale: float = 1.0,
        exposure: float = 0.0,
        lighting: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 1 <= max_objects <= 4:
            raise ValueError("max_objects must be in 1..4")
        if split == "heldout" and max_objects < 2:
            raise ValueError("the held-out split has only multi-object captions; use max_objects >= 2")
        if size < 0 or seed < 0:
            raise ValueError("size and seed must be non-negative")
        self.split = split
        self.resolution = int(resolution)
        self.size = int(size)
        self.seed = int(seed)
        self.max_objects = int(max_objects)
        self.grid = int(grid)
        check_grid(self.grid, self.resolution)
        self.align = int(align)
        check_align(self.align, self.resolution)
        self.background = resolve_background(background)
        if not 0.0 <= shadow <= 0.5:
            raise ValueError(f"shadow must lie in [0, 0.5] (the darkening of the background), got {shadow}")
        self.shadow = float(shadow)
        check_size_scale(size_scale)
        self.size_scale = float(size_scale)
        if not 0.0 <= exposure <= 0.3:
            raise ValueError(f"exposure must lie in [0, 0.3] (the largest darkening of an image), got {exposure}")
        self.exposure = float(exposure)
        if lighting and self.exposure == 0:
            raise ValueError("lighting=True names the exposure level in the caption: it needs exposure > 0")
        self.lighting = bool(lighting)
        if min(np.linalg.norm(np.subtract(c, self.background)) for c in COLORS.values()) < 100:
            raise ValueError(f"background {self.background} is too close to a palette colour")

    def __len__(self) -> int:
        return self.size

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for dataset of size {self.size}")
        return i

    def _gain(self, i: int) -> float:
        """Exposure factor of sample ``i``, from its own stream (the layout is unaffected)."""
        if self.exposure == 0:
            return 1.0
        u = np.random.default_rng([self.seed, SPLITS.index(self.split), i, 1]).random()
        if self.lighting:
            return 1.0 - self.exposure if u < 0.5 else 1.0
        return 1.0 - self.exposure * u

    def scene(self, i: int) -> Scene:
        """Ground-truth :class:`Scene` of sample ``i`` (with ``lighting``, its caption ends with the lighting)."""
        i = self._index(i)
        return self._lit(self._layout(i), self._gain(i))

    def _lit(self, scene: Scene, gain: float) -> Scene:
        """``scene`` with its caption naming the lighting of ``gain`` (with ``lighting``; else as is)."""
        if not self.lighting:
            return scene
        key = "dim" if gain < 1.0 else "bright"
        return dataclasses.replace(scene, caption=f"{scene.caption} {LIGHTING_PHRASES[key]}")

    def _layout(self, i: int) -> Scene:
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
        composable = self.split == "heldout"
        for _ in range(_MAX_SPLIT_TRIES):
            spec = sample_spec(rng, self.max_objects, composable_only=composable)
            if caption_split(spec, self.seed) == self.split:
                return layout_spec(rng, spec, self.resolution, self.grid, self.align, self.size_scale)
        raise RuntimeError(f"no {self.split} scene found for seed {self.seed}")

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        gain = self._gain(i)
        scene = self._lit(self._layout(i), gain)
        chw = _render_chw(scene, self.background, self.shadow).astype(np.float32)
        if self.exposure > 0:  # global exposure of this image
            chw = np.rint(chw * np.float32(gain))
        chw *= np.float32(1.0 / 127.5)
        chw -= np.float32(1.0)
        image = torch.from_numpy(chw)
        return {"image": image, "caption": scene.caption, "scene": scene.to_dict(), "index": i}

    def captions(self) -> set[str]:
        """All distinct captions this split can produce (for its seed and ``max_objects``)."""
        return split_captions(self.split, self.seed, self.max_objects)

    def heldout_captions(self) -> set[str]:
        """All distinct held-out captions for this dataset's seed and ``max_objects`` (for evaluation)."""
        return split_captions("heldout", self.seed, self.max_objects)
