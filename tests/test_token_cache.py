"""Token cache (dcar.data.token_cache, scripts/pretokenize.py): exact contents, resume, text features, and generator
training from the cache equal to training from images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcar.data.shapes import ShapesDataset
from dcar.data.token_cache import TokenCacheDataset, write_token_cache
from dcar.models.generator import TextEncoder, TextEncoderConfig, build_word_tokenizer
from dcar.models.tokenizer import DCHT, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_TOK = {"model": {
    "encoder_block_out_channels": [8, 8, 16, 32, 32, 32], "decoder_block_out_channels": [8, 8, 16, 32, 32, 32],
    "encoder_layers_per_block": [0, 1, 1, 1, 1, 1], "decoder_layers_per_block": [0, 1, 1, 1, 1, 1],
    "quantizer": {"codebook_size": 64}}}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "final"
    build_tokenizer(TINY_TOK).save_pretrained(path)
    return path


def test_cache_contents_and_resume(tmp_path, tokenizer_dir):
    tok = DCHT.from_pretrained(tokenizer_dir).eval()
    data = ShapesDataset("train", 64, size=40, seed=0)
    out = write_token_cache(tok, data, tmp_path / "c", shard_size=16, batch_size=8, progress=False)
    meta = json.loads((out / "cache.json").read_text())
    assert meta["num_samples"] == 40 and [s["num_samples"] for s in meta["shards"]] == [16, 16, 8]
    assert meta["grid"] == [2, 2] and meta["skipped"] == 0
    cache = TokenCacheDataset(out)
    images = torch.stack([data[i]["image"] for i in range(40)])
    with torch.no_grad():
        enc = tok.encode(images)
    assert torch.equal(torch.stack([cache[i]["indices"] for i in range(40)]), enc.indices)
    assert torch.allclose(torch.stack([cache[i]["residual"] for i in range(40)]), enc.residual, atol=1e-5)
    assert [cache[i]["caption"] for i in range(40)] == [data[i]["caption"] for i in range(40)]
    # an interrupted run (last shard and cache.json missing) resumes: finished shards are not rewritten
    before = (out / "shard-00000.safetensors").stat().st_mtime_ns
    reference = load_file(str(out / "shard-00002.safetensors"))
    os.remove(out / "shard-00002.safetensors")
    os.remove(out / "cache.json")
    with pytest.raises(FileNotFoundError, match="not a complete token cache"):
        TokenCacheDataset(out)
    write_token_cache(tok, data, out, shard_size=16, batch_size=8, progress=False)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == before
    again = load_file(str(out / "shard-00002.safetensors"))
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    assert json.loads((out / "cache.json").read_text()) == meta


def test_text_features_and_fp16_residuals(tmp_path, tokenizer_dir):
    tok = DCHT.from_pretrained(tokenizer_dir).eval()
    data = ShapesDataset("train", 64, size=8, seed=0)
    words = tmp_path / "words"
    build_word_tokenizer([data[i]["caption"] for i in range(8)], words)
    text = TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=str(words), max_length=16,
                                         t5_config={"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
                                                    "num_heads": 4}))
    out = write_token_cache(tok, data, tmp_path / "c", shard_size=8, batch_size=4, residual_dtype="float16",
                            text_encoder=text, progress=False)
    cache = TokenCacheDataset(out)
    states, mask = text.encode([data[i]["caption"] for i in range(8)])
    assert torch.allclose(torch.stack([cache[i]["text_states"] for i in range(8)]), states)
    assert torch.equal(torch.stack([cache[i]["text_mask"] for i in range(8)]), mask)
    assert load_file(str(out / "shard-00000.safetensors"))["residual"].dtype == torch.float16
    assert cache[0]["residual"].dtype == torch.float32
    with pytest.raises(ValueError, match="multiple of batch_size"):
        write_token_cache(tok, data, tmp_path / "bad", shard_size=10, batch_size=4)


def test_generator_training_from_cache_equals_from_images(tmp_path, tokenizer_dir):
    from accelerate import Accelerator

    from dcar.config import load_config
    from dcar.train.generator import GeneratorTrainConfig, GeneratorTrainer

    cmd = [sys.executable, str(ROOT / "scripts" / "pretokenize.py"), f"tokenizer={tokenizer_dir}", "data=shapes",
           "data.resolution=64", "data.shapes.size=64", "num_samples=64", "shard_size=32", "batch_size=8",
           "data.shapes.align=32", "data.shapes.exposure=0.12",  # the layout of configs/generator/shapes.yaml
           f"out={tmp_path / 'cache'}", "progress=false"]
    # same thread count and batch size as the in-loop encoder: float results of a conv can depend on both
    threads = str(torch.get_num_threads())
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
    gen = [f"config={ROOT}/configs/generator/shapes.yaml", "data.resolution=64", "model.image_size=64",
           "model.pos_base_size=2", "model.num_layers=1", "model.width=32", "model.num_heads=2",
           "model.codebook_size=64", "model.head.width=16", "model.head.depth=1", "train.batch_size=8",
           "train.steps=3", "train.ckpt_every=3", "train.log_every=1", "log.progress=false", "num_preview=0",
           "text_encoder.t5_config={d_model: 128, d_kv: 32, d_ff: 128, num_layers: 1, num_heads: 2}",
           f"tokenizer={tokenizer_dir}"]
    runs = {"images": ["data.kind=shapes", "data.shapes.size=64"],
            "cache": ["data.kind=tokens", f"data.path={tmp_path / 'cache'}"]}
    weights = {}
    for name, extra in runs.items():
        cfg = load_config(GeneratorTrainConfig, [*gen, *extra, f"run.dir={tmp_path / name}"])
        GeneratorTrainer(cfg, accelerator=Accelerator(cpu=True), argv=["test"]).fit()
        weights[name] = load_file(str(tmp_path / name / "final" / "model.safetensors"))
    a, b = weights["images"], weights["cache"]
    assert a.keys() == b.keys()
    scales = [json.loads((tmp_path / n / "final" / "config.json").read_text())["head"]["residual_scale"] for n in runs]
    assert scales[0] == scales[1], scales
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst[0] < 1e-5, f"largest weight difference {worst}"
    bad = subprocess.run([*cmd[:2], f"tokenizer={tokenizer_dir}", "data.kind=tokens"], capture_output=True, text=True)
    assert bad.returncode == 2 and "already a token cache" in bad.stderr
