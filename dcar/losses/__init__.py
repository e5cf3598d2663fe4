"""Tokenizer (DC-HT) training losses: reconstruction, LPIPS, PatchGAN + hinge GAN with VQGAN's adaptive weight, VQ."""

from dcar.losses.discriminator import PatchGANDiscriminator, init_discriminator_weights
from dcar.losses.gan import (
    adaptive_gan_weight,
    d_loss_fn,
    disc_factor,
    generator_adv_loss,
    hinge_d_loss,
    vanilla_d_loss,
)
from dcar.losses.perceptual import (
    VGG16_FILENAME,
    VGG16_URL,
    LPIPSLoss,
    PerceptualWeightsNotFoundError,
    hub_checkpoint_path,
    resolve_vgg16_weights,
)
from dcar.losses.reconstruction import l1_loss, l2_loss, reconstruction_loss
from dcar.losses.tokenizer_loss import TokenizerLoss, TokenizerLossConfig, check_loss_assets

__all__ = [
    "VGG16_FILENAME",
    "VGG16_URL",
    "LPIPSLoss",
    "PatchGANDiscriminator",
    "PerceptualWeightsNotFoundError",
    "TokenizerLoss",
    "TokenizerLossConfig",
    "adaptive_gan_weight",
    "check_loss_assets",
    "d_loss_fn",
    "disc_factor",
    "generator_adv_loss",
    "hinge_d_loss",
    "hub_checkpoint_path",
    "init_discriminator_weights",
    "l1_loss",
    "l2_loss",
    "reconstruction_loss",
    "resolve_vgg16_weights",
    "vanilla_d_loss",
]
