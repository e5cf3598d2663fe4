"""Tokenizer losses: hand-computed values, offline LPIPS behaviour, adaptive weight, disc_start gating, totals."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dcar.losses import (
    VGG16_FILENAME,
    VGG16_URL,
    LPIPSLoss,
    PerceptualWeightsNotFoundError,
    TokenizerLoss,
    TokenizerLossConfig,
    adaptive_gan_weight,
    check_loss_assets,
    disc_factor,
    generator_adv_loss,
    hinge_d_loss,
    reconstruction_loss,
    vanilla_d_loss,
)
from dcar.losses.perceptual import vgg16_features_to_lpips

# --------------------------------------------------------------------------- reconstruction


def test_l1_l2_against_hand_values() -> None:
    x = torch.zeros(1, 1, 2, 2)
    y = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])
    total, l1, l2 = reconstruction_loss(x, y, l1_weight=2.0, l2_weight=0.5)
    assert l1.item() == pytest.approx((1 + 2 + 3 + 0) / 4)  # 1.5
    assert l2.item() == pytest.approx((1 + 4 + 9 + 0) / 4)  # 3.5
    assert total.item() == pytest.approx(2.0 * 1.5 + 0.5 * 3.5)
    total, l1, l2 = reconstruction_loss(x, y, l1_weight=0.0, l2_weight=1.0)
    assert l1.item() == 0.0 and total.item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_loss(x, y[..., :1], 1.0, 1.0)


# --------------------------------------------------------------------------- LPIPS (offline)


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case something called torch.hub.set_dir
    return home


def test_missing_vgg_weights_error_names_file_dir_and_url(empty_torch_home: Path) -> None:
    with pytest.raises(PerceptualWeightsNotFoundError, match="vgg16-397923af.pth"):
        check_loss_assets(TokenizerLossConfig())  # pre-flight, before any model is built
    check_loss_assets(TokenizerLossConfig(perceptual_weight=0.0))  # nothing needed
    with pytest.raises(PerceptualWeightsNotFoundError) as err:
        TokenizerLoss(TokenizerLossConfig(gan_weight=0.0))
    msg = str(err.value)
    assert VGG16_FILENAME in msg and VGG16_URL in msg
    assert str(empty_torch_home / "hub" / "checkpoints") in msg
    assert "perceptual_backbone_path" in msg and "perceptual_weight=0" in msg


def test_missing_configured_backbone_path_is_named(empty_torch_home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "vgg.pth"
    with pytest.raises(PerceptualWeightsNotFoundError, match="configured perceptual_backbone_path") as err:
        TokenizerLoss(TokenizerLossConfig(gan_weight=0.0, perceptual_backbone_path=str(missing)))
    msg = str(err.value)
    assert str(missing) in msg and str(missing.parent) in msg and VGG16_URL in msg
    assert str(empty_torch_home / "hub" / "checkpoints" / VGG16_FILENAME) in msg


def test_zero_perceptual_weight_builds_nothing(empty_torch_home: Path) -> None:
    loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0, gan_weight=0.0))
    assert loss.perceptual is None and loss.discriminator is None
    assert list(loss.parameters()) == []


@pytest.fixture(scope="module")
def random_lpips() -> LPIPSLoss:
    torch.manual_seed(0)
    return LPIPSLoss(pretrained_backbone=False)  # random trunk: tests only


def test_random_backbone_lpips_zero_for_identical_positive_otherwise(random_lpips: LPIPSLoss) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    same = random_lpips(x, x)
    diff = random_lpips(x, y)
    assert same.shape == (2,) and torch.all(same == 0)
    assert torch.all(diff > 0)
    y.requires_grad_(True)
    random_lpips(x, y).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_lpips_is_frozen_and_stays_in_eval(random_lpips: LPIPSLoss) -> None:
    assert all(not p.requires_grad for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.training and not any(m.training for m in random_lpips.modules())


def test_vgg_weights_loaded_from_hub_cache(random_lpips: LPIPSLoss, empty_torch_home: Path) -> None:
    """A torchvision-format file in $TORCH_HOME/hub/checkpoints is found and loaded into the LPIPS trunk."""
    tv_state = {}
    for key, value in random_lpips.lpips.net.state_dict().items():  # slice{k}.{i}.{w} -> features.{i}.{w}
        _, idx, name = key.split(".")
        tv_state[f"features.{idx}.{name}"] = value + 1.0
    tv_state["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    target = empty_torch_home / "hub" / "checkpoints" / VGG16_FILENAME
    target.parent.mkdir(parents=True)
    torch.save(tv_state, target)
    assert set(vgg16_features_to_lpips(tv_state)) == set(random_lpips.lpips.net.state_dict())
    loaded = LPIPSLoss()
    w = getattr(loaded.lpips.net.slice5, "28").weight
    assert torch.equal(w, tv_state["features.28.weight"]) and not w.requires_grad


# --------------------------------------------------------------------------- GAN losses


def test_hinge_vanilla_and_generator_losses_on_constructed_logits() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, .5, 2] -> 2.5/3; relu(1 + fake) = [0, 1, 2.5] -> 3.5/3; halved sum = 1.0
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    sp = lambda v: math.log1p(math.exp(v))
    expected = 0.5 * (sum(sp(-r) for r in real.tolist()) / 3 + sum(sp(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)
    assert generator_adv_loss(fake).item() == pytest.approx(0.5 / 3)
    assert disc_factor(9, 10) == 0.0 and disc_factor(10, 10) == 1.0


def _tiny_graph(seed: int = 0) -> tuple[nn.Conv2d, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    last = nn.Conv2d(4, 3, 3, padding=1)  # "decoder's last layer"
    disc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3))
    h = torch.randn(2, 4, 8, 8)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    return last, disc, h, x


def test_adaptive_weight_equals_grad_norm_ratio() -> None:
    last, disc, h, x = _tiny_graph()
    # expected, from two independent graphs
    g_rec = torch.autograd.grad(((last(h) - x) ** 2).mean(), last.weight)[0]
    g_gan = torch.autograd.grad(-disc(last(h)).mean(), last.weight)[0]
    expected = 0.8 * g_rec.norm() / (g_gan.norm() + 1e-4)

    recon = last(h)
    rec, g_loss = ((recon - x) ** 2).mean(), -disc(recon).mean()
    w = adaptive_gan_weight(rec, g_loss, last.weight, disc_weight=0.8)
    assert not w.requires_grad
    assert w.item() == pytest.approx(expected.item(), rel=1e-5)
    (rec + w * g_loss).backward()  # graphs were retained for the caller
    assert last.weight.grad is not None

    # clamp at 1e4 * disc_weight when the GAN gradient vanishes
    recon = last(h)
    w = adaptive_gan_weight(100 * ((recon - x) ** 2).mean(), 1e-12 * recon.mean(), last.weight, disc_weight=0.5)
    assert w.item() == pytest.approx(0.5 * 1e4)


def test_adaptive_weight_fallbacks() -> None:
    last, disc, h, x = _tiny_graph()
    with torch.no_grad():
        recon = last(h)
        w = adaptive_gan_weight(((recon - x) ** 2).mean(), -disc(recon).mean(), last.weight, 0.8, fallback=0.25)
    assert w.item() == pytest.approx(0.2)
    recon = last(h)
    rec, g_loss = ((recon - x) ** 2).mean(), -disc(recon).mean()
    assert adaptive_gan_weight(rec, g_loss, None, 0.8).item() == 0.0  # taming's eval constant
    last.weight.requires_grad_(False)
    recon = last(h)
    rec, g_loss = ((recon - x) ** 2).mean(), -disc(recon).mean()
    assert adaptive_gan_weight(rec, g_loss, last.weight, 0.8, fallback=1.0).item() == pytest.approx(0.8)


# --------------------------------------------------------------------------- TokenizerLoss


def _gan_only_cfg(**kw: object) -> TokenizerLossConfig:
    base = dict(perceptual_weight=0.0, gan_weight=0.5, disc_start=10, disc_ndf=8, disc_n_layers=2)
    base.update(kw)
    return TokenizerLossConfig(**base)  # type: ignore[arg-type]


def test_disc_start_gating() -> None:
    torch.manual_seed(0)
    loss_fn = TokenizerLoss(_gan_only_cfg())
    last, _, h, x = _tiny_graph()
    x = nn.functional.interpolate(x, size=32)
    h = nn.functional.interpolate(h, size=32)
    assert not loss_fn.discriminator_active(9) and loss_fn.discriminator_active(10)

    total, logs = loss_fn.generator_loss(x, last(h), torch.tensor(0.25), step=9, last_layer=last.weight)
    assert logs["disc_factor"] == 0.0 and logs["g_loss"] == 0.0 and logs["d_weight"] == 0.0
    assert total.item() == pytest.approx(logs["rec_l2"] + 0.25)
    total.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # D was not even run

    d_loss, d_logs = loss_fn.discriminator_loss(x, last(h), step=9)
    assert d_loss.item() == 0.0 and d_logs["disc_factor"] == 0.0
    d_loss.backward()  # safe: zero gradients
    assert all(torch.count_nonzero(p.grad) == 0 for p in loss_fn.discriminator.parameters())

    d_loss, d_logs = loss_fn.discriminator_loss(x, last(h), step=10)
    assert d_logs["disc_factor"] == 1.0 and d_loss.item() > 0 and d_loss.requires_grad
    total, logs = loss_fn.generator_loss(x, last(h), 0.25, step=10, last_layer=last.weight)
    assert logs["disc_factor"] == 1.0 and logs["d_weight"] > 0 and logs["g_loss"] != 0.0
    with pytest.raises(ValueError, match="needs last_layer"):  # would silently drop the GAN term otherwise
        loss_fn.generator_loss(x, last(h), 0.25, step=10, last_layer=None)


def test_discriminator_loss_detaches_recon_and_matches_hinge() -> None:
    torch.manual_seed(0)
    loss_fn = TokenizerLoss(_gan_only_cfg(disc_start=0)).eval()
    last, _, h, x = _tiny_graph()
    x, h = nn.functional.interpolate(x, size=32), nn.functional.interpolate(h, size=32)
    recon = last(h)
    d_loss, logs = loss_fn.discriminator_loss(x, recon, step=0)
    d_loss.backward()
    assert last.weight.grad is None  # recon detached
    with torch.no_grad():
        expected = hinge_d_loss(loss_fn.discriminator(x), loss_fn.discriminator(recon))
    assert d_loss.item() == pytest.approx(expected.item())


def test_total_equals_weighted_sum_of_logged_parts_and_is_deterministic() -> None:
    torch.manual_seed(0)
    cfg = TokenizerLossConfig(
        l1_weight=0.3, l2_weight=1.0, perceptual_weight=0.7, gan_weight=0.5, disc_start=0, vq_weight=1.5,
        disc_ndf=8, disc_n_layers=2,
    )  # fmt: skip
    loss_fn = TokenizerLoss(cfg, pretrained_backbone=False)
    last, _, h, x = _tiny_graph()
    x, h = nn.functional.interpolate(x, size=32), nn.functional.interpolate(h, size=32)
    vq = torch.tensor(0.2, requires_grad=True)

    total, logs = loss_fn.generator_loss(x, last(h), vq, step=5, last_layer=last.weight)
    parts = (
        0.3 * logs["rec_l1"] + 1.0 * logs["rec_l2"] + 0.7 * logs["perceptual"]
        + logs["d_weight"] * logs["disc_factor"] * logs["g_loss"] + 1.5 * logs["vq"]
    )  # fmt: skip
    assert total.item() == pytest.approx(parts, rel=1e-6)
    assert logs["total"] == pytest.approx(total.item())
    assert logs["rec_total"] == pytest.approx(0.3 * logs["rec_l1"] + logs["rec_l2"] + 0.7 * logs["perceptual"])
    assert all(isinstance(v, float) for v in logs.values())
    assert logs["perceptual"] > 0 and logs["d_weight"] > 0 and logs["vq"] == pytest.approx(0.2)
    total.backward()
    assert last.weight.grad is not None and vq.grad.item() == pytest.approx(1.5)

    total2, logs2 = loss_fn.generator_loss(x, last(h), vq, step=5, last_layer=last.weight)
    assert total2.item() == total.item() and logs2 == logs  # pure function of its inputs on CPU

    loss_fn.eval()
    with torch.no_grad():  # validation: adaptive weight falls back to gan_weight * 0 (taming)
        _, logs3 = loss_fn.generator_loss(x, last(h), vq, step=5, last_layer=last.weight)
    assert logs3["d_weight"] == 0.0


def test_non_adaptive_weight_and_no_gan() -> None:
    torch.manual_seed(0)
    loss_fn = TokenizerLoss(_gan_only_cfg(disc_start=0, adaptive_weight=False))
    last, _, h, x = _tiny_graph()
    x, h = nn.functional.interpolate(x, size=32), nn.functional.interpolate(h, size=32)
    total, logs = loss_fn.generator_loss(x, last(h), None, step=0, last_layer=None)
    assert logs["d_weight"] == 0.5 and logs["vq"] == 0.0
    assert total.item() == pytest.approx(logs["rec_l2"] + 0.5 * logs["g_loss"], rel=1e-6)

    off = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0, gan_weight=0.0, disc_start=0))
    _, logs = off.generator_loss(x, last(h), 0.1, step=100, last_layer=None)
    assert logs["g_loss"] == 0.0 and not off.discriminator_active(100)
    with pytest.raises(RuntimeError, match="no discriminator"):
        off.discriminator_loss(x, last(h), step=100)


def test_config_is_json_and_omegaconf_friendly() -> None:
    from omegaconf import OmegaConf

    cfg = TokenizerLossConfig()
    values = dataclasses.asdict(cfg)
    assert all(isinstance(v, (bool, int, float, str)) for v in values.values())
    assert json.loads(json.dumps(values)) == values
    merged = OmegaConf.merge(OmegaConf.structured(TokenizerLossConfig), {"gan_weight": 0.1, "disc_start": 5})
    assert OmegaConf.to_object(merged) == dataclasses.replace(cfg, gan_weight=0.1, disc_start=5)
    with pytest.raises(ValueError, match="disc_loss"):
        TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0, disc_loss="wgan"))
