"""Reconstruction metrics of a DC-HT tokenizer: PSNR / SSIM of both decoding paths, and codebook usage.

Definitions (those of DC-AE's evaluator):

* images are compared as **uint8 RGB**: a float image in [-1, 1] is first quantised exactly as a saved PNG would be,
  ``round((x + 1) * 127.5)`` clamped to [0, 255] (:func:`quantize_uint8`, the same mapping as
  :func:`dcar.train.logging.to_uint8`);
* **PSNR** is computed per image with data range 255, ``10 * log10(255^2 / MSE)`` where the MSE is over all pixels
  and channels of that image, then averaged over images. Identical images (MSE = 0) would give +inf; every value
  is capped at :data:`PSNR_CAP_DB` = 100 dB instead, which keeps means finite. (The smallest non-zero MSE of an
  H x W RGB pair, one level in one channel of one pixel, gives ``10 * log10(255^2 * 3HW)``: ~89 dB at 64 px,
  ~101 dB at 256 px, so below ~230 px the cap only replaces exact matches.)
* **SSIM** is torchmetrics' ``structural_similarity_index_measure(data_range=255)`` (11 x 11 Gaussian window,
  sigma 1.5) per image on the uint8-valued images as float RGB (:func:`ssim_per_image`), averaged over images
  (the value of torchmetrics' ``StructuralSimilarityIndexMeasure``);
* **codebook usage** (:func:`codebook_stats`): fraction of the codes used and perplexity ``exp(H(p))`` of the
  histogram of every token seen.

:func:`evaluate_reconstruction` runs a tokenizer in eval mode over a dataset or an iterable of images and reports,
for the continuous path (``decode(z)``) and the discrete path (``decode(zq)``), mean PSNR / SSIM and per-image
PSNR, plus codebook usage over every token seen (fraction of codes used and perplexity ``exp(H(p))``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dcar.utils.modes import eval_mode

PSNR_CAP_DB = 100.0
"""Upper bound of a per-image PSNR (dB): identical images score this instead of +inf."""

PATHS: tuple[str, ...] = ("continuous", "discrete")


def quantize_uint8(images: Tensor) -> Tensor:
    """Images to uint8-valued **float** tensors in [0, 255] (same shape).

    A ``torch.uint8`` tensor is taken as already quantised; a floating tensor is taken to be in [-1, 1] and mapped
    with ``round((x + 1) * 127.5)`` clamped to [0, 255] (what saving it as a PNG stores).
    """
    if images.dtype == torch.uint8:
        return images.float()
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating images, got {images.dtype}")
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0.0, 255.0)


def _as_batch(images: Tensor) -> Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) or (C, H, W) images, got shape {tuple(images.shape)}")
    return images


def psnr_per_image(a: Tensor, b: Tensor, cap_db: float = PSNR_CAP_DB) -> Tensor:
    """Per-image PSNR (dB, data range 255, capped at ``cap_db``) of two image batches; returns shape (B,).

    ``a`` and ``b`` are (B, C, H, W) or (C, H, W), each either uint8 or float in [-1, 1] (see :func:`quantize_uint8`).
    """
    x, y = _as_batch(quantize_uint8(a)), _as_batch(quantize_uint8(b))
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    psnr = 10.0 * torch.log10(255.0**2 / mse)  # inf where mse == 0
    return psnr.clamp(max=cap_db).float()


def psnr_uint8(a: Tensor, b: Tensor, cap_db: float = PSNR_CAP_DB) -> float:
    """Mean over images of the per-image uint8 PSNR (:func:`psnr_per_image`); the DC-AE evaluator's PSNR."""
    return float(psnr_per_image(a, b, cap_db).mean())


def ssim_per_image(a: Tensor, b: Tensor) -> Tensor:
    """Per-image SSIM (B,) of uint8-valued RGB batches (uint8 or float 0..255), torchmetrics, data range 255."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = a.float(), b.float()
    if x.ndim == 3:
        x, y = x[None], y[None]
    out = structural_similarity_index_measure(x, y, data_range=255.0, reduction="none")
    return out.reshape(-1).float().cpu()


def ssim_uint8(a: Tensor, b: Tensor) -> float:
    """Mean over images of the per-image SSIM (:func:`ssim_per_image`) of two image batches, each uint8 or float in
    [-1, 1]; equals torchmetrics' ``StructuralSimilarityIndexMeasure(data_range=255)``."""
    return float(ssim_per_image(_as_batch(quantize_uint8(a)), _as_batch(quantize_uint8(b))).double().mean())


def codebook_stats(counts: np.ndarray) -> dict[str, Any]:
    """Usage of a codebook from its code histogram: fraction used, perplexity ``exp(H(p))``, counts."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    p = counts / max(total, 1)
    nz = p[p > 0]
    return {
        "usage": float((counts > 0).mean()) if counts.size else 0.0,
        "perplexity": math.exp(float(-(nz * np.log(nz)).sum())) if total else 0.0,
        "codes_used": int((counts > 0).sum()),
        "codebook_size": int(counts.size),
        "num_tokens": total,
    }


def _image_of(item: Any) -> Tensor | None:
    if item is None:
        return None
    if isinstance(item, dict):
        return item.get("image")
    if isinstance(item, (tuple, list)):  # (image, label) style samples
        return item[0]
    return item


def iter_image_batches(source: Any, batch_size: int) -> Iterator[Tensor]:
    """Batches (B, C, H, W) of images from a tensor, a map-style dataset, or an iterable.

    Accepted items: image tensors (C, H, W) or batches (B, C, H, W), dicts with an ``"image"`` field (dataset
    samples or collated batches), or ``(image, ...)`` tuples. ``None`` items (unreadable files) are skipped.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if isinstance(source, Tensor):
        source = _as_batch(source)
        for start in range(0, source.shape[0], batch_size):
            yield source[start : start + batch_size]
        return
    if hasattr(source, "__len__") and hasattr(source, "__getitem__") and not isinstance(source, (list, tuple)):
        items: Iterable[Any] = (source[i] for i in range(len(source)))
    else:
        items = source
    pending: list[Tensor] = []
    for item in items:
        image = _image_of(item)
        if image is None:
            continue
        pending.extend(_as_batch(image).unbind(0))
        while len(pending) >= batch_size:
            yield torch.stack(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        yield torch.stack(pending)


@torch.no_grad()
def evaluate_reconstruction(
    tokenizer: Any,
    images: Any,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    *,
    return_images: int = 0,
) -> dict[str, Any]:
    """Reconstruct ``images`` through both paths of ``tokenizer`` (a :class:`~dcar.models.tokenizer.DCHT`).

    ``images``: a tensor (N, C, H, W) in [-1, 1], a map-style dataset whose samples have an ``"image"`` field, or an
    iterable of images / batches (see :func:`iter_image_batches`). The tokenizer runs in eval mode (BatchNorm
    running statistics, no quantiser buffer updates) and is put back in its previous mode afterwards, so the
    result is deterministic. Decoder outputs are clamped to [-1, 1] and quantised to uint8 before scoring.

    Returns::

        {"num_images": N,
         "continuous": {"psnr": mean dB, "ssim": mean, "psnr_per_image": [N floats]},
         "discrete":   {... same ...},
         "psnr_gap_db": continuous psnr - discrete psnr,
         "codebook": {"usage": fraction of codes used, "perplexity": exp(H(p)), "codes_used": int,
                      "codebook_size": V, "num_tokens": tokens seen},
         "images": {"original", "continuous", "discrete"}: the first ``return_images`` images (CPU, [-1, 1])
                   (only when ``return_images > 0``)}
    """
    if device is None:
        device = next(tokenizer.parameters()).device
    device = torch.device(device)
    codebook_size = int(tokenizer.quantizer.codebook_size)
    counts = torch.zeros(codebook_size, dtype=torch.long)
    psnrs: dict[str, list[float]] = {p: [] for p in PATHS}
    ssims: dict[str, list[float]] = {p: [] for p in PATHS}
    kept: dict[str, list[Tensor]] = {"original": [], **{p: [] for p in PATHS}}
    n_kept = 0
    with eval_mode(tokenizer):
        for batch in iter_image_batches(images, batch_size):
            x = batch.to(device=device, dtype=next(tokenizer.parameters()).dtype)
            out = tokenizer.encode(x)
            recon = {"continuous": tokenizer.decode(out.z), "discrete": tokenizer.decode(out.zq)}
            counts += torch.bincount(out.indices.flatten().cpu(), minlength=codebook_size)
            ref = quantize_uint8(x)  # uint8-valued float
            for p in PATHS:
                rec = quantize_uint8(recon[p])  # clamps to [0, 255] after the PNG mapping
                psnrs[p].extend(psnr_per_image(ref.to(torch.uint8), rec.to(torch.uint8)).tolist())
                ssims[p].extend(ssim_per_image(rec, ref).tolist())
            if n_kept < return_images:
                take = min(return_images - n_kept, x.shape[0])
                kept["original"].append(x[:take].float().cpu())
                for p in PATHS:
                    kept[p].append(recon[p][:take].clamp(-1, 1).float().cpu())
                n_kept += take

    n = len(psnrs["continuous"])
    if n == 0:
        raise ValueError("evaluate_reconstruction: no images")
    result: dict[str, Any] = {"num_images": n}
    for p in PATHS:
        result[p] = {"psnr": sum(psnrs[p]) / n, "ssim": sum(ssims[p]) / n, "psnr_per_image": psnrs[p]}
    result["psnr_gap_db"] = result["continuous"]["psnr"] - result["discrete"]["psnr"]
    result["codebook"] = codebook_stats(counts.numpy())
    if return_images > 0:
        result["images"] = {k: torch.cat(v) for k, v in kept.items()}
    return result


__all__ = [
    "PATHS",
    "PSNR_CAP_DB",
    "codebook_stats",
    "evaluate_reconstruction",
    "iter_image_batches",
    "psnr_per_image",
    "psnr_uint8",
    "quantize_uint8",
    "ssim_per_image",
    "ssim_uint8",
]
