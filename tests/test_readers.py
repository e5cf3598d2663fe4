"""Tests for the data readers: safe image loading, ImageFolder, JSONL captions and webdataset shards."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dcar.data.captioned import JsonlCaptionDataset
from dcar.data.collate import collate
from dcar.data.imagefolder import ImageFolderDataset
from dcar.data.io import load_rgb
from dcar.data.shards import WebDatasetCaptions, expand_shards
from dcar.data.writers import encode_image, write_jsonl_dataset, write_webdataset_shards

R = 8  # output resolution used throughout: tiny images keep the file fast


def solid(color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Image.Image:
    return Image.new("RGB", size, color)


def noise_jpeg_bytes(size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
    return encode_image(img, "jpg")


def expected_tensor(color: tuple[int, int, int]) -> torch.Tensor:
    return (torch.tensor(color, dtype=torch.float32) / 127.5 - 1.0).view(3, 1, 1).expand(3, R, R)


@pytest.fixture
def warn_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING)
    return caplog


# ------------------------------------------------------------------------------------------------ load_rgb


def test_load_rgb_unreadable_files_give_none_and_log_path(tmp_path: Path, warn_logs: pytest.LogCaptureFixture) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"definitely not an image" * 10)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(noise_jpeg_bytes()[:400])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    for path in (corrupt, truncated, empty, missing):
        warn_logs.clear()
        assert load_rgb(path) is None
        assert str(path) in warn_logs.text, path
    assert load_rgb(b"") is None
    assert load_rgb(b"garbage", name="shard.tar#0001.jpg") is None
    assert "shard.tar#0001.jpg" in warn_logs.text


def test_load_rgb_mode_conversions(tmp_path: Path) -> None:
    def roundtrip(img: Image.Image, fmt: str) -> Image.Image:
        path = tmp_path / f"img_{img.mode.replace(';', '_')}.{fmt}"
        img.save(path)
        out = load_rgb(path)
        assert out is not None and out.mode == "RGB" and out.size == img.size
        return out

    assert roundtrip(Image.new("L", (4, 4), 100), "png").getpixel((0, 0)) == (100, 100, 100)
    # CMYK (lossless TIFF): no cyan/black, full magenta+yellow = red
    assert roundtrip(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "tiff").getpixel((0, 0)) == (255, 0, 0)
    # RGBA is composited on white: opaque stays, transparent -> white, half-transparent red -> pink
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    rgba.putpixel((2, 0), (255, 0, 0, 128))
    out = roundtrip(rgba, "png")
    assert out.getpixel((0, 0)) == (10, 20, 30)
    assert out.getpixel((1, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((2, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    la = Image.new("LA", (2, 2), (50, 0))  # fully transparent grey -> white
    assert roundtrip(la, "png").getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 3)
    pal.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    assert roundtrip(pal, "png").getpixel((0, 0)) == (200, 100, 50)
    # 16-bit greyscale is rescaled (PIL's own convert("RGB") would clip 40000 to 255)
    wide = Image.fromarray(np.array([[0, 40000, 65535]], dtype=np.uint16))
    assert wide.mode == "I;16"
    out = roundtrip(wide, "png")
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (156, 156, 156), (255, 255, 255)]


def test_load_rgb_too_large_images(tmp_path: Path, warn_logs: pytest.LogCaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    solid((30, 30, 30), (20, 20)).save(path)
    assert load_rgb(path, max_pixels=399) is None
    assert str(path) in warn_logs.text and "max_pixels" in warn_logs.text
    assert load_rgb(path, max_pixels=400) is not None
    # PIL's own decompression-bomb protection: error above 2x MAX_IMAGE_PIXELS -> None, warning zone -> our limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)
    warn_logs.clear()
    assert load_rgb(path, max_pixels=None) is None
    assert "decompression bomb" in warn_logs.text and str(path) in warn_logs.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 px: PIL only warns; the warning must not escape
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = load_rgb(path, max_pixels=None)
    assert img is not None and img.getpixel((0, 0)) == (30, 30, 30)


def test_load_rgb_from_bytes() -> None:
    img = load_rgb(encode_image(solid((1, 2, 3)), "png"))
    assert img is not None and img.getpixel((5, 5)) == (1, 2, 3)


# ------------------------------------------------------------------------------------------------ ImageFolder


def make_class_folder(root: Path) -> None:
    colors = {"zebra": (0, 0, 255), "apple": (255, 0, 0), "mango": (0, 255, 0)}
    for name, color in colors.items():
        (root / name).mkdir(parents=True)
        for i in range(2):
            solid(color).save(root / name / f"img{i}.png")
    (root / "mango" / "notes.txt").write_text("not an image")
    solid((9, 9, 9)).save(root / "mango" / "upper.JPEG")  # upper-case extension still counts


def test_imagefolder_labels_order_and_values(tmp_path: Path) -> None:
    make_class_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, R)
    assert ds.classes == ["apple", "mango", "zebra"]
    names = [Path(p).relative_to(tmp_path).as_posix() for p, _ in ds.samples]
    assert names == ["apple/img0.png", "apple/img1.png", "mango/img0.png", "mango/img1.png", "mango/upper.JPEG",
                     "zebra/img0.png", "zebra/img1.png"]
    assert [label for _, label in ds.samples] == [0, 0, 1, 1, 1, 2, 2]
    assert ImageFolderDataset(tmp_path, R).samples == ds.samples  # deterministic
    first = ds[0]
    assert first is not None and first["label"] == 0 and first["path"] == ds.samples[0][0]
    assert first["image"].shape == (3, R, R)
    assert torch.equal(first["image"], expected_tensor((255, 0, 0)))
    assert torch.equal(ds[6]["image"], expected_tensor((0, 0, 255)))
    assert float(first["image"].min()) >= -1.0 and float(first["image"].max()) <= 1.0


def test_imagefolder_flat_folder(tmp_path: Path) -> None:
    for i, color in enumerate([(10, 20, 30), (40, 50, 60)]):
        solid(color).save(tmp_path / f"b{i}.png")
    ds = ImageFolderDataset(tmp_path, R)
    assert ds.classes == [] and [label for _, label in ds.samples] == [0, 0]
    assert Path(ds.samples[0][0]).name == "b0.png"


def test_imagefolder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(missing, R)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as err:
        ImageFolderDataset(empty, R, extensions=("jpg", ".png"))
    assert str(empty) in str(err.value) and ".jpg" in str(err.value) and ".png" in str(err.value)


def make_folder_with_bad_files(root: Path) -> int:
    """3 good images, 4 bad ones (corrupt, truncated, zero-byte, too large for max_pixels=10_000)."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i in range(3):
        solid((i * 50, 0, 0)).save(root / "a" / f"good{i}.png")
    (root / "a" / "corrupt.jpg").write_bytes(b"\x00\x01 junk")
    (root / "b" / "truncated.jpg").write_bytes(noise_jpeg_bytes()[:300])
    (root / "b" / "zero.png").write_bytes(b"")
    solid((1, 1, 1), (200, 200)).save(root / "b" / "huge.png")
    return 4


def test_imagefolder_bad_files_in_dataloader(tmp_path: Path, warn_logs: pytest.LogCaptureFixture) -> None:
    num_bad = make_folder_with_bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path, R, max_pixels=10_000)
    assert len(ds) == 7
    assert ds[ds.samples.index((str(tmp_path / "a" / "corrupt.jpg"), 0))] is None
    assert str(tmp_path / "a" / "corrupt.jpg") in warn_logs.text
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
    skipped = images = 0
    for batch in loader:
        skipped += batch["num_skipped"]
        images += len(batch.get("image", []))
    assert skipped == num_bad and images == 3


# ------------------------------------------------------------------------------------------------ JSONL


def test_jsonl_round_trip_non_ascii_and_relative_paths(tmp_path: Path) -> None:
    captions = ["Ein Bild: Größe", "東京の夜景 🌃", "plain"]
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    manifest = write_jsonl_dataset([(solid(c), t) for c, t in zip(colors, captions, strict=True)], tmp_path / "ds")
    assert json.loads(manifest.read_text(encoding="utf-8").splitlines()[1])["caption"] == captions[1]
    ds = JsonlCaptionDataset(manifest, R)
    assert len(ds) == 3 and ds.num_malformed == 0
    for i in range(3):
        sample = ds[i]
        assert sample is not None and sample["caption"] == captions[i]
        assert Path(sample["path"]) == tmp_path / "ds" / "images" / f"{i:09d}.png"
        assert torch.equal(sample["image"], expected_tensor(colors[i]))


def test_jsonl_malformed_lines(tmp_path: Path, warn_logs: pytest.LogCaptureFixture) -> None:
    solid((1, 2, 3)).save(tmp_path / "a.png")
    solid((4, 5, 6)).save(tmp_path / "abs.png")
    other = tmp_path / "other"
    other.mkdir()
    solid((7, 8, 9)).save(other / "a.png")
    lines = [
        json.dumps({"image": "a.png", "caption": "good one"}),  # 1
        "{not json",  # 2
        json.dumps(["a.png", "list"]),  # 3
        json.dumps({"image": "a.png"}),  # 4 missing caption
        "",  # 5 blank: ignored, not malformed
        json.dumps({"image": "a.png", "caption": 42}),  # 6 non-string caption
        json.dumps({"caption": "no image"}),  # 7
        json.dumps({"image": str(tmp_path / "abs.png"), "caption": "absolute"}),  # 8
        json.dumps({"image": "missing.png", "caption": "gone"}),  # 9 valid row, unreadable image
    ]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = JsonlCaptionDataset(manifest, R)
    assert ds.num_malformed == 5 and len(ds) == 3
    for lineno in (2, 3, 4, 6, 7):
        assert f"{manifest}:{lineno}:" in warn_logs.text
    assert f"{manifest}:1:" not in warn_logs.text and f"{manifest}:5:" not in warn_logs.text
    assert torch.equal(ds[0]["image"], expected_tensor((1, 2, 3)))
    assert ds[1]["caption"] == "absolute" and torch.equal(ds[1]["image"], expected_tensor((4, 5, 6)))
    warn_logs.clear()
    assert ds[2] is None and "missing.png" in warn_logs.text
    # image_root overrides the JSONL folder for relative paths
    rerooted = JsonlCaptionDataset(manifest, R, image_root=other)
    assert torch.equal(rerooted[0]["image"], expected_tensor((7, 8, 9)))


def test_jsonl_caption_truncation(tmp_path: Path, warn_logs: pytest.LogCaptureFixture) -> None:
    manifest = write_jsonl_dataset([(solid((0, 0, 0)), "x" * 30), (solid((0, 0, 0)), "short")], tmp_path)
    ds = JsonlCaptionDataset(manifest, R, max_caption_chars=10)
    assert ds[0]["caption"] == "x" * 10 and ds[1]["caption"] == "short"
    assert ds.num_truncated == 1 and "truncated 1 caption" in warn_logs.text
    assert JsonlCaptionDataset(manifest, R, max_caption_chars=None)[0]["caption"] == "x" * 30


def test_jsonl_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlCaptionDataset(tmp_path / "nope.jsonl", R)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        JsonlCaptionDataset(empty, R)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": 1}\nnot json\n')
    with pytest.raises(ValueError, match="no valid rows"):
        JsonlCaptionDataset(bad, R)


# ------------------------------------------------------------------------------------------------ WebDataset


def color_of(i: int) -> tuple[int, int, int]:
    return (i * 10 % 256, 255 - i * 7 % 256, i * 3 % 256)


def make_shards(out: Path, n: int = 10, per_shard: int = 3) -> list[Path]:
    samples = ((solid(color_of(i)), f"caption {i} — ü") for i in range(n))
    return write_webdataset_shards(samples, out, per_shard)


def captions(ds: WebDatasetCaptions) -> list[str | None]:
    return [s["caption"] if s is not None else None for s in ds]


def test_webdataset_round_trip(tmp_path: Path) -> None:
    shards = make_shards(tmp_path)
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    ds = WebDatasetCaptions(str(tmp_path / "shard-{000000..000003}.tar"), R)
    out = list(ds)
    assert [s["caption"] for s in out] == [f"caption {i} — ü" for i in range(10)]
    for i, s in enumerate(out):
        assert torch.equal(s["image"], expected_tensor(color_of(i)))
    assert out[4]["path"] == f"{shards[1]}#000000004"
    assert ds.stats.total == 0 and ds.count_samples() == 10
    # directory and explicit list give the same stream
    assert captions(WebDatasetCaptions(tmp_path, R)) == [s["caption"] for s in out]
    assert captions(WebDatasetCaptions([str(p) for p in shards], R)) == [s["caption"] for s in out]


def test_webdataset_shard_spec_errors(tmp_path: Path) -> None:
    make_shards(tmp_path, n=2, per_shard=2)
    with pytest.raises(FileNotFoundError, match=r"7 shard\(s\) not found: .*shard-000001.tar"):
        expand_shards(str(tmp_path / "shard-{000000..000007}.tar"))
    with pytest.raises(ValueError, match="local"):
        WebDatasetCaptions("https://example.com/shard-000000.tar", R)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar shards"):
        WebDatasetCaptions(tmp_path / "empty", R)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_caption_sources_and_bad_samples(tmp_path: Path, warn_logs: pytest.LogCaptureFixture) -> None:
    png = encode_image(solid((0, 0, 0)), "png")
    shard = tmp_path / "mixed.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "s0.jpg", encode_image(solid((0, 0, 0)), "jpg"))
        add_member(tar, "s0.json", json.dumps({"caption": "from json caption"}).encode())
        add_member(tar, "s1.webp", encode_image(solid((0, 0, 0)), "webp"))
        add_member(tar, "s1.json", json.dumps({"text": "from json text"}).encode())
        add_member(tar, "s2.png", png)  # no caption
        add_member(tar, "s3.png", b"corrupt image bytes")
        add_member(tar, "s3.txt", b"caption of a corrupt image")
        add_member(tar, "s4.txt", b"caption without image")
        add_member(tar, "s5.png", png)
        add_member(tar, "s5.json", b'{"caption": 3}')  # non-string caption
        add_member(tar, "__index__", b"metadata, not a sample")
        add_member(tar, "s6.png", png)
        add_member(tar, "s6.txt", b"  x" + b"y" * 50 + b"\n")
    ds = WebDatasetCaptions(shard, R, max_caption_chars=20)
    out = captions(ds)
    assert out == ["from json caption", "from json text", None, None, None, None, "x" + "y" * 19]
    assert ds.stats.counts == {"missing_caption": 2, "corrupt_image": 1, "missing_image": 1, "truncated_captions": 1}
    assert f"{shard}#s2" in warn_logs.text and f"{shard}#s3.png" in warn_logs.text
    assert "caption truncated" in warn_logs.text


def tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_webdataset_truncated_shards(tmp_path: Path, warn_logs: pytest.LogCaptureFixture) -> None:
    shards = make_shards(tmp_path, n=9, per_shard=3)
    full = captions(WebDatasetCaptions(tmp_path, R))
    members = tar_members(shards[1])
    # Middle shard cut inside the 2nd sample's image payload; last shard cut inside a header. Both are survived.
    second_image = members[2]
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: second_image.offset_data + second_image.size // 2])
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[: tar_members(shards[2])[3].offset + 100])
    ds = WebDatasetCaptions(tmp_path, R)
    out = captions(ds)
    # shard 0 intact; shard 1: sample 3 only (sample 4 is cut in its image); shard 2: sample 6, then sample 7's
    # image whose caption header was cut -> one unusable position.
    assert out == full[:4] + full[6:7] + [None]
    assert ds.stats.counts["truncated_shards"] == 2 and ds.stats.counts["missing_caption"] == 1
    assert str(shards[1]) in warn_logs.text and str(shards[2]) in warn_logs.text
    # a shard cut inside its first header cannot be opened at all: skipped, counted, the rest still read
    shards[1].write_bytes(data[:100])
    ds = WebDatasetCaptions(tmp_path, R)
    assert len([c for c in captions(ds) if c is not None]) == 3 + 1
    assert ds.stats.counts["unreadable_shards"] == 1


@pytest.mark.parametrize("shuffle", [False, True])
def test_webdataset_skip_resumes_exact_tail(tmp_path: Path, shuffle: bool) -> None:
    make_shards(tmp_path, n=11, per_shard=3)
    kwargs = dict(shuffle=shuffle, shuffle_buffer=4, seed=7, epoch=2)
    full = captions(WebDatasetCaptions(tmp_path, R, **kwargs))
    assert sorted(full) == sorted(f"caption {i} — ü" for i in range(11))
    for skip in (0, 1, 5, 10, 11, 20):
        assert captions(WebDatasetCaptions(tmp_path, R, skip=skip, **kwargs)) == full[skip:]
    # per-rank resume: the tail of that rank's stream
    for rank in range(2):
        rank_full = captions(WebDatasetCaptions(tmp_path, R, rank=rank, world_size=2, **kwargs))
        resumed = WebDatasetCaptions(tmp_path, R, rank=rank, world_size=2, skip=3, **kwargs)
        assert captions(resumed) == rank_full[3:]
    # set_epoch resets skip; a different epoch is a different permutation when shuffling
    ds = WebDatasetCaptions(tmp_path, R, skip=4, **kwargs)
    ds.set_epoch(2)
    assert captions(ds) == full
    ds.set_epoch(3)
    other = captions(ds)
    assert sorted(other) == sorted(full)
    assert (other != full) == shuffle


def test_webdataset_dataloader_order_and_resume_with_workers(tmp_path: Path) -> None:
    make_shards(tmp_path, n=13, per_shard=4)
    kwargs = dict(shuffle=True, shuffle_buffer=5, seed=1, batch_size=2)
    stream = captions(WebDatasetCaptions(tmp_path, R, **kwargs))

    def loader_captions(ds: WebDatasetCaptions) -> list[str]:
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
        return [c for batch in loader for c in batch["caption"]]

    # blocks of batch_size dealt round-robin to workers: the loader yields exactly the stream order ...
    assert loader_captions(WebDatasetCaptions(tmp_path, R, **kwargs)) == stream
    # ... so resuming after 3 batches (6 samples) with workers continues exactly where the run stopped
    assert loader_captions(WebDatasetCaptions(tmp_path, R, skip=6, **kwargs)) == stream[6:]


@pytest.mark.parametrize("split_by", ["sample", "shard"])
def test_webdataset_ranks_and_workers_cover_each_sample_once(tmp_path: Path, split_by: str) -> None:
    make_shards(tmp_path, n=14, per_shard=3)  # 5 shards of uneven size
    seen: list[str] = []
    per_rank: list[int] = []
    for rank in range(2):
        ds = WebDatasetCaptions(tmp_path, R, rank=rank, world_size=2, split_by=split_by, shuffle=True, seed=3)
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
        got = [c for batch in loader for c in batch["caption"]]
        per_rank.append(len(got))
        seen.extend(got)
    assert len(seen) == 14 and set(seen) == {f"caption {i} — ü" for i in range(14)}
    if split_by == "sample":
        assert per_rank == [7, 7]
