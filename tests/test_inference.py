"""How a pipeline runs (dcar.inference, DCARPipeline.set_autocast): autocast reaches every part of a call, float16
keeps T5 out of it, configure_pipeline applies each option, and the settings reach the scripts and the evaluations'
records."""

import dataclasses
import json
import runpy
from pathlib import Path

import pytest
import torch
from test_pipeline import PROMPTS, TINY_T5, tiny_generator

from dcar.config import ConfigError
from dcar.inference import InferenceConfig, configure_pipeline, inference_settings
from dcar.models.generator import TextEncoder, TextEncoderConfig, build_word_tokenizer
from dcar.models.tokenizer import build_tokenizer
from dcar.pipeline import DCARPipeline

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


@pytest.fixture
def pipe(tmp_path):
    torch.manual_seed(0)
    tokenizer = build_tokenizer(ROOT / "configs" / "tokenizer" / "shapes.yaml").eval()
    build_word_tokenizer(PROMPTS, tmp_path / "words")
    text = TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=str(tmp_path / "words"), max_length=8,
                                         t5_config=TINY_T5))
    return DCARPipeline(tokenizer, tiny_generator(), text)


def output_dtypes(pipe, call):
    """The output dtypes of the text encoder's first Linear, the generator's first MLP Linear and the decoder in
    ``call()``."""
    first_linear = next(m for m in pipe.text_encoder.model.modules() if isinstance(m, torch.nn.Linear))
    modules = {"text": first_linear, "mlp": pipe.generator.blocks[0].fc1, "decoder": pipe.tokenizer.decoder}
    seen: dict[str, set] = {name: set() for name in modules}

    def hook(name):
        def record(module, args, out):
            seen[name].add(out.dtype)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        result = call()
    finally:
        for h in handles:
            h.remove()
    return result, seen


def test_set_autocast_reaches_every_part_of_a_call(pipe):
    plain = pipe(PROMPTS[:2], num_steps=3, seed=0)
    pipe.set_autocast(torch.bfloat16)
    assert "autocast bfloat16" in repr(pipe)
    images, seen = output_dtypes(pipe, lambda: pipe(PROMPTS[:2], num_steps=3, seed=0))
    assert seen == {"text": {torch.bfloat16}, "mlp": {torch.bfloat16}, "decoder": {torch.bfloat16}}
    assert images.dtype == torch.float32 and images.shape == plain.shape and images.abs().max() <= 1
    assert torch.equal(images, pipe(PROMPTS[:2], num_steps=3, seed=0))  # still deterministic
    assert next(pipe.generator.parameters()).dtype == torch.float32  # weights untouched
    # refine_residuals runs under it too
    codes = torch.randint(0, 1024, (2, 4, 4))
    _, seen = output_dtypes(pipe, lambda: pipe.refine_residuals(codes, PROMPTS[:2], context="full", seed=0))
    assert seen == {"text": {torch.bfloat16}, "mlp": {torch.bfloat16}, "decoder": set()}
    pipe.set_autocast(torch.float32)  # = off
    assert torch.equal(pipe(PROMPTS[:2], num_steps=3, seed=0), plain) and "autocast" not in repr(pipe)
    with pytest.raises(ValueError, match="autocast dtype must be bfloat16, float16, float32 or None, got torch.int8"):
        pipe.set_autocast(torch.int8)


def test_float16_autocast_keeps_t5_in_float32(pipe):
    pipe.set_autocast(torch.float16)
    _, seen = output_dtypes(pipe, lambda: pipe(PROMPTS[:1], num_steps=2, seed=0))
    assert seen == {"text": {torch.float32}, "mlp": {torch.float16}, "decoder": {torch.float16}}


@pytest.mark.parametrize(("dtype", "cast_text", "text_dtype"), [
    ("bfloat16", True, torch.bfloat16), ("bfloat16", False, torch.float32), ("float16", True, torch.float32)])
def test_configure_cast(pipe, dtype, cast_text, text_dtype):
    cfg = InferenceConfig(dtype=dtype, precision="cast", cast_text_encoder=cast_text)
    out = configure_pipeline(pipe, cfg)
    assert out is pipe and pipe._autocast_dtype is None
    want = getattr(torch, dtype)
    assert {p.dtype for p in pipe.generator.parameters()} == {p.dtype for p in pipe.tokenizer.parameters()} == {want}
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {text_dtype}
    images = pipe(PROMPTS[:1], num_steps=2, seed=0)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_configure_autocast_paths_epilogue_and_compile(pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(pipe, "compile", lambda **kw: calls.append(kw) or pipe)
    cfg = InferenceConfig(dtype="bfloat16", decoder_channels_last=True, decoder_fuse_norms=True, gelu_epilogue=True,
                          compile=True, compile_mode="reduce-overhead", compile_text=True, compile_head=False)
    configure_pipeline(pipe, cfg, compile=False)
    assert pipe._autocast_dtype == torch.bfloat16 and {p.dtype for p in pipe.generator.parameters()} == {torch.float32}
    assert pipe.decoder_path.channels_last and pipe.decoder_path.fuse_norms and pipe.generator.gelu_epilogue
    assert calls == []  # compile=False: the benchmark compiles after counting FLOPs
    configure_pipeline(pipe, cfg)
    assert calls == [{"mode": "reduce-overhead", "backend": "inductor", "head": False, "text": True,
                      "decoder": False, "static_text_kv": True}]
    configure_pipeline(pipe, InferenceConfig())  # the defaults undo every setting but the compilation
    assert pipe._autocast_dtype is None and pipe.decoder_path.plain and not pipe.generator.gelu_epilogue
    assert len(calls) == 1


def test_inference_settings_lists_what_differs_from_the_defaults():
    assert inference_settings(InferenceConfig()) == {}
    cfg = InferenceConfig(dtype="bfloat16", compile=True, gelu_epilogue=True)
    assert inference_settings(cfg) == {"dtype": "bfloat16", "compile": True, "gelu_epilogue": True}


def test_benchmark_keys_are_the_inference_keys():
    """scripts/benchmark.py keeps the keys at its top level: same names, types, choices (only defaults differ)."""
    from dcar.benchmark import load_benchmark_config
    from dcar.benchmark.config import BenchmarkConfig

    bench = {f.name: f for f in dataclasses.fields(BenchmarkConfig)}
    for f in dataclasses.fields(InferenceConfig):
        assert f.name in bench, f.name
        assert bench[f.name].type == f.type and bench[f.name].metadata == f.metadata, f.name
    cfg = load_benchmark_config(["preset=tiny", "precision=cast", "gelu_epilogue=true", "compile_mode=max-autotune"])
    inf = cfg.inference()
    assert (inf.dtype, inf.precision, inf.gelu_epilogue, inf.compile_mode) == ("float32", "cast", True,
                                                                               "max-autotune")


def test_sample_script_takes_inference_keys(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    main = runpy.run_path(str(ROOT / "scripts" / "sample.py"))["main"]
    args = [f"pipeline={tmp_path / 'pipe'}", "prompts=a red circle", "num_steps=2", "seed=3"]
    plain = main([*args, f"out={tmp_path / 'fp32'}"])
    bf16 = main([*args, f"out={tmp_path / 'bf16'}", "inference.dtype=bfloat16", "inference.precision=cast"])
    a, b = ((d / "images" / "00000_000.png").read_bytes() for d in (plain, bf16))
    assert a != b  # bf16 weights sample (slightly) different pixels
    with pytest.raises(ConfigError, match=r"invalid choice 'fp8' for 'inference.dtype'"):
        main([*args, "inference.dtype=fp8"])
    with pytest.raises(ConfigError, match="inference.compile_modes"):
        main([*args, "inference.compile_modes=default"])


def test_shapes_eval_records_the_settings_and_refuses_others(pipe, tmp_path):
    from dcar.eval.shapes_eval import evaluate_shapes

    kw = dict(num_steps=2, use_head=False, progress=False)
    caption = ["a red circle"]
    res = evaluate_shapes(pipe, caption, tmp_path / "out", inference={"dtype": "bfloat16"}, **kw)
    assert res["inference"] == {"dtype": "bfloat16"}
    saved = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert saved["inference"] == {"dtype": "bfloat16"}
    with pytest.raises(ConfigError, match="inference"):
        evaluate_shapes(pipe, caption, tmp_path / "out", **kw)  # default settings: other images
    plain = evaluate_shapes(pipe, caption, tmp_path / "plain", **kw)
    assert "inference" not in plain
    assert "inference" not in json.loads((tmp_path / "plain" / "generation.json").read_text())
