"""Scene model of the procedural "shapes" dataset: vocabulary, scenes, captions, the train/held-out split, sampling.

Layouts (where the objects go) live in :mod:`dcar.data.shapes_layout`; rendering and the torch dataset in
:mod:`dcar.data.shapes`, which re-exports everything public of both.

Scene families (the *spec* of a scene is what its caption says; the *layout* is where the objects are):

* ``single``: one object, "a red circle" ("an orange square": the article follows the colour word).
* ``relation``: two objects that differ in colour or shape, "a red circle above a blue square"; ``objects[0]`` is the
  subject (the first-named object), ``objects[1]`` the reference.
* ``count``: two to four identical objects (same colour, shape and size), "three green triangles".

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
