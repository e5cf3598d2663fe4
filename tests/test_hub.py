"""save_pretrained / from_pretrained: JSON config + safetensors, nested dataclass configs, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from dcar.models.hub import HubMixin


@dataclass
class InnerCfg:
    width: int = 4
    kinds: tuple[str, ...] = ("a", "b")


@dataclass
class TinyCfg:
    depth: int = 2
    inner: InnerCfg = field(default_factory=InnerCfg)


class Tiny(nn.Module, HubMixin):
    config_class = TinyCfg

    def __init__(self, config: TinyCfg) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.Sequential(*[nn.Linear(config.inner.width, config.inner.width) for _ in range(config.depth)])
        self.tied = self.layers[0]  # a shared module: safetensors must cope with aliases


def test_round_trip_identical(tmp_path):
    torch.manual_seed(0)
    model = Tiny(TinyCfg(depth=3, inner=InnerCfg(width=5, kinds=("x",))))
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Tiny.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and isinstance(loaded.config.inner, InnerCfg)
    x = torch.randn(2, 5)
    assert torch.equal(loaded.layers(x), model.layers(x))
    assert loaded.tied is loaded.layers[0]


def test_wrong_class_and_missing_files(tmp_path):
    class Other(Tiny):
        pass

    Tiny(TinyCfg()).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="holds a Tiny, not a Other"):
        Other.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save({}, tmp_path / "m" / "pytorch_model.bin")  # pickled weights are never a fallback
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        Tiny.from_pretrained(tmp_path / "m")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a reachable Hub repo id"):
        Tiny.from_pretrained("nobody/does-not-exist")


def test_mismatched_weights_list_keys(tmp_path):
    Tiny(TinyCfg(depth=2)).save_pretrained(tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json")
    cfg.write_text(cfg.read_text().replace('"depth": 2', '"depth": 3'))
    with pytest.raises(ValueError, match=r"missing keys \['layers.2.bias', 'layers.2.weight'\]"):
        Tiny.from_pretrained(tmp_path / "m")
