"""Pixel reconstruction losses (L1 / L2), averaged over every element.

taming-transformers' VQGAN uses the element-wise L1 ``|x - x_rec|`` (``VQLPIPSWithDiscriminator``); HART's released
``compute_loss`` and LlamaGen's ``VQLoss`` use the MSE. Both are element means, like ``F.l1_loss``/``F.mse_loss``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def l1_loss(inputs: Tensor, recon: Tensor) -> Tensor:
    """Mean absolute error over all elements."""
    return F.l1_loss(recon, inputs)


def l2_loss(inputs: Tensor, recon: Tensor) -> Tensor:
    """Mean squared error over all elements."""
    return F.mse_loss(recon, inputs)


def reconstruction_loss(
    inputs: Tensor, recon: Tensor, l1_weight: float, l2_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(l1_weight * L1 + l2_weight * L2, L1, L2)``; a term with weight 0 is not computed (logged as 0)."""
    if inputs.shape != recon.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and recon {tuple(recon.shape)} differ in shape")
    zero = recon.new_zeros(())
    l1 = l1_loss(inputs, recon) if l1_weight != 0 else zero
    l2 = l2_loss(inputs, recon) if l2_weight != 0 else zero
    return l1_weight * l1 + l2_weight * l2, l1, l2


__all__ = ["l1_loss", "l2_loss", "reconstruction_loss"]
