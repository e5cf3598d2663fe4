"""scripts/eval_mjhq.py end to end on a fake MJHQ layout (3 categories x 4 prompts, reference JPEGs made here) with
a tiny random DCARPipeline and the tiny registered feature extractor: samples, FID overall / per category, cached
reference statistics, resumability (nothing regenerated; a deleted PNG comes back identical), CLIP score with a
tiny local CLIP, layout errors, and the protocol's preprocessing helpers."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcar.config import ConfigError
from dcar.eval import mjhq as Q
from dcar.models.generator import DCAR, DCARConfig, HeadConfig, TextEncoder, TextEncoderConfig, build_word_tokenizer
from dcar.models.tokenizer import build_tokenizer
from dcar.pipeline import DCARPipeline

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("animals", "food", "logo")
WORDS = {"animals": ["a red cat", "a blue dog", "two green birds", "a yellow horse"],
         "food": ["a red apple", "a blue cake", "green soup", "a yellow banana"],
         "logo": ["a red circle logo", "a blue square logo", "a green triangle logo", "a yellow star logo"]}
FAST = ["feature_extractor=dcar-random-tiny", "fid_resize=extractor", "num_steps=4", "batch_size=4",
        "chunk_size=5", "feature_batch_size=4", "num_workers=0", "progress=false"]


@pytest.fixture(scope="module")
def main():
    return runpy.run_path(str(ROOT / "scripts" / "eval_mjhq.py"))["main"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mjhq")
    prompts = [p for c in CATEGORIES for p in WORDS[c]]
    # tiny pipeline (as tests/test_pipeline.py): shapes DC-HT, 2-layer DC-AR, random T5 over a word vocabulary
    torch.manual_seed(0)
    tokenizer = build_tokenizer(ROOT / "configs" / "tokenizer" / "shapes.yaml").eval()
    build_word_tokenizer(prompts, root / "words")
    text = TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=str(root / "words"), max_length=8,
                                         t5_config={"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
                                                    "num_heads": 4}))
    head = HeadConfig(token_dim=32, width=48, depth=2, num_sampling_steps=2)
    gen = DCAR(DCARConfig(codebook_size=1024, num_layers=2, width=64, num_heads=4, caption_dim=32, max_text_len=8,
                          image_size=128, pos_base_size=4, head=head)).eval()
    with torch.no_grad():
        for p in gen.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    DCARPipeline(tokenizer, gen, text).save_pretrained(root / "pipe")
    # fake MJHQ: meta_data.json and <images>/<category>/<key>.jpg references (larger than 128: downsampled)
    meta, rng = {}, np.random.default_rng(0)
    for c, cat in enumerate(CATEGORIES):
        (root / "imgs" / cat).mkdir(parents=True)
        for i, prompt in enumerate(WORDS[cat]):
            key = f"{c:02d}{i:02d}" + "ab" * 18  # 40 characters, like MJHQ's hex ids
            meta[key] = {"category": cat, "prompt": prompt}
            pixels = rng.integers(0, 80, (200, 200, 3)) + np.array([60 * c, 40 * i, 90], dtype=np.int64)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "imgs" / cat / f"{key}.jpg")
    (root / "meta_data.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(autouse=True)
def no_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def args(root, out, *extra):
    return [f"pipeline={root / 'pipe'}", f"mjhq.meta={root / 'meta_data.json'}", f"mjhq.images={root / 'imgs'}",
            f"out={out}", *FAST, *extra]


def test_end_to_end_then_resume_regenerates_nothing(main, setup, tmp_path, monkeypatch):
    out = tmp_path / "results" / "mjhq"
    result = main(args(setup, out))
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["protocol"] == "mjhq30k" and saved["dcar_version"] and saved["resolution"] == 128
    assert saved["num_samples"] == 12 and saved["num_reference"] == 12 and saved["full_protocol"] is False
    assert saved["sampling"] == {"num_steps": 4, "guidance_scale": 4.5, "seed": 0, "batch_size": 4, "resolution": 128}
    assert saved["fid"] > 0 and set(saved["fid_per_category"]) == set(CATEGORIES)
    assert all(v > 0 for v in saved["fid_per_category"].values())
    assert saved["counts_per_category"] == {c: {"samples": 4, "reference": 4} for c in CATEGORIES}
    assert saved["clip_score"] is None and saved["jpeg_quality"] == 75
    pngs = sorted((out / "samples").glob("*.png"))
    assert len(pngs) == 12
    with Image.open(pngs[0]) as png:
        assert png.size == (128, 128)
    ref = Path(saved["fid_details"]["reference_stats"])
    assert ref.parent == tmp_path / "results" / "fid_stats" and ref.is_file()
    with np.load(ref) as f:
        assert {"mu", "sigma", "mu__animals", "sigma__food", "n__logo"} <= set(f.files)

    # second run: nothing generated (the pipeline is never loaded), nothing recomputed, same JSON
    mtimes = {p: p.stat().st_mtime_ns for p in pngs}
    monkeypatch.setattr(DCARPipeline, "from_pretrained", lambda *a, **k: pytest.fail("pipeline loaded"))
    assert main(args(setup, out)) == result
    assert {p: p.stat().st_mtime_ns for p in pngs} == mtimes
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # a deleted sample is regenerated alone, pixel-identical (batch b always has the same prompts and seed)
    victim = pngs[5]
    before = np.array(Image.open(victim))
    victim.unlink()
    assert main(args(setup, out)) == result
    np.testing.assert_array_equal(np.array(Image.open(victim)), before)
    assert {p: p.stat().st_mtime_ns for p in pngs if p != victim} == {p: m for p, m in mtimes.items() if p != victim}
    # other sampling settings in the same folder are refused instead of mixing samples; so are other precisions
    with pytest.raises(ConfigError, match="seed"):
        main(args(setup, out, "seed=1"))
    assert "inference" not in saved
    with pytest.raises(ConfigError, match="inference"):
        main(args(setup, out, "inference.dtype=bfloat16"))
    bf16 = main(args(setup, tmp_path / "bf16", "inference.dtype=bfloat16"))
    assert bf16["inference"] == {"dtype": "bfloat16"} and bf16["num_samples"] == 12


def tiny_clip(folder: Path, prompts: list[str]) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = build_word_tokenizer(prompts, folder)
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 1, "pad_token_id": 0,
            "bos_token_id": 0}
    vision = {"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_score_with_a_local_clip_model_reuses_samples(main, setup, tmp_path, monkeypatch):
    out = tmp_path / "mjhq"
    base = main(args(setup, out, "mjhq.num_prompts=8"))
    assert base["num_samples"] == 8 and base["counts_per_category"]["food"]["samples"] == 4
    assert "logo" not in base["fid_per_category"] and base["num_reference"] == 12  # reference: all images
    clip_dir = tiny_clip(tmp_path / "clip", [p for c in CATEGORIES for p in WORDS[c]])
    monkeypatch.setattr(DCARPipeline, "from_pretrained", lambda *a, **k: pytest.fail("pipeline loaded"))
    result = main(args(setup, out, "mjhq.num_prompts=8", f"clip_model={clip_dir}"))
    assert result["fid"] == base["fid"] and result["clip_model"] == str(clip_dir)
    from dcar.eval.metrics import ClipScorer

    scorer = ClipScorer(clip_dir)
    items = Q.load_meta(setup / "meta_data.json")[:8]
    images = [Q.jpeg_roundtrip(Image.open(Q.sample_path(out / "samples", it.key)).convert("RGB"), 75) for it in items]
    scores = scorer(images, [it.prompt for it in items])
    assert result["clip_score"] == pytest.approx(float(scores.mean()), rel=1e-5)
    assert result["clip_score_per_category"]["animals"] == pytest.approx(float(scores[:4].mean()), rel=1e-5)
    # the CLIP score is logit_scale.exp() x cosine
    with torch.no_grad():
        emb_i = scorer.model.get_image_features(pixel_values=scorer.processor(images=images[:1],
                                                                            return_tensors="pt")["pixel_values"])
        ids = scorer.tokenizer([items[0].prompt], return_tensors="pt")
        emb_t = scorer.model.get_text_features(**ids)
    emb_i, emb_t = getattr(emb_i, "pooler_output", emb_i), getattr(emb_t, "pooler_output", emb_t)
    cos = torch.nn.functional.cosine_similarity(emb_i, emb_t).item()
    assert float(scores[0]) == pytest.approx(scorer.model.logit_scale.exp().item() * cos, rel=1e-4)


def test_layout_errors(main, setup, tmp_path):
    bad = tmp_path / "meta.json"
    bad.write_text(json.dumps({"k": {"prompt": "x"}}))
    with pytest.raises(ConfigError, match="category"):
        main(args(setup, tmp_path / "o", f"mjhq.meta={bad}"))
    bad.write_text(json.dumps({"nothere": {"category": "food", "prompt": "x"}}))
    with pytest.raises(ConfigError, match="food/nothere.jpg"):
        main(args(setup, tmp_path / "o", f"mjhq.meta={bad}"))
    with pytest.raises(ConfigError, match="pipeline=PATH"):
        main([a for a in args(setup, tmp_path / "o") if not a.startswith("pipeline=")])


def test_protocol_preprocessing():
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8))
    expected = np.array(T.CenterCrop(64)(T.Resize(64)(big)))  # Sana: Resize (PIL bilinear) + CenterCrop
    assert np.array_equal(Q.fid_transform(big, 64).permute(1, 2, 0).numpy(), expected)
    native = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert np.array_equal(Q.fid_transform(native, 64).permute(1, 2, 0).numpy(), np.array(native))  # unchanged
    assert Q.jpeg_roundtrip(native, 0) is native
    import io

    buf = io.BytesIO()
    native.save(buf, format="JPEG")  # what saving a .jpg with PIL's defaults stores (quality 75)
    assert np.array_equal(np.array(Q.jpeg_roundtrip(native, 75)), np.array(Image.open(buf)))
