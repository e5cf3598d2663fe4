"""DC-HT: paper-size parameter counts, equivalence with diffusers' AutoencoderDC, hybrid interface, builds, hub I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderDC

from dcar.models.tokenizer import DCHT, DCHTConfig, QuantizerConfig, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAPER_YAML = ROOT / "configs" / "tokenizer" / "dcht_f32c32.yaml"
SHAPES_YAML = ROOT / "configs" / "tokenizer" / "shapes.yaml"


def tiny_config(codebook_size: int = 64) -> DCHTConfig:
    """f32c32's design (Res x3 + EViT x3, BN/ReLU decoder stages 0-2, empty stage 0) at toy widths."""
    widths, layers = (16, 16, 32, 32, 64, 64), (0, 1, 1, 1, 1, 1)
    return DCHTConfig(
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=layers,
        decoder_layers_per_block=layers,
        quantizer=QuantizerConfig(codebook_size=codebook_size),
    )


def tiny_model(seed: int = 0) -> DCHT:
    torch.manual_seed(seed)
    return DCHT(tiny_config()).eval()


def images(b: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_paper_parameter_counts() -> None:
    with torch.device("meta"):
        model = build_tokenizer(PAPER_YAML)
    assert model.config == DCHTConfig()  # the YAML is the dataclass default
    assert model.num_parameters("encoder") == 123_172_384
    assert model.num_parameters("decoder") == 200_184_076
    assert model.num_parameters("quantizer") == 16384 * 32
    bn = [m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 15 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules())


def _equivalence(config: DCHTConfig, size: int) -> None:
    torch.manual_seed(0)
    ref = AutoencoderDC(**config.to_diffusers_kwargs()).eval()
    model = DCHT(config).eval()
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("quantizer.") for k in missing)
    x = images(2, size)
    with torch.no_grad():
        z_ref = ref.encode(x).latent
        y_ref = ref.decode(z_ref).sample
        out = model.encode(x)
        y = model.decode(out.z)
    assert out.z.shape == (2, 32, size // 32, size // 32)
    torch.testing.assert_close(out.z, z_ref, rtol=1e-4, atol=1e-4 * z_ref.abs().max().item())
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4 * y_ref.abs().max().item())


def test_matches_diffusers_autoencoder_dc_small() -> None:
    _equivalence(tiny_config(), 64)  # 8x8 linear attention in stage 3, quadratic in stages 4-5


@pytest.mark.slow
def test_matches_diffusers_autoencoder_dc_paper_size() -> None:
    _equivalence(DCHTConfig(), 64)


def test_hybrid_interface_shapes_and_identities() -> None:
    model = tiny_model()
    for size in (64, 128):
        x = images(2, size)
        with torch.no_grad():
            out = model.encode(x)
            t = size // 32
            assert out.z.shape == out.zq.shape == out.residual.shape == (2, 32, t, t)
            assert out.indices.shape == (2, t, t) and out.indices.dtype == torch.long
            rec_z = model.decode(out.z)
            assert rec_z.shape == x.shape
            torch.testing.assert_close(model.decode(out.zq + out.residual), rec_z, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.decode_indices(out.indices, out.residual), rec_z, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.indices_to_latent(out.indices), out.zq)
            torch.testing.assert_close(model.decode_indices(out.indices), model.decode(out.zq))
            rec_c, _ = model(x, path="continuous")
            rec_d, _ = model(x, path="discrete")
            torch.testing.assert_close(rec_c, rec_z)
            torch.testing.assert_close(rec_d, model.decode(out.zq))
        assert set(out.stats) >= {"perplexity", "codebook_usage"} and out.vq_loss.ndim == 0
    with pytest.raises(ValueError, match="multiples of 32"):
        model.encode(images(1, 48))
    with pytest.raises(ValueError, match="path"):
        model(images(1, 32), path="hybrid")


def test_gradients_of_both_paths() -> None:
    model = tiny_model().train()
    x = images(2, 64)
    rec, out = model(x, path="discrete")
    (rec.square().mean() + out.vq_loss).backward()
    assert model.encoder.conv_in.conv.weight.grad.abs().sum() > 0  # straight-through to the encoder
    assert model.quantizer.embedding.weight.grad.abs().sum() > 0  # codebook term
    assert model.last_layer_weight().shape == (12, 16, 3, 3) and model.last_layer_weight().grad is not None
    model.zero_grad()
    out = model.encode(x)
    model.decode(out.zq + out.residual).square().mean().backward()  # == decode(z): identity gradient to z
    assert model.encoder.conv_in.conv.weight.grad.abs().sum() > 0


def test_model_built_for_256_runs_at_512() -> None:
    model = tiny_model()
    with torch.no_grad():
        for size, tokens in ((256, 8), (512, 16)):
            out = model.encode(images(1, size))
            assert out.indices.shape == (1, tokens, tokens)
            assert model.decode_indices(out.indices, out.residual).shape == (1, 3, size, size)


def test_batchnorm_mode_follows_trainable_parts() -> None:
    model = tiny_model()
    bn = next(m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model.set_trainable(encoder=False, quantizer=False, decoder=True)  # DC-HT stage 3
    model.train()
    assert not model.encoder.training and not model.quantizer.training and model.decoder.training and bn.training
    before = bn.running_mean.clone()
    model(images(2, 64))
    assert not torch.equal(bn.running_mean, before)  # batch statistics while the decoder trains
    model.set_trainable(encoder=True, quantizer=True, decoder=False)
    assert model.training and model.encoder.training and not bn.training
    before = bn.running_mean.clone()
    model(images(2, 64))
    assert torch.equal(bn.running_mean, before)  # frozen decoder: running statistics
    model.set_trainable()
    assert bn.training
    model.eval()
    assert not bn.training


def test_build_from_config_dict_yaml_and_meta(tmp_path: Path) -> None:
    cfg = tiny_config()
    assert build_tokenizer(cfg).config == cfg
    as_dict = {"encoder_block_out_channels": [16, 16, 32, 32, 64, 64], "quantizer": {"codebook_size": 32}}
    model = build_tokenizer({"model": as_dict})
    assert model.config.encoder_block_out_channels == (16, 16, 32, 32, 64, 64)
    assert model.quantizer.embedding.weight.shape == (32, 32)
    with pytest.raises(ValueError, match="'bogus'"):
        build_tokenizer({"model": {"bogus": 1}})
    with pytest.raises(ValueError, match="quantizer.nope"):
        build_tokenizer({"quantizer": {"nope": 1}})
    with pytest.raises(ValueError, match="quantizer.dim"):
        build_tokenizer({"quantizer": {"dim": 16}})
    with pytest.raises(ValueError, match="layers_per_block"):
        build_tokenizer({"encoder_layers_per_block": [0, 1, 0, 1, 1, 1]})
    with torch.device("meta"):
        meta = build_tokenizer(SHAPES_YAML)
    assert all(p.is_meta for p in meta.parameters())
    shapes = build_tokenizer(SHAPES_YAML)
    assert shapes.spatial_compression == 32 and shapes.config.latent_channels == 32


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    model = tiny_model().train()
    model(images(4, 64))  # move BN running stats and quantizer buffers away from their init
    model.eval()
    model.save_pretrained(tmp_path / "dcht")
    loaded = DCHT.from_pretrained(tmp_path / "dcht").eval()
    assert loaded.config == model.config
    x = images(2, 64, seed=5)
    with torch.no_grad():
        a, oa = model(x, path="discrete")
        b, ob = loaded(x, path="discrete")
    assert torch.equal(a, b) and torch.equal(oa.indices, ob.indices)
    assert torch.equal(loaded.quantizer.usage_ema, model.quantizer.usage_ema)
