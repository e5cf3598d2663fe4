"""An inference copy of the DC-HT decoder: ``channels_last`` memory format and fused norms (issue 7).

:func:`build_inference_decoder` returns an eval-mode :class:`InferenceDecoder`, a snapshot of a DC-AE decoder
(diffusers' ``autoencoder_dc.Decoder``) transformed for inference; the tokenizer itself is never modified, so
training, ``state_dict`` and ``save_pretrained`` are unaffected. Options (:class:`DecoderPath`):

* ``channels_last``: weights and the latent in ``torch.channels_last`` (NHWC) memory format (PyTorch's
  "(beta) Channels Last Memory Format" tutorial), which cuDNN's tensor-core convolutions prefer. The DC-AE blocks
  move channels to the last dimension for every RMSNorm and every linear-attention projection
  (``x.movedim(1, -1)``), which is a contiguous view of an NHWC tensor instead of a strided one.
* ``fuse_norms``: the norms that torch can fuse, in eval mode:

  - BatchNorm folded into the layer it directly follows (``torch.nn.utils.fusion``): ``ResBlock.conv2 -> norm``
    (``fuse_conv_bn_eval``; DC-AE's BatchNorm stages, efficientvit ``bn2d``) and, in EfficientViT blocks built with
    ``norm_type="batch_norm"``, ``SanaMultiscaleLinearAttention.to_out -> norm_out`` (``fuse_linear_bn_eval``; the
    linear acts on the channel dimension, so BN's per-channel affine folds into its rows). The folding runs in
    float32 and is cast back to the parameter dtype. Every BatchNorm of the DC-AE decoder directly follows one of
    these two layers, so none is left;
  - diffusers' ``RMSNorm`` (``x * rsqrt(mean(x^2) + eps) * weight + bias``, five elementwise kernels) replaced by
    ``torch.nn.functional.rms_norm`` (one kernel where torch has a fused one) plus the bias.
    ``nn.LayerNorm`` is already a single torch kernel.

Both keep fp32 images equal within rounding (tests: max abs diff <= 1e-5 against the plain decoder).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import SanaMultiscaleLinearAttention
from diffusers.models.autoencoders.autoencoder_dc import ResBlock
from diffusers.models.normalization import RMSNorm
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

__all__ = ["DecoderPath", "FusedRMSNorm", "InferenceDecoder", "build_inference_decoder", "fold_batchnorms",
           "fuse_rms_norms", "weights_key"]


@dataclass(frozen=True)
class DecoderPath:
    """How :meth:`DCARPipeline.decode` runs the DC-HT decoder; both off = the plain decoder module."""

    channels_last: bool = False
    fuse_norms: bool = False

    @property
    def plain(self) -> bool:
        """True when no option is on (the tokenizer's own decoder is used, no copy)."""
        return not (self.channels_last or self.fuse_norms)


class FusedRMSNorm(nn.Module):
    """diffusers' ``RMSNorm`` (last dimension, optional affine weight and bias) as ``F.rms_norm`` + bias.

    Output dtype as in diffusers: the input's, promoted to the weight's (float32 under autocast with float32
    weights; the weight dtype when the model is cast to bf16/fp16).
    """

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.normalized_shape = tuple(norm.dim)
        self.eps = float(norm.eps)
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None:
            return F.rms_norm(x, self.normalized_shape, None, self.eps)
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        out = F.rms_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.eps)
        return out if self.bias is None else out + self.bias.to(dtype)


def _fold(layer: nn.Module, bn: nn.BatchNorm2d, fuse) -> nn.Module:
    """``fuse(layer, bn)`` computed in float32, returned in the layer's dtype (both modules must be in eval mode)."""
    dtype = layer.weight.dtype
    return fuse(layer.float().eval(), bn.float().eval()).to(dtype)


def fold_batchnorms(decoder: nn.Module) -> int:
    """Fold, in place, every BatchNorm of a DC-AE decoder into the conv / linear it directly follows (eval-time
    statistics); the norm becomes ``nn.Identity``. Returns how many were folded."""
    folded = 0
    for module in decoder.modules():
        if isinstance(module, ResBlock) and isinstance(module.norm, nn.BatchNorm2d):
            module.conv2 = _fold(module.conv2, module.norm, fuse_conv_bn_eval)
            module.norm = nn.Identity()
            folded += 1
        elif isinstance(module, SanaMultiscaleLinearAttention) and isinstance(module.norm_out, nn.BatchNorm2d):
            module.to_out = _fold(module.to_out, module.norm_out, fuse_linear_bn_eval)
            module.norm_out = nn.Identity()
            folded += 1
    return folded


def fuse_rms_norms(module: nn.Module) -> int:
    """Replace, in place, every diffusers ``RMSNorm`` under ``module`` by :class:`FusedRMSNorm`; returns the count."""
    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, RMSNorm)]
    for name, norm in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, FusedRMSNorm(norm))
    return len(targets)


class InferenceDecoder(nn.Module):
    """A transformed decoder copy; ``forward(latent)`` converts the latent's memory format and returns a
    contiguous (NCHW) image tensor, like the plain decoder."""

    def __init__(self, decoder: nn.Module, path: DecoderPath) -> None:
        super().__init__()
        self.decoder = decoder
        self.path = path

    def forward(self, latent: Tensor) -> Tensor:
        if self.path.channels_last:
            latent = latent.contiguous(memory_format=torch.channels_last)
        return self.decoder(latent).contiguous()


@torch.no_grad()
def build_inference_decoder(decoder: nn.Module, path: DecoderPath) -> InferenceDecoder:
    """An eval-mode, gradient-free copy of ``decoder`` with ``path``'s options applied (``decoder`` is untouched;
    the copy holds its own weights, a second copy of the decoder's memory)."""
    inner = copy.deepcopy(decoder).eval().requires_grad_(False)
    if path.fuse_norms:
        fold_batchnorms(inner)
        fuse_rms_norms(inner)
    if path.channels_last:
        inner = inner.to(memory_format=torch.channels_last)
    return InferenceDecoder(inner, path).eval()


def weights_key(module: nn.Module) -> Any:
    """Identity of a module's current weights (storage, version counter, dtype, device of every parameter and
    buffer): it changes with ``.to()``, ``load_state_dict`` and any in-place update such as an optimizer step.
    Inference tensors carry no version counter; a module holding one gets a fresh key every time."""
    try:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (*module.parameters(), *module.buffers()))
    except RuntimeError:
        return object()
