"""DCARPipeline (dcar.pipeline) and scripts/sample.py on tiny random models: images, determinism, CFG plumbing,
residual hidden states (masked / all conventions), discrete-only mode, resolution change, refine_residuals,
save/load round trip, the decoder path options, torch.compile and the sampling script."""

import copy
import dataclasses
import json
import runpy
from pathlib import Path

import pytest
import torch
from diffusers.models.normalization import RMSNorm

from dcar.models.generator import DCAR, DCARConfig, HeadConfig, TextEncoder, TextEncoderConfig, build_word_tokenizer
from dcar.models.tokenizer import DCHT, DecoderPath, build_inference_decoder, build_tokenizer, load_tokenizer_config
from dcar.models.tokenizer.fast_decoder import FusedRMSNorm
from dcar.pipeline import DCARPipeline
from dcar.sampling import encode_text_branches, maskgit_decode

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow diamond"]
TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}


def tiny_generator(seed: int = 0, **kw) -> DCAR:
    """A tiny DCAR over the shapes DC-HT (1024 codes, 32-d residuals), zero-init layers perturbed."""
    head = HeadConfig(token_dim=32, width=48, depth=2, num_sampling_steps=4, **kw.pop("head", {}))
    base = dict(codebook_size=1024, num_layers=2, width=64, num_heads=4, caption_dim=32, max_text_len=8,
                image_size=128, pos_base_size=4, head=head)
    torch.manual_seed(seed)
    model = DCAR(DCARConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = build_tokenizer(ROOT / "configs" / "tokenizer" / "shapes.yaml").eval()
    tok_dir = tmp_path_factory.mktemp("words")
    build_word_tokenizer(PROMPTS, tok_dir)
    text = TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=str(tok_dir), max_length=8,
                                         t5_config=TINY_T5))
    return tokenizer, text


@pytest.fixture(scope="module")
def pipe(parts):
    return DCARPipeline(parts[0], tiny_generator(), parts[1])


def test_images_shape_range_and_pil(pipe):
    images = pipe(PROMPTS, num_steps=8, seed=0)
    assert images.shape == (3, 3, 128, 128) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.05
    pil = pipe(PROMPTS[:2], num_steps=8, seed=0, output_type="pil")
    assert len(pil) == 2 and pil[0].size == (128, 128) and pil[0].mode == "RGB"
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPTS, output_type="np")


def test_same_seed_same_images_without_touching_global_rng(pipe):
    state = torch.get_rng_state()
    a = pipe(PROMPTS, num_steps=8, seed=3)
    b = pipe(PROMPTS, num_steps=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    c = pipe(PROMPTS, num_steps=8, seed=4)
    assert (a - c).abs().mean() > 1e-3
    # the residuals alone also depend on the seed (head noise): same codes, different residuals
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    codes1, res1 = pipe.generate_tokens(PROMPTS, 8, generator=g1)
    codes2, res2 = pipe.generate_tokens(PROMPTS, 8, generator=g2)
    assert torch.equal(codes1, codes2) and torch.equal(res1, res2)


@pytest.mark.parametrize("loss_tokens", ["masked", "all"])
def test_text_kv_computed_once_per_generation(parts, monkeypatch, loss_tokens):
    gen = tiny_generator(head={"loss_tokens": loss_tokens})
    p = DCARPipeline(parts[0], gen, parts[1])
    calls = []
    original = gen.encode_text
    monkeypatch.setattr(gen, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k))
    for guidance, head_guidance in ((3.0, None), (3.0, 1.0), (1.0, 2.0), (1.0, None)):
        calls.clear()
        p(PROMPTS, num_steps=6, guidance_scale=guidance, head_guidance_scale=head_guidance, seed=0)
        assert len(calls) == 1
    p.refine_residuals(torch.zeros(3, 4, 4, dtype=torch.long), PROMPTS, seed=0)
    assert len(calls) == 2


def capture_head(monkeypatch, gen):
    seen = {}
    original = gen.sample_residuals

    def spy(hidden, codes, generator=None, num_steps=None, guidance_scale=1.0, temperature=1.0, uncond_hidden=None):
        seen.update(hidden=hidden, codes=codes, uncond=uncond_hidden, scale=guidance_scale, steps=num_steps)
        return original(hidden, codes, generator, num_steps, guidance_scale, temperature, uncond_hidden)

    monkeypatch.setattr(gen, "sample_residuals", spy)
    return seen


def test_masked_convention_uses_hidden_states_of_the_deciding_step(pipe, monkeypatch):
    seen = capture_head(monkeypatch, pipe.generator)
    codes, residual = pipe.generate_tokens(PROMPTS, 8, 3.0, head_steps=3, seed=1)
    assert residual.shape == (3, 32, 4, 4) and torch.isfinite(residual).all()
    states, mask = pipe.encode_prompts(PROMPTS)
    kv = encode_text_branches(pipe.generator, states, mask, True)
    with torch.no_grad():
        ref = maskgit_decode(pipe.generator, kv, 3, (4, 4), use_cfg=True, num_steps=8, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(1), keep_hidden=True, keep_uncond=True)
    assert torch.equal(ref.codes, codes)
    torch.testing.assert_close(seen["hidden"], ref.hidden)
    torch.testing.assert_close(seen["uncond"], ref.uncond_hidden)
    assert torch.equal(seen["codes"], codes.reshape(3, 16)) and seen["scale"] == 3.0 and seen["steps"] == 3
    # with the final map as input the hidden states differ: they really come from the masked steps
    with torch.no_grad():
        full = pipe.generator(codes, states, mask).hidden
    assert (full - seen["hidden"]).abs().max() > 1e-2
    # head guidance 1 runs the head without the unconditional branch
    pipe.generate_tokens(PROMPTS, 8, 3.0, head_guidance_scale=1.0, seed=1)
    assert seen["uncond"] is None and seen["scale"] == 1.0


def test_all_convention_uses_one_forward_over_the_final_map(parts, monkeypatch):
    gen = tiny_generator(head={"loss_tokens": "all"})
    p = DCARPipeline(parts[0], gen, parts[1])
    seen = capture_head(monkeypatch, gen)
    codes, residual = p.generate_tokens(PROMPTS, 8, 2.0, seed=0)
    states, mask = p.encode_prompts(PROMPTS)
    with torch.no_grad():
        cond = gen(codes, states, mask, torch.zeros(3, dtype=torch.bool)).hidden
        uncond = gen(codes, states, mask, torch.ones(3, dtype=torch.bool)).hidden
    torch.testing.assert_close(seen["hidden"], cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["uncond"], uncond, atol=1e-5, rtol=1e-5)
    assert residual.shape == (3, 32, 4, 4)


def test_use_head_false_and_discrete_only_generator(pipe, parts):
    codes_h, residual = pipe.generate_tokens(PROMPTS, 8, 3.0, seed=0)
    codes_d, none = pipe.generate_tokens(PROMPTS, 8, 3.0, seed=0, use_head=False)
    assert none is None and torch.equal(codes_h, codes_d)  # the head does not change the codes
    images = pipe(PROMPTS, 8, 3.0, seed=0, use_head=False)
    assert torch.equal(images, pipe.decode(codes_d))
    assert (images - pipe.decode(codes_h, residual)).abs().mean() > 1e-3  # the residual changes the pixels
    discrete = DCARPipeline(parts[0], tiny_generator(use_head=False), parts[1])
    assert discrete.generator.head is None
    codes, res = discrete.generate_tokens(PROMPTS, 8, 3.0, seed=0)
    assert res is None and codes.shape == (3, 4, 4)
    assert discrete(PROMPTS, 8, seed=0).shape == (3, 3, 128, 128)
    with pytest.raises(RuntimeError, match="discrete-only"):
        discrete.refine_residuals(codes, PROMPTS)


def test_256_model_samples_at_512(parts):
    gen = tiny_generator(image_size=256, pos_base_size=8)
    p = DCARPipeline(parts[0], gen, parts[1])
    codes, residual = p.generate_tokens(PROMPTS[:2], 8, 2.0, seed=0)
    assert codes.shape == (2, 8, 8) and residual.shape == (2, 32, 8, 8)
    images = p(PROMPTS[:2], 8, 2.0, seed=0, height=512, width=512)
    assert images.shape == (2, 3, 512, 512) and torch.isfinite(images).all()
    codes, residual = p.generate_tokens(PROMPTS[:1], 8, seed=0, height=256, width=512)
    assert codes.shape == (1, 8, 16) and residual.shape == (1, 32, 8, 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        p.generate_tokens(PROMPTS, height=500)


def test_refine_residuals_conventions(pipe, monkeypatch):
    codes = torch.randint(0, 1024, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    a = pipe.refine_residuals(codes, PROMPTS, seed=0)
    assert a.shape == (3, 32, 4, 4) and torch.equal(a, pipe.refine_residuals(codes, PROMPTS, seed=0))
    full = pipe.refine_residuals(codes, PROMPTS, context="full", seed=0)
    assert not torch.equal(a, full)
    seen = capture_head(monkeypatch, pipe.generator)
    pipe.refine_residuals(codes, PROMPTS, context="full", head_guidance_scale=1.0, seed=0)
    states, mask = pipe.encode_prompts(PROMPTS)
    with torch.no_grad():
        ref = pipe.generator(codes, states, mask).hidden
    torch.testing.assert_close(seen["hidden"], ref, atol=1e-5, rtol=1e-5)
    assert seen["uncond"] is None
    # "schedule" (auto for loss_tokens="masked"): one forward per step, each position read while it was [MASK]
    inputs = []
    original = pipe.generator.forward
    monkeypatch.setattr(pipe.generator, "forward", lambda t, *x, **k: inputs.append(t.clone()) or original(t, *x, **k))
    pipe.refine_residuals(codes, PROMPTS, num_steps=5, head_guidance_scale=2.0, seed=0)
    assert len(inputs) == 5 and all(t.shape == (6, 4, 4) for t in inputs)
    revealed = torch.zeros(3, 4, 4, dtype=torch.bool)
    for t in inputs:
        known = t[:3] != pipe.generator.mask_token_id
        assert torch.equal(t[:3][known], codes[known]) and torch.equal(known, revealed | known)
        revealed = known
    with pytest.raises(ValueError, match="context"):
        pipe.refine_residuals(codes, PROMPTS, context="masked")


def test_modes_are_restored_and_eval_is_used(parts):
    gen = tiny_generator().train()
    p = DCARPipeline(parts[0], gen, parts[1])
    tok_flags = [m.training for m in p.tokenizer.modules()]
    p.tokenizer.train()
    train_flags = [m.training for m in p.tokenizer.modules()]
    images = p(PROMPTS, 6, seed=0)
    assert gen.training and [m.training for m in p.tokenizer.modules()] == train_flags
    p.tokenizer.eval()
    gen.eval()
    assert torch.equal(images, p(PROMPTS, 6, seed=0))  # BatchNorm running statistics were used
    assert [m.training for m in p.tokenizer.modules()] == tok_flags


def norm_tokenizer(norm_types: tuple[str, ...] | None = None) -> DCHT:
    """The shapes DC-HT (optionally with other decoder norm types) with non-trivial BatchNorm statistics and
    RMSNorm affines, so that folding and fusing them is really exercised."""
    cfg = load_tokenizer_config(ROOT / "configs" / "tokenizer" / "shapes.yaml")
    if norm_types is not None:
        cfg = dataclasses.replace(cfg, decoder_norm_types=norm_types)
    torch.manual_seed(1)
    tokenizer = DCHT(cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in tokenizer.decoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            if isinstance(m, (torch.nn.BatchNorm2d, RMSNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return tokenizer


@pytest.mark.parametrize("norm_types", [None, ("batch_norm",) * 6], ids=["shapes", "all_batch_norm"])
def test_decoder_path_keeps_fp32_images(parts, norm_types):
    tokenizer = norm_tokenizer(norm_types)
    state = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    p = DCARPipeline(tokenizer, tiny_generator(), parts[1])
    codes, residual = p.generate_tokens(PROMPTS, 6, 3.0, seed=0)
    plain = p.decode(codes, residual)
    whole = p(PROMPTS, 6, 3.0, seed=0)
    for channels_last, fuse_norms in ((True, False), (False, True), (True, True)):
        p.set_decoder_path(channels_last=channels_last, fuse_norms=fuse_norms)
        assert p.decoder_path == DecoderPath(channels_last, fuse_norms)
        images = p.decode(codes, residual)
        assert images.is_contiguous() and (images - plain).abs().max() <= 1e-5, (channels_last, fuse_norms)
    assert (p(PROMPTS, 6, 3.0, seed=0) - whole).abs().max() <= 1e-5
    # the tokenizer itself is untouched: same modules, same state dict
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tokenizer.modules())
    assert tokenizer.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in tokenizer.state_dict().items())
    # what the copy holds: no BatchNorm (each follows a conv or a linear), every RMSNorm fused, NHWC conv weights
    n_rms = sum(isinstance(m, RMSNorm) for m in tokenizer.decoder.modules())
    fast = build_inference_decoder(tokenizer.decoder, DecoderPath(channels_last=True, fuse_norms=True))
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, RMSNorm)) for m in fast.modules())
    assert sum(isinstance(m, FusedRMSNorm) for m in fast.modules()) == n_rms > 0
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in fast.modules()
               if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert not fast.training and not any(q.requires_grad for q in fast.parameters())
    # the copy follows in-place weight updates (optimizer step, load_state_dict) of the tokenizer
    with torch.no_grad():
        tokenizer.decoder.conv_in.weight.mul_(1.5)
    updated = p.decode(codes, residual)
    p.set_decoder_path()
    assert (updated - plain).abs().max() > 1e-3 and (updated - p.decode(codes, residual)).abs().max() <= 1e-5


def test_decoder_path_in_bfloat16():
    tokenizer = norm_tokenizer().to(torch.bfloat16)
    latent = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        plain = tokenizer.decode(latent).float().clamp(-1, 1)
        fast = build_inference_decoder(tokenizer.decoder, DecoderPath(channels_last=True, fuse_norms=True))
        images = tokenizer.decode(latent, fast)
    assert images.dtype == torch.bfloat16 and (images.float().clamp(-1, 1) - plain).abs().max() <= 5e-2


def test_compiled_pipeline_samples_the_same(parts, monkeypatch):
    seen = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: seen.append(k) or real(*a, **k))
    ref = DCARPipeline(parts[0], tiny_generator(), parts[1])
    p = DCARPipeline(parts[0], tiny_generator(), copy.deepcopy(parts[1])).compile(
        mode="reduce-overhead", backend="aot_eager", decoder=True, text=True)
    kwargs = {"mode": "reduce-overhead", "backend": "aot_eager", "dynamic": False}
    assert seen == [kwargs] * 3  # the generator's forward, the head's denoising network, the text encoder
    assert p.generator.head.net._compiled_call_impl is not None
    states, mask = p.encode_prompts(PROMPTS)
    ref_states, ref_mask = ref.encode_prompts(PROMPTS)
    assert torch.equal(mask, ref_mask) and torch.equal(states, ref_states)
    codes, residual = p.generate_tokens(PROMPTS, 6, 3.0, seed=2)
    ref_codes, ref_residual = ref.generate_tokens(PROMPTS, 6, 3.0, seed=2)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(residual, ref_residual, atol=1e-5, rtol=1e-5)
    assert (p.decode(codes, residual) - ref.decode(codes, residual)).abs().max() <= 1e-5
    assert seen == [kwargs] * 4  # the decoder, compiled on the first decode


def test_static_text_kv_buffers_under_cuda_graph_modes(parts, monkeypatch):
    """After compile(mode="reduce-overhead"), every generation of one shape hands the compiled forward the same
    K/V tensors, marked static for torch.compile and holding this generation's values (one set per shape); the
    codes equal the eager pipeline's, and the second generation compiles nothing new. Other modes keep fresh K/V."""
    ref = DCARPipeline(parts[0], tiny_generator(), parts[1])
    p = DCARPipeline(parts[0], tiny_generator(), parts[1]).compile(mode="reduce-overhead", backend="aot_eager",
                                                                     head=False)
    seen = []
    original = p.text_kv
    monkeypatch.setattr(p, "text_kv", lambda *a: seen.append(original(*a)) or seen[-1])
    frames = torch._dynamo.utils.counters["stats"]
    for prompts, seed in ((PROMPTS, 1), (PROMPTS[::-1], 2), (PROMPTS[:2], 3)):
        codes, _ = p.generate_tokens(prompts, 6, 3.0, seed=seed)
        assert torch.equal(codes, ref.generate_tokens(prompts, 6, 3.0, seed=seed)[0])
        kv = encode_text_branches(ref.generator, *ref.encode_prompts(prompts), use_cfg=True)
        assert all(torch.equal(a, b) for a, b in zip(seen[-1].tensors(), kv.tensors(), strict=True))
        if seed == 1:
            compiled = frames["unique_graphs"]
    first, second, third = seen
    assert first.keys[0] is second.keys[0] and first.values[-1] is second.values[-1]  # one set per shape
    assert third.keys[0] is not first.keys[0] and third.keys[0].shape[0] == 4  # batch 2: its own set
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in first.keys + first.values)
    assert frames["unique_graphs"] - compiled == 1  # only the new batch size compiled again
    for mode in ("default", None):
        q = DCARPipeline(parts[0], tiny_generator(), parts[1]).compile(mode=mode, backend="eager", head=False)
        states, mask = q.encode_prompts(PROMPTS)
        assert q.text_kv(states, mask, True).keys[0] is not q.text_kv(states, mask, True).keys[0]


def test_save_and_load_round_trip(pipe, tmp_path):
    images = pipe(PROMPTS, 8, 2.0, seed=5)
    pipe.save_pretrained(tmp_path / "pipe")
    files = {str(p.relative_to(tmp_path / "pipe")) for p in (tmp_path / "pipe").rglob("*") if p.is_file()}
    assert {"pipeline.json", "tokenizer/config.json", "tokenizer/model.safetensors", "generator/config.json",
            "generator/model.safetensors", "text_encoder/model.safetensors", "text_encoder/tokenizer.json",
            "text_encoder/dcar_text_encoder.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    loaded = DCARPipeline.from_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "text_encoder" / "dcar_text_encoder.json").read_text())["kind"] == \
        "t5-random"
    assert not loaded.generator.training and not loaded.tokenizer.training
    assert torch.equal(loaded(PROMPTS, 8, 2.0, seed=5), images)
    with pytest.raises(FileNotFoundError):
        DCARPipeline.from_pretrained(tmp_path / "missing")


def test_repr_names_the_parts(pipe, parts):
    assert repr(pipe) == ("DCARPipeline(generator: 2 x 64, 4 heads "
                          f"({pipe.generator.num_parameters('transformer') / 1e6:.1f}M), head 48 x 2 "
                          f"({pipe.generator.num_parameters('head') / 1e6:.1f}M); tokenizer: DC-HT f32c32, 1024 codes "
                          f"({parts[0].num_parameters() / 1e6:.1f}M); text: t5-random 'google-t5/t5-base', 8 tokens; "
                          "128 px = 4x4 tokens; cpu, float32)")
    assert "no head (discrete only)" in repr(DCARPipeline(parts[0], tiny_generator(use_head=False), parts[1]))


def test_component_mismatch_errors(parts):
    with pytest.raises(ValueError, match="caption_dim"):
        DCARPipeline(parts[0], tiny_generator(caption_dim=48), parts[1])
    with pytest.raises(ValueError, match="codebook"):
        DCARPipeline(parts[0], tiny_generator(codebook_size=512), parts[1])
    with pytest.raises(ValueError, match="max_text_len"):
        DCARPipeline(parts[0], tiny_generator(max_text_len=4), parts[1])
    gen = tiny_generator()
    bad = dataclasses.replace(gen.config.head, token_dim=16)
    with pytest.raises(ValueError, match="token_dim"):
        DCARPipeline(parts[0], DCAR(dataclasses.replace(gen.config, head=bad)), parts[1])


def test_sample_script(pipe, tmp_path, capsys):
    from dcar.config import ConfigError

    pipe.save_pretrained(tmp_path / "pipe")
    main = runpy.run_path(str(ROOT / "scripts" / "sample.py"))["main"]
    out = main([f"pipeline={tmp_path / 'pipe'}", "prompts=a red circle|two blue squares", f"out={tmp_path / 's'}",
                "n_per_prompt=2", "batch_size=3", "num_steps=4", "guidance_scale=2", "seed=7"])
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample"], r["seed"]) for r in rows] == [(0, 0, 7), (0, 1, 7), (1, 0, 7),
                                                                             (1, 1, 8)]
    assert all((out / r["file"]).is_file() for r in rows) and (out / "grid.png").is_file()
    from PIL import Image

    with Image.open(out / rows[0]["file"]) as png:
        assert png.size == (128, 128)
    first = pipe(["a red circle", "a red circle", "two blue squares"], 4, 2.0, seed=7)
    saved = torch.from_numpy(__import__("numpy").array(Image.open(out / rows[1]["file"]))).permute(2, 0, 1)
    assert (saved.float() - (first[1].clamp(-1, 1) + 1) * 127.5).abs().max() <= 0.51
    # separate components: tokenizer + generator folders and a saved text-encoder folder
    out2 = main([f"tokenizer={tmp_path / 'pipe' / 'tokenizer'}", f"generator={tmp_path / 'pipe' / 'generator'}",
                 f"text_encoder_config={tmp_path / 'pipe' / 'text_encoder'}", f"out={tmp_path / 's2'}",
                 "prompts=a red circle", "num_steps=4", "use_head=false"])
    assert (out2 / "images" / "00000_000.png").is_file()
    with pytest.raises(ConfigError, match="exactly one"):
        main([f"pipeline={tmp_path / 'pipe'}"])
    with pytest.raises(ConfigError, match="tokenizer=PATH"):
        main(["prompts=a"])
