"""Layouts of the procedural "shapes" scenes: where each object of a :class:`~dcar.data.shapes_scene.SceneSpec` goes,
the relation test between two centres, and the pixel mask of each shape.

Geometry. Every object is drawn in a square box of odd side ``s`` (so each shape has a centre pixel and is
symmetric), ``s`` a fraction of the resolution R: 0.25-0.6 R for a single object, 0.2-0.34 R in relations,
0.18-0.28 R when counting (11 px minimum at 64 px); boxes are half-open pixel boxes ``(x0, y0, x1, y1)`` with ``x1 = x0 + s``. Shape membership is decided
at pixel centres (:func:`shape_mask`), so every shape touches all four sides of its box. Objects keep ``margin`` pixels
(3% of R) from the canvas edge and ``gap`` pixels (4% of R, at least 2) from each other (boxes, not just shapes, never overlap). A relation
"A left of B" is laid out with A's box entirely left of B's (by at least ``gap``) *and* the vertical distance between
box centres at most half the horizontal one; likewise for the other three relations, so the dominant axis of the
centre displacement always names the relation.
"""

from __future__ import annotations

import numpy as np

from dcar.data.shapes_scene import Scene, SceneSpec, ShapeObject, sample_spec

_SIZE_RANGE = {"single": (0.25, 0.6), "relation": (0.2, 0.34), "count": (0.18, 0.28)}
_CANDIDATES = 32  # positions drawn per rejection-sampling round


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
