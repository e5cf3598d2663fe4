"""Reconstruction metrics (uint8 PSNR / SSIM, codebook usage) and ``scripts/reconstruct.py``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcar.eval.reconstruction import (
    PSNR_CAP_DB,
    evaluate_reconstruction,
    iter_image_batches,
    psnr_per_image,
    psnr_uint8,
    quantize_uint8,
    ssim_uint8,
)
from dcar.models.tokenizer import DCHT, DCHTConfig, QuantizerConfig

ROOT = Path(__file__).resolve().parents[1]


def _tiny_dcht(seed: int = 0) -> DCHT:
    torch.manual_seed(seed)
    cfg = DCHTConfig(
        encoder_block_out_channels=(8, 8, 16, 32, 32, 32), decoder_block_out_channels=(8, 8, 16, 32, 32, 32),
        encoder_layers_per_block=(0, 1, 1, 1, 1, 1), decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
        quantizer=QuantizerConfig(codebook_size=16, dim=32),
    )
    return DCHT(cfg)


def test_quantize_matches_png_mapping():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 128.0, 191.0, 255.0, 255.0])  # round((x+1)*127.5), clamped
    assert torch.equal(quantize_uint8(x), expected)
    u = torch.tensor([0, 7, 255], dtype=torch.uint8)
    assert torch.equal(quantize_uint8(u), u.float())


def test_psnr_identical_is_capped():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    per = psnr_per_image(x, x)
    assert torch.equal(per, torch.full((3,), PSNR_CAP_DB))
    assert psnr_uint8(x, x) == PSNR_CAP_DB and math.isfinite(psnr_uint8(x, x))


def test_psnr_hand_computed_pair():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 10  # image 0: one channel of one pixel off by 10 -> MSE = 100 / 48
    b[1] = 5  # image 1: every value off by 5 -> MSE = 25
    p0 = 10 * math.log10(255**2 / (100 / 48))
    p1 = 10 * math.log10(255**2 / 25)
    per = psnr_per_image(a, b)
    assert per.tolist() == pytest.approx([p0, p1], abs=1e-4)
    assert psnr_uint8(a, b) == pytest.approx((p0 + p1) / 2, abs=1e-4)  # mean of per-image PSNRs, not pooled MSE
    # float inputs in [-1, 1] are quantised first: 0 -> 128, and 5/127.5 - 1 + 0.001 rounds to level 5
    fa = torch.zeros(1, 3, 4, 4) - 1.0
    fb = fa + 5 / 127.5 + 0.001
    assert psnr_uint8(fa, fb) == pytest.approx(p1, abs=1e-4)


def test_ssim_identical_is_one_and_drops_with_noise():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert ssim_uint8(x, x) == pytest.approx(1.0, abs=1e-6)
    assert ssim_uint8(x, (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)) < 0.9


def test_iter_image_batches_sources():
    images = torch.randn(5, 3, 8, 8)
    samples = [{"image": im} for im in images] + [None]
    for source in (images, samples, iter(samples), [images[:2], images[2:]]):
        batches = list(iter_image_batches(source, 2))
        assert [b.shape[0] for b in batches] == [2, 2, 1]
        assert torch.equal(torch.cat(batches), images)


def test_evaluate_reconstruction_tiny_dcht_sane_and_deterministic():
    from dcar.data.shapes import ShapesDataset

    tok = _tiny_dcht()
    tok.train()
    data = ShapesDataset("heldout", 64, size=6)
    r1 = evaluate_reconstruction(tok, data, batch_size=4, device="cpu", return_images=3)
    assert tok.training  # mode restored
    r2 = evaluate_reconstruction(tok, data, batch_size=4, device="cpu")
    assert r1["num_images"] == 6
    for path in ("continuous", "discrete"):
        res = r1[path]
        assert len(res["psnr_per_image"]) == 6
        assert all(0 < p < PSNR_CAP_DB for p in res["psnr_per_image"])
        assert res["psnr"] == pytest.approx(sum(res["psnr_per_image"]) / 6)
        assert -1 <= res["ssim"] <= 1
        assert res == r2[path]  # deterministic, and independent of return_images
    cb = r1["codebook"]
    assert cb["num_tokens"] == 6 * 2 * 2 and cb["codebook_size"] == 16
    assert 1 <= cb["codes_used"] <= 16 and cb["usage"] == cb["codes_used"] / 16
    assert 1.0 <= cb["perplexity"] <= cb["codes_used"] + 1e-6
    assert r1["psnr_gap_db"] == pytest.approx(r1["continuous"]["psnr"] - r1["discrete"]["psnr"])
    shown = r1["images"]
    assert all(shown[k].shape == (3, 3, 64, 64) for k in ("original", "continuous", "discrete"))
    assert torch.equal(shown["original"], torch.stack([data[i]["image"] for i in range(3)]))
    for path in ("continuous", "discrete"):  # the reported PSNR is that of the returned reconstructions
        assert psnr_per_image(shown["original"], shown[path]).tolist() == pytest.approx(
            r1[path]["psnr_per_image"][:3], abs=1e-4)
    # batch size does not change the result
    r3 = evaluate_reconstruction(tok, data, batch_size=5, device="cpu")
    assert r3["continuous"]["psnr_per_image"] == pytest.approx(r1["continuous"]["psnr_per_image"], abs=1e-4)


def test_evaluate_reconstruction_perfect_decoder_hits_cap():
    """A decoder that returns its input's pixels exactly scores the cap on both paths."""
    tok = _tiny_dcht()
    images = (torch.randint(0, 256, (2, 3, 64, 64)).float() / 127.5 - 1)
    tok.decode = lambda latent: images[: latent.shape[0]]  # type: ignore[method-assign]
    r = evaluate_reconstruction(tok, images, batch_size=2, device="cpu")
    assert r["continuous"]["psnr"] == PSNR_CAP_DB and r["discrete"]["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_reconstruct_script(tmp_path):
    tok = _tiny_dcht()
    tok.save_pretrained(tmp_path / "run" / "final")
    # the run recorded a token-aligned shapes layout: data=shapes must rebuild exactly that layout
    (tmp_path / "run" / "config.yaml").write_text(
        "data:\n  kind: shapes\n  resolution: 64\n  shapes:\n    grid: 16\n    align: 16\n    exposure: 0.1\n")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "reconstruct.py"), f"tokenizer={tmp_path / 'run' / 'final'}",
           "data=shapes", "num=5", "grid=4", "batch_size=2", f"out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "continuous: PSNR" in proc.stdout and "discrete:   PSNR" in proc.stdout
    report = json.loads((out / "psnr.json").read_text())
    assert report["resolution"] == 64 and report["num_images"] == 5 and report["ids"] == list(range(5))
    assert len(report["psnr_per_image"]["continuous"]) == 5
    assert report["psnr_continuous"] == pytest.approx(sum(report["psnr_per_image"]["continuous"]) / 5)
    from PIL import Image

    grid = Image.open(out / "recon.png")
    assert grid.size == (4 * 66 + 2, 3 * 66 + 2)  # 4 columns x 3 rows of 64 px tiles, 2 px padding
    from dcar.data.shapes import ShapesDataset

    expected = ShapesDataset("heldout", 64, size=5, seed=0, grid=16, align=16, exposure=0.1)
    for col in range(4):  # the originals row holds the run's layout, not the default free layout
        tile = torch.from_numpy(np.asarray(grid.convert("RGB"))[2:66, 2 + 66 * col:66 + 66 * col].copy())
        want = ((expected[col]["image"].permute(1, 2, 0) + 1) * 127.5).round()
        assert (tile.float() - want).abs().max() <= 1
    bad = subprocess.run([*cmd[:2], "data=shapes"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "tokenizer=PATH" in bad.stderr
