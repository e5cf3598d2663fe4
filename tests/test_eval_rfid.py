"""scripts/eval_rfid.py end to end on a small ImageFolder (odd sizes, 2 classes) with a tiny random DC-HT and the
tiny registered feature extractor: JSON contents, agreement with dcar.eval.reconstruction, resume after an
interruption or a deleted part, a second run that computes nothing, two simulated processes, data=shapes, and the
missing-weights error."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dcar
from dcar.config import ConfigError
from dcar.eval import fid as F
from dcar.eval import runner as R
from dcar.models.tokenizer import DCHT, DCHTConfig, QuantizerConfig, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAST = ["feature_extractor=dcar-random-tiny", "fid_resize=extractor", "batch_size=4", "chunk_size=4",
        "num_workers=0", "progress=false"]


@pytest.fixture(scope="module")
def main():
    return runpy.run_path(str(ROOT / "scripts" / "eval_rfid.py"))["main"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rfid")
    torch.manual_seed(0)
    cfg = DCHTConfig(
        encoder_block_out_channels=(8, 8, 16, 32, 32, 32), decoder_block_out_channels=(8, 8, 16, 32, 32, 32),
        encoder_layers_per_block=(0, 1, 1, 1, 1, 1), decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
        quantizer=QuantizerConfig(codebook_size=16, dim=32),
    )
    build_tokenizer(cfg).save_pretrained(root / "tok")
    rng = np.random.default_rng(0)
    for c, label in enumerate(("n01", "n02")):
        (root / "val" / label).mkdir(parents=True)
        for i in range(6):
            h, w = int(rng.integers(45, 130)), int(rng.integers(45, 130))  # odd sizes, some above 2R (BOX step)
            yy, xx = np.mgrid[:h, :w]
            img = np.stack([(xx * (3 + i)) % 256, (yy * (2 + c)) % 256, (xx + yy) % 256], -1).astype(np.uint8)
            Image.fromarray(img).save(root / "val" / label / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(autouse=True)
def no_hub_cache(data, monkeypatch):
    """An empty torch hub cache: LPIPS is skipped the same way on every machine; nothing is downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(data / "torch_home"))


def args(data, out, *extra):
    return [f"tokenizer={data / 'tok'}", f"data.path={data / 'val'}", "resolution=64", f"out={out}", *FAST, *extra]


@pytest.fixture(scope="module")
def full(main, data):
    """One complete run (default reference-statistics path): ``(out path, result, reference path)``."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("TORCH_HOME", str(data / "torch_home"))
        out = data / "results" / "rfid_64.json"
        result = main(args(data, out))
    return out, result, Path(result["fid"]["reference_stats"])


def test_json_has_both_paths_and_matches_the_reconstruction_module(full, data):
    out, result, ref = full
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["protocol"] == "dcae-reconstruction" and saved["dcar_version"] == dcar.__version__
    assert saved["num_images"] == 12 and saved["resolution"] == 64 and saved["tokenizer"] == str(data / "tok")
    assert saved["data"] == {"kind": "imagefolder", "path": str(data / "val"), "crop": "adm"}
    for p in ("continuous", "discrete"):
        assert set(saved[p]) == {"rfid", "psnr", "ssim", "lpips"} and saved[p]["lpips"] is None
        assert saved[p]["rfid"] > 0 and np.isfinite(saved[p]["rfid"])
    assert "alexnet-owt-7be5be79.pth" in saved["lpips_status"]
    assert ref.is_file() and ref.parent == data / "results" / "fid_stats" and saved["fid"]["reference_count"] == 12
    assert saved["fid"]["feature_extractor"]["name"] == F.RANDOM_TINY_EXTRACTOR
    # PSNR / SSIM / codebook agree with dcar.eval.reconstruction on the same ADM-cropped images
    from dcar.data.imagefolder import ImageFolderDataset
    from dcar.eval.reconstruction import evaluate_reconstruction

    direct = evaluate_reconstruction(DCHT.from_pretrained(data / "tok"), ImageFolderDataset(data / "val", 64), 4)
    for p in ("continuous", "discrete"):
        assert saved[p]["psnr"] == pytest.approx(direct[p]["psnr"], abs=1e-4)
        assert saved[p]["ssim"] == pytest.approx(direct[p]["ssim"], abs=1e-5)
    assert saved["codebook"] == pytest.approx(direct["codebook"])
    # rFID of the originals against their own statistics is ~0: the reference is the same pipeline
    ext = F.FeatureExtractor(F.RANDOM_TINY_EXTRACTOR, resize="extractor")
    from dcar.eval.reconstruction import quantize_uint8

    originals = torch.stack([ImageFolderDataset(data / "val", 64)[i]["image"] for i in range(12)])
    stats = F.FeatureStats.from_features(ext(quantize_uint8(originals).to(torch.uint8)))
    assert stats.fid(F.load_stats(ref)[0]["all"]) == pytest.approx(0.0, abs=1e-6)


def test_resume_reuses_parts_and_reference_and_gives_the_same_json(main, data, full, monkeypatch):
    out, first, _ = full
    calls = []
    original = F.FeatureExtractor.__call__
    monkeypatch.setattr(F.FeatureExtractor, "__call__", lambda self, x: calls.append(len(x)) or original(self, x))
    loads = []
    from_pretrained = DCHT.from_pretrained.__func__
    monkeypatch.setattr(DCHT, "from_pretrained", classmethod(lambda cls, p: loads.append(p) or from_pretrained(cls, p)))
    # a second run computes nothing: no tokenizer, no features
    assert main(args(data, out)) == first and calls == [] and loads == []
    # a deleted part is recomputed (one chunk of 4 images: recon features of 2 paths, reference is cached)
    R.part_path(out.with_suffix(".parts"), 1).unlink()
    out.unlink()
    assert main(args(data, out)) == first
    assert calls == [4, 4] and len(loads) == 1


def test_interrupted_run_resumes_to_the_same_result(main, data, full, tmp_path, monkeypatch):
    _, complete, ref = full
    original = F.FeatureExtractor.__call__
    calls = []

    def crash_in_second_chunk(self, x):
        calls.append(1)
        if len(calls) > 2:  # chunk 0 = 2 calls (both paths); the reference stats are cached
            raise RuntimeError("simulated crash")
        return original(self, x)

    out = tmp_path / "cut.json"
    with monkeypatch.context() as m:
        m.setattr(F.FeatureExtractor, "__call__", crash_in_second_chunk)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(args(data, out, f"ref_stats={ref}"))
    assert not out.exists() and sorted(p.name for p in out.with_suffix(".parts").glob("part-*")) == ["part-00000.npz"]
    assert main(args(data, out, f"ref_stats={ref}")) == complete


def test_two_processes_take_disjoint_chunks_and_the_main_one_gathers(main, data, full, tmp_path, monkeypatch):
    _, single, ref = full
    out = tmp_path / "two.json"
    parts = out.with_suffix(".parts")

    def as_rank(rank):  # barriers are no-ops: the two "processes" run one after the other
        monkeypatch.setattr(R, "dist_context", lambda device: R.DistContext(rank, 2, torch.device("cpu")))
        return main(args(data, out, f"ref_stats={ref}"))

    with pytest.raises(RuntimeError, match="part-00001.npz is missing"):  # rank 1 has not run yet
        as_rank(0)
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-00000.npz", "part-00002.npz"]
    assert as_rank(1) == {} and not out.exists()  # only the main process writes the JSON
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-00000.npz", "part-00001.npz", "part-00002.npz"]
    assert as_rank(0) == single


def test_shapes_heldout_split(main, data, tmp_path):
    out = tmp_path / "shapes.json"
    result = main([f"tokenizer={data / 'tok'}", "data=shapes", "num_images=6", f"out={out}", *FAST])
    layout = result["data"].pop("layout")  # no run config above the tokenizer: the data=shapes preset's layout
    assert result["data"] == {"kind": "shapes", "split": "heldout", "seed": 0}
    assert layout["grid"] == 16 and layout["align"] == 0
    assert result["resolution"] == 64 and result["num_images"] == 6
    assert result["continuous"]["psnr"] > 0 and result["codebook"]["num_tokens"] == 6 * 4


def test_missing_inception_weights_fail_before_any_work(main, data, tmp_path, monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(DCHT, "from_pretrained", lambda *a, **k: pytest.fail("the tokenizer must not be loaded"))
    argv = [a for a in args(data, tmp_path / "x.json") if not a.startswith("feature_extractor=")]
    with pytest.raises(ConfigError) as info:
        main(argv)
    msg = str(info.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "fid_weights=" in msg
    assert str(data / "torch_home" / "hub" / "checkpoints") in msg and F.INCEPTION_WEIGHTS_URL in msg
    with pytest.raises(ConfigError, match="lpips"):
        main(args(data, tmp_path / "x.json", "lpips=maybe"))
    with pytest.raises(ConfigError, match="alexnet-owt-7be5be79.pth"):
        main(args(data, tmp_path / "x.json", "lpips=required"))


def test_shapes_layout_comes_from_the_tokenizer_run(main, data, tmp_path):
    import shutil

    from dcar.data.build import run_data_config

    run = tmp_path / "run"
    shutil.copytree(data / "tok", run / "final")
    (run / "config.yaml").write_text("data:\n  kind: shapes\n  resolution: 64\n  shapes:\n    grid: 16\n"
                                     "    align: 16\n    exposure: 0.1\n")
    assert run_data_config(run / "final").shapes.align == 16 and run_data_config(data / "tok") is None
    assert run_data_config(run / "final", kind="imagefolder") is None  # a shapes run is no imagefolder layout
    result = main([f"tokenizer={run / 'final'}", "data=shapes", "num_images=4", f"out={tmp_path / 'r.json'}", *FAST])
    assert result["data"]["layout"]["align"] == 16 and result["data"]["layout"]["exposure"] == 0.1
    default = main([f"tokenizer={data / 'tok'}", "data=shapes", "num_images=4", f"out={tmp_path / 'd.json'}", *FAST])
    assert default["continuous"]["psnr"] != result["continuous"]["psnr"]  # other images were reconstructed
    stats = sorted(p.name for p in (tmp_path / "fid_stats").iterdir())
    assert len(stats) == 2 and all(n.startswith("shapes-heldout-seed0-") for n in stats)  # one per layout
