"""scripts/benchmark.py and dcar.benchmark on the tiny preset: the JSON has every key with sane values, FLOPs match
an independent FlopCounterMode count, the phase pieces reproduce the whole call, and config errors name the key.
No assertion depends on how fast this machine is (only loose consistency between two timings of the same work)."""

import contextlib
import dataclasses
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dcar.benchmark import (
    PHASES,
    Sampling,
    build_pipeline,
    flop_counter,
    load_benchmark_config,
    phased_call,
    transformer_phase,
)
from dcar.benchmark.config import prompt_list
from dcar.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"


def run_script(argv, monkeypatch):
    """scripts/benchmark.py with ``argv``; run_benchmark puts torch's thread count back after its ``threads``."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    runpy.run_path(str(SCRIPT), run_name="__main__")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with pytest.MonkeyPatch.context() as mp:
            run_script(["preset=tiny", f"out={out}"], mp)  # the preset runs on one thread
        assert torch.get_num_threads() == 3  # restored by run_benchmark
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = load_benchmark_config(["preset=tiny"])
    pipe = build_pipeline(cfg, torch.device("cpu"), tmp_path_factory.mktemp("words"))
    return cfg, pipe


def test_compiled_training_step_is_the_same_step(tiny, monkeypatch):
    """train_compile: the timed steps run the compiled GeneratorStep (aot_eager here) and train the model exactly
    as the eager steps do (same FLOPs counted, same weights after the same steps)."""
    import copy

    from dcar.benchmark.train import train_throughput

    seen, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append((type(m).__name__, kw)) or real(m, **kw))
    gens = [copy.deepcopy(tiny[1].generator) for _ in range(2)]
    runs = [train_throughput(g, 4, 8, torch.device("cpu"), contextlib.nullcontext, 0, 2, 0, backend)
            for g, backend in zip(gens, (None, "aot_eager"), strict=True)]
    assert seen == [("GeneratorStep", {"mode": "default", "backend": "aot_eager", "dynamic": False})]
    assert runs[0]["flops_per_step"] == runs[1]["flops_per_step"] > 0
    before = tiny[1].generator.state_dict()
    eager, compiled = (g.state_dict() for g in gens)
    assert not torch.equal(eager["out.weight"], before["out.weight"])  # the steps did train
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)


def test_json_has_every_key_with_sane_values(result):
    for key in ("device", "dtype", "flops_per_image", "matmul_flops_per_s", "latency_s", "throughput_img_s",
                "phases", "fraction_of_peak", "transformer_fraction_of_peak", "config", "torch_version",
                "device_name", "threads", "peak_memory", "train", "ablation"):
        assert key in result, key
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["threads"] == 1
    assert result["config"]["preset"] == "tiny" and result["torch_version"] == torch.__version__
    for key in ("flops_per_image", "matmul_flops_per_s", "latency_s", "throughput_img_s", "achieved_flops_per_s"):
        assert result[key] > 0, key
    for key in ("phases", "latency_phases"):
        assert set(result[key]) == set(PHASES) and all(v > 0 for v in result[key].values()), key
    assert 0 < result["fraction_of_peak"] <= 1.5 and 0 < result["transformer_fraction_of_peak"] <= 1.5
    assert result["peak_memory"]["bytes"] > 2**20
    assert result["latency"]["n"] == 2 and result["throughput"]["n"] == 2 and result["matmul"]["size"] == 256
    train = result["train"]
    assert train["batch"] == 4 and train["img_s"] > 0 and train["flops_per_step"] > 0
    assert 0 < train["fraction_of_peak"] <= 1.5
    # a training step costs about 3 forwards (forward + backward of the transformer, plus the head's loss)
    assert train["flops_per_image"] > result["flops_per_image_phases"]["transformer"] / 24


def test_phases_add_up_to_the_whole_call(result):
    assert sum(result["flops_per_image_phases"].values()) == result["flops_per_image"]
    batch_s = result["throughput"]["median"]
    # same work timed two ways on a shared machine: only a loose consistency check
    assert batch_s / 3 < sum(result["phases"].values()) < 3 * batch_s
    assert result["latency_s"] / 3 < sum(result["latency_phases"].values()) < 3 * result["latency_s"]
    assert result["latency_phase_timing"]["stats"]["transformer"]["n"] == result["config"]["latency_phase_repeats"] == 2


def test_ablation_entries(result):
    ab = result["ablation"]
    assert ab["batch"] == 4 and ab["baseline_s"] > 0
    assert set(ab["variants"]) == {"logits_at_masked_only", "batched_cfg", "text_kv_once", "compile",
                                   "gelu_epilogue", "decoder_channels_last", "decoder_fused_norms"}
    assert ab["variants"].pop("gelu_epilogue") == {"skipped": "no GELU epilogue on cpu (only ['cuda'])"}
    assert result["gelu_epilogue"] is False
    for name, v in ab["variants"].items():
        assert v["off_s"] > 0 and v["on_s"] > 0 and v["speedup"] > 0, name
    # switching an optimisation off must not change what is sampled (K/V recomputation and eager-backend
    # compilation run the very same kernels)
    assert ab["variants"]["text_kv_once"]["same_codes"] and ab["variants"]["compile"]["same_codes"]
    # the decoder options keep fp32 images equal within rounding
    for name in ("decoder_channels_last", "decoder_fused_norms"):
        v = ab["variants"][name]
        assert v["phase"] == "decode" and v["tolerance"] == 1e-5 and v["same_images"], name
        assert 0 <= v["max_abs_diff"] <= 1e-5, name


def test_flops_per_image_equals_an_independent_count(result, tiny):
    cfg, pipe = tiny
    with flop_counter() as counter:
        pipe(prompt_list(cfg, 1), cfg.num_steps, cfg.guidance_scale, seed=cfg.seed)
    assert counter.get_total_flops() == result["flops_per_image"]
    with flop_counter() as counter:
        pipe(prompt_list(cfg, 2), cfg.num_steps, cfg.guidance_scale, seed=cfg.seed)
    assert counter.get_total_flops() == 2 * result["flops_per_image"]


def test_cpu_attention_is_counted():
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 3:] = False
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 6 * 8)  # QK^T and PV


def test_phase_pieces_reproduce_the_pipeline_call(tiny):
    cfg, pipe = tiny
    prompts = prompt_list(cfg, 3)
    s = Sampling(6, 3.0, seed=5)
    images = phased_call(pipe, prompts, s, lambda name: contextlib.nullcontext())
    assert torch.equal(images, pipe(prompts, 6, 3.0, seed=5))


def test_transformer_variants_sample_the_same_codes(tiny):
    cfg, pipe = tiny
    s = Sampling(6, 3.0, seed=1)
    with torch.no_grad():
        states, mask = pipe.encode_prompts(prompt_list(cfg, 3))
    base = transformer_phase(pipe, states, mask, s)
    codes, _ = pipe.generate_tokens(prompt_list(cfg, 3), 6, 3.0, seed=1)
    assert torch.equal(base, codes)
    for variant in ("full_logits", "separate_cfg", "recompute_kv"):
        assert transformer_phase(pipe, states, mask, s, variant).shape == base.shape
    assert torch.equal(transformer_phase(pipe, states, mask, s, "recompute_kv"), base)
    assert torch.equal(transformer_phase(pipe, states, mask, s, "forward", pipe.generator), base)
    with pytest.raises(ValueError, match="unknown variant"):
        transformer_phase(pipe, states, mask, s, "nope")


@pytest.mark.parametrize("setting", [False, True])
def test_gelu_epilogue_variant_flips_the_run_setting(tiny, monkeypatch, setting):
    """The ablation times the transformer phase with the epilogue flipped from ``gelu_epilogue`` and restores it
    (run here with the CPU let in; its fused kernel's exact GELU stands in for CUDA's tanh GELU)."""
    from dcar.benchmark import run
    from dcar.models.generator import transformer as tr

    cfg, pipe = tiny
    cfg = dataclasses.replace(cfg, gelu_epilogue=setting)
    for module in (run, tr):
        monkeypatch.setattr(module, "TANH_EPILOGUE_DEVICES", frozenset({"cpu", "cuda"}))
    fused, real = [], torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: fused.append(1) or real(*a, **k))
    s = Sampling(num_steps=3, guidance_scale=2.0, seed=0)
    states, mask = pipe.encode_prompts(prompt_list(cfg, 2))
    uses: list[tuple[bool, int]] = []

    def measure(variant):
        before = len(fused)
        codes = transformer_phase(pipe, states, mask, s, variant)
        uses.append((pipe.generator.gelu_epilogue, len(fused) - before))
        return {"median": 1.0 + pipe.generator.gelu_epilogue}, codes

    pipe.generator.set_gelu_epilogue(setting)
    try:
        base, base_codes = measure("baseline")
        v = run._epilogue_variant(pipe, cfg, measure, base, base_codes)
        assert pipe.generator.gelu_epilogue is setting  # restored
    finally:
        pipe.generator.set_gelu_epilogue(False)
    layers = pipe.generator.config.num_layers
    assert uses == [(setting, 3 * layers * setting), (not setting, 3 * layers * (not setting))]
    assert (v["off_s"], v["on_s"], v["speedup"]) == (1.0, 2.0, 0.5)
    assert v["off_timing"] == {"median": 1.0} and v["timing"] == {"median": 2.0}
    assert 0.5 <= v["codes_agreement"] <= 1 and v["same_codes"] == (v["codes_agreement"] == 1)


def test_compile_options_reach_torch_compile(tmp_path, monkeypatch):
    """compile=true goes through DCARPipeline.compile with compile_mode / compile_backend (eager: no codegen), for
    the generator and, with compile_decoder=true, the decoder path set by decoder_channels_last/_fuse_norms."""
    seen = []
    real = torch.compile

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    out = tmp_path / "compiled.json"
    run_script(["preset=tiny", "compile=true", "compile_mode=reduce-overhead", "compile_decoder=true",
                "decoder_channels_last=true", "decoder_fuse_norms=true", "ablate=false", "train=false",
                "latency_repeats=1", "throughput_batch=2", "throughput_repeats=1", "phase_repeats=1",
                "latency_phase_repeats=0", f"out={out}"], monkeypatch)
    result = json.loads(out.read_text())
    assert "latency_phases" not in result and "phases" in result  # latency_phase_repeats=0 skips the batch-1 split
    assert result["compile"] and result["compile_mode"] == "reduce-overhead"
    assert result["decoder_path"] == {"channels_last": True, "fuse_norms": True}
    assert len(seen) == 3  # the generator's forward, the head's network and the decoder
    assert all(k == {"mode": "reduce-overhead", "backend": "eager", "dynamic": False} for k in seen)
    with pytest.raises(ConfigError, match="compile_mode"):
        load_benchmark_config(["compile_mode=fast"])


def test_unknown_keys_are_named(monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"unknown key 'num_step'.*did you mean 'num_steps'"):
        load_benchmark_config(["num_step=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_layer'.*did you mean 'model.num_layers'"):
        load_benchmark_config(["preset=tiny", "model.num_layer=3"])
    with pytest.raises(ConfigError, match="invalid choice 'fast' for 'preset'"):
        load_benchmark_config(["preset=fast"])
    with pytest.raises(ConfigError, match="codebook"):
        load_benchmark_config(["tokenizer=shapes"])
    with pytest.raises(SystemExit) as exit_info:
        run_script(["preset=tiny", "latency_repeat=3"], monkeypatch)
    assert exit_info.value.code == 2
    assert "unknown key 'latency_repeat'" in capsys.readouterr().err


def test_presets_resolve():
    mid = load_benchmark_config(["preset=cpu-mid"])
    assert (mid.device, mid.dtype, mid.throughput_batch, mid.model["num_layers"], mid.model["width"]) == \
        ("cpu", "float32", 16, 12, 512)
    paper = load_benchmark_config(["preset=paper"])
    default = load_benchmark_config([])
    assert (paper.generator, paper.tokenizer, paper.throughput_batch) == (default.generator, default.tokenizer, 16)


def test_profile_ranks_ops_and_cast_text_encoder(tmp_path, monkeypatch):
    """profile=true writes the profiler table beside the JSON and ranks the call's ops by self time (shares sum
    to at most 1, the convolutions of the decoder and the matmuls among the top); precision=cast with bfloat16
    casts the text encoder too, and cast_text_encoder=false keeps it float32."""
    out = tmp_path / "prof.json"
    run_script(["preset=tiny", "dtype=bfloat16", "precision=cast", "profile=true", "ablate=false", "train=false",
                "latency_repeats=1", "throughput_batch=2", "throughput_repeats=1", "phase_repeats=1",
                f"out={out}"], monkeypatch)
    result = json.loads(out.read_text())
    prof = result["profile"]
    table = Path(prof["file"])
    assert table == tmp_path / "prof.profile.txt" and "Self CPU" in table.read_text()
    top = prof["top"]
    assert len(top) == 25 and prof["total_us"] > 0
    assert all(a["self_us"] >= b["self_us"] for a, b in zip(top, top[1:], strict=False))
    assert 0.5 < sum(e["share"] for e in top) <= 1.0 + 1e-9
    names = {e["name"] for e in top}
    assert any("convolution" in n for n in names) and names & {"aten::addmm", "aten::mm", "aten::linear"}
    assert result["models"]["text_encoder_dtype"] == "bfloat16"
    assert result["host_syncs"] is None  # CUDA's synchronisation check: GPU runs only
    cfg = load_benchmark_config(["preset=tiny", "dtype=bfloat16", "precision=cast", "cast_text_encoder=false"])
    pipe = build_pipeline(cfg, torch.device("cpu"), tmp_path / "words")
    assert next(pipe.text_encoder.parameters()).dtype == torch.float32
    assert next(pipe.generator.parameters()).dtype == torch.bfloat16


def test_sync_warnings_are_counted_by_source_line():
    """host_syncs' counter: the synchronisation warnings (torch.cuda.set_sync_debug_mode's message) of a call, by
    the line that issued them; other warnings are not counted."""
    import warnings

    from dcar.benchmark.profile import SYNC_WARNING, count_sync_warnings

    def call():
        for _ in range(3):
            warnings.warn(f"{SYNC_WARNING} (nonzero)", UserWarning, stacklevel=1)
        warnings.warn(SYNC_WARNING, UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)

    counted = count_sync_warnings(call)
    assert counted["count"] == 4 and sorted(counted["where"].values()) == [1, 3]
    assert all(k.startswith(__file__) for k in counted["where"])
    assert count_sync_warnings(lambda: None) == {"count": 0, "where": {}}

