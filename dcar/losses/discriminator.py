"""PatchGAN discriminator following the design of taming-transformers' ``NLayerDiscriminator``.

Design source: CompVis/taming-transformers ``taming/modules/discriminator/model.py`` (itself from pix2pix), which
HART also uses (``hart/modules/losses/vqgan/discriminator.py``, input 3, ndf 64, n_layers 3, no ActNorm). Own code.

Layout with the defaults (kernel 4, padding 1, LeakyReLU 0.2)::

    conv s2 3->64 (bias) + LReLU
    conv s2 64->128 (no bias) + BN + LReLU
    conv s2 128->256 (no bias) + BN + LReLU
    conv s1 256->512 (no bias) + BN + LReLU
    conv s1 512->1 (bias)                      -> (B, 1, 30, 30) logits at 256x256, 2,765,633 parameters

Init: conv weights N(0, 0.02) (conv biases keep PyTorch's default), norm weights N(1, 0.02), norm biases 0.
"""

from __future__ import annotations

from torch import Tensor, nn

NORM_TYPES = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {kind!r}; valid: {', '.join(NORM_TYPES)}")


def init_discriminator_weights(module: nn.Module) -> None:
    """taming's ``weights_init``: conv weight ~ N(0, 0.02); norm weight ~ N(1, 0.02), norm bias = 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)) and module.weight is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchGANDiscriminator(nn.Module):
    """PatchGAN discriminator: ``forward(x)`` maps (B, C, H, W) images to (B, 1, H', W') real/fake logits.

    Args:
        in_channels: image channels (3).
        ndf: width of the first conv; later widths are ``ndf * min(2**i, 8)``.
        n_layers: number of stride-2 convs (the first one plus ``n_layers - 1`` normalised ones).
        norm: "batch" (taming/HART default), "group" (GroupNorm, batch-size independent) or "none".
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        use_bias = norm == "none"  # a norm layer after the conv makes its bias redundant (taming: bias iff no BN)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < n_layers else 1  # the last normalised conv keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=use_bias),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(init_discriminator_weights)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits, shape (B, 1, H', W')."""
        return self.main(x)


__all__ = ["NORM_TYPES", "PatchGANDiscriminator", "init_discriminator_weights"]
