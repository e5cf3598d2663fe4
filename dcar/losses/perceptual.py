"""LPIPS perceptual loss (VGG16 trunk) built on the ``lpips`` package, with offline-friendly weight loading.

The ``lpips`` wheel ships its linear heads (``lpips/weights/v0.1/vgg.pth``) but asks torchvision to download the
ImageNet VGG16 trunk from download.pytorch.org. That fails without internet, so this module always builds LPIPS with a
random trunk (``pnet_rand=True``) and then loads the torchvision VGG16 checkpoint itself, from either

1. a configured local file (``backbone_path``), or
2. the torch hub cache: ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth`` (``$TORCH_HOME/hub/checkpoints/``).

If neither exists, :func:`resolve_vgg16_weights` raises :class:`PerceptualWeightsNotFoundError` naming the file, the
directory and the download URL. Call it (or build :class:`LPIPSLoss`) before training starts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"

# torchvision ``vgg16().features`` indices -> LPIPS slice (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 boundaries);
# lpips.pretrained_networks.vgg16 keeps the torchvision index as the module name inside each slice.
_VGG_SLICE_BOUNDS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


class PerceptualWeightsNotFoundError(FileNotFoundError):
    """The ImageNet VGG16 weights LPIPS needs are not on disk (and cannot be downloaded offline)."""


def hub_checkpoint_path() -> Path:
    """Where torchvision/torch.hub would cache the VGG16 weights (honours ``$TORCH_HOME`` at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def resolve_vgg16_weights(backbone_path: str | None = None) -> Path:
    """Return the VGG16 weights file to load, or raise :class:`PerceptualWeightsNotFoundError` explaining the fix.

    A non-empty ``backbone_path`` must exist (it is not silently replaced by the hub cache).
    """
    hub_file = hub_checkpoint_path()
    fetch = f"on a connected machine download {VGG16_URL}"
    if backbone_path:
        path = Path(os.path.expanduser(backbone_path))
        if path.is_file():
            return path
        where = f"the configured perceptual_backbone_path '{path}'"
        fix = (
            f"{fetch} and put it at '{path}' (directory '{path.parent}'), or set perceptual_backbone_path='' to use "
            f"the torch hub cache file '{hub_file}'"
        )
    elif hub_file.is_file():
        return hub_file
    else:
        where = f"the torch hub cache '{hub_file}'"
        fix = (
            f"{fetch} and put it at '{hub_file}' (directory '{hub_file.parent}', i.e. $TORCH_HOME/hub/checkpoints/ "
            f"with torch.hub.get_dir()='{torch.hub.get_dir()}'), or set perceptual_backbone_path to the file"
        )
    raise PerceptualWeightsNotFoundError(
        f"LPIPS perceptual loss needs the torchvision ImageNet VGG16 weights file '{VGG16_FILENAME}', but it is not "
        f"at {where}, and lpips cannot download it offline. Fix: {fix}; or set perceptual_weight=0 to train "
        "without the perceptual loss."
    )


def vgg16_features_to_lpips(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a torchvision VGG16 state dict (``features.{i}.*``) onto the names of ``lpips.pretrained_networks.vgg16``."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "features":
            continue  # classifier.* and anything else: not used by LPIPS
        idx = int(parts[1])
        for s, (lo, hi) in enumerate(_VGG_SLICE_BOUNDS, start=1):
            if lo <= idx < hi:
                out[f"slice{s}.{idx}.{parts[2]}"] = value
    return out


def _build_lpips_vgg() -> nn.Module:
    """LPIPS(vgg) with the shipped linear heads and a *random* trunk; never touches the network."""
    import lpips  # imported lazily: only needed when the perceptual loss is on

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation warnings
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)


class LPIPSLoss(nn.Module):
    """Frozen LPIPS-VGG distance between images in [-1, 1]; ``forward`` returns one value per sample, shape (B,).

    Args:
        backbone_path: optional local path of torchvision's ``vgg16-397923af.pth``; otherwise the torch hub cache.
        pretrained_backbone: **tests only** when False: keep the random VGG trunk. The shipped linear heads are still
            loaded, but the values are meaningless as a perceptual metric and must not be used for training.
    """

    def __init__(self, backbone_path: str | None = None, pretrained_backbone: bool = True) -> None:
        super().__init__()
        weights = resolve_vgg16_weights(backbone_path) if pretrained_backbone else None  # fail before building
        self.lpips = _build_lpips_vgg()
        self.pretrained_backbone = pretrained_backbone
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            mapped = vgg16_features_to_lpips(state)
            expected = set(self.lpips.net.state_dict())
            if set(mapped) != expected:
                missing = sorted(expected - set(mapped))[:4]
                raise ValueError(f"'{weights}' is not a torchvision VGG16 state dict (missing e.g. {missing})")
            self.lpips.net.load_state_dict(mapped, strict=True)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSLoss:
        """LPIPS always stays in eval mode (its linear heads have dropout)."""
        return super().train(False)

    def forward(self, inputs: Tensor, recon: Tensor) -> Tensor:
        """Per-sample LPIPS distance, shape (B,); inputs must be in [-1, 1]. Differentiable w.r.t. both images."""
        if inputs.shape != recon.shape or inputs.dim() != 4 or inputs.shape[1] != 3:
            raise ValueError(f"expected two (B, 3, H, W) images, got {tuple(inputs.shape)} and {tuple(recon.shape)}")
        return self.lpips(inputs, recon, normalize=False).flatten()


__all__ = [
    "VGG16_FILENAME",
    "VGG16_URL",
    "LPIPSLoss",
    "PerceptualWeightsNotFoundError",
    "hub_checkpoint_path",
    "resolve_vgg16_weights",
    "vgg16_features_to_lpips",
]
