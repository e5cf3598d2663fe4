"""Tests for dcar.data.transforms: the ADM centre crop, tensor conversion and random flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcar.data.transforms import (
    adm_center_crop,
    from_tensor,
    image_to_sample_tensor,
    random_hflip,
    to_pil,
    to_tensor,
)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def manual_adm(img: Image.Image, resolution: int, halvings: int, resized: tuple[int, int]) -> Image.Image:
    """The expected pipeline written out step by step with the sizes computed by hand."""
    for _ in range(halvings):
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    img = img.resize(resized, resample=Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


@pytest.mark.parametrize(
    ("size", "resolution"),
    [((300, 500), 64), ((500, 300), 64), ((50, 30), 64), ((2100, 1500), 64), ((64, 640), 64), ((17, 17), 16)],
    ids=["portrait", "landscape", "small-upsampled", "huge", "very-tall", "odd"],
)
def test_adm_crop_output_size(size: tuple[int, int], resolution: int) -> None:
    out = adm_center_crop(noise_image(*size), resolution)
    assert out.size == (resolution, resolution)
    assert out.mode == "RGB"


def test_adm_crop_1024x768_matches_manual_pipeline() -> None:
    img = noise_image(1024, 768, seed=1)
    # 1024x768, R=256: short side 768 >= 512 -> BOX to 512x384; 384 < 512 stops; bicubic to (round(512*256/384),
    # 256) = (341, 256); centre crop x offset (341 - 256) // 2 = 42.
    expected = manual_adm(img, 256, halvings=1, resized=(341, 256))
    out = adm_center_crop(img, 256)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    # The box step matters: a direct bicubic resize of the original gives different pixels.
    direct = manual_adm(img, 256, halvings=0, resized=(341, 256))
    assert not np.array_equal(np.asarray(out), np.asarray(direct))


def test_adm_crop_repeated_box_halvings() -> None:
    img = noise_image(2100, 1500, seed=2)
    # short side 1500 -> 750 -> 375 -> 187 -> 93 (< 128 stops): 4 halvings, long side 2100 -> 131;
    # bicubic to (round(131 * 64 / 93), 64) = (90, 64).
    expected = manual_adm(img, 64, halvings=4, resized=(90, 64))
    np.testing.assert_array_equal(np.asarray(adm_center_crop(img, 64)), np.asarray(expected))


def test_adm_crop_box_filter_averages_fine_pattern() -> None:
    # 1-pixel checkerboard of 0/255: the 2x2 box average is exactly 127.5 -> a flat grey after the crop.
    yy, xx = np.mgrid[0:768, 0:1024]
    checker = (((yy + xx) % 2) * 255).astype(np.uint8)
    img = Image.fromarray(np.stack([checker] * 3, axis=-1))
    out = np.asarray(adm_center_crop(img, 256)).astype(np.int32)
    assert out.min() >= 127 and out.max() <= 128


def test_adm_crop_identity_for_exact_size() -> None:
    img = noise_image(256, 256, seed=3)
    out = adm_center_crop(img, 256)
    assert out is not img
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_adm_crop_exact_double_size_is_a_box_average() -> None:
    img = noise_image(64, 64, seed=4)
    arr = np.asarray(img).astype(np.float64)
    expected = arr.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    out = np.asarray(adm_center_crop(img, 32)).astype(np.float64)
    assert np.abs(out - expected).max() <= 1.0  # PIL's fixed-point filters round to within one level


def test_adm_crop_rejects_bad_resolution() -> None:
    with pytest.raises(ValueError, match="resolution"):
        adm_center_crop(noise_image(8, 8), 0)


def test_to_tensor_range_and_values() -> None:
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    arr[0, 0] = (0, 128, 255)
    t = to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[:, 0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1.0, 1.0], abs=1e-6)
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0


def test_tensor_round_trip_is_exact() -> None:
    img = noise_image(20, 12, seed=5)
    back = from_tensor(to_tensor(img))
    assert back.dtype == np.uint8 and back.shape == (12, 20, 3)
    np.testing.assert_array_equal(back, np.asarray(img))
    np.testing.assert_array_equal(np.asarray(to_pil(to_tensor(img))), np.asarray(img))
    batch = torch.stack([to_tensor(img), to_tensor(img)])
    assert from_tensor(batch).shape == (2, 12, 20, 3)


def test_from_tensor_clamps_out_of_range() -> None:
    t = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 5).expand(3, 1, 5)
    assert from_tensor(t)[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError):
        from_tensor(torch.zeros(4, 8, 8))


def test_random_hflip_is_controlled_by_generator() -> None:
    img = noise_image(9, 4, seed=6)
    mirrored = np.asarray(img)[:, ::-1]
    np.testing.assert_array_equal(np.asarray(random_hflip(img, p=1.0)), mirrored)
    assert random_hflip(img, p=0.0) is img

    def decisions(seed: int) -> list[bool]:
        g = torch.Generator().manual_seed(seed)
        return [np.array_equal(np.asarray(random_hflip(img, generator=g)), mirrored) for _ in range(32)]

    first = decisions(123)
    assert first == decisions(123)
    assert 0 < sum(first) < 32  # both outcomes occur


def test_image_to_sample_tensor_pipeline() -> None:
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    t = image_to_sample_tensor(img, 16, random_flip=True, generator=torch.Generator().manual_seed(0))
    assert t.shape == (3, 16, 16)
    assert torch.equal(t[0], torch.ones(16, 16)) and torch.equal(t[1:], -torch.ones(2, 16, 16))
