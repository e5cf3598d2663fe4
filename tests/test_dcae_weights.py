"""Loading DC-AE checkpoints into DC-HT: native (efficientvit) and diffusers keys, files, folders, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderDC
from safetensors.torch import save_file

from dcar.models.tokenizer import (
    DCHT,
    DCHTConfig,
    QuantizerConfig,
    load_dcae_weights,
    native_to_diffusers,
    to_native_state_dict,
)
from dcar.models.tokenizer.dcae_weights import detect_format


def tiny_config() -> DCHTConfig:
    widths, layers = (16, 16, 32, 32, 64, 64), (0, 1, 1, 1, 1, 1)
    return DCHTConfig(
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=layers,
        decoder_layers_per_block=layers,
        quantizer=QuantizerConfig(codebook_size=64),
    )


@pytest.fixture(scope="module")
def reference() -> tuple[AutoencoderDC, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A randomly initialised diffusers AutoencoderDC (BN stats perturbed) and its outputs on a fixed input."""
    torch.manual_seed(0)
    ae = AutoencoderDC(**tiny_config().to_diffusers_kwargs())
    with torch.no_grad():
        for m in ae.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ae.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x).latent
        y = ae.decode(z).sample
    return ae, x, z, y


def fresh_model() -> DCHT:
    torch.manual_seed(123)  # different weights than the reference
    return DCHT(tiny_config()).eval()


def assert_same_outputs(model: DCHT, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> None:
    with torch.no_grad():
        out = model.encode(x)
        torch.testing.assert_close(out.z, z, rtol=0, atol=0)
        torch.testing.assert_close(model.decode(out.z), y, rtol=0, atol=0)


def test_native_layout_and_round_trip(reference) -> None:
    ae = reference[0]
    sd = ae.state_dict()
    native = to_native_state_dict(sd)
    assert detect_format(native) == "native" and detect_format(sd) == "diffusers"
    key = "encoder.stages.3.op_list.0.context_module.main"
    qkv = native[f"{key}.qkv.conv.weight"]
    assert qkv.shape == (96, 32, 1, 1)
    attn = "encoder.down_blocks.3.0.attn"
    for i, name in enumerate("qkv"):  # diffusers' to_q/k/v are the thirds of the native output channels
        assert torch.equal(qkv[32 * i : 32 * (i + 1), :, 0, 0], sd[f"{attn}.to_{name}.weight"])
    assert native[f"{key}.proj.conv.weight"].shape == (32, 32, 1, 1)
    assert "decoder.stages.1.op_list.1.main.conv2.norm.running_var" in native
    back = native_to_diffusers(native)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k].reshape(sd[k].shape), sd[k]) for k in sd)


def test_paper_size_key_formats() -> None:
    with torch.device("meta"):
        model = DCHT(DCHTConfig())
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("quantizer.")}
    native = to_native_state_dict(sd)
    assert len(sd) == 362 and len(native) == 338
    assert native["encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight"].shape == (1536, 512, 1, 1)
    for key in (
        "encoder.project_in.conv.conv.weight",
        "encoder.stages.1.op_list.4.main.conv.conv.weight",
        "encoder.project_out.main.op_list.0.conv.weight",
        "decoder.project_in.main.conv.weight",
        "decoder.stages.4.op_list.0.main.conv.conv.weight",
        "decoder.project_out.op_list.0.weight",
        "decoder.project_out.op_list.2.conv.conv.weight",
        "encoder.stages.3.op_list.0.local_module.main.point_conv.norm.bias",
    ):
        assert key in native, key
    assert {k: tuple(v.shape) for k, v in native_to_diffusers(native).items()} == {
        k: tuple(v.shape) for k, v in sd.items()
    }


@pytest.mark.parametrize("fmt", ["native", "diffusers"])
def test_load_safetensors_file(reference, tmp_path: Path, fmt: str) -> None:
    ae, x, z, y = reference
    sd = ae.state_dict()
    sd = to_native_state_dict(sd) if fmt == "native" else sd
    path = tmp_path / f"{fmt}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = fresh_model()
    codebook = model.quantizer.embedding.weight.detach().clone()
    info = load_dcae_weights(model, path)
    assert info["format"] == fmt and info["num_tensors"] == len(ae.state_dict())
    assert_same_outputs(model, x, z, y)
    assert torch.equal(model.quantizer.embedding.weight, codebook)  # codebook untouched


def test_load_directory_and_pickle(reference, tmp_path: Path) -> None:
    ae, x, z, y = reference
    folder = tmp_path / "pipeline"
    (folder / "vae").mkdir(parents=True)
    save_file(ae.state_dict(), str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    model = fresh_model().load_dcae_weights(folder)
    assert_same_outputs(model, x, z, y)
    pt = tmp_path / "native.pt"
    torch.save({"state_dict": to_native_state_dict(ae.state_dict())}, pt)
    assert_same_outputs(fresh_model().load_dcae_weights(pt), x, z, y)


class NotWeights:
    """An arbitrary object: a pickle holding it is not loadable with weights_only=True."""


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"encoder.conv_in.conv.weight": torch.zeros(1), "payload": NotWeights()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        fresh_model().load_dcae_weights(path)


def test_missing_and_unexpected_keys_are_listed(reference, tmp_path: Path) -> None:
    sd = dict(reference[0].state_dict())
    sd.pop("decoder.conv_in.weight")
    sd["encoder.conv_in.conv.extra"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"missing keys \[decoder.conv_in.weight\].*encoder.conv_in.conv.extra"):
        fresh_model().load_dcae_weights(path)
    sd = to_native_state_dict(reference[0].state_dict())
    sd["encoder.stages.1.op_list.0.main.conv1.conv.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="shape mismatches.*down_blocks.1.0.conv1.weight"):
        fresh_model().load_dcae_weights(tmp_path / "shape.safetensors")


def test_paper_config_rejects_tiny_checkpoint_and_meta_assign(reference, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file(reference[0].state_dict(), str(path))
    with torch.device("meta"):
        big = DCHT(DCHTConfig())
    with pytest.raises(ValueError, match="shape mismatches"):
        big.load_dcae_weights(path)
    with torch.device("meta"):
        small = DCHT(tiny_config())
    small.load_dcae_weights(path)  # meta tensors are replaced by the checkpoint's
    assert not any(p.is_meta for p in small.encoder.parameters()) and small.quantizer.embedding.weight.is_meta


def test_missing_paths_and_offline_hub(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fresh_model().load_dcae_weights(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no DC-AE weights in directory"):
        fresh_model().load_dcae_weights(tmp_path)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(OSError, match="Hugging Face Hub.*local"):
        fresh_model().load_dcae_weights("mit-han-lab/dc-ae-f32c32-in-1.0")
