"""The DC-HT tokenizer training loss: reconstruction + LPIPS + PatchGAN (hinge) + VQ, VQGAN-style.

DC-AR's paper names the terms but its code is unreleased, and DC-AE's training losses are not in the public
efficientvit repo either, so no default below comes from DC-AR or DC-AE. Defaults are taken from public code and
each field cites its source: taming-transformers (VQGAN, ``vqperceptual.py`` and ``configs/imagenet_vqgan.yaml``),
HART's released ``compute_loss`` (``MSE * recon_weight(1.0) + vq_loss``) and LlamaGen's ``vq_train.py``/``vq_loss.py``.
MaskGIT's public repo has no tokenizer training code, so it contributes no default.

Usage (two optimizers, as taming)::

    loss_fn = TokenizerLoss(TokenizerLossConfig(...))      # raises here if LPIPS weights are missing
    g_loss, g_logs = loss_fn.generator_loss(x, x_rec, vq_loss, step, last_layer=decoder.last_conv.weight)
    g_loss.backward(); opt_g.step()                          # note: D's params also receive grads here
    if loss_fn.discriminator_active(step):
        opt_d.zero_grad(); d_loss, d_logs = loss_fn.discriminator_loss(x, x_rec, step); d_loss.backward(); opt_d.step()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dcar.config.schema import choice
from dcar.losses.discriminator import NORM_TYPES, PatchGANDiscriminator
from dcar.losses.gan import D_LOSS_TYPES, adaptive_gan_weight, d_loss_fn, disc_factor, generator_adv_loss
from dcar.losses.perceptual import LPIPSLoss, resolve_vgg16_weights
from dcar.losses.reconstruction import reconstruction_loss


@dataclass
class TokenizerLossConfig:
    """Weights and settings of :class:`TokenizerLoss` (plain floats/ints/bools/strings: JSON and OmegaConf safe)."""

    # Pixel loss. HART's released compute_loss and LlamaGen (reconstruction_loss='l2', weight 1.0) use MSE;
    # taming's VQGAN uses L1 (pixelloss_weight 1.0). Both may be combined.
    l1_weight: float = 0.0
    l2_weight: float = 1.0
    # LPIPS-VGG weight: taming VQLPIPSWithDiscriminator perceptual_weight=1.0 and LlamaGen --perceptual-weight 1.0.
    perceptual_weight: float = 1.0
    # Local torchvision vgg16-397923af.pth; "" means the torch hub cache ($TORCH_HOME/hub/checkpoints/).
    perceptual_backbone_path: str = ""
    # GAN weight (taming's disc_weight): 0.8 in taming configs/imagenet_vqgan.yaml (class default 1.0; LlamaGen 0.5
    # without the adaptive weight). 0 disables the GAN and builds no discriminator.
    gan_weight: float = 0.8
    # Step from which the GAN term and D training are on: LlamaGen --disc-start 20000 (taming ImageNet: 250001).
    disc_start: int = 20000
    # D loss: taming's default "hinge" (also LlamaGen's); "vanilla" = softplus/BCE form.
    disc_loss: str = choice("hinge", *D_LOSS_TYPES)
    # taming's adaptive weight ||grad rec|| / (||grad G|| + 1e-4), on by default there (LlamaGen: off).
    adaptive_weight: bool = True
    # Multiplier of gan_weight used when the adaptive weight cannot be computed (no grad / frozen last layer);
    # 0.0 as in taming's eval path (`d_weight = torch.tensor(0.0)`).
    adaptive_weight_fallback: float = 0.0
    # VQ loss weight: taming codebook_weight 1.0; HART adds vq_loss unweighted (its beta=0.25 is inside vq_loss).
    vq_weight: float = 1.0
    # PatchGAN: taming / HART NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3), BatchNorm.
    disc_ndf: int = 64
    disc_n_layers: int = 3
    disc_norm: str = choice("batch", *NORM_TYPES)
    # D learning rate = disc_lr_mult * generator lr (for the trainer); taming uses the same lr for both (1.0).
    disc_lr_mult: float = 1.0


def check_loss_assets(config: TokenizerLossConfig) -> None:
    """Cheap pre-flight check (call before building the models): raise if the LPIPS VGG16 weights are missing."""
    if config.perceptual_weight > 0:
        resolve_vgg16_weights(config.perceptual_backbone_path or None)


class TokenizerLoss(nn.Module):
    """Owns the frozen LPIPS net and the PatchGAN discriminator; computes the generator and discriminator losses.

    Args:
        config: loss weights; ``perceptual_weight > 0`` requires the VGG16 weights on disk (checked here, so a
            missing file fails before training starts). ``gan_weight == 0`` builds no discriminator.
        pretrained_backbone: **tests only** when False: LPIPS keeps a random VGG trunk (meaningless values).
    """

    def __init__(self, config: TokenizerLossConfig | None = None, *, pretrained_backbone: bool = True) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else TokenizerLossConfig()
        if cfg.disc_loss not in D_LOSS_TYPES:
            raise ValueError(f"disc_loss must be one of {D_LOSS_TYPES}, got {cfg.disc_loss!r}")
        for name in ("l1_weight", "l2_weight", "perceptual_weight", "gan_weight", "vq_weight"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
        self.perceptual: LPIPSLoss | None = None
        if cfg.perceptual_weight > 0:
            self.perceptual = LPIPSLoss(cfg.perceptual_backbone_path or None, pretrained_backbone=pretrained_backbone)
        self.discriminator: PatchGANDiscriminator | None = None
        if cfg.gan_weight > 0:
            self.discriminator = PatchGANDiscriminator(3, cfg.disc_ndf, cfg.disc_n_layers, cfg.disc_norm)

    def discriminator_active(self, step: int) -> bool:
        """Whether D exists and is trained at ``step`` (``step >= disc_start``); the trainer may skip D otherwise."""
        return self.discriminator is not None and disc_factor(step, self.config.disc_start) > 0

    def generator_loss(
        self,
        inputs: Tensor,
        recon: Tensor,
        vq_loss: Tensor | float | None,
        step: int,
        last_layer: Tensor | None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Tokenizer (generator) objective and its logged parts.

        ``total = l1_w*rec_l1 + l2_w*rec_l2 + perceptual_w*perceptual + d_weight*disc_factor*g_loss + vq_w*vq``,
        where ``d_weight`` is the adaptive weight w.r.t. ``last_layer`` (the decoder's last conv weight) times
        ``gan_weight``, or ``gan_weight`` itself when ``adaptive_weight`` is False. Before ``disc_start`` the
        discriminator is not run and the GAN term is 0. Images are in [-1, 1].

        ``last_layer`` may be None only when no adaptive weight is needed (``adaptive_weight=False``, eval mode or
        no-grad); a frozen ``last_layer`` or no-grad mode gives ``d_weight = gan_weight * adaptive_weight_fallback``.
        """
        cfg = self.config
        rec_pix, l1, l2 = reconstruction_loss(inputs, recon, cfg.l1_weight, cfg.l2_weight)
        zero = recon.new_zeros(())
        p_loss = self.perceptual(inputs, recon).mean() if self.perceptual is not None else zero
        rec_total = rec_pix + cfg.perceptual_weight * p_loss

        factor = disc_factor(step, cfg.disc_start) if self.discriminator is not None else 0.0
        g_loss, d_weight = zero, zero
        if factor > 0:
            g_loss = generator_adv_loss(self.discriminator(recon))
            if cfg.adaptive_weight:
                if last_layer is None and self.training and torch.is_grad_enabled():
                    raise ValueError("adaptive_weight=True needs last_layer (the decoder's last conv weight)")
                d_weight = adaptive_gan_weight(
                    rec_total, g_loss, last_layer, cfg.gan_weight, fallback=cfg.adaptive_weight_fallback
                )
            else:
                d_weight = recon.new_tensor(cfg.gan_weight)

        vq = _as_tensor(vq_loss, zero)
        total = rec_total + d_weight * factor * g_loss + cfg.vq_weight * vq
        logs = {
            "total": total,
            "rec_l1": l1,
            "rec_l2": l2,
            "perceptual": p_loss,
            "rec_total": rec_total,
            "vq": vq,
            "g_loss": g_loss,
            "d_weight": d_weight,
            "disc_factor": factor,
        }
        return total, _floats(logs)

    def discriminator_loss(self, inputs: Tensor, recon: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """``disc_factor * d_loss(D(inputs), D(recon.detach()))``; both images are detached.

        Before ``disc_start`` D is not run and the result is an exact 0 that still backpropagates (zero gradients),
        so an unconditional ``backward()`` is safe; skipping the D step via :meth:`discriminator_active` is cheaper.
        """
        if self.discriminator is None:
            raise RuntimeError("gan_weight is 0: there is no discriminator to train (check discriminator_active)")
        factor = disc_factor(step, self.config.disc_start)
        if factor == 0:
            loss = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
            return loss, {"d_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0, "disc_factor": 0.0}
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(recon.detach())
        loss = factor * d_loss_fn(self.config.disc_loss, logits_real, logits_fake)
        logs = {
            "d_loss": loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
            "disc_factor": factor,
        }
        return loss, _floats(logs)


def _as_tensor(value: Tensor | float | None, like: Tensor) -> Tensor:
    if value is None:
        return like
    if isinstance(value, Tensor):
        return value.mean() if value.dim() > 0 else value
    return like.new_tensor(float(value))


def _floats(logs: dict[str, Tensor | float]) -> dict[str, float]:
    with torch.no_grad():
        return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in logs.items()}


__all__ = ["TokenizerLoss", "TokenizerLossConfig", "check_loss_assets"]
