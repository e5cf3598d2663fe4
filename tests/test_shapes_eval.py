"""ShapesEval (dcar.eval.shapes_eval, scripts/eval_shapes.py): the scorer on ground-truth renders and shuffled
captions, aggregation, perfect / wrong fake pipelines, use_head pass-through, and an interrupted + resumed run."""

import dataclasses
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from dcar.config import ConfigError
from dcar.data.shapes import Scene, ShapesDataset, caption_split, parse_caption, render_array
from dcar.eval import runner as R
from dcar.eval.shapes_eval import aggregate, evaluate_shapes, heldout_captions, scene_for, validate_scorer

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle to the left of a blue square", "three green triangles", "a yellow diamond above a red circle",
            "two blue circles"]


def test_scorer_on_ground_truth_and_shuffled_captions():
    report = validate_scorer(200, resolution=64)
    assert report["true_full_rate"] >= 0.99
    assert report["shuffled_full_rate"] <= 0.05


def test_scene_for_captions_scenes_and_dicts():
    scene = scene_for("three green triangles")
    assert scene.kind == "count" and [(o.color, o.shape) for o in scene.objects] == [("green", "triangle")] * 3
    rel = scene_for(CAPTIONS[0], resolution=128)
    assert rel.relation == "left of" and rel.caption == CAPTIONS[0] and rel.resolution == 128
    assert scene_for(rel) is rel and scene_for(rel.to_dict()) == rel
    with pytest.raises(ValueError):
        scene_for("a purple elephant")


def test_heldout_captions_subset():
    all_caps = heldout_captions()
    assert all_caps == sorted(all_caps) and len(all_caps) > 100
    assert all(caption_split(c, 0) == "heldout" for c in all_caps[:50])
    sub = heldout_captions(20, seed=1)
    assert len(sub) == 20 and sub == sorted(sub) and set(sub) <= set(all_caps) and sub == heldout_captions(20, seed=1)
    assert sub != heldout_captions(20, seed=2)


def test_aggregate():
    recs = [
        {"index": 0, "kind": "relation", "color": True, "shape": True, "count": True, "relation": False, "full": False},
        {"index": 0, "kind": "relation", "color": True, "shape": True, "count": True, "relation": True, "full": True},
        {"index": 1, "kind": "count", "color": True, "shape": False, "count": False, "relation": None, "full": False},
        {"index": 2, "kind": "count", "color": False, "shape": True, "count": True, "relation": None, "full": False},
    ]
    out = aggregate(recs)
    s = out["scores"]
    assert s["color"] == 0.75 and s["shape"] == 0.75 and s["count"] == 0.75 and s["full"] == 0.25
    assert s["relation"] == 0.5 and s["num_relation_images"] == 2  # over relation images only
    assert s["full_any_sample"] == pytest.approx(1 / 3) and s["num_captions"] == 3 and s["num_images"] == 4
    assert out["by_kind"]["count"]["relation"] is None and out["by_kind"]["relation"]["full"] == 0.5
    with pytest.raises(ValueError):
        aggregate([])


class RenderPipe:
    """Fake pipeline drawing the ground truth of each prompt (``offset=1``: of the next caption in CAPTIONS)."""

    def __init__(self, offset=0):
        self.offset, self.kwargs = offset, []

    def __call__(self, prompts, seed=None, **kw):
        self.kwargs.append({"seed": seed, **kw})
        caps = [CAPTIONS[(CAPTIONS.index(p) + self.offset) % len(CAPTIONS)] for p in prompts]
        arrs = [render_array(scene_for(c, 64)) for c in caps]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_perfect_and_wrong_pipelines(tmp_path):
    good = RenderPipe()
    res = evaluate_shapes(good, CAPTIONS, tmp_path / "good", n_per_caption=2, batch_size=3, seed=5,
                          guidance_scale=3.0, use_head=False, progress=False)
    assert res["scores"]["full"] == 1.0 and res["scores"]["relation"] == 1.0 and res["num_failures"] == 0
    assert res["failures_grid"] is None and res["num_images"] == 8 and res["by_kind"]["count"]["num_images"] == 4
    assert [k["seed"] for k in good.kwargs] == [5, 6, 7] and all(k["use_head"] is False for k in good.kwargs)
    assert good.kwargs[0]["guidance_scale"] == 3.0 and res["sampler"]["use_head"] is False
    assert sorted(p.name for p in (tmp_path / "good" / "images").iterdir())[:3] == ["00000_00.png", "00000_01.png",
                                                                                    "00001_00.png"]
    rows = [json.loads(x) for x in (tmp_path / "good" / "per_image.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[2]["caption"] == CAPTIONS[1] and len(rows[2]["detections"]) == 3
    bad = evaluate_shapes(RenderPipe(offset=1), CAPTIONS, tmp_path / "bad", progress=False)
    assert bad["scores"]["full"] == 0.0 and bad["num_failures"] == 4 and (tmp_path / "bad" / "failures.png").is_file()
    assert json.loads((tmp_path / "bad" / "shapes_eval.json").read_text()) == bad
    rescored = evaluate_shapes(None, CAPTIONS, tmp_path / "bad", progress=False)  # score existing images
    assert rescored["scores"] == bad["scores"]
    with pytest.raises(ConfigError, match="no pipeline"):
        evaluate_shapes(None, CAPTIONS, tmp_path / "empty", progress=False)
    with pytest.raises(ConfigError, match="captions"):
        evaluate_shapes(RenderPipe(), CAPTIONS[:2], tmp_path / "good", n_per_caption=2, batch_size=3, seed=5,
                        guidance_scale=3.0, use_head=False, progress=False)


def test_scene_objects_and_dataset_scenes_can_be_evaluated(tmp_path):
    ds = ShapesDataset("heldout", resolution=64, size=3)
    scenes = [ds.scene(i) for i in range(3)]

    def pipe(prompts, seed=None, **kw):
        by_caption = {s.caption: s for s in scenes}
        arrs = [render_array(by_caption[p]) for p in prompts]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1

    res = evaluate_shapes(pipe, [scenes[0], scenes[1].to_dict(), scenes[2].caption], tmp_path, progress=False,
                          guidance_scale=1.0)
    assert res["scores"]["full"] == 1.0 and isinstance(scenes[0], Scene)
    assert parse_caption(scenes[2].caption).kind in ("relation", "count")


@pytest.fixture(scope="module")
def tiny_pipe():
    from dcar.models.generator import DCAR, DCARConfig, HeadConfig, TextEncoder, TextEncoderConfig, build_word_tokenizer
    from dcar.models.tokenizer import build_tokenizer
    from dcar.pipeline import DCARPipeline

    torch.manual_seed(0)
    tokenizer = build_tokenizer(ROOT / "configs" / "tokenizer" / "shapes.yaml").eval()
    import tempfile

    words = tempfile.mkdtemp()
    build_word_tokenizer(CAPTIONS, words)
    text = TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=words, max_length=8,
                                         t5_config={"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}))
    head = HeadConfig(token_dim=32, width=48, depth=2, num_sampling_steps=2)
    generator = DCAR(DCARConfig(codebook_size=1024, num_layers=2, width=64, num_heads=4, caption_dim=32, max_text_len=8,
                                image_size=64, pos_base_size=2, head=head)).eval()
    with torch.no_grad():
        for p in generator.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return DCARPipeline(tokenizer, generator, text)


def test_interrupted_run_resumes_to_the_same_json(tiny_pipe, tmp_path):
    calls = {"n": 0, "stop": 2}

    def crashing(prompts, **kw):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return tiny_pipe(prompts, **kw)

    kw = dict(n_per_caption=2, batch_size=4, seed=3, num_steps=2, guidance_scale=2.0, pipeline_path="tiny",
              progress=False)
    fresh = evaluate_shapes(tiny_pipe, CAPTIONS, tmp_path / "fresh", **kw)
    with pytest.raises(KeyboardInterrupt):
        evaluate_shapes(crashing, CAPTIONS, tmp_path / "resumed", **kw)
    assert len(list((tmp_path / "resumed" / "images").glob("*.png"))) == 4
    calls.update(n=0, stop=None)
    resumed = evaluate_shapes(crashing, CAPTIONS, tmp_path / "resumed", **kw)
    assert calls["n"] == 1  # the second batch only
    assert resumed == fresh == json.loads((tmp_path / "resumed" / "shapes_eval.json").read_text())
    assert fresh["pipeline_fingerprint"] is None  # "tiny" names no folder
    for p in (tmp_path / "fresh" / "images").iterdir():
        assert p.read_bytes() == (tmp_path / "resumed" / "images" / p.name).read_bytes()
    # the discrete-only ablation reaches the pipeline and changes the images
    disc = evaluate_shapes(tiny_pipe, CAPTIONS[:1], tmp_path / "disc", **{**kw, "n_per_caption": 1}, use_head=False)
    hyb = evaluate_shapes(tiny_pipe, CAPTIONS[:1], tmp_path / "hyb", **{**kw, "n_per_caption": 1})
    assert disc["sampler"]["use_head"] is False and hyb["sampler"]["use_head"] is True
    a, b = ((tmp_path / d / "images" / "00000_00.png").read_bytes() for d in ("disc", "hyb"))
    assert a != b


def test_script(tiny_pipe, tmp_path, capsys):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    mod = runpy.run_path(str(ROOT / "scripts" / "eval_shapes.py"))
    res = mod["main"]([f"pipeline={tmp_path / 'pipe'}", f"out={tmp_path / 'out'}", "num_captions=3", "num_steps=2",
                       "use_head=false", "seed=1"])
    assert res["num_captions"] == 3 and res["sampler"]["use_head"] is False and res["pipeline"] == str(tmp_path / "pipe")
    assert "heldout" in res["captions_source"] and (tmp_path / "out" / "shapes_eval.json").is_file()
    assert "shapes eval:" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "shapes_eval.json").read_text())
    assert saved == res and saved["pipeline_fingerprint"] == R.fingerprint(tmp_path / "pipe")
    assert saved["environment"] == R.environment() and saved["dcar_version"] == saved["environment"]["dcar"]
    report = mod["main"](["validate=true", "validate_images=50", f"out={tmp_path / 'val'}", "data_seed=1"])
    on_disk = json.loads((tmp_path / "val" / "scorer_validation.json").read_text())
    assert on_disk == report and report["true_full_rate"] >= 0.99 and report["shuffled_full_rate"] <= 0.05
    assert report["passed"] is True and report["num_images"] == 50 and report["data_seed"] == 1
    assert report["min_true_full_rate"] == 0.99 and report["max_shuffled_full_rate"] == 0.05
    assert report["protocol"] == "shapes-eval-scorer-validation" and report["split"] == "heldout"
    assert report["environment"] == R.environment() and report["dcar_version"] == report["environment"]["dcar"]
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["scorer_validation.json"]
    assert "scorer_validation.json" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not a shapes caption"):
        mod["main"]([f"pipeline={tmp_path / 'pipe'}", "captions=a photo of a cat"])
    with pytest.raises(ConfigError, match=r"invalid choice 'cosine' for 'cfg_schedule'; valid choices: constant, linear"):
        mod["main"]([f"pipeline={tmp_path / 'pipe'}", "cfg_schedule=cosine"])
    from dcar.sampling import CFG_SCHEDULES

    field = next(f for f in dataclasses.fields(mod["ShapesEvalConfig"]) if f.name == "cfg_schedule")
    assert field.metadata["choices"] == CFG_SCHEDULES  # the sampler's schedules, no more, no fewer
    lit = mod["main"]([f"pipeline={tmp_path / 'pipe'}", f"out={tmp_path / 'lit'}", "num_captions=2", "num_steps=2",
                       "use_head=false", "lighting=true", "cfg_schedule=constant", "guidance_scale=2"])
    rows = [json.loads(x) for x in (tmp_path / "lit" / "per_image.jsonl").read_text().splitlines()]
    assert [r["caption"].rsplit(" ", 3)[1:] for r in rows] == [["in", "bright", "light"], ["in", "dim", "light"]]
    assert all(r["lighting"] in (True, False) for r in rows) and lit["scores"]["lighting"] is not None
    assert lit["sampler"]["cfg_schedule"] == "constant" and res["sampler"]["cfg_schedule"] == "linear"


def test_score_reconstructions_of_a_perfect_and_a_blank_tokenizer():
    from types import SimpleNamespace

    from dcar.data.shapes import ShapesDataset
    from dcar.eval.shapes_eval import score_reconstructions

    class Identity(torch.nn.Module):  # "decodes" the image it encoded: the true ceiling is 1.0 everywhere
        def __init__(self, blank_discrete: bool) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.blank = blank_discrete

        def encode(self, x):
            return SimpleNamespace(z=x, zq=torch.ones_like(x) if self.blank else x)

        def decode(self, latent):
            return latent

    data = ShapesDataset("heldout", 64, size=12, seed=0)
    perfect = score_reconstructions(Identity(False), data, batch_size=5)
    assert all(perfect[p][a] == 1.0 for p in ("continuous", "discrete") for a in ("color", "shape", "full"))
    blank = score_reconstructions(Identity(True), data, batch_size=5)  # white images: nothing detected
    assert blank["continuous"]["full"] == 1.0 and blank["discrete"]["full"] == 0.0 and blank["discrete"]["color"] == 0.0


def test_lighting_is_scored_from_the_background_and_prompts_keep_it(tmp_path):
    """Captions that name their lighting keep it in the prompt (scene_for keeps the caption as given); the lighting
    attribute is right for the dataset's own lit renders, wrong for the same scene at the other level, None for
    captions without lighting; the full-caption rate ignores it."""
    from dcar.eval.shapes_eval import detect_lighting, score_shapes_image

    data = ShapesDataset("heldout", 64, size=12, exposure=0.12, lighting=True)
    items = {data.scene(i).caption: data[i]["image"] for i in range(12)}
    caps = list(items)
    assert any(c.endswith("in dim light") for c in caps) and any(c.endswith("in bright light") for c in caps)
    assert scene_for(caps[0]).caption == caps[0]

    class LitPipe:
        def __init__(self, flip):
            self.flip, self.prompts = flip, []

        def __call__(self, prompts, seed=None, **kw):
            self.prompts += list(prompts)
            out = [items[p] for p in prompts]
            if self.flip:  # the other lighting level: bright <-> dim
                out = [((x + 1) / (0.88 if p.endswith("dim light") else 1 / 0.88) - 1).clamp(-1, 1)
                       for x, p in zip(out, prompts, strict=True)]
            return torch.stack(out)

    right = LitPipe(False)
    res = evaluate_shapes(right, caps, tmp_path / "right", progress=False)
    assert right.prompts == caps and res["scores"]["lighting"] == 1.0 and res["scores"]["full"] == 1.0
    wrong = evaluate_shapes(LitPipe(True), caps, tmp_path / "wrong", progress=False)
    assert wrong["scores"]["lighting"] == 0.0 and wrong["scores"]["full"] == 1.0
    white = torch.ones(3, 64, 64)
    assert detect_lighting(white) == "bright" and detect_lighting(white * 0.88 - 0.12) == "dim"
    plain = scene_for("three green triangles")
    assert score_shapes_image(render_array(plain), plain)["lighting"] is None
