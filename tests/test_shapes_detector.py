"""Tests for the shapes detector: exact recovery on clean renders, tolerance to mild noise, rejection of wrong scenes."""

from __future__ import annotations

import dataclasses
import io
import random

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dcar.data.shapes import COLORS, Scene, ShapeObject, ShapesDataset, render_array, render_scene, sample_scene
from dcar.eval.shapes_detector import detect_objects, score_image, score_scene, to_uint8_rgb

KEYS = ("color", "shape", "count", "relation", "full")


def _scenes(resolution: int, n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, resolution) for _ in range(n)]


def _key(objs: list) -> list[tuple]:
    return sorted((o.color, o.shape, tuple(o.box)) for o in objs)


@pytest.mark.parametrize(("resolution", "n"), [(64, 500), (128, 300), (256, 200)])
def test_exact_recovery_on_clean_renders(resolution: int, n: int) -> None:
    scenes = _scenes(resolution, n, seed=resolution + 1)
    for s in scenes:
        dets = detect_objects(render_array(s))
        assert _key(dets) == _key(list(s.objects)), s.caption  # colour, shape and exact box of every object
        assert all(d.shape_iou == 1.0 for d in dets)
        score = score_scene(dets, s)
        assert score == {
            "color": True,
            "shape": True,
            "count": True,
            "relation": True if s.kind == "relation" else None,
            "full": True,
        }
    # the same images paired with shuffled scenes: near chance
    perm = random.Random(0).sample(range(n), n)
    wrong = [score_image(render_array(scenes[i]), scenes[j]) for i, j in enumerate(perm) if i != j]
    assert np.mean([w["full"] for w in wrong]) < 0.1
    assert np.mean([w["count"] for w in wrong]) < 0.6


def test_input_types_agree() -> None:
    ds = ShapesDataset(resolution=64, size=8)
    for i in range(8):
        item, scene = ds[i], ds.scene(i)
        arr = render_array(scene)
        assert np.array_equal(to_uint8_rgb(item["image"]), arr)
        assert np.array_equal(to_uint8_rgb(item["image"][None]), arr)
        assert np.array_equal(to_uint8_rgb(render_scene(scene)), arr)
        assert np.array_equal(to_uint8_rgb(arr.astype(np.float32) / 127.5 - 1), arr)
        assert detect_objects(item["image"]) == detect_objects(render_scene(scene)) == detect_objects(arr)
        assert score_scene(detect_objects(arr), item["scene"])["full"]  # scene given as its dict


def test_black_background() -> None:
    ds = ShapesDataset(resolution=64, size=40, background="black")
    assert all(score_image(ds[i]["image"], ds.scene(i))["full"] for i in range(40))


def _scene(resolution: int, relation: str | None, *objs: tuple[str, str, tuple[int, int, int, int]]) -> Scene:
    objects = tuple(ShapeObject(c, s, b) for c, s, b in objs)
    kind = "relation" if relation else ("single" if len(objs) == 1 else "count")
    return Scene(objects=objects, caption="", kind=kind, relation=relation, resolution=resolution)


def test_wrong_images_are_scored_wrong() -> None:
    s = _scene(64, "left of", ("red", "circle", (4, 20, 21, 37)), ("blue", "square", (40, 22, 57, 39)))
    img = render_array(s)
    assert score_image(img, s)["full"]
    swapped = dataclasses.replace(s, relation="right of")
    assert score_image(img, swapped) == {"color": True, "shape": True, "count": True, "relation": False, "full": False}
    assert not score_image(img, dataclasses.replace(s, relation="above"))["relation"]
    recolored = _scene(64, "left of", ("red", "circle", (4, 20, 21, 37)), ("green", "square", (40, 22, 57, 39)))
    sc = score_image(render_array(recolored), s)
    assert not sc["color"] and not sc["relation"] and not sc["full"] and sc["shape"] and sc["count"]
    reshaped = _scene(64, "left of", ("red", "diamond", (4, 20, 21, 37)), ("blue", "square", (40, 22, 57, 39)))
    sc = score_image(render_array(reshaped), s)
    assert sc["color"] and not sc["shape"] and not sc["full"]
    # attribute binding: right colours and shapes, wrongly paired
    bound = _scene(64, "left of", ("red", "square", (4, 20, 21, 37)), ("blue", "circle", (40, 22, 57, 39)))
    sc = score_image(render_array(bound), s)
    assert sc["color"] and sc["shape"] and sc["count"] and not sc["relation"] and not sc["full"]
    three = _scene(64, None, *[("green", "triangle", (x, 10, x + 13, 23)) for x in (4, 24, 44)])
    img3 = render_array(three)
    assert score_image(img3, three)["full"]
    img3[10:23, 44:57] = 255  # erase one triangle
    sc = score_image(img3, three)
    assert not sc["count"] and not sc["full"] and sc["relation"] is None and sc["color"]
    assert score_scene([], three) == {"color": False, "shape": False, "count": False, "relation": None, "full": False}


def test_foreign_colours_and_shapes_are_not_palette_objects() -> None:
    img = np.full((64, 64, 3), 255, dtype=np.uint8)
    img[10:30, 10:30] = (140, 80, 20)  # brown: nearest palette colour is orange/red, but far from both
    img[40:60, 40:60] = (128, 128, 128)  # gray square on white
    assert detect_objects(img) == []
    img = np.full((64, 64, 3), 255, dtype=np.uint8)
    img[10:16, 5:50] = COLORS["red"]  # elongated bar: an object, but no known shape
    ring = render_array(_scene(64, None, ("blue", "circle", (30, 25, 57, 52))))
    img[25:52, 30:57] = ring[25:52, 30:57]
    img[33:44, 38:49] = 255  # hollow it out: a ring (and not a plausible circle)
    dets = detect_objects(img)
    assert [(d.color, d.shape) for d in dets] == [("red", None), ("blue", None)]
    one = _scene(64, None, ("red", "square", (5, 5, 20, 20)), ("blue", "circle", (30, 30, 45, 45)))
    assert not score_scene(dets, one)["full"]


def _degrade(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "noise":
        return np.clip(img + rng.normal(0, 16, img.shape), 0, 255).astype(np.uint8)
    if kind == "salt":
        out = img.copy()
        m = rng.random(img.shape[:2]) < 0.02
        out[m] = rng.integers(0, 256, (int(m.sum()), 3))
        return out
    if kind == "blur":
        return np.clip(ndimage.gaussian_filter(img.astype(np.float32), (0.8, 0.8, 0)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=75)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize(
    ("kind", "resolution", "min_full"),
    [
        ("noise", 128, 0.97),
        ("salt", 128, 0.97),
        ("blur", 128, 0.97),
        ("jpeg", 128, 0.97),
        ("noise", 64, 0.95),
        ("salt", 64, 0.95),
        ("blur", 64, 0.9),
    ],
)
def test_tolerates_mild_degradation(kind: str, resolution: int, min_full: float) -> None:
    rng = np.random.default_rng(11)
    scenes = _scenes(resolution, 100, seed=12)
    full = [score_image(_degrade(render_array(s), kind, rng), s)["full"] for s in scenes]
    assert np.mean(full) >= min_full


def test_blur_fringe_is_not_an_object() -> None:
    """Red blurred into white passes through pink; that fringe must not become a pink object."""
    s = _scene(256, None, ("red", "triangle", (60, 60, 161, 161)))
    img = np.clip(ndimage.gaussian_filter(render_array(s).astype(np.float32), (2.5, 2.5, 0)), 0, 255).astype(np.uint8)
    dets = detect_objects(img)
    assert [(d.color, d.shape) for d in dets] == [("red", "triangle")]
