"""VectorQuantizer: exact nearest codes (chunked), straight-through gradient, HART's loss, usage stats, restarts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dcar.models.tokenizer import QuantizerConfig, VectorQuantizer


def make_vq(codebook_size: int = 97, dim: int = 8, **kw) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(QuantizerConfig(codebook_size=codebook_size, dim=dim, **kw))


@pytest.mark.parametrize("chunk_size", [7, 64, 4096])
def test_indices_are_true_nearest_codes(chunk_size: int) -> None:
    vq = make_vq(chunk_size=chunk_size)
    z = torch.randn(3, 8, 10, 11)  # 330 tokens, more than the smaller chunk sizes
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    dist = torch.cdist(flat.double(), vq.embedding.weight.double())
    brute = dist.argmin(1)
    got = out.indices.reshape(-1)
    assert out.indices.shape == (3, 10, 11) and out.indices.dtype == torch.long
    # identical up to exact ties: wherever the index differs the distances must agree to float precision
    differs = got != brute
    assert differs.float().mean() < 0.01
    torch.testing.assert_close(dist.gather(1, got[:, None]), dist.gather(1, brute[:, None]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.zq, vq.embedding.weight[got].view(3, 10, 11, 8).permute(0, 3, 1, 2))


def test_low_precision_input_uses_fp32_distances() -> None:
    vq = make_vq(chunk_size=16)
    z = torch.randn(2, 8, 6, 6)
    ref = vq(z).indices
    assert torch.equal(vq(z.double()).indices, ref)
    assert vq(z.bfloat16()).zq.dtype == torch.bfloat16


def test_straight_through_gradient() -> None:
    vq = make_vq()
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    vq(z).zq.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_loss_matches_hart_formula() -> None:
    vq = make_vq(beta=0.25)
    z = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = vq(z)
    codes = vq.embedding.weight[out.indices].permute(0, 3, 1, 2)
    by_hand = 0.25 * ((codes.detach() - z) ** 2).mean() + ((codes - z.detach()) ** 2).mean()
    torch.testing.assert_close(out.loss, by_hand)
    # gradients: commitment term to z (beta * 2 (z - e) / n), codebook term to the codes only
    out.loss.backward()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - codes).detach() / z.numel())
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out.loss, 1.25 * F.mse_loss(codes.detach(), z.detach()))


def test_usage_stats_on_uniform_assignment() -> None:
    vq = make_vq(codebook_size=16, dim=4)
    k = 4
    z = vq.embedding.weight.detach()[:k].repeat(6, 1)  # 24 tokens, each of codes 0..3 used 6 times
    out = vq(z.T.reshape(1, 4, 4, 6))
    assert torch.equal(torch.bincount(out.indices.reshape(-1), minlength=16)[:k], torch.full((k,), 6))
    torch.testing.assert_close(out.stats["perplexity"], torch.tensor(float(k)))
    torch.testing.assert_close(out.stats["codebook_usage"], torch.tensor(k / 16))
    # one code only -> perplexity 1
    single = vq(vq.embedding.weight.detach()[:1].T.reshape(1, 4, 1, 1).expand(1, 4, 3, 3).contiguous())
    torch.testing.assert_close(single.stats["perplexity"], torch.tensor(1.0))


def test_usage_ema_updates_only_in_training() -> None:
    vq = make_vq(codebook_size=16, dim=4, usage_ema_decay=0.5).eval()
    z = vq.embedding.weight.detach()[:1].T.reshape(1, 4, 1, 1).expand(1, 4, 2, 2).contiguous()
    before = vq.usage_ema.clone()
    vq(z)
    assert torch.equal(vq.usage_ema, before)
    vq.train()(z)
    expected = 0.5 * before
    expected[0] += 0.5
    torch.testing.assert_close(vq.usage_ema, expected)
    assert math.isclose(float(vq.usage_ema.sum()), 1.0, rel_tol=1e-6)


def test_dead_code_restart_replaces_exactly_the_dead_codes() -> None:
    vq = make_vq(codebook_size=8, dim=4, dead_code_restart=True, dead_code_steps=2).train()
    live = vq.embedding.weight.detach()[:3].clone()
    # a batch whose tokens sit exactly on codes 0..2 (plus tiny noise): codes 3..7 are never used
    z = (live.repeat(4, 1) + 1e-4 * torch.randn(12, 4)).T.reshape(1, 4, 3, 4).contiguous()
    old = vq.embedding.weight.detach().clone()
    out1 = vq(z)
    assert out1.stats["restarted"].item() == 0 and torch.equal(vq.embedding.weight, old)
    torch.manual_seed(123)
    out2 = vq(z)
    new = vq.embedding.weight.detach()
    assert out2.stats["restarted"].item() == 5
    assert torch.equal(new[:3], old[:3])  # live codes untouched
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    for row in new[3:]:  # every restarted code is one of the batch's latent vectors
        assert (flat == row).all(1).any()
    assert len({tuple(r.tolist()) for r in new[3:]}) == 5  # drawn without replacement
    assert torch.equal(vq.steps_since_used, torch.zeros(8, dtype=torch.long))
    # deterministic given the torch RNG
    vq2 = make_vq(codebook_size=8, dim=4, dead_code_restart=True, dead_code_steps=2).train()
    vq2(z)
    torch.manual_seed(123)
    vq2(z)
    assert torch.equal(vq2.embedding.weight, vq.embedding.weight)


def test_no_restart_in_eval_mode_or_when_disabled() -> None:
    z = torch.randn(1, 4, 2, 2)
    for vq in (
        make_vq(8, 4, dead_code_restart=True, dead_code_steps=1).eval(),
        make_vq(8, 4, dead_code_restart=False, dead_code_steps=1).train(),
    ):
        old = vq.embedding.weight.detach().clone()
        for _ in range(3):
            assert vq(z).stats["restarted"].item() == 0
        assert torch.equal(vq.embedding.weight, old)


def test_meta_device_construction() -> None:
    with torch.device("meta"):
        vq = VectorQuantizer(QuantizerConfig())
    assert vq.embedding.weight.is_meta and vq.embedding.weight.shape == (16384, 32)
    assert vq.usage_ema.is_meta


def _ddp_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        vq = VectorQuantizer(QuantizerConfig(codebook_size=16, dim=4, dead_code_restart=True, dead_code_steps=1))
        vq.train()
        torch.manual_seed(100 + rank)  # different data and RNG on each rank
        z = torch.randn(1, 4, 3, 3)
        out = vq(z)
        results[rank] = (vq.embedding.weight.detach().clone(), out.stats["perplexity"], out.stats["restarted"])
    finally:
        dist.destroy_process_group()


def test_restart_is_consistent_across_ranks(tmp_path) -> None:
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    (w0, p0, r0), (w1, p1, r1) = results[0], results[1]
    assert r0.item() > 0 and r0.item() == r1.item()
    assert torch.equal(w0, w1)
    assert torch.equal(p0, p1)  # statistics use the all-reduced counts


def test_kmeans_recovers_clusters_and_is_deterministic():
    from dcar.models.tokenizer.kmeans import kmeans

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 4, generator=g) * 10
    x = (centres[torch.arange(800) % 8] + 0.05 * torch.randn(800, 4, generator=g))
    found = kmeans(x, 8, iters=10, generator=torch.Generator().manual_seed(1))
    dist = torch.cdist(centres, found)
    assert dist.min(1).values.max() < 0.1  # every true centre has a centroid next to it
    assert dist.min(0).values.max() < 0.1  # and no centroid is stranded
    again = kmeans(x, 8, iters=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(found, again)
    few = kmeans(x[:3], 5, iters=3, generator=torch.Generator().manual_seed(0))  # fewer points than codes
    assert few.shape == (5, 4) and torch.cdist(few, x[:3]).min(1).values.max() < 1e-5
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(torch.empty(0, 4), 2)


def test_find_synonyms_merges_pure_codes_with_the_same_patch():
    from dcar.models.tokenizer.synonyms import find_synonyms, patchify

    white, red, blue = torch.ones(12), torch.tensor([1.0, -1, -1] * 4), torch.tensor([-1.0, -1, 1] * 4)
    # codes 2, 5, 7 only ever quantise white patches (7 the most often), 1 and 4 red ones; code 3 covers white and
    # blue (impure); code 6 blue; code 0 is unused
    rows = [(2, white), (5, white), (7, white), (7, white), (7, white), (1, red), (4, red), (4, red),
            (3, white), (3, blue), (6, blue)]
    indices = torch.tensor([c for c, _ in rows])
    patches = torch.stack([p for _, p in rows])
    code_map = find_synonyms(indices, patches, 8)
    assert code_map.tolist() == [0, 4, 7, 3, 4, 7, 6, 7]
    # a tolerance: a slightly darker white joins the group only when it is within tol
    near = torch.cat([patches, (white - 0.05)[None]])
    assert find_synonyms(torch.cat([indices, torch.tensor([0])]), near, 8, tol=0.02)[0] == 0
    assert find_synonyms(torch.cat([indices, torch.tensor([0])]), near, 8, tol=0.1)[0] == 7
    with pytest.raises(ValueError, match="expected indices"):
        find_synonyms(indices[:3], patches, 8)
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(images, 2)  # token (b, i, j) of a (2, 2, 2) index map is row b * 4 + i * 2 + j
    assert p.shape == (8, 12) and torch.equal(p[3], images[0, :, 2:4, 2:4].reshape(-1))
    assert torch.equal(p[4], images[1, :, 0:2, 0:2].reshape(-1))
    with pytest.raises(ValueError, match="not a multiple"):
        patchify(images, 3)


def test_gain_synonyms_join_codes_that_follow_a_brightness_change():
    from dcar.models.tokenizer.synonyms import find_gain_synonyms, unite_codes

    # tokens coded 1 turn into 4 when the image is dimmed (5 of 5), tokens coded 2 into 5 on 4 of 5 occurrences
    # (purity 0.8) and into 6 once; code 3 splits 3 / 3 between 6 and 7 (no partner for 3; 7, seen 3 times, is
    # always a 3); code 0 (2 tokens) always turns into 8
    base = torch.tensor([1] * 5 + [2] * 5 + [3] * 6 + [0] * 2)
    scaled = torch.tensor([4] * 5 + [5, 5, 5, 5, 6] + [6, 6, 6, 7, 7, 7] + [8, 8])
    edges = find_gain_synonyms(base, scaled, 10, purity=0.8, min_count=4)
    assert {tuple(e) for e in edges.tolist()} == {(4, 1), (1, 4), (5, 2), (2, 5)}
    assert {tuple(e) for e in find_gain_synonyms(base, scaled, 10, 0.8, min_count=2).tolist()} == \
        {(4, 1), (1, 4), (5, 2), (2, 5), (0, 8), (8, 0), (7, 3)}
    assert find_gain_synonyms(base, base, 10).numel() == 0  # a code never joins itself
    with pytest.raises(ValueError, match="purity must lie"):
        find_gain_synonyms(base, scaled, 10, purity=0.5)
    with pytest.raises(ValueError, match="two \\(N,\\) code tensors"):
        find_gain_synonyms(base, scaled[:3], 10)
    # groups: the synonym map joins 9 -> 1; the edges join 1 ~ 4 and 2 ~ 5; each group emits its most used code
    code_map = torch.arange(10)
    code_map[9] = 1
    counts = torch.tensor([0, 3, 1, 0, 7, 1, 0, 0, 0, 2])
    united = unite_codes(code_map, edges, counts)
    assert united.tolist() == [0, 4, 2, 3, 4, 2, 6, 7, 8, 4]  # {1, 4, 9} -> 4; {2, 5} tie -> 2; the rest alone
    assert torch.equal(united[united], united)
    assert torch.equal(unite_codes(code_map, torch.zeros(0, 2, dtype=torch.long), counts), code_map)


def test_code_map_redirects_emitted_indices_and_loads_old_files():
    q = VectorQuantizer(QuantizerConfig(codebook_size=8, dim=4, chunk_size=3)).eval()
    z = torch.randn(2, 4, 3, 3)
    plain = q(z)
    q.code_map[:] = torch.tensor([0, 0, 2, 2, 4, 4, 6, 6])
    out = q(z)
    assert q.merged and torch.equal(out.indices, q.code_map[plain.indices])
    torch.testing.assert_close(out.zq, q.lookup(out.indices))
    state = {k: v for k, v in q.state_dict().items() if k != "code_map"}  # a file written before code_map existed
    fresh = VectorQuantizer(QuantizerConfig(codebook_size=8, dim=4))
    fresh.code_map[:] = 0
    fresh.load_state_dict(state)
    assert torch.equal(fresh.code_map, torch.arange(8)) and not fresh.merged
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.code_map, q.code_map)
