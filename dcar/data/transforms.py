"""Image transforms shared by every reader: the ADM centre crop, tensor conversion, random horizontal flip.

The training and evaluation pipelines use the same crop as the ADM evaluation suite and the DC-AE evaluators
(``center_crop_arr`` in openai/guided-diffusion, ``guided_diffusion/image_datasets.py``), so that FID reference
statistics and training inputs see identical pixels. The algorithm (re-implemented here):

1. while the short side is at least ``2 * R``, halve both sides (integer division) with a BOX filter;
2. resize so that the short side is ``R`` with BICUBIC (long side ``round(long * R / short)``, Python rounding);
3. crop the central ``R x R`` window (offsets ``(size - R) // 2``).

An image that is already ``R x R`` is returned pixel-identical.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def adm_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize + centre-crop ``img`` to ``resolution x resolution`` exactly as the ADM / DC-AE evaluators do."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    # Step 1: repeated 2x BOX downsampling (anti-aliasing for large images), as in guided-diffusion center_crop_arr.
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    # Step 2: bicubic resize of the short side to the target resolution (PIL returns a copy if the size is unchanged).
    scale = resolution / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC)
    # Step 3: central crop.
    left = (img.width - resolution) // 2
    top = (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def random_hflip(
    img: Image.Image,
    *,
    p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Image.Image:
    """Mirror ``img`` left-right with probability ``p``, drawing from ``generator`` (torch's global RNG if None).

    In a DataLoader worker the global RNG is seeded per worker from the loader's base seed, so flips are
    reproducible for a fixed loader seed; pass an explicit generator for flips independent of the worker layout.
    """
    if p <= 0.0:
        return img
    if p >= 1.0 or float(torch.rand((), generator=generator)) < p:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor ``(3, H, W)`` in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def from_tensor(t: torch.Tensor) -> np.ndarray:
    """Float tensor in ``[-1, 1]``, ``(3, H, W)`` or ``(B, 3, H, W)`` -> uint8 array ``(H, W, 3)`` / ``(B, H, W, 3)``.

    Values are clamped, mapped with ``(x + 1) * 127.5`` and rounded, so ``from_tensor(to_tensor(img))`` is exact.
    """
    if t.dim() not in (3, 4) or t.shape[-3] != 3:
        raise ValueError(f"expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(t.shape)}")
    x = t.detach().float().cpu().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).contiguous().numpy()


def to_pil(t: torch.Tensor) -> Image.Image:
    """Float tensor ``(3, H, W)`` in ``[-1, 1]`` -> RGB PIL image."""
    if t.dim() != 3:
        raise ValueError(f"to_pil expects a single (3, H, W) image, got shape {tuple(t.shape)}")
    return Image.fromarray(from_tensor(t))


def image_to_sample_tensor(
    img: Image.Image,
    resolution: int,
    *,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The readers' common pipeline: ADM centre crop, optional random flip, ``[-1, 1]`` tensor."""
    img = adm_center_crop(img, resolution)
    if random_flip:
        img = random_hflip(img, generator=generator)
    return to_tensor(img)
