"""The DC-AR generator model (dcar.models.generator.DCAR): sizes, position embedding, attention masking, caching,
discrete-only variant, save/load and resolution change."""

import copy
import dataclasses
import math
import time
from pathlib import Path

import pytest
import torch

from dcar.models.generator import (
    DCAR,
    DCARConfig,
    HeadConfig,
    build_generator,
    load_generator_config,
    sincos_pos_embed_2d,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "generator"


def tiny_config(**kw) -> DCARConfig:
    base = dict(
        codebook_size=64, num_layers=2, width=64, num_heads=4, caption_dim=32, max_text_len=12, image_size=128,
        pos_base_size=4, head=HeadConfig(token_dim=8, width=48, depth=2, diffusion_batch_mul=2),
    )
    return DCARConfig(**{**base, **kw})


def tiny_model(seed: int = 0, **kw) -> DCAR:
    """A tiny DCAR with its zero-initialised layers (cross-attn proj, head adaLN) perturbed so that they matter."""
    torch.manual_seed(seed)
    model = DCAR(tiny_config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def inputs(b=3, h=4, w=4, length=10, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab + 1, (b, h, w), generator=g)  # includes the [MASK] id
    states = torch.randn(b, length, 32, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    for i in range(b):
        mask[i, 3 + 2 * i :] = False
    return tokens, states, mask


@pytest.mark.parametrize("name", ["dcar_256", "dcar_512"])
def test_paper_parameter_counts(name):
    with torch.device("meta"):
        model = build_generator(CONFIGS / f"{name}.yaml")
    assert model.num_parameters("transformer") == 634_942_336
    assert model.num_parameters("head") == 36_192_320
    assert model.token_embed.weight.shape == (16385, 1152) and model.out.weight.shape == (16384, 1152)
    assert "null_caption" in model.state_dict() and model.null_caption.shape == (120, 768)


def test_512_config_differs_only_in_resolution_settings():
    a, b = (dataclasses.asdict(load_generator_config(CONFIGS / f"dcar_{r}.yaml")) for r in (256, 512))
    diff = {k for k in a if a[k] != b[k]}
    assert diff == {"image_size", "pos_base_size", "pos_interpolation_scale"}


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.widht"):
        build_generator({"model": {"widht": 64}})
    with pytest.raises(ValueError, match="model.head.depht"):
        load_generator_config({"model": {"head": {"depht": 2}}})
    with pytest.raises(ValueError, match="head.condition"):
        load_generator_config({"head": {"condition": "code"}})
    with pytest.raises(ValueError, match="num_heads"):
        DCAR(tiny_config(num_heads=5))


def test_pos_embed_matches_formula():
    dim, h, w, base, scale = 16, 3, 5, 4, 1.5
    emb = sincos_pos_embed_2d(dim, h, w, base, scale)
    assert emb.shape == (h * w, dim)
    for i, j in [(0, 0), (1, 3), (2, 4)]:
        pw, ph = j / (w / base) / scale, i / (h / base) / scale
        omegas = [10000 ** (-k / (dim / 4)) for k in range(dim // 4)]
        expected = [math.sin(pw * o) for o in omegas] + [math.cos(pw * o) for o in omegas]
        expected += [math.sin(ph * o) for o in omegas] + [math.cos(ph * o) for o in omegas]
        torch.testing.assert_close(emb[i * w + j], torch.tensor(expected), rtol=0, atol=1e-6)


def test_512_positions_cover_the_256_range():
    cfg256, cfg512 = (load_generator_config(CONFIGS / f"dcar_{r}.yaml") for r in (256, 512))
    with torch.device("meta"):
        m256, m512 = DCAR(cfg256), DCAR(cfg512)
    e256, e512 = m256.pos_embed(8, 8), m512.pos_embed(16, 16)
    # the 512 model's positions are i/2 in 0..7.5: every even grid index lands exactly on a 256 position
    torch.testing.assert_close(e512.view(16, 16, -1)[::2, ::2].reshape(64, -1), e256, rtol=0, atol=1e-6)
    # and the 256 model run at 512 px (16 x 16 tokens) uses the same positions as the 512 model
    torch.testing.assert_close(m256.pos_embed(16, 16), e512, rtol=0, atol=0)
    w_coord = torch.arange(16) / (16 / cfg512.pos_base_size) / cfg512.pos_interpolation_scale
    assert w_coord.min() == 0 and w_coord.max() == 7.5


def test_forward_shapes_and_meta_build():
    model = tiny_model()
    tokens, states, mask = inputs()
    out = model(tokens, states, mask)
    assert out.logits.shape == (3, 16, 64) and out.hidden.shape == (3, 16, 64)
    logits, hidden = out  # a NamedTuple
    assert torch.isfinite(logits).all()
    assert model(tokens, states, mask, return_logits=False).logits is None
    torch.testing.assert_close(model.to_logits(hidden[:, :5]), logits[:, :5])
    with torch.device("meta"):
        meta = DCAR(tiny_config())
    assert meta.token_embed.weight.is_meta


def test_padded_text_has_no_effect():
    model = tiny_model()
    tokens, states, mask = inputs()
    ref = model(tokens, states, mask)
    noisy = torch.where(mask[..., None], states, 100 * torch.randn_like(states))
    out = model(tokens, noisy, mask)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    # the caption matters where it is not padded
    assert not torch.allclose(model(tokens, states + 1, mask).logits, ref.logits, atol=1e-3)
    # a sample without any valid text token gives finite output, as if it had no cross-attention input
    empty = mask.clone()
    empty[1] = False
    out = model(tokens, states, empty)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits[0], ref.logits[0], rtol=1e-5, atol=1e-5)
    no_cross = copy.deepcopy(model)  # zero attention output: the cross-attention adds only its proj bias
    for block in no_cross.blocks:
        torch.nn.init.zeros_(block.cross_attn.proj.weight)
    torch.testing.assert_close(out.logits[1], no_cross(tokens, states, mask).logits[1], rtol=1e-5, atol=1e-5)


def test_text_kv_cache_gives_identical_outputs():
    model = tiny_model()
    tokens, states, mask = inputs()
    drop = torch.tensor([False, True, False])
    ref = model(tokens, states, mask, drop)
    kv = model.encode_text(states, mask, drop)
    for step in range(2):  # reused across steps with different tokens
        toks = tokens if step == 0 else torch.full_like(tokens, model.mask_token_id)
        a, b = model(toks, states, mask, drop), model(toks, text_kv=kv)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
    assert torch.equal(ref.logits, model(tokens, text_kv=kv).logits)
    with pytest.raises(ValueError):
        model(tokens, text_kv=kv, drop_text=drop)


def test_batch_invariance():
    model = tiny_model()
    tokens, states, mask = inputs(b=4)
    full = model(tokens, states, mask)
    for i in range(4):
        single = model(tokens[i : i + 1], states[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(single.logits[0], full.logits[i], rtol=1e-5, atol=1e-5)


def test_drop_text_uses_the_null_caption():
    model = tiny_model()
    tokens, states, mask = inputs()
    drop = torch.tensor([True, True, False])
    a = model(tokens, states, mask, drop)
    b = model(tokens, torch.randn_like(states), torch.ones_like(mask), drop)
    torch.testing.assert_close(a.logits[:2], b.logits[:2], rtol=0, atol=1e-6)  # independent of the prompt
    assert not torch.allclose(a.logits[2], b.logits[2], atol=1e-3)
    # the null caption is a seeded buffer
    assert torch.equal(DCAR(tiny_config()).null_caption, DCAR(tiny_config()).null_caption)
    assert not torch.equal(DCAR(tiny_config()).null_caption, DCAR(tiny_config(null_caption_seed=1)).null_caption)
    assert abs(model.null_caption.std().item() - 32**-0.5) < 0.05


def test_head_loss_and_condition():
    model = tiny_model()
    tokens, states, mask = inputs()
    codes = tokens.clamp(max=63)
    hidden = model(tokens, states, mask).hidden
    res = torch.randn(3, 8, 4, 4)
    masked = torch.zeros(3, 4, 4, dtype=torch.bool)
    masked[:, :2] = True
    loss = model.head_loss(hidden, codes, res, masked, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None and model.head.net.input_proj.weight.grad is not None
    # "masked": residuals at unmasked positions do not enter; (B, N, D) targets work too
    res2 = res.clone()
    res2[:, :, 2:] = 50.0
    with torch.no_grad():
        a = model.head_loss(hidden, codes, res, masked, generator=torch.Generator().manual_seed(0))
        b = model.head_loss(hidden, codes, res2.flatten(2).transpose(1, 2), masked, torch.Generator().manual_seed(0))
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
        cond = model.head_condition(hidden, codes)
        torch.testing.assert_close(cond, hidden + model.token_embed(codes.flatten(1)))
        all_tokens = tiny_model(head=dataclasses.replace(tiny_config().head, loss_tokens="all"))
        h2 = all_tokens(tokens, states, mask).hidden
        c = all_tokens.head_loss(h2, codes, res, masked, torch.Generator().manual_seed(0))
        d = all_tokens.head_loss(h2, codes, res2, masked, torch.Generator().manual_seed(0))
        assert c.item() != pytest.approx(d.item(), rel=1e-3)
        hidden_only = tiny_model(head=dataclasses.replace(tiny_config().head, condition="hidden"))
        assert torch.equal(hidden_only.head_condition(hidden, codes), hidden)


def test_sample_residuals():
    model = tiny_model()
    tokens, states, mask = inputs()
    codes = tokens.clamp(max=63)
    hidden = model(tokens, states, mask).hidden
    uncond = model(tokens, states, mask, torch.ones(3, dtype=torch.bool)).hidden
    a = model.sample_residuals(hidden, codes, torch.Generator().manual_seed(0), num_steps=4)
    b = model.sample_residuals(hidden, codes, torch.Generator().manual_seed(0), num_steps=4)
    assert a.shape == (3, 16, 8) and torch.equal(a, b)
    c = model.sample_residuals(hidden, codes, torch.Generator().manual_seed(0), 4, 1.0, 1.0, uncond_hidden=uncond)
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
    sub = model.sample_residuals(hidden[:, :5], codes.flatten(1)[:, :5], torch.Generator().manual_seed(0), 4, 3.0)
    assert sub.shape == (3, 5, 8)


def test_random_mask_uses_mask_id():
    model = tiny_model()
    tokens = torch.randint(0, 64, (5, 4, 4))
    inp, mask = model.random_mask(tokens, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 4, 4) and mask.flatten(1).sum(1).min() >= 1
    assert torch.equal(inp[mask], torch.full_like(inp[mask], 64)) and torch.equal(inp[~mask], tokens[~mask])


def test_discrete_only_has_no_head():
    model = tiny_model(use_head=False)
    assert model.head is None and model.num_parameters("head") == 0
    assert not any(k.startswith("head.") for k in model.state_dict())
    tokens, states, mask = inputs()
    out = model(tokens, states, mask)
    assert out.logits.shape == (3, 16, 64)
    with pytest.raises(RuntimeError, match="discrete-only"):
        model.head_loss(out.hidden, tokens.clamp(max=63), torch.zeros(3, 8, 4, 4))


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    tokens, states, mask = inputs()
    model.save_pretrained(tmp_path / "gen")
    loaded = DCAR.from_pretrained(tmp_path / "gen").eval()
    assert loaded.config == model.config
    a, b = model(tokens, states, mask, torch.tensor([True, False, False])), loaded(
        tokens, states, mask, torch.tensor([True, False, False])
    )
    assert torch.equal(a.logits, b.logits) and torch.equal(model.null_caption, loaded.null_caption)
    codes = tokens.clamp(max=63)
    ra = model.sample_residuals(a.hidden, codes, torch.Generator().manual_seed(0), 3)
    rb = loaded.sample_residuals(b.hidden, codes, torch.Generator().manual_seed(0), 3)
    assert torch.equal(ra, rb)


def test_model_trained_at_256_runs_at_512():
    model = tiny_model()  # trained grid 4 x 4 (pos_base_size 4)
    tokens, states, mask = inputs(h=8, w=8)
    out = model(tokens, states, mask)
    assert out.logits.shape == (3, 64, 64) and torch.isfinite(out.logits).all()
    pos = model.pos_embed(8, 8).view(8, 8, -1)
    torch.testing.assert_close(pos[::2, ::2].reshape(16, -1), model.pos_embed(4, 4), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_paper_size_forward_cpu():
    """Paper-size forward (batch 2) at 8 x 8 and 16 x 16 tokens with a 120-token caption; prints CPU times."""
    torch.manual_seed(0)
    model = build_generator(CONFIGS / "dcar_256.yaml").eval()
    states, mask = torch.randn(2, 120, 768), torch.ones(2, 120, dtype=torch.bool)
    for side in (8, 16):
        tokens = torch.randint(0, 16385, (2, side, side))
        with torch.inference_mode():
            model(tokens, states, mask)
            start = time.perf_counter()
            out = model(tokens, states, mask)
            print(f"paper-size forward b2 {side}x{side}: {time.perf_counter() - start:.2f}s")
        assert out.logits.shape == (2, side * side, 16384)


def _shapes_step_inputs(tmp_path, batch):
    from dcar.data.shapes import ShapesDataset
    from dcar.models.generator import build_text_encoder, build_word_tokenizer

    captions = sorted(ShapesDataset("train").captions() | ShapesDataset("heldout").captions())
    build_word_tokenizer(captions, tmp_path / "tok")
    encoder = build_text_encoder(CONFIGS / "shapes.yaml", tokenizer_path=str(tmp_path / "tok"))
    states, mask = encoder.encode(captions[:batch])
    return states, mask


def test_shapes_config_train_step(tmp_path):
    torch.manual_seed(0)
    model = build_generator(CONFIGS / "shapes.yaml")
    assert model.config.codebook_size == 1024 and model.config.grid_size == 4
    states, mask = _shapes_step_inputs(tmp_path, 8)
    assert states.shape == (8, 16, 128) and mask.any(1).all()
    codes, residual = torch.randint(0, 1024, (8, 4, 4)), 0.3 * torch.randn(8, 32, 4, 4)
    inp, masked = model.random_mask(codes, torch.Generator().manual_seed(0))
    out = model(inp, states, mask, torch.rand(8) < 0.1)
    flat = masked.flatten(1)
    loss = torch.nn.functional.cross_entropy(out.logits[flat], codes.flatten(1)[flat])
    loss = loss + model.head_loss(out.hidden, codes, residual, masked)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_shapes_config_step_time(tmp_path):
    """Train step (fwd + bwd + AdamW) of the shapes model at batch 32, 16 tokens, 16 text tokens; prints the time."""
    torch.manual_seed(0)
    model = build_generator(CONFIGS / "shapes.yaml")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    states, mask = _shapes_step_inputs(tmp_path, 32)
    codes, residual = torch.randint(0, 1024, (32, 4, 4)), 0.3 * torch.randn(32, 32, 4, 4)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        inp, masked = model.random_mask(codes)
        out = model(inp, states, mask, torch.rand(32) < 0.1)
        flat = masked.flatten(1)
        loss = torch.nn.functional.cross_entropy(out.logits[flat], codes.flatten(1)[flat])
        loss = loss + model.head_loss(out.hidden, codes, residual, masked)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    print(f"shapes train step b32: median {sorted(times)[5]:.3f}s (threads {torch.get_num_threads()})")
