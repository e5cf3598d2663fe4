"""Tests for the procedural shapes dataset: determinism, split rule, ground truth vs pixels, relations, coverage."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from dcar.data.collate import collate
from dcar.data.shapes import (
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    RELATIONS,
    SHAPES,
    Scene,
    SceneSpec,
    ShapesDataset,
    all_specs,
    caption_split,
    layout_params,
    parse_caption,
    relation_holds,
    render_array,
    render_scene,
    sample_scene,
    shadow_alpha,
    shape_mask,
    spec_of,
    split_captions,
)


def _scenes(resolution: int, n: int, seed: int = 0, grid: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, resolution, grid=grid) for _ in range(n)]


def test_vocabulary() -> None:
    assert len(COLORS) >= 8 and len(SHAPES) >= 4 and set(RELATIONS) == {"left of", "right of", "above", "below"}
    rgb = np.array(list(COLORS.values()), dtype=float)
    pair_d = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert min(pair_d) > 70  # distinct palette colours
    for bg in BACKGROUNDS.values():
        assert np.linalg.norm(rgb - np.array(bg), axis=1).min() > 100


def test_determinism_and_seeds() -> None:
    a, b = ShapesDataset(seed=0), ShapesDataset(seed=0)
    for i in (0, 7, 123):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"]) and sa["scene"] == sb["scene"] and sa["index"] == i
        assert render_scene(a.scene(i)).tobytes() == render_scene(b.scene(i)).tobytes()
    other = ShapesDataset(seed=1)
    diff = sum(a[i]["caption"] != other[i]["caption"] for i in range(20))
    assert diff >= 15
    # sample i's caption does not depend on the resolution; its layout scales with it
    big = ShapesDataset(seed=0, resolution=256)
    assert [a.scene(i).caption for i in range(30)] == [big.scene(i).caption for i in range(30)]
    assert big[3]["image"].shape == (3, 256, 256)


def test_item_format_and_collate() -> None:
    ds = ShapesDataset(resolution=64, size=10)
    item = ds[4]
    img = item["image"]
    assert img.dtype == torch.float32 and img.shape == (3, 64, 64)
    assert img.min().item() >= -1.0 and img.max().item() == 1.0  # white background maps to exactly 1
    scene = ds.scene(4)
    assert item["caption"] == scene.caption and item["index"] == 4
    assert Scene.from_dict(json.loads(json.dumps(item["scene"]))) == scene
    expected = torch.from_numpy(render_array(scene).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(img, expected, atol=1e-6)
    assert torch.equal(ds[-1]["image"], ds[9]["image"])
    with pytest.raises(IndexError):
        ds[10]
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 64, 64) and batch["index"].tolist() == [0, 1, 2, 3]
    assert isinstance(batch["scene"][0], dict) and len(batch["caption"]) == 4


def test_caption_grammar_roundtrip() -> None:
    specs = all_specs(4)
    assert len({s.caption for s in specs}) == len(specs) == 32 + 32 * 31 * 4 + 32 * 3
    for s in specs:
        assert parse_caption(s.caption) == s
    assert SceneSpec("single", (("orange", "square"),)).caption == "an orange square"
    assert SceneSpec("count", (("green", "triangle"),), None, 3).caption == "three green triangles"
    assert (
        SceneSpec("relation", (("red", "circle"), ("blue", "square")), "above").caption
        == "a red circle above a blue square"
    )
    with pytest.raises(ValueError):
        parse_caption("a mauve circle")


def test_split_regression_constants() -> None:
    """Pinned splits (rule in dcar.data.shapes_scene's docstring); changing them breaks held-out comparability."""
    assert caption_split("a blue circle above an orange square", 0) == "heldout"
    assert caption_split("an orange square below a blue circle", 0) == "heldout"  # converse paraphrase
    assert caption_split("a blue circle above a pink diamond", 0) == "heldout"
    assert caption_split("four pink diamonds", 0) == "heldout"
    assert caption_split("a red circle above a blue square", 0) == "train"
    assert caption_split("three green triangles", 0) == "train"
    assert caption_split("three green triangles", 2) == "heldout"
    assert caption_split("four pink diamonds", 1) == "train"
    assert caption_split("a red circle", 0) == "train"
    assert len(split_captions("heldout", 0)) == 511


def test_split_rule_properties() -> None:
    specs = all_specs(4)
    for s in specs:
        if s.kind == "relation":
            conv = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[s.relation]
            converse = SceneSpec("relation", (s.items[1], s.items[0]), conv)
            assert converse.key == s.key and caption_split(converse, 5) == caption_split(s, 5)
    assert all(caption_split(s, seed) == "train" for s in specs if s.kind == "single" for seed in (0, 1))
    composable = [s for s in specs if s.kind != "single"]
    for seed in (0, 1, 2):
        held = [s for s in composable if caption_split(s, seed) == "heldout"]
        assert 0.10 <= len(held) / len(composable) <= 0.15
        assert {s.kind for s in held} == {"relation", "count"}
    assert split_captions("heldout", 0) != split_captions("heldout", 1)
    scene = sample_scene(np.random.default_rng(3), 64)
    assert caption_split(scene, 0) == caption_split(scene.caption, 0) == caption_split(spec_of(scene), 0)


def test_splits_disjoint_over_samples() -> None:
    train, held = ShapesDataset("train", seed=0), ShapesDataset("heldout", seed=0)
    train_caps = {train.scene(i).caption for i in range(3000)}
    held_caps = {held.scene(i).caption for i in range(2000)}
    assert train_caps.isdisjoint(held_caps)
    assert held_caps <= train.heldout_captions() == held.captions()
    assert train_caps <= train.captions() and train.captions().isdisjoint(train.heldout_captions())
    assert len(held_caps) > 200  # the held-out split really varies
    with pytest.raises(ValueError):
        ShapesDataset("heldout", max_objects=1)


def test_caption_coverage() -> None:
    ds = ShapesDataset(seed=0)
    colors, shapes, counts, relations = set(), set(), set(), set()
    for i in range(1500):
        s = ds.scene(i)
        colors |= {o.color for o in s.objects}
        shapes |= {o.shape for o in s.objects}
        counts.add(len(s.objects))
        relations.add(s.relation)
        if s.kind == "count":
            assert s.caption.startswith(COUNT_WORDS[len(s.objects)] + " ")
    assert colors == set(COLORS) and shapes == set(SHAPES)
    assert counts == {1, 2, 3, 4} and relations == set(RELATIONS) | {None}
    small = ShapesDataset(seed=0, max_objects=2)
    assert max(len(small.scene(i).objects) for i in range(300)) == 2
    assert {ShapesDataset(max_objects=1).scene(i).kind for i in range(50)} == {"single"}


@pytest.mark.parametrize(("resolution", "grid"), [(64, 0), (128, 0), (256, 0), (512, 0), (64, 16), (128, 16), (256, 32)])
def test_layout_constraints_and_relations(resolution: int, grid: int) -> None:
    margin, gap = layout_params(resolution)
    n = 1500 if resolution == 64 else 300
    for s in _scenes(resolution, n, seed=resolution, grid=grid):
        boxes = [o.box for o in s.objects]
        for x0, y0, x1, y1 in boxes:
            assert x1 - x0 == y1 - y0 and (x1 - x0) % 2 == 1 and x1 - x0 >= (0.15 if grid else 0.17) * resolution
            if grid:  # snapped: starts on a cell boundary, side = whole cells (minus 1 px when even)
                cell = resolution // grid
                assert x0 % cell == 0 and y0 % cell == 0 and (x1 - x0 + 1) // cell * cell in (x1 - x0, x1 - x0 + 1)
            assert x0 >= margin and y0 >= margin and x1 <= resolution - margin and y1 <= resolution - margin
        for a, b in itertools.combinations(boxes, 2):  # separated by >= gap along some axis
            assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= gap
        if s.kind == "count":
            assert len({(o.color, o.shape, o.box[2] - o.box[0]) for o in s.objects}) == 1
        if s.kind != "relation":
            assert s.relation is None
            continue
        a, b = s.objects
        assert (a.color, a.shape) != (b.color, b.shape)
        (ax, ay), (bx, by) = a.center, b.center
        assert relation_holds(a.center, b.center, s.relation)
        if s.relation in ("left of", "right of"):
            lo, hi = (a, b) if s.relation == "left of" else (b, a)
            assert hi.box[0] - lo.box[2] >= gap and 2 * abs(by - ay) <= abs(bx - ax)
        else:
            lo, hi = (a, b) if s.relation == "above" else (b, a)
            assert hi.box[1] - lo.box[3] >= gap and 2 * abs(bx - ax) <= abs(by - ay)
        for other in set(RELATIONS) - {s.relation}:
            assert not relation_holds(a.center, b.center, other)


@pytest.mark.parametrize(("resolution", "n"), [(64, 300), (128, 150), (256, 60)])
def test_ground_truth_matches_pixels(resolution: int, n: int) -> None:
    bg = np.array(BACKGROUNDS["white"], dtype=np.uint8)
    for s in _scenes(resolution, n, seed=7):
        img = render_array(s)
        assert img.shape == (resolution, resolution, 3) and img.dtype == np.uint8
        outside = np.ones((resolution, resolution), dtype=bool)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            crop = img[y0:y1, x0:x1]
            is_col = (crop == np.array(COLORS[o.color], dtype=np.uint8)).all(-1)
            assert is_col.mean() >= 0.45  # triangle / diamond fill half their box, circle ~0.79, square all
            assert np.array_equal(is_col, shape_mask(o.shape, y1 - y0))
            assert (crop[~is_col] == bg).all()
            for edge in (is_col[0], is_col[-1], is_col[:, 0], is_col[:, -1]):
                assert edge.any()  # the box is tight
            outside[y0:y1, x0:x1] = False
        assert (img[outside] == bg).all()


def test_grid_layout_dataset() -> None:
    free, snapped = ShapesDataset(size=64, resolution=128), ShapesDataset(size=64, resolution=128, grid=16)
    assert [free[i]["caption"] for i in range(64)] == [snapped[i]["caption"] for i in range(64)]  # same specs
    assert all(o.box[0] % 8 == 0 and o.box[1] % 8 == 0 for i in range(64) for o in snapped.scene(i).objects)
    assert any(o.box[0] % 8 for i in range(64) for o in free.scene(i).objects)
    for bad in (12, 24, 48):
        with pytest.raises(ValueError, match="grid must be"):
            ShapesDataset(resolution=128, grid=bad)


@pytest.mark.parametrize("grid", [0, 16])
def test_token_aligned_layout(grid: int) -> None:
    """align=32: every box starts on the 32-px token grid (unless pushed back inside the canvas), boxes keep the gap,
    relations still hold, captions (specs) are those of the unaligned dataset, and the layout is deterministic."""
    r, n = 128, 300
    aligned = ShapesDataset(size=n, resolution=r, grid=grid, align=32)
    plain = ShapesDataset(size=n, resolution=r, grid=grid)
    _, gap = layout_params(r)
    for i in range(n):
        scene = aligned.scene(i)
        assert scene.caption == plain.scene(i).caption and scene == aligned.scene(i)
        boxes = [o.box for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= r and 0 <= y0 < y1 <= r
            assert (x0 % 32 == 0 or x1 == r) and (y0 % 32 == 0 or y1 == r)
        for a, b in itertools.combinations(boxes, 2):
            assert a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
        if scene.kind == "relation":
            assert relation_holds(scene.objects[0].center, scene.objects[1].center, scene.relation)
    # most boxes really are on the grid (not only pushed against the canvas edge)
    assert sum(o.box[0] % 32 == 0 for i in range(n) for o in aligned.scene(i).objects) > 0.8 * sum(
        len(aligned.scene(i).objects) for i in range(n))
    held = ShapesDataset("heldout", size=50, resolution=r, grid=grid, align=32)
    assert all(caption_split(held[i]["caption"], 0) == "heldout" for i in range(50))
    for bad in (3, 24, 48):
        with pytest.raises(ValueError, match="align must be"):
            ShapesDataset(resolution=r, align=bad)


def test_soft_shadows() -> None:
    """shadow > 0 only darkens background pixels, by at most that fraction, below-right of the objects; objects keep
    their exact palette colours; shadow=0 is the flat render; the detector still recovers every scene."""
    from dcar.eval.shapes_detector import score_image

    flat, shaded = (ShapesDataset(size=40, resolution=128, grid=16, align=32, shadow=s) for s in (0.0, 0.15))
    for i in range(40):
        scene = flat.scene(i)
        a, b = render_array(scene), render_array(scene, shadow=0.15)
        assert np.array_equal(a, ((flat[i]["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round())
        assert np.array_equal(b, ((shaded[i]["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round())
        on_object = (a != 255).any(-1)
        assert np.array_equal(a[on_object], b[on_object])  # objects unshaded
        bg = b[~on_object].astype(int)
        assert bg.min() >= round(255 * 0.85) - 1 and (bg < 255).any()  # darkened by at most 15%, somewhere
        ys, xs = np.nonzero((b != a).any(-1))
        cy, cx = np.mean([o.center[1] for o in scene.objects]), np.mean([o.center[0] for o in scene.objects])
        if len(scene.objects) == 1:
            assert ys.mean() > cy and xs.mean() > cx  # the shadow falls right of and below the object
        assert score_image(b, scene)["full"]
    alpha = shadow_alpha(flat.scene(0))
    assert alpha.shape == (128, 128) and alpha.min() >= 0.0 and alpha.max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="shadow must lie"):
        ShapesDataset(shadow=0.8)


def test_size_scale_puts_objects_in_one_token() -> None:
    """size_scale=0.7 at 128 px (16-cell grid, 32-px alignment): every relation / count object is 23 px and lies
    inside one token; captions are unchanged; out-of-range scales are refused."""
    small = ShapesDataset(size=200, resolution=128, grid=16, align=32, size_scale=0.7)
    full = ShapesDataset(size=200, resolution=128, grid=16, align=32)
    sizes = []
    for i in range(200):
        scene = small.scene(i)
        assert scene.caption == full.scene(i).caption
        for o in scene.objects:
            side = o.box[2] - o.box[0]
            sizes.append(side)
            if scene.kind != "single":
                assert side == 23 and o.box[0] // 32 == (o.box[2] - 1) // 32 and o.box[1] // 32 == (o.box[3] - 1) // 32
    assert max(sizes) < max(o.box[2] - o.box[0] for i in range(200) for o in full.scene(i).objects)
    with pytest.raises(ValueError, match="size_scale must lie"):
        ShapesDataset(size_scale=0.1)


def test_exposure_scales_each_image_by_its_own_factor() -> None:
    """exposure=e multiplies image i by a factor in [1 - e, 1] that depends on i (deterministic), keeps the scene
    and caption, and the detector still recovers every scene."""
    from dcar.eval.shapes_detector import score_image

    plain, lit = ShapesDataset(size=60, resolution=128), ShapesDataset(size=60, resolution=128, exposure=0.12)
    gains = []
    for i in range(60):
        a, b = plain[i], lit[i]
        assert a["caption"] == b["caption"] and a["scene"] == b["scene"]
        x, y = (a["image"] + 1) * 127.5, (b["image"] + 1) * 127.5
        gain = float(y.max() / x.max())
        assert 0.88 - 1e-3 <= gain <= 1.0 + 1e-6
        assert torch.allclose(y, torch.round(x * gain), atol=1.01)  # one factor for the whole image
        assert torch.equal(b["image"], lit[i]["image"])
        gains.append(gain)
        assert score_image(((b["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy(),
                           Scene.from_dict(b["scene"]))["full"]
    assert max(gains) - min(gains) > 0.08  # factors differ between images
    with pytest.raises(ValueError, match="exposure must lie"):
        ShapesDataset(exposure=0.5)


def test_lighting_names_the_exposure_in_the_caption() -> None:
    """lighting=True: each image is bright (factor 1) or dim (factor 1 - exposure), about one half each; its caption
    is the plain caption + "in bright light" / "in dim light", which parse_caption ignores and split_lighting
    recovers; scenes and splits are those of the plain dataset."""
    from dcar.data.shapes import split_lighting

    plain = ShapesDataset("heldout", size=80, resolution=128, exposure=0.12)
    lit = ShapesDataset("heldout", size=80, resolution=128, exposure=0.12, lighting=True)
    keys = []
    for i in range(80):
        a, b = plain[i], lit[i]
        base, key = split_lighting(b["caption"])
        assert base == a["caption"] and key in ("bright", "dim") and lit.scene(i).caption == b["caption"]
        assert b["caption"] == f"{a['caption']} in {key} light"
        assert parse_caption(b["caption"]) == parse_caption(a["caption"])
        assert caption_split(b["caption"], 0) == "heldout"
        x = (b["image"] + 1) * 127.5
        assert float(x.max()) == pytest.approx(255.0 if key == "bright" else round(255 * 0.88), abs=0.5)
        keys.append(key)
    assert 25 <= keys.count("dim") <= 55
    assert split_lighting("a red circle") == ("a red circle", None)
    with pytest.raises(ValueError, match="needs exposure > 0"):
        ShapesDataset(lighting=True)


def test_align_from_config() -> None:
    from dcar.config import load_config
    from dcar.data.build import build_dataset
    from dcar.train.tokenizer import TokenizerTrainConfig

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(TokenizerTrainConfig, [f"config={root}/configs/tokenizer/shapes.yaml", "data.shapes.align=32"])
    ds = build_dataset(cfg.data, "train")
    assert ds.align == 32 and ds.scene(0) == ShapesDataset(size=1, resolution=128, grid=16, align=32).scene(0)


def test_other_backgrounds() -> None:
    ds = ShapesDataset(size=4, background="black")
    img = ds[0]["image"]
    assert img.min().item() == -1.0
    s = ds.scene(0)
    arr = render_array(s, background=(128, 128, 128))
    assert (arr[0, 0] == 128).all()
    with pytest.raises(ValueError):
        ShapesDataset(background=(250, 100, 180))  # too close to pink
    with pytest.raises(ValueError):
        render_scene(s, resolution=128)  # scene was laid out for 64 px
