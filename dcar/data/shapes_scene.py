"""Scene model of the procedural "shapes" dataset: vocabulary, scenes, captions, the train/held-out split, sampling.

Rendering and the torch dataset live in :mod:`dcar.data.shapes`, which re-exports everything public here.

Scene families (the *spec* of a scene is what its caption says; the *layout* is where the objects are):

* ``single``: one object, "a red circle" ("an orange square": the article follows the colour word).
* ``relation``: two objects that differ in colour or shape, "a red circle above a blue square"; ``objects[0]`` is the
  subject (the first-named object), ``objects[1]`` the reference.
* ``count``: two to four identical objects (same colour, shape and size), "three green triangles".

Geometry. Every object is drawn in a square box of odd side ``s`` (so each shape has a centre pixel and is
symmetric), ``s`` a fraction of the resolution R: 0.25-0.6 R for a single object, 0.2-0.34 R in relations,
0.18-0.28 R when counting (11 px minimum at 64 px); boxes are half-open pixel boxes ``(x0, y0, x1, y1)`` with ``x1 = x0 + s``. Shape membership is decided
at pixel centres (:func:`shape_mask`), so every shape touches all four sides of its box. Objects keep ``margin`` pixels
(3% of R) from the canvas edge and ``gap`` pixels (4% of R, at least 2) from each other (boxes, not just shapes, never overlap). A relation
"A left of B" is laid out with A's box entirely left of B's (by at least ``gap``) *and* the vertical distance between
box centres at most half the horizontal one; likewise for the other three relations, so the dominant axis of the
centre displacement always names the relation.

Split rule (stable across versions for a given seed; pinned by tests):

1. Canonical key of a scene spec: ``single:<color> <shape>``, ``count:<n>:<color> <shape>``, or
   ``relation:<rel>:<color> <shape>|<color> <shape>`` where "right of" / "below" are rewritten as "left of" / "above"
   with the two objects swapped, so a caption and its converse paraphrase share a key.
2. ``u = int.from_bytes(sha256(f"dcar-shapes/v1/seed={seed}/{key}".encode("utf-8")).digest()[:8], "big") / 2**64``.
3. Single-object scenes are always "train"; other scenes are "heldout" iff ``u < HELDOUT_FRACTION`` (0.125).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "orange": (255, 140, 0),
    "yellow": (245, 215, 0),
    "green": (20, 160, 40),
    "cyan": (0, 200, 220),
    "blue": (20, 50, 230),
    "purple": (130, 30, 180),
    "pink": (255, 105, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
FAMILIES: tuple[str, ...] = ("single", "relation", "count")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

HELDOUT_FRACTION = 0.125
SPLIT_SALT = "dcar-shapes/v1"
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
# Optional lighting suffix (``ShapesDataset(lighting=True)``): the caption names the image's exposure level.
LIGHTING_PHRASES: dict[str, str] = {"bright": "in bright light", "dim": "in dim light"}
_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Family probabilities (single, relation, count) and object sizes as fractions of the resolution.
_FAMILY_PROBS = (0.25, 0.45, 0.30)
_SIZE_RANGE = {"single": (0.25, 0.6), "relation": (0.2, 0.34), "count": (0.18, 0.28)}
_CANDIDATES = 32  # positions drawn per rejection-sampling round


@dataclass(frozen=True)
class ShapeObject:
    """One flat object: palette colour name, shape name and half-open pixel box ``(x0, y0, x1, y1)``."""

    color: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        """Box centre ``(cx, cy)`` in pixel coordinates."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0

    def to_dict(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "box": list(self.box)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeObject:
        return cls(color=str(d["color"]), shape=str(d["shape"]), box=tuple(int(v) for v in d["box"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Scene:
    """A ground-truth scene: objects, caption, family, relation (``None`` unless ``kind == "relation"``), resolution."""

    objects: tuple[ShapeObject, ...]
    caption: str
    kind: str
    relation: str | None
    resolution: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; inverse of :meth:`from_dict`."""
        return {
            "objects": [o.to_dict() for o in self.objects],
            "caption": self.caption,
            "kind": self.kind,
            "relation": self.relation,
            "resolution": self.resolution,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(
            objects=tuple(ShapeObject.from_dict(o) for o in d["objects"]),
            caption=str(d["caption"]),
            kind=str(d["kind"]),
            relation=None if d.get("relation") is None else str(d["relation"]),
            resolution=int(d["resolution"]),
        )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class SceneSpec:
    """What a caption says: family, the named ``(color, shape)`` items, relation (relation family), count."""

    kind: str
    items: tuple[tuple[str, str], ...]
    relation: str | None = None
    count: int = 1

    @property
    def caption(self) -> str:
        """The caption text of this spec."""
        (c0, s0) = self.items[0]
        if self.kind == "count":
            return f"{COUNT_WORDS[self.count]} {c0} {s0}s"
        first = f"{_article(c0)} {c0} {s0}"
        if self.kind == "single":
            return first
        c1, s1 = self.items[1]
        return f"{first} {RELATION_PHRASES[self.relation]} {_article(c1)} {c1} {s1}"  # type: ignore[index]

    @property
    def key(self) -> str:
        """Canonical key: identical for a relation caption and its converse paraphrase."""
        if self.kind == "single":
            return "single:{} {}".format(*self.items[0])
        if self.kind == "count":
            return "count:{}:{} {}".format(self.count, *self.items[0])
        a, b, rel = self.items[0], self.items[1], self.relation
        if rel in ("right of", "below"):
            a, b, rel = b, a, _CONVERSE[rel]
        return f"relation:{rel}:{a[0]} {a[1]}|{b[0]} {b[1]}"


def spec_of(scene: Scene) -> SceneSpec:
    """The :class:`SceneSpec` of a scene (its caption content without the layout)."""
    items = tuple((o.color, o.shape) for o in scene.objects)
    if scene.kind == "count":
        return SceneSpec("count", items[:1], None, len(items))
    return SceneSpec(scene.kind, items, scene.relation)


def _caption_regex() -> re.Pattern[str]:
    col, shp = "|".join(COLORS), "|".join(SHAPES)
    rel = "|".join(RELATION_PHRASES.values())
    cnt = "|".join(COUNT_WORDS[2:])
    return re.compile(
        rf"^(?:an? (?P<c0>{col}) (?P<s0>{shp})(?: (?P<rel>{rel}) an? (?P<c1>{col}) (?P<s1>{shp}))?"
        rf"|(?P<n>{cnt}) (?P<cc>{col}) (?P<cs>{shp})s)$"
    )


def split_lighting(caption: str) -> tuple[str, str | None]:
    """``(caption without its lighting suffix, lighting key or None)``: "a red circle in dim light" ->
    ("a red circle", "dim")."""
    text = caption.strip()
    for key, phrase in LIGHTING_PHRASES.items():
        if text.lower().endswith(" " + phrase):
            return text[: -len(phrase) - 1].rstrip(), key
    return text, None


def parse_caption(caption: str) -> SceneSpec:
    """Parse a caption produced by this module back into its :class:`SceneSpec` (``ValueError`` otherwise); a
    lighting suffix ("... in dim light") is allowed and ignored (see :func:`split_lighting`)."""
    m = _caption_regex().match(split_lighting(caption)[0].lower())
    if m is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    if m["n"]:
        return SceneSpec("count", ((m["cc"], m["cs"]),), None, COUNT_WORDS.index(m["n"]))
    if m["rel"] is None:
        return SceneSpec("single", ((m["c0"], m["s0"]),))
    rel = next(k for k, v in RELATION_PHRASES.items() if v == m["rel"])
    return SceneSpec("relation", ((m["c0"], m["s0"]), (m["c1"], m["s1"])), rel)


def caption_split(scene: Scene | SceneSpec | str, seed: int) -> str:
    """Split ("train" or "heldout") of a scene, spec or caption string for ``seed`` (rule in the module docstring)."""
    if isinstance(scene, str):
        spec = parse_caption(scene)
    elif isinstance(scene, Scene):
        spec = spec_of(scene)
    else:
        spec = scene
    if spec.kind == "single":
        return "train"
    digest = hashlib.sha256(f"{SPLIT_SALT}/seed={int(seed)}/{spec.key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "heldout" if u < HELDOUT_FRACTION else "train"


def all_specs(max_objects: int = 4) -> list[SceneSpec]:
    """Every distinct scene spec (hence caption) reachable with ``max_objects``, in a fixed order."""
    objs = [(c, s) for c in COLORS for s in SHAPES]
    specs = [SceneSpec("single", (o,)) for o in objs]
    if max_objects >= 2:
        specs += [SceneSpec("relation", (a, b), r) for a in objs for b in objs if a != b for r in RELATIONS]
        specs += [SceneSpec("count", (o,), None, n) for n in range(2, min(max_objects, 4) + 1) for o in objs]
    return specs


def split_captions(split: str, seed: int, max_objects: int = 4) -> set[str]:
    """The set of distinct captions of ``split`` for ``seed``."""
    return {s.caption for s in all_specs(max_objects) if caption_split(s, seed) == split}


def sample_spec(rng: np.random.Generator, max_objects: int = 4, composable_only: bool = False) -> SceneSpec:
    """Draw a scene spec; ``composable_only`` skips the single-object family (used for the held-out split)."""
    if max_objects < 1:
        raise ValueError("max_objects must be >= 1")
    if composable_only and max_objects < 2:
        raise ValueError("composable scenes need max_objects >= 2")
    p_single, p_relation, p_count = _FAMILY_PROBS
    if composable_only:
        p_single = 0.0
    u = rng.random() * (p_single + p_relation + p_count)
    kind = "relation" if u < p_single + p_relation else "count"
    if max_objects < 2 or u < p_single:
        kind = "single"
    colors, n_obj = list(COLORS), len(COLORS) * len(SHAPES)
    o = int(rng.integers(n_obj))
    a = (colors[o // len(SHAPES)], SHAPES[o % len(SHAPES)])
    if kind == "single":
        return SceneSpec("single", (a,))
    if kind == "count":
        return SceneSpec("count", (a,), None, int(rng.integers(2, min(max_objects, 4) + 1)))
    o2 = (o + 1 + int(rng.integers(n_obj - 1))) % n_obj
    b = (colors[o2 // len(SHAPES)], SHAPES[o2 % len(SHAPES)])
    return SceneSpec("relation", (a, b), RELATIONS[int(rng.integers(len(RELATIONS)))])


def layout_params(resolution: int) -> tuple[int, int]:
    """``(margin, gap)`` in pixels for a resolution: distance to the canvas edge and between object boxes."""
    return max(1, round(0.03 * resolution)), max(2, round(0.04 * resolution))


def _odd_size(rng: np.random.Generator, kind: str, resolution: int, scale: float = 1.0) -> int:
    lo, hi = (scale * v for v in _SIZE_RANGE[kind])
    return 2 * int((lo + (hi - lo) * rng.random()) * resolution / 2) + 1


def _layout_relation(rng: np.random.Generator, rel: str, r: int, scale: float = 1.0) -> list[tuple[int, int, int, int]]:
    """Boxes (subject, reference) satisfying ``rel`` with a clear margin; built along the relation's axis."""
    margin, gap = layout_params(r)
    s_a, s_b = _odd_size(rng, "relation", r, scale), _odd_size(rng, "relation", r, scale)
    first_is_a = rel in ("left of", "above")  # the object nearer the origin along the axis
    s1, s2 = (s_a, s_b) if first_is_a else (s_b, s_a)
    slack = r - 2 * margin - s1 - s2 - gap
    t0, t1 = sorted(rng.integers(0, slack + 1, size=2).tolist())
    p1 = margin + t0
    p2 = p1 + s1 + gap + (t1 - t0)
    d_axis = (p2 + s2 / 2) - (p1 + s1 / 2)
    # Cross-axis offsets: first candidate pair whose centres differ by at most half the along-axis distance.
    q1 = rng.integers(margin, r - margin - s1 + 1, size=_CANDIDATES).tolist()
    q2 = rng.integers(margin, r - margin - s2 + 1, size=_CANDIDATES).tolist()
    o1, o2 = (r - s1) // 2, (r - s2) // 2  # fallback: centre both across the axis (always feasible)
    for c1, c2 in zip(q1, q2, strict=True):
        if abs((c2 + s2 / 2) - (c1 + s1 / 2)) * 2 <= d_axis:
            o1, o2 = c1, c2
            break
    if rel in ("left of", "right of"):
        b1, b2 = (p1, o1, p1 + s1, o1 + s1), (p2, o2, p2 + s2, o2 + s2)
    else:
        b1, b2 = (o1, p1, o1 + s1, p1 + s1), (o2, p2, o2 + s2, p2 + s2)
    return [b1, b2] if first_is_a else [b2, b1]


def _layout_count(rng: np.random.Generator, n: int, r: int, scale: float = 1.0) -> list[tuple[int, int, int, int]]:
    """``n`` same-size boxes placed by sequential rejection sampling; shrinks the size (not below the family's
    minimum) and restarts when a box finds no free spot."""
    margin, gap = layout_params(r)
    s = _odd_size(rng, "count", r, scale)
    s_min = 2 * int(scale * _SIZE_RANGE["count"][0] * r / 2) + 1
    while True:
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            sep = s + gap  # top-left corners this far apart along x or y keep the boxes >= gap apart
            for x, y in rng.integers(margin, r - margin - s + 1, size=(_CANDIDATES, 2)).tolist():
                if all(abs(x - b[0]) >= sep or abs(y - b[1]) >= sep for b in boxes):
                    boxes.append((x, y, x + s, y + s))
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
        s = max(s_min, 2 * int(s * 0.9 / 2) + 1)  # at s_min, n <= 4 boxes cover < 15% of the canvas


def layout_spec(rng: np.random.Generator, spec: SceneSpec, resolution: int, grid: int = 0, align: int = 0,
                size_scale: float = 1.0) -> Scene:
    """Place the objects of ``spec`` on a ``resolution`` canvas and return the full :class:`Scene`.

    ``grid=0`` places boxes at any pixel. ``grid=G`` lays the scene out on a ``G x G`` canvas of cells (same rules,
    cell units) and scales it: a box of ``k`` cells starts on a cell boundary and has side ``k * cell`` (minus one
    pixel when that is even, so every shape keeps a centre pixel), ``cell = resolution / G``. Snapped layouts have
    far fewer distinct token patches, which is what lets a 32x-compressed discrete tokenizer represent them.

    ``align=A`` (pixels, e.g. the tokenizer's 32-px patch) also moves every box's top-left corner to the nearest
    multiple of ``A`` (kept inside the canvas; the canvas margin is dropped): token-aligned layouts, so an object's
    edges meet token boundaries and a token holds one of few patches. Box sizes, the gap between boxes and the
    relation rule are kept; a layout that breaks them after snapping is redrawn (see :func:`_align_layout`).

    ``size_scale`` multiplies every family's size range (0.7 at 128 px on a 16-cell grid: every object of a
    relation or count scene is 23 px, inside one 32-px token)."""
    r = int(resolution)
    if not 16 <= r <= 4096:  # designed and tested for 64..512
        raise ValueError(f"resolution {resolution} out of range")
    check_size_scale(size_scale)
    if align:
        check_align(align, r)
        return _align_layout(rng, spec, r, grid, align, size_scale)
    if grid:
        check_grid(grid, r)
        coarse = layout_spec(rng, spec, grid, size_scale=size_scale)
        cell = r // grid
        objects = tuple(ShapeObject(o.color, o.shape, _scale_box(o.box, cell)) for o in coarse.objects)
        return Scene(objects=objects, caption=spec.caption, kind=spec.kind, relation=spec.relation, resolution=r)
    if spec.kind == "single":
        margin, _ = layout_params(r)
        s = _odd_size(rng, "single", r, size_scale)
        x, y = rng.integers(margin, r - margin - s + 1, size=2).tolist()
        boxes = [(x, y, x + s, y + s)]
        items = list(spec.items)
    elif spec.kind == "relation":
        boxes = _layout_relation(rng, spec.relation, r, size_scale)  # type: ignore[arg-type]
        items = list(spec.items)
    else:
        boxes = _layout_count(rng, spec.count, r, size_scale)
        items = [spec.items[0]] * spec.count
    objects = tuple(ShapeObject(c, sh, b) for (c, sh), b in zip(items, boxes, strict=True))
    return Scene(objects=objects, caption=spec.caption, kind=spec.kind, relation=spec.relation, resolution=r)


_ALIGN_TRIES = 256


def _align_layout(rng: np.random.Generator, spec: SceneSpec, r: int, grid: int, align: int,
                  size_scale: float = 1.0) -> Scene:
    """Lay out with ``layout_spec(..., grid)``, snap the boxes to multiples of ``align``; redraw until the snapped
    boxes keep ``gap`` pixels between them and the relation still holds (deterministic given ``rng``)."""
    _, gap = layout_params(r)
    for _ in range(_ALIGN_TRIES):
        scene = layout_spec(rng, spec, r, grid, size_scale=size_scale)
        objects = []
        for o in scene.objects:
            side = o.box[2] - o.box[0]
            x, y = (min(max(0, round(v / align) * align), r - side) for v in o.box[:2])
            objects.append(ShapeObject(o.color, o.shape, (x, y, x + side, y + side)))
        if not _boxes_apart([o.box for o in objects], gap):
            continue
        rel = scene.relation
        if rel is not None and not relation_holds(objects[0].center, objects[1].center, rel):
            continue
        return Scene(objects=tuple(objects), caption=scene.caption, kind=scene.kind, relation=scene.relation,
                     resolution=r)
    raise RuntimeError(f"no {align}-px aligned layout found for {spec.caption!r} at {r} px in {_ALIGN_TRIES} tries")


def _boxes_apart(boxes: list[tuple[int, int, int, int]], gap: int) -> bool:
    """Whether every pair of boxes is at least ``gap`` pixels apart along x or y."""
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]):
                return False
    return True


def check_align(align: int, resolution: int) -> None:
    """``ValueError`` unless ``align`` is 0 (no snapping) or at least 4 pixels dividing ``resolution``."""
    if align and (align < 4 or resolution % align):
        raise ValueError(f"align must be 0 or >= 4 pixels dividing the resolution; got align={align}, "
                         f"resolution={resolution}")


def check_size_scale(size_scale: float) -> None:
    """``ValueError`` unless ``size_scale`` lies in [0.25, 1]."""
    if not 0.25 <= size_scale <= 1.0:
        raise ValueError(f"size_scale must lie in [0.25, 1], got {size_scale}")


def check_grid(grid: int, resolution: int) -> None:
    """``ValueError`` unless ``grid`` is 0 (free layout) or at least 16 cells dividing ``resolution``."""
    if grid and (grid < 16 or resolution % grid):
        raise ValueError(f"grid must be 0 or >= 16 and divide the resolution; got grid={grid}, "
                         f"resolution={resolution}")


def _scale_box(box: tuple[int, int, int, int], cell: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (v * cell for v in box)
    side = x1 - x0 - (1 - (x1 - x0) % 2)  # odd side: drop one pixel when k * cell is even
    return x0, y0, x0 + side, y0 + side


def sample_scene(rng: np.random.Generator, resolution: int, max_objects: int = 4, grid: int = 0,
                 align: int = 0, size_scale: float = 1.0) -> Scene:
    """Draw a random scene (spec then layout, see :func:`layout_spec` for ``grid``, ``align``, ``size_scale``)."""
    return layout_spec(rng, sample_spec(rng, max_objects), resolution, grid, align, size_scale)


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """Whether ``relation`` holds from centre ``a`` to centre ``b``: the dominant axis of ``b - a`` names it."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if relation == "left of":
        return dx > abs(dy)
    if relation == "right of":
        return -dx > abs(dy)
    if relation == "above":
        return dy > abs(dx)
    if relation == "below":
        return -dy > abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def shape_mask(shape: str, height: int, width: int | None = None) -> np.ndarray:
    """Boolean ``(height, width)`` mask of ``shape`` filling its box, tested at pixel centres (no antialiasing).

    With box coordinates ``u, v`` in [0, 1] at pixel centres: circle ``(u-1/2)^2 + (v-1/2)^2 <= 1/4``; triangle (apex
    up) ``|u-1/2| <= v/2``; diamond ``|u-1/2| + |v-1/2| <= 1/2``; square everything. Evaluated in exact integer
    arithmetic on ``a = 2k+1-width`` and ``b = 2j+1-height`` (so ``u - 1/2 = a / (2 width)``); for odd sizes no pixel
    centre lies on a boundary, so the masks are symmetric and well defined."""
    w = height if width is None else width
    if shape == "square":
        return np.ones((height, w), dtype=bool)
    a = np.arange(1 - w, w, 2, dtype=np.int64)
    b = np.arange(1 - height, height, 2, dtype=np.int64)[:, None]
    if shape == "circle":
        return (a * a * (height * height)) + (b * b * (w * w)) <= (w * w) * (height * height)
    if shape == "triangle":
        return 2 * height * np.abs(a) <= w * (b + height)
    if shape == "diamond":
        return height * np.abs(a) + w * np.abs(b) <= w * height
    raise ValueError(f"unknown shape {shape!r}")
