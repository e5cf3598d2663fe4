"""PatchGAN discriminator: taming-faithful size/shape/init, configurability, and that it learns real vs fake."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcar.losses import PatchGANDiscriminator, hinge_d_loss


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_default_matches_taming_size_and_output_shape() -> None:
    torch.manual_seed(0)
    d = PatchGANDiscriminator().eval()
    assert _n_params(d) == 2_765_633  # taming NLayerDiscriminator(3, 64, 3), as measured for HART in DCAR_SPEC §2
    with torch.no_grad():
        out = d(torch.zeros(1, 3, 256, 256))
    assert out.shape == (1, 1, 30, 30)


def test_default_layout_and_init() -> None:
    torch.manual_seed(0)
    d = PatchGANDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert len(bns) == 3
    assert all(
        isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in d.modules() if isinstance(m, nn.LeakyReLU)
    )
    big = convs[3].weight  # 2M samples: N(0, 0.02)
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 5e-4
    bn_w = torch.cat([b.weight for b in bns])
    assert abs(bn_w.mean().item() - 1.0) < 5e-3 and abs(bn_w.std().item() - 0.02) < 5e-3
    assert all(torch.equal(b.bias, torch.zeros_like(b.bias)) for b in bns)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_configurable_width_depth_norm(norm: str) -> None:
    torch.manual_seed(0)
    d = PatchGANDiscriminator(ndf=8, n_layers=2, norm=norm)
    # convs 3->8 (bias), 8->16 s2, 16->32 s1, 32->1 (bias); norm layers 16 and 32 channels (weight+bias)
    n = 3 * 8 * 16 + 8 + 8 * 16 * 16 + 16 * 32 * 16 + 32 * 16 + 1
    n += (2 * 16 + 2 * 32) if norm != "none" else (16 + 32)  # affine norms, or conv biases when there is no norm
    assert _n_params(d) == n
    out = d(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 14, 14)  # 64 -s2-> 32 -s2-> 16 -s1-> 15 -s1-> 14
    with pytest.raises(ValueError, match="unknown discriminator norm"):
        PatchGANDiscriminator(norm="layer")


def _real(n: int, g: torch.Generator) -> torch.Tensor:
    """Smooth images: random low-frequency patterns upsampled from 4x4."""
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)


def _fake(n: int, g: torch.Generator) -> torch.Tensor:
    """High-frequency noise with the same range."""
    return (torch.rand(n, 3, 32, 32, generator=g) * 2 - 1) * 0.5


def test_tiny_discriminator_learns_to_separate_real_and_fake() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    d = PatchGANDiscriminator(ndf=8, n_layers=2)
    opt = torch.optim.Adam(d.parameters(), lr=2e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(40):
        loss = hinge_d_loss(d(_real(8, g)), d(_fake(8, g)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8  # ~1 at init: logits near 0
    assert sum(losses[-5:]) / 5 < 0.3
    with torch.no_grad():  # held-out batches, train-mode BN (batch statistics, as during GAN training)
        real, fake = d(_real(16, g)), d(_fake(16, g))
    assert real.mean().item() > 0.5 and fake.mean().item() < -0.5
    d.eval()  # running statistics: the per-image ranking still holds
    with torch.no_grad():
        real, fake = d(_real(16, g)), d(_fake(16, g))
    assert (real.mean(dim=(1, 2, 3)) > fake.mean(dim=(1, 2, 3)).max()).all()  # every held-out real beats every fake
