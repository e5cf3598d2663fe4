"""dcar.eval.fid / metrics / runner: Fréchet distance (closed form, scipy), FID end to end with a tiny registered
extractor (no download), cached reference statistics, missing-weights and LPIPS messages, PSNR / SSIM / LPIPS per
image, CLIP score, and the chunked runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from dcar.eval import fid as F
from dcar.eval import metrics as M
from dcar.eval import runner as R
from dcar.eval.reconstruction import psnr_per_image, psnr_uint8, ssim_uint8


def test_frechet_distance_closed_form_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    # commuting (diagonal) covariances: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(v1) - sqrt(v2))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert F.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    assert F.frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_direct_scipy_and_is_rotation_invariant():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + np.eye(6), b @ b.T + 0.5 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # same Gaussians in a rotated basis: same distance
    assert F.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(direct, rel=1e-8)


def test_feature_stats_and_singular_covariances():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 4)) * [1.0, 2.0, 3.0, 4.0] + 5.0
    s = F.FeatureStats.from_features(x)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False))  # (n - 1) normalisation
    assert s.n == 500 and s.mu.dtype == np.float64
    few = F.FeatureStats.from_features(rng.normal(size=(3, 8)))  # rank 2 covariance: still finite
    assert np.isfinite(few.fid(F.FeatureStats.from_features(rng.normal(size=(3, 8)))))
    with pytest.raises(ValueError, match="at least 2"):
        F.FeatureStats.from_features(x[:1])


def _images(seed: int, n: int = 16, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 40, 48, generator=g) * 160 + shift
    return base.clamp(0, 255).to(torch.uint8)


def test_fid_end_to_end_with_tiny_registered_extractor():
    ext = F.FeatureExtractor(F.RANDOM_TINY_EXTRACTOR, device="cpu", resize="extractor")
    assert ext.layer == "16" and ext.describe()["name"] == F.RANDOM_TINY_EXTRACTOR
    a = F.FeatureStats.from_features(ext(_images(0, 32)))
    same = F.FeatureStats.from_features(ext(_images(0, 32)))
    other = F.FeatureStats.from_features(ext(_images(1, 32)))
    shifted = F.FeatureStats.from_features(ext(_images(1, 32, shift=90.0)))
    assert a.fid(same) == pytest.approx(0.0, abs=1e-6)
    assert a.fid(shifted) > 10 * a.fid(other) > 0
    with pytest.raises(ValueError, match="uint8"):
        ext(torch.rand(2, 3, 8, 8))


def test_cached_reference_stats_are_reused(tmp_path, monkeypatch):
    ext = F.FeatureExtractor(F.RANDOM_TINY_EXTRACTOR, device="cpu")
    calls = []
    forward = type(ext.model).forward
    monkeypatch.setattr(type(ext.model), "forward", lambda self, x: calls.append(1) or forward(self, x))
    meta = {"resolution": 40, "extractor": ext.describe()}
    path = tmp_path / "ref.npz"
    first = F.cached_stats(path, lambda: {"all": F.FeatureStats.from_features(ext(_images(0)))}, meta)
    assert len(calls) == 1 and path.is_file()
    second = F.cached_stats(path, lambda: {"all": F.FeatureStats.from_features(ext(_images(0)))}, meta)
    assert len(calls) == 1  # loaded, not recomputed
    np.testing.assert_array_equal(first["all"].sigma, second["all"].sigma)
    assert second["all"].n == 16
    with pytest.raises(ValueError, match="resolution"):
        F.cached_stats(path, lambda: {}, {**meta, "resolution": 64})
    # a plain pytorch-fid style file (mu, sigma only) loads as group "all"
    np.savez(tmp_path / "plain.npz", mu=np.zeros(3), sigma=np.eye(3))
    stats, saved_meta = F.load_stats(tmp_path / "plain.npz")
    assert saved_meta == {} and stats["all"].sigma.shape == (3, 3)


def test_missing_inception_weights_error_names_file_folder_url_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(F.FidWeightsError) as info:
        F.FeatureExtractor("inception-v3-compat", weights_path=str(tmp_path / "nope.pth"), config_key="fid_weights")
    msg = str(info.value)
    assert F.INCEPTION_WEIGHTS_FILE in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert F.INCEPTION_WEIGHTS_URL in msg and "fid_weights=" in msg
    # no file anywhere and the download fails (no network / blocked here): the same message, raised up front
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(F.FidWeightsError, match="weights-inception-2015-12-05-6726825d.pth"):
        F.FeatureExtractor("inception-v3-compat")


def test_psnr_ssim_per_image_match_the_reconstruction_module():
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(3, 3, 24, 24, generator=g) * 255).to(torch.uint8)
    b = (a.float() + torch.randn(3, 3, 24, 24, generator=g) * 12).clamp(0, 255).to(torch.uint8)
    per = M.ssim_per_image(a, b)
    assert per.shape == (3,) and float(per.mean()) == pytest.approx(ssim_uint8(a, b), abs=1e-5)
    assert M.ssim_per_image(a, a).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    # a constant offset of 5 levels: PSNR = 10 log10(255^2 / 25) per image
    c = (a.int() + 5).clamp(max=255).to(torch.uint8)
    d = (c.int() - 5).to(torch.uint8)
    assert psnr_per_image(d, c).tolist() == pytest.approx([10 * np.log10(255**2 / 25)] * 3, abs=1e-4)
    assert psnr_uint8(d, c) == pytest.approx(10 * np.log10(255**2 / 25), abs=1e-4)


def test_lpips_skipped_with_message_or_required_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level("WARNING"):
        scorer, status = M.build_lpips("auto")
    assert scorer is None and M.ALEXNET_WEIGHTS_FILE in status and "skipping LPIPS" in caplog.text
    assert str(tmp_path / "hub" / "checkpoints") in status
    with pytest.raises(M.LpipsUnavailable, match="alexnet-owt-7be5be79.pth"):
        M.build_lpips("required")
    assert M.build_lpips("off")[0] is None


def test_lpips_per_image_with_a_random_backbone(tmp_path, monkeypatch):
    import torchvision

    real = torchvision.models.alexnet
    monkeypatch.setattr(torchvision.models, "alexnet", lambda weights=None, **kw: real(weights=None))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints" / M.ALEXNET_WEIGHTS_FILE
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")  # presence is what build_lpips checks; the patched alexnet does not read it
    torch.manual_seed(0)
    scorer, status = M.build_lpips("required")
    assert status.startswith("computed")
    a, b = _images(0, 3), _images(1, 3)
    per = scorer(a, b)
    assert per.shape == (3,) and (per > 0).all()
    assert scorer(a, a).abs().max() < 1e-6
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    ref = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    ref.net.load_state_dict(scorer.metric.net.state_dict())
    assert float(ref(a.float() / 255, b.float() / 255)) == pytest.approx(float(per.mean()), rel=1e-5)


def test_codebook_stats():
    s = M.codebook_stats(np.array([2, 2, 0, 0]))
    assert s["usage"] == 0.5 and s["perplexity"] == pytest.approx(2.0) and s["num_tokens"] == 4


def test_chunked_runner_resumes_and_merges_in_order(tmp_path):
    ctx = R.DistContext(rank=0, world=1, device="cpu")
    chunks = R.chunk_ranges(10, 4)
    assert [list(c) for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert R.my_share(5, R.DistContext(rank=1, world=2, device="cpu")) == [1, 3]
    seen = []

    def compute(items):
        seen.append(list(items))
        return {"x": np.asarray(items, dtype=np.float64) * 2}

    work = R.prepare_work_dir(ctx, tmp_path / "w", {"a": 1})
    assert R.run_chunks(ctx, work, chunks, compute, ["x"], progress=False) == 3
    R.part_path(work, 1).unlink()
    R.part_path(work, 2).write_bytes(b"truncated")  # an unreadable part is recomputed
    assert R.run_chunks(ctx, work, chunks, compute, ["x"], progress=False) == 2
    assert seen[-2:] == [[4, 5, 6, 7], [8, 9]]
    merged = R.concat(R.load_parts(work, 3, ["x"]), "x")
    np.testing.assert_array_equal(merged, np.arange(10) * 2.0)
    from dcar.config import ConfigError

    with pytest.raises(ConfigError, match="different settings"):
        R.prepare_work_dir(ctx, tmp_path / "w", {"a": 2})
