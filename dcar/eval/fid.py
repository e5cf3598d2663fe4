"""FID: Inception features through torch-fidelity's feature-extractor API, cached statistics, Fréchet distance.

Definitions (EVAL_PROTOCOLS.md sections 2.2 and 3.1: Sana ``tools/metrics/pytorch-fid``, efficientvit@de7d773
``efficientvit/apps/metrics/fid``):

* features: the 2048-d pool3 activations of the FID Inception-v3 (TF weights ``inception-2015-12-05``), here
  torch-fidelity's ``inception-v3-compat`` at layer ``"2048"`` on uint8 RGB images. The extractor name and layer
  are configurable so tests and smoke runs can use :class:`RandomTinyExtractor` (no download);
* resizing to 299: both protocols use pytorch-fid, which resizes with ``F.interpolate(bilinear,
  align_corners=False)``; torch-fidelity's extractor resizes TF1-style instead. ``resize="bilinear-299"`` (the
  default of the eval commands) first resizes like pytorch-fid and rounds to uint8, so torch-fidelity's own resize is
  then the identity; ``resize="extractor"`` leaves it to the extractor (torch-fidelity's native FID);
* statistics: ``mu`` = mean, ``sigma`` = covariance with the (n - 1) normalisation (``np.cov``), in float64;
* distance: ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with ``scipy.linalg.sqrtm``; when the product is
  singular (non-finite root) ``eps * I`` is added to both covariances, and a complex root is accepted only if the
  imaginary part of its diagonal is below 1e-3 (pytorch-fid's rule), then its real part is used.

Remaining difference to pytorch-fid: torch-fidelity normalises ``(x - 128) / 128`` (the TF graph), pytorch-fid
``2 x / 255 - 1``; the same weights and pool layer are used.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from dcar.eval.runner import atomic_savez, load_npz

logger = logging.getLogger(__name__)

DEFAULT_EXTRACTOR = "inception-v3-compat"
DEFAULT_FID_LAYER = "2048"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_INPUT_SIZE = 299
RANDOM_TINY_EXTRACTOR = "dcar-random-tiny"
RESIZE_MODES = ("bilinear-299", "extractor")


class FidWeightsError(FileNotFoundError):
    """The FID Inception weights are neither at the configured path nor in the torch hub cache (and no download)."""


def hub_checkpoint(filename: str) -> Path:
    """Where ``torch.hub`` caches ``filename``: ``$TORCH_HOME/hub/checkpoints/`` (default ``~/.cache/torch``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def missing_weights_message(config_key: str = "fid_weights", tried: str | None = None) -> str:
    """What to do when the Inception weights are unavailable: file name, folder, URL and config key."""
    where = hub_checkpoint(INCEPTION_WEIGHTS_FILE)
    lines = [
        "The Inception-v3 FID weights of torch-fidelity's 'inception-v3-compat' are not available"
        + (f": {tried}." if tried else "."),
        f"Put the file {INCEPTION_WEIGHTS_FILE} into {where.parent}/ (the torch hub cache, $TORCH_HOME/hub/checkpoints/);",
        f"  it is the file torch-fidelity downloads from {INCEPTION_WEIGHTS_URL}",
        f"or pass its path with {config_key}=/path/to/{INCEPTION_WEIGHTS_FILE} (torch-fidelity's "
        "feature_extractor_weights_path).",
    ]
    return "\n".join(lines)


class RandomTinyExtractor(FeatureExtractorBase):
    """A tiny fixed-seed random CNN with torch-fidelity's extractor interface (16-d features ``"16"``).

    For tests and CPU smoke runs only: FID values from it are **not** comparable to anything. Registered under
    :data:`RANDOM_TINY_EXTRACTOR` by :func:`register_random_tiny_extractor`.
    """

    def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
        super().__init__(name, features_list)
        gen = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("16",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "16"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        x = torch.nn.functional.interpolate(x.float() / 127.5 - 1.0, size=(32, 32), mode="bilinear",
                                            align_corners=False, antialias=True)
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return (torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1),)


def register_random_tiny_extractor(name: str = RANDOM_TINY_EXTRACTOR) -> str:
    """Register :class:`RandomTinyExtractor` with torch-fidelity under ``name`` (idempotent); returns ``name``."""
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, RandomTinyExtractor)
    return name


class FeatureExtractor:
    """A torch-fidelity feature extractor applied to uint8 RGB batches; ``extractor(images) -> (B, D) float32``.

    ``weights_path`` is torch-fidelity's ``feature_extractor_weights_path`` (Inception only; "" = the torch hub
    cache, downloading if possible). Construction fails with :class:`FidWeightsError` naming the file, the folder,
    the URL and ``config_key`` when the Inception weights cannot be found or fetched, so call it before heavy work.
    """

    def __init__(self, name: str = DEFAULT_EXTRACTOR, layer: str = "", weights_path: str = "",
                 device: torch.device | str = "cpu", resize: str = "bilinear-299",
                 config_key: str = "fid_weights") -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if name == RANDOM_TINY_EXTRACTOR:
            register_random_tiny_extractor()
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"unknown feature extractor {name!r}; registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
        self.name, self.resize, self.device = name, resize, torch.device(device)
        self.layer = layer or FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
        kwargs: dict[str, Any] = {"verbose": False}
        is_inception = name == DEFAULT_EXTRACTOR
        if weights_path:
            if not Path(weights_path).is_file():
                raise FidWeightsError(missing_weights_message(config_key, f"{config_key}={weights_path} does not exist")
                                      if is_inception else f"{config_key}={weights_path} does not exist")
            kwargs["feature_extractor_weights_path"] = str(weights_path)
        self.weights = str(weights_path) if weights_path else (
            str(hub_checkpoint(INCEPTION_WEIGHTS_FILE)) if is_inception else "")
        try:
            self.model = create_feature_extractor(name, [self.layer], cuda=False, **kwargs).to(self.device)
        except Exception as err:
            if is_inception and not weights_path and not hub_checkpoint(INCEPTION_WEIGHTS_FILE).is_file():
                raise FidWeightsError(missing_weights_message(
                    config_key, f"download failed: {type(err).__name__}: {err}")) from err
            raise

    def describe(self) -> dict[str, Any]:
        """What the features were computed with (for result JSONs and cache checks)."""
        return {"name": self.name, "layer": self.layer, "weights": self.weights, "resize": self.resize}

    @torch.no_grad()
    def __call__(self, images: Tensor) -> np.ndarray:
        """Features (B, D) float32 of uint8 images (B, 3, H, W)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device)
        size = INCEPTION_INPUT_SIZE
        if self.resize == "bilinear-299" and tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
            x = x.round().clamp(0, 255).to(torch.uint8)
        feats = self.model(x)[0]
        return feats.reshape(feats.shape[0], -1).float().cpu().numpy()


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set: ``mu`` (D,), ``sigma`` (D, D) float64, ``n`` samples."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, feats: np.ndarray) -> FeatureStats:
        """Mean and (n - 1)-normalised covariance of ``feats`` (N, D) in float64 (needs N >= 2)."""
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors (N, D), got shape {x.shape}")
        return cls(x.mean(0), np.cov(x, rowvar=False), int(x.shape[0]))

    def fid(self, other: FeatureStats, eps: float = 1e-6) -> float:
        """Fréchet distance to ``other``."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))`` (scipy ``sqrtm``; eps and complex handling as above)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        logger.warning("fid: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"fid: imaginary component {imag:.3g} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def save_stats(path: str | os.PathLike, stats: dict[str, FeatureStats], meta: dict[str, Any] | None = None) -> Path:
    """Save named statistics as one ``.npz`` (atomically).

    Group ``"all"`` is stored as ``mu`` / ``sigma`` (the pytorch-fid / DC-AE layout), any other group ``g`` as
    ``mu__g`` / ``sigma__g``; ``n``/``n__g`` hold the sample counts and ``meta`` a JSON string.
    """
    arrays: dict[str, Any] = {"meta": np.array(json.dumps(meta or {}))}
    for group, s in stats.items():
        suffix = "" if group == "all" else f"__{group}"
        arrays.update({f"mu{suffix}": s.mu, f"sigma{suffix}": s.sigma, f"n{suffix}": np.array(s.n)})
    return atomic_savez(path, **arrays)


def load_stats(path: str | os.PathLike) -> tuple[dict[str, FeatureStats], dict[str, Any]] | None:
    """``(stats by group, meta)`` from :func:`save_stats` (or a plain ``mu``/``sigma`` file); None if absent."""
    data = load_npz(path) if Path(path).is_file() else None
    if data is None:
        return None
    stats = {}
    for key in data:
        if key == "mu" or key.startswith("mu__"):
            suffix = key[2:]
            group = suffix[2:] if suffix else "all"
            n = data.get(f"n{suffix}")
            stats[group] = FeatureStats(data[key], data[f"sigma{suffix}"], int(n) if n is not None else -1)
    meta = json.loads(str(data["meta"])) if "meta" in data else {}
    return stats, meta


def check_stats_meta(path: str | os.PathLike, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise ``ValueError`` if cached statistics were computed with other settings (a file without meta, e.g. a
    pytorch-fid npz, is accepted with a warning)."""
    if not saved:
        logger.warning("reference statistics %s carry no metadata; using them as given", path)
        return
    expected = json.loads(json.dumps(expected))
    diff = sorted(k for k in expected if saved.get(k) != expected[k])
    if diff:
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, wanted {expected[k]!r}" for k in diff)
        raise ValueError(f"reference statistics {path} were computed with other settings ({details}); "
                         f"delete the file or pass another path")


def reuse_stats(path: str | os.PathLike, meta: dict[str, Any]) -> dict[str, FeatureStats] | None:
    """Statistics saved at ``path`` (checked against ``meta``: ``ValueError`` on a mismatch), or None if absent."""
    loaded = load_stats(path)
    if loaded is None:
        return None
    check_stats_meta(path, loaded[1], meta)
    return loaded[0]


def cached_stats(path: str | os.PathLike, compute: Callable[[], dict[str, FeatureStats]],
                 meta: dict[str, Any]) -> dict[str, FeatureStats]:
    """Statistics from ``path`` if it exists (checked against ``meta``), else ``compute()`` saved there first."""
    stats = reuse_stats(path, meta)
    if stats is not None:
        return stats
    stats = compute()
    save_stats(path, stats, meta)
    logger.info("saved reference statistics to %s", path)
    return stats


__all__ = [
    "DEFAULT_EXTRACTOR", "DEFAULT_FID_LAYER", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "RANDOM_TINY_EXTRACTOR",
    "RESIZE_MODES", "FeatureExtractor", "FeatureStats", "FidWeightsError", "RandomTinyExtractor", "cached_stats",
    "check_stats_meta", "frechet_distance", "hub_checkpoint", "load_stats", "missing_weights_message",
    "register_random_tiny_extractor", "reuse_stats", "save_stats",
]
