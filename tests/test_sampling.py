"""MaskGIT decoding with classifier-free guidance (dcar.sampling): the unmasking schedule, fixed tokens, CFG
batching and forms, the masked-only logits path, per-step hidden states, and a memorisation run (a tiny DC-AR
trained on four shapes captions reproduces their DC-HT token maps when sampled with CFG)."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dcar.models.generator import (
    DCAR,
    DCARConfig,
    HeadConfig,
    TextEncoder,
    TextEncoderConfig,
    build_word_tokenizer,
    load_generator_config,
    mask_schedule_counts,
)
from dcar.sampling import (
    branch_hidden,
    cfg_scale,
    encode_text_branches,
    guide,
    maskgit_decode,
    sample_logits,
    unknown_positions,
)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


def test_this_file_runs_on_one_thread():
    assert torch.get_num_threads() == 1  # one_thread_module; the count before the file comes back after it


def tiny_model(seed: int = 0, **kw) -> DCAR:
    """A tiny DCAR whose zero-initialised layers (cross-attn proj, head adaLN) are perturbed so they matter."""
    base = dict(codebook_size=64, num_layers=2, width=64, num_heads=4, caption_dim=32, max_text_len=12,
                image_size=128, pos_base_size=4, head=HeadConfig(token_dim=8, width=48, depth=2))
    torch.manual_seed(seed)
    model = DCAR(DCARConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.3)
    return model


def captions(b: int = 3, length: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, length, 32, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    for i in range(b):
        mask[i, 4 + 2 * i :] = False
    return states, mask


def decode(model, use_cfg=True, grid=(4, 4), seed=0, **kw):
    states, mask = captions()
    kv = encode_text_branches(model, states, mask, use_cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return maskgit_decode(model, kv, states.shape[0], grid, use_cfg=use_cfg, generator=gen, **kw)


@pytest.mark.parametrize(("grid", "num_steps"), [((4, 4), 12), ((8, 8), 12), ((2, 2), 8), ((4, 4), 1)])
def test_unmasking_follows_the_schedule_and_fixed_tokens_stay(grid, num_steps):
    model = tiny_model()
    seen: list[torch.Tensor] = []
    out = decode(model, grid=grid, num_steps=num_steps, guidance_scale=3.0, on_step=lambda s, t: seen.append(t))
    n, mask_id = grid[0] * grid[1], model.mask_token_id
    counts = mask_schedule_counts(num_steps, n)
    assert len(seen) == num_steps
    prev = torch.full_like(seen[0], mask_id)
    for step, tokens in enumerate(seen):
        masked = (tokens == mask_id).flatten(1).sum(1)
        assert masked.tolist() == [counts[step]] * 3  # every sample follows the shared schedule
        was_known = prev != mask_id
        assert torch.equal(tokens[was_known], prev[was_known])  # fixed tokens never change
        newly = (prev == mask_id) & (tokens != mask_id)
        if num_steps <= n:
            assert (newly.flatten(1).sum(1) >= 1).all()
        prev = tokens
    assert counts[-1] == 0 and not (out.codes == mask_id).any()
    assert torch.equal(out.codes, seen[-1]) and out.codes.shape == (3, *grid)
    assert out.codes.max() < model.config.codebook_size


def test_more_steps_than_tokens_still_finishes():
    out = decode(tiny_model(), grid=(2, 2), num_steps=6)
    assert not (out.codes == 64).any()


def test_guidance_scale_one_cfg_path_equals_plain_path():
    model = tiny_model()
    plain = decode(model, use_cfg=False).codes
    batched = decode(model, use_cfg=True, guidance_scale=1.0).codes
    assert torch.equal(plain, batched)
    assert not torch.equal(decode(model, use_cfg=True, guidance_scale=8.0).codes, plain)  # guidance does act


def test_batched_cfg_forward_equals_separate_forwards():
    model = tiny_model()
    states, mask = captions()
    tokens = torch.randint(0, 65, (3, 4, 4), generator=torch.Generator().manual_seed(1))
    kv = encode_text_branches(model, states, mask, use_cfg=True)
    with torch.no_grad():
        cond, uncond, logits = branch_hidden(model, tokens, kv, use_cfg=True, return_logits=True)
        ref_c = model(tokens, states, mask, torch.zeros(3, dtype=torch.bool))
        ref_u = model(tokens, states, mask, torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(cond, ref_c.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond, ref_u.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, torch.cat([ref_c.logits, ref_u.logits]), atol=1e-5, rtol=1e-5)
    assert (cond - uncond).abs().max() > 1e-2  # the null caption changes the result
    # the unconditional rows do not depend on the prompt
    other = encode_text_branches(model, captions(seed=5)[0], None, use_cfg=True)
    with torch.no_grad():
        torch.testing.assert_close(branch_hidden(model, tokens, other, True)[1], uncond, atol=1e-5, rtol=1e-5)


def test_masked_only_logits_equal_plain_logits_path():
    model = tiny_model()
    for use_cfg in (False, True):
        fast = decode(model, use_cfg=use_cfg, guidance_scale=2.5, grid=(8, 8), logits_at_masked_only=True)
        plain = decode(model, use_cfg=use_cfg, guidance_scale=2.5, grid=(8, 8), logits_at_masked_only=False)
        assert torch.equal(fast.codes, plain.codes)


def test_unknown_positions_equal_nonzero():
    g = torch.Generator().manual_seed(0)
    for n, count in [(256, 200), (16, 16), (64, 1), (9, 0)]:
        unknown = torch.zeros(5, n, dtype=torch.bool)
        for row in unknown:
            row[torch.randperm(n, generator=g)[:count]] = True
        idx = unknown_positions(unknown, count)
        assert idx.shape == (5, count) and torch.equal(idx, unknown.nonzero()[:, 1].view(5, count))


def test_decoding_and_residual_sampling_never_wait_for_the_device():
    """The whole MaskGIT loop (CFG, kept hidden states, both logits paths) and the residual sampler (plain,
    temperature, CFG) run on the meta device, where any data-dependent size or host read raises (the check can
    fail: nonzero and item do): on a GPU the CPU then queues every step without waiting for the previous one."""
    for sync in (lambda t: t.nonzero(), lambda t: bool(t.any())):
        with pytest.raises((NotImplementedError, RuntimeError)):
            sync(torch.ones(2, 3, dtype=torch.bool, device="meta"))
    model = tiny_model()
    states, mask = captions()
    kv = encode_text_branches(model, states, mask, use_cfg=True)
    kv = kv.map(lambda t: t.to("meta"))
    model = model.to("meta")
    with torch.no_grad():
        for masked_only in (True, False):
            out = maskgit_decode(model, kv, 3, (4, 4), use_cfg=True, guidance_scale=3.0, keep_hidden=True,
                                 keep_uncond=True, logits_at_masked_only=masked_only)
            assert out.codes.shape == (3, 4, 4) and out.codes.is_meta and out.uncond_hidden.shape == (3, 16, 64)
        for kw in ({}, {"temperature": 0.5}, {"guidance_scale": 2.0, "uncond_hidden": out.uncond_hidden}):
            res = model.sample_residuals(out.hidden, out.codes.view(3, 16), None, 4, **kw)
            assert res.shape == (3, 16, 8) and res.is_meta


def test_same_seed_same_tokens_different_seed_different():
    model = tiny_model()
    a, b, c = (decode(model, guidance_scale=2.0, seed=s, grid=(8, 8)).codes for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kept_hidden_states_come_from_the_step_that_fixed_each_token():
    model = tiny_model()
    inputs: list[torch.Tensor] = [torch.full((3, 4, 4), model.mask_token_id)]
    out = decode(model, guidance_scale=2.0, keep_hidden=True, keep_uncond=True, on_step=lambda s, t: inputs.append(t))
    states, mask = captions()
    kv = encode_text_branches(model, states, mask, True)
    covered = torch.zeros(3, 16, dtype=torch.bool)
    for before, after in zip(inputs[:-1], inputs[1:], strict=True):
        newly = ((before == model.mask_token_id) & (after != model.mask_token_id)).flatten(1)
        with torch.no_grad():
            cond, uncond, _ = branch_hidden(model, before, kv, True)
        torch.testing.assert_close(out.hidden[newly], cond[newly], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.uncond_hidden[newly], uncond[newly], atol=1e-5, rtol=1e-5)
        assert (before.flatten(1)[newly] == model.mask_token_id).all()  # the position was [MASK] in that input
        covered |= newly
    assert covered.all()


def test_cfg_forms_and_schedules():
    c, u = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(guide(c, u, 3.0), torch.tensor([4.0, -5.0]))  # u + 3 (c - u)
    assert guide(c, u, 1.0) is c
    counts = mask_schedule_counts(12, 64)
    linear = [cfg_scale(4.0, "linear", 64, m) for m in counts]
    assert linear[0] == pytest.approx(1 + 3 * (64 - 63) / 64) and linear[-1] == pytest.approx(4.0)
    assert all(a < b for a, b in zip(linear, linear[1:], strict=False))
    assert {cfg_scale(4.0, "constant", 64, m) for m in counts} == {4.0}
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_scale(4.0, "cosine", 64, 3)


def test_sample_logits_distribution_temperature_and_top_k():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(40_000, 3)
    ids, logp = sample_logits(logits, 1.0, None, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).float() / ids.numel()
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.01, rtol=0)
    torch.testing.assert_close(logp, torch.log(torch.tensor([0.6, 0.3, 0.1]))[ids])
    hot, _ = sample_logits(logits, 0.25, None, torch.Generator().manual_seed(0))  # sharper: p ~ 0.6^4 / sum
    assert (hot == 0).float().mean() == pytest.approx(0.6**4 / (0.6**4 + 0.3**4 + 0.1**4), abs=0.01)
    top2, _ = sample_logits(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert (top2 != 2).all() and (top2 == 1).float().mean() == pytest.approx(1 / 3, abs=0.01)
    greedy, glogp = sample_logits(torch.tensor([[0.0, 3.0, 1.0]]), 0.0)
    assert greedy.tolist() == [1] and glogp.item() == pytest.approx(math.log(math.e**3 / (1 + math.e**3 + math.e)))


# ---- memorisation -------------------------------------------------------------------------------------------------


def test_tiny_generator_memorises_shapes_token_maps(tmp_path):
    """Masked-token CE with random cosine masks and 20% caption dropout, 300 AdamW steps at batch 32 on four
    captions; sampling those captions with CFG (12 steps) reproduces >= 90% of their DC-HT tokens."""
    from dcar.data.shapes import ShapesDataset
    from dcar.models.tokenizer import build_tokenizer
    from dcar.pipeline import DCARPipeline

    torch.manual_seed(0)
    tokenizer = build_tokenizer(ROOT / "configs" / "tokenizer" / "shapes.yaml").eval()
    data = ShapesDataset(resolution=128, size=100)
    items = [data[i] for i in range(4)]
    caps = [it["caption"] for it in items]
    with torch.no_grad():
        targets = tokenizer.encode(torch.stack([it["image"] for it in items])).indices  # (4, 4, 4)
    assert len({tuple(t.flatten().tolist()) for t in targets}) == 4
    build_word_tokenizer(caps, tmp_path)
    text = TextEncoder(TextEncoderConfig(kind="t5-random", tokenizer_path=str(tmp_path), max_length=16, t5_config={
        "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}))
    cfg = load_generator_config(ROOT / "configs" / "generator" / "shapes.yaml")
    cfg = dataclasses.replace(cfg, num_layers=4, width=128, caption_dim=64, use_head=False)
    torch.manual_seed(0)
    model = DCAR(cfg)
    g = torch.Generator().manual_seed(0)
    states, mask = text.encode(caps)
    steps = 300
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.96), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * s / steps)))
    for _ in range(steps):
        pick = torch.randint(0, 4, (32,), generator=g)
        inp, masked = model.random_mask(targets[pick], g)
        drop = torch.rand(32, generator=g) < 0.2
        logits = model(inp, states[pick], mask[pick], drop).logits
        loss = F.cross_entropy(logits[masked.flatten(1)], targets[pick].flatten(1)[masked.flatten(1)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert loss.item() < 0.5
    model.eval()
    pipe = DCARPipeline(tokenizer, model, text)
    acc = []
    for seed in range(3):
        codes, residual = pipe.generate_tokens(caps, guidance_scale=2.0, seed=seed)
        assert residual is None
        acc.append((codes == targets).float().mean().item())
    print(f"memorisation accuracy per seed {acc}")
    assert sum(acc) / len(acc) >= 0.9, acc
    # the captions matter: against the other captions' maps the samples agree far less
    shuffled = (codes == targets[[1, 2, 3, 0]]).float().mean().item()
    print(f"agreement with the other captions' maps {shuffled:.3f}")
    assert shuffled < acc[-1] - 0.2, (shuffled, acc)
