"""Per-image metrics for the evaluation commands: SSIM and LPIPS per image, codebook usage, CLIP score.

Definitions (EVAL_PROTOCOLS.md):

* PSNR: :func:`dcar.eval.reconstruction.psnr_per_image` (uint8 RGB, data range 255, mean of per-image values;
  section 3.1 item 6, DC-AE evaluator ``efficientvit/apps/metrics/psnr``).
* SSIM: torchmetrics ``structural_similarity_index_measure(data_range=255)`` with defaults (Gaussian 11 x 11,
  sigma 1.5, k1 0.01, k2 0.03) on uint8-valued RGB, per image (section 3.1 item 7):
  :func:`dcar.eval.reconstruction.ssim_per_image`, re-exported here; its mean over images equals torchmetrics'
  ``StructuralSimilarityIndexMeasure``.
* LPIPS: torchmetrics ``LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)`` on ``u8 / 255``,
  per image, averaged (section 3.1 item 8). Its AlexNet backbone comes from torchvision (file
  :data:`ALEXNET_WEIGHTS_FILE` in the torch hub cache); :func:`build_lpips` never downloads it.
* Codebook usage / perplexity: :func:`dcar.eval.reconstruction.codebook_stats`, re-exported here (fraction of codes
  used, ``exp(H(p))`` of the code histogram).
* CLIP score (section 2.3, Sana ``tools/metrics/clip-score``): ``logit_scale.exp() * cos(image, prompt)`` per image
  (100 x cosine for OpenAI CLIP), not clipped at 0, averaged; text truncated to the model's 77 tokens; here with a
  ``transformers`` ``CLIPModel`` loaded from a local folder (Sana uses the ``clip`` package's ViT-L/14, the same
  weights as ``openai/clip-vit-large-patch14``) and CLIP's PIL image preprocessing (bicubic resize of the short side to
  224, centre crop, CLIP mean / std).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dcar.eval.fid import hub_checkpoint
from dcar.eval.reconstruction import codebook_stats, ssim_per_image

logger = logging.getLogger(__name__)

ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_WEIGHTS_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_MODES = ("auto", "required", "off")


class LpipsUnavailable(FileNotFoundError):
    """``lpips=required`` but the AlexNet backbone file is not in the torch hub cache."""


def lpips_missing_message() -> str:
    """Why LPIPS is skipped, naming the backbone file and where to put it."""
    where = hub_checkpoint(ALEXNET_WEIGHTS_FILE)
    return (f"LPIPS needs torchvision's AlexNet ImageNet weights {ALEXNET_WEIGHTS_FILE}, not found at {where} "
            f"(put the file, downloadable from {ALEXNET_WEIGHTS_URL}, into {where.parent}/ i.e. "
            f"$TORCH_HOME/hub/checkpoints/)")


class LpipsScorer:
    """Per-image LPIPS (AlexNet, torchmetrics) of uint8 image pairs; ``scorer(a, b) -> (B,) float tensor``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="none")
        self.metric = self.metric.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        x = a.to(self.device).float().div(255.0)
        y = b.to(self.device).float().div(255.0)
        self.metric.reset()
        self.metric.update(x, y)
        out = self.metric.compute().reshape(-1).float().cpu()
        self.metric.reset()
        return out


def build_lpips(mode: str = "auto", device: torch.device | str = "cpu") -> tuple[LpipsScorer | None, str]:
    """An :class:`LpipsScorer` and a status line, or ``(None, reason)`` when LPIPS is skipped.

    ``mode``: ``"auto"`` uses LPIPS when the AlexNet file is in the torch hub cache and skips it (logged) otherwise;
    ``"required"`` raises :class:`LpipsUnavailable` instead; ``"off"`` skips it. Never downloads.
    """
    if mode not in LPIPS_MODES:
        raise ValueError(f"lpips must be one of {LPIPS_MODES}, got {mode!r}")
    if mode == "off":
        return None, "skipped: lpips=off"
    if not hub_checkpoint(ALEXNET_WEIGHTS_FILE).is_file():
        msg = lpips_missing_message()
        if mode == "required":
            raise LpipsUnavailable(msg)
        logger.warning("skipping LPIPS: %s; the results will have \"lpips\": null", msg)
        return None, f"skipped: {msg}"
    return LpipsScorer(device), "computed: torchmetrics LPIPS (alex, normalize=True)"


class ClipScorer:
    """CLIP score of (image, prompt) pairs with a local ``transformers`` CLIP folder (model, tokenizer, processor).

    ``scorer(images: list[PIL.Image], prompts) -> (B,)`` of ``logit_scale.exp() * cos``. Loads with
    ``local_files_only=True``: a missing folder is an error, nothing is downloaded.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        import transformers
        from transformers import AutoTokenizer, CLIPModel

        # the PIL backend (transformers >= 5; the default before) resizes like OpenAI CLIP's preprocess (PIL bicubic)
        processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP model folder {folder} does not exist (expected a transformers CLIPModel "
                                    f"folder, e.g. a local copy of openai/clip-vit-large-patch14)")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.processor = processor_cls.from_pretrained(str(folder), local_files_only=True)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.path = str(folder)

    @torch.no_grad()
    def __call__(self, images: list, prompts: list[str]) -> Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=pixels)
        txt = self.model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (self.model.logit_scale.exp().float() * cos).cpu()


RECON_PATHS: tuple[str, ...] = ("continuous", "discrete")


def recon_part_keys(lpips: bool, need_ref: bool) -> list[str]:
    """Keys a reconstruction part file must hold (see :func:`reconstruction_arrays`)."""
    keys = ["index", "counts"]
    for p in RECON_PATHS:
        keys += [f"psnr_{p}", f"ssim_{p}", f"feat_{p}"] + ([f"lpips_{p}"] if lpips else [])
    return keys + (["feat_ref"] if need_ref else [])


@torch.no_grad()
def reconstruction_arrays(tokenizer: Any, batches: Iterable[dict[str, Any]], extractor: Any,
                          lpips: LpipsScorer | None = None, need_ref: bool = True) -> dict[str, np.ndarray]:
    """Reconstruct collated ``batches`` (``"image"`` in [-1, 1], ``"index"``) through both DC-HT paths and score them.

    Inputs and decoder outputs are quantised to uint8 (:func:`dcar.eval.reconstruction.quantize_uint8`) before
    every metric. Returns per-image ``index``, ``psnr_<path>``, ``ssim_<path>``, ``lpips_<path>`` (with ``lpips``),
    FID features ``feat_<path>`` and ``feat_ref`` (originals, with ``need_ref``), and the code histogram ``counts``.
    """
    from dcar.eval.reconstruction import psnr_per_image, quantize_uint8

    param = next(tokenizer.parameters())
    codebook = int(tokenizer.quantizer.codebook_size)
    acc: dict[str, list] = {k: [] for k in recon_part_keys(lpips is not None, need_ref) if k != "counts"}
    counts = torch.zeros(codebook, dtype=torch.long)
    for batch in batches:
        if "image" not in batch:  # every sample of the batch was unreadable
            continue
        x = batch["image"].to(device=param.device, dtype=param.dtype)
        out = tokenizer.encode(x)
        counts += torch.bincount(out.indices.flatten().cpu(), minlength=codebook)
        ref = quantize_uint8(x).to(torch.uint8)
        acc["index"].append(np.asarray(batch["index"], dtype=np.int64).reshape(-1))
        if need_ref:
            acc["feat_ref"].append(extractor(ref))
        for p, latent in zip(RECON_PATHS, (out.z, out.zq), strict=True):
            rec = quantize_uint8(tokenizer.decode(latent)).to(torch.uint8)
            acc[f"psnr_{p}"].append(psnr_per_image(ref, rec).cpu().double().numpy())
            acc[f"ssim_{p}"].append(ssim_per_image(ref, rec).double().numpy())
            acc[f"feat_{p}"].append(extractor(rec))
            if lpips is not None:
                acc[f"lpips_{p}"].append(lpips(ref, rec).double().numpy())
    arrays = {k: np.concatenate(v, axis=0) if v else np.zeros((0,)) for k, v in acc.items()}
    arrays["counts"] = counts.numpy()
    return arrays


def summarize_reconstruction(parts: Sequence[dict[str, np.ndarray]], reference: Any,
                             lpips: bool) -> dict[str, Any]:
    """Means over images of every per-image metric, rFID of both paths against ``reference`` (a
    :class:`~dcar.eval.fid.FeatureStats`), and codebook usage, from the part files of :func:`reconstruction_arrays`."""
    from dcar.eval.fid import FeatureStats
    from dcar.eval.runner import concat

    out: dict[str, Any] = {"num_images": int(concat(parts, "index").shape[0])}
    for p in RECON_PATHS:
        out[p] = {
            "rfid": FeatureStats.from_features(concat(parts, f"feat_{p}")).fid(reference),
            "psnr": float(concat(parts, f"psnr_{p}").mean()),
            "ssim": float(concat(parts, f"ssim_{p}").mean()),
            "lpips": float(concat(parts, f"lpips_{p}").mean()) if lpips else None,
        }
    out["psnr_gap_db"] = out["continuous"]["psnr"] - out["discrete"]["psnr"]
    out["codebook"] = codebook_stats(np.sum([part["counts"] for part in parts], axis=0))
    return out


__all__ = [
    "ALEXNET_WEIGHTS_FILE", "RECON_PATHS", "ALEXNET_WEIGHTS_URL", "LPIPS_MODES", "ClipScorer", "LpipsScorer", "LpipsUnavailable",
    "build_lpips", "codebook_stats", "lpips_missing_message", "recon_part_keys", "reconstruction_arrays",
    "ssim_per_image", "summarize_reconstruction",
]
