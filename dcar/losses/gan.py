"""GAN losses for tokenizer training: hinge/vanilla D losses, the generator loss, VQGAN's adaptive weight, delayed start.

Sources (formulas re-implemented, not copied): CompVis/taming-transformers ``taming/modules/losses/vqperceptual.py``
(``hinge_d_loss``, ``vanilla_d_loss``, ``adopt_weight``, ``calculate_adaptive_weight``) and Esser et al. 2021, eq. 7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

D_LOSS_TYPES = ("hinge", "vanilla")
ADAPTIVE_WEIGHT_EPS = 1e-4  # taming: ||g_rec|| / (||g_gan|| + 1e-4)
ADAPTIVE_WEIGHT_MAX = 1e4  # taming: clamp(d_weight, 0, 1e4)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`` (VQGAN halves the sum)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating BCE form ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def d_loss_fn(kind: str, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Dispatch on ``kind`` in :data:`D_LOSS_TYPES`."""
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "vanilla":
        return vanilla_d_loss(logits_real, logits_fake)
    raise ValueError(f"unknown discriminator loss {kind!r}; valid: {', '.join(D_LOSS_TYPES)}")


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    """Generator adversarial loss ``-mean(D(recon))`` (taming, for both hinge and vanilla D losses)."""
    return -logits_fake.mean()


def disc_factor(step: int, disc_start: int) -> float:
    """1.0 once ``step >= disc_start``, else 0.0 (taming's ``adopt_weight`` with value 0)."""
    return 1.0 if step >= disc_start else 0.0


def _grad_norm(loss: Tensor, param: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(loss, param, retain_graph=True, allow_unused=True)
    return param.new_zeros(()) if grad is None else grad.detach().norm()


def adaptive_gan_weight(
    rec_loss: Tensor,
    g_loss: Tensor,
    last_layer: Tensor | None,
    disc_weight: float = 1.0,
    fallback: float = 0.0,
    max_weight: float = ADAPTIVE_WEIGHT_MAX,
) -> Tensor:
    """VQGAN's adaptive weight ``disc_weight * clamp(||dL_rec/dw|| / (||dL_G/dw|| + 1e-4), 0, max)``, detached.

    ``w`` is ``last_layer`` (the decoder's last conv weight). ``rec_loss`` is the weighted reconstruction total
    (pixel + perceptual, no VQ term), as in taming's ``nll_loss``. The graphs are retained for the caller's backward.

    When the gradients cannot be taken (grad mode off, ``last_layer`` None or frozen, or a loss without a graph:
    e.g. validation under ``torch.no_grad``) the documented constant ``disc_weight * fallback`` is returned instead.
    The default ``fallback=0`` follows taming, whose eval path sets ``d_weight = 0``.
    """
    usable = (
        torch.is_grad_enabled()
        and last_layer is not None
        and last_layer.requires_grad
        and rec_loss.requires_grad
        and g_loss.requires_grad
    )
    if not usable:
        return rec_loss.new_tensor(disc_weight * fallback).detach()
    ratio = _grad_norm(rec_loss, last_layer) / (_grad_norm(g_loss, last_layer) + ADAPTIVE_WEIGHT_EPS)
    return (ratio.clamp(0.0, max_weight) * disc_weight).detach().to(rec_loss.dtype)


__all__ = [
    "ADAPTIVE_WEIGHT_EPS",
    "ADAPTIVE_WEIGHT_MAX",
    "D_LOSS_TYPES",
    "adaptive_gan_weight",
    "d_loss_fn",
    "disc_factor",
    "generator_adv_loss",
    "hinge_d_loss",
    "vanilla_d_loss",
]
