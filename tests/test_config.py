"""Config merge order and every error message of the loader."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dcar.config import ConfigError, Preset, TrainConfig, choice, load_config, to_yaml


@dataclass
class StagedConfig(TrainConfig):
    stage: str = choice("warmup", "warmup", "discrete", "alternate")
    extras: dict = field(default_factory=dict)


@pytest.fixture
def presets(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny.yaml").write_text("kind: imagefolder\npath: /x\nresolution: 64\n")
    (tmp_path / "data" / "shapes.yaml").write_text("kind: shapes\nresolution: 128\n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "typo.yaml").write_text("kind: shapes\nresolutoin: 128\n")
    return [Preset("data", tmp_path / "data", target="data"), Preset("bad", tmp_path / "bad", target="data")]


def test_defaults_yaml_preset_cli_merge_in_order(tmp_path, presets):
    base = tmp_path / "base.yaml"
    base.write_text("seed: 3\noptim: {lr: 0.001, warmup_steps: 5}\ndata: {resolution: 256}\n")
    cfg = load_config(StagedConfig, [f"config={base}", "data=shapes", "optim.lr=2e-4", "stage=discrete"],
                      presets=presets)
    assert isinstance(cfg, StagedConfig)
    assert cfg.seed == 3 and cfg.optim.warmup_steps == 5  # from the base YAML
    assert cfg.optim.lr == pytest.approx(2e-4)  # CLI beats YAML
    assert cfg.data.resolution == 128 and cfg.data.kind == "shapes"  # preset beats base
    assert cfg.stage == "discrete"
    assert cfg.config == str(base)
    assert cfg.train.steps == TrainConfig().train.steps  # schema default untouched


def test_cli_beats_preset_regardless_of_position(presets):
    cfg = load_config(StagedConfig, ["data.resolution=96", "data=tiny"], presets=presets)
    assert cfg.data.resolution == 96 and cfg.data.kind == "imagefolder" and cfg.data.path == "/x"


def test_default_config_and_tuple_override(tmp_path):
    base = tmp_path / "paper.yaml"
    base.write_text("train: {steps: 77}\n")
    cfg = load_config(TrainConfig, ["optim.betas=[0.5,0.6]"], default_config=base)
    assert cfg.train.steps == 77 and cfg.optim.betas == (0.5, 0.6) and cfg.config == str(base)


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, ["optim.lrr=1"])
    msg = str(err.value)
    assert "unknown key 'optim.lrr'" in msg and "(did you mean 'optim.lr'?)" in msg and "on the command line" in msg
    assert "valid keys under 'optim':" in msg and "warmup_steps" in msg


def test_unknown_parent_key_suggests_full_path():
    with pytest.raises(ConfigError, match=r"unknown key 'optm.lr' .*did you mean 'optim.lr'.*top level"):
        load_config(TrainConfig, ["optm.lr=1"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    base = tmp_path / "b.yaml"
    base.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=rf"unknown key 'train.stepz' in {base}.*did you mean 'train.steps'"):
        load_config(TrainConfig, [f"config={base}"])


def test_unknown_key_in_preset_names_preset(presets):
    with pytest.raises(ConfigError, match=r"unknown key 'data.resolutoin' in preset .*typo.yaml.*'data.resolution'"):
        load_config(StagedConfig, ["bad=typo"], presets=presets)


def test_wrong_type_names_key_and_source():
    with pytest.raises(ConfigError, match=r"wrong value for 'optim.lr' on the command line: .*'abc'"):
        load_config(TrainConfig, ["optim.lr=abc"])
    with pytest.raises(ConfigError, match=r"wrong value for 'train.steps'"):
        load_config(TrainConfig, ["train.steps=1.5"])


def test_invalid_choice_lists_choices(presets):
    with pytest.raises(ConfigError, match=r"invalid choice 'foo' for 'stage'; valid choices: alternate, discrete, warmup"):
        load_config(StagedConfig, ["stage=foo"])
    with pytest.raises(ConfigError, match=r"invalid choice 'nope' for 'data'; valid choices: shapes, tiny"):
        load_config(StagedConfig, ["data=nope"], presets=presets)
    with pytest.raises(ConfigError, match=r"'train.mixed_precision'; valid choices: bf16, fp16, no"):
        load_config(TrainConfig, ["train.mixed_precision=fp8"])


def test_malformed_argument_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value on the command line, got 'stage'"):
        load_config(TrainConfig, ["stage"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, [f"config={tmp_path / 'none.yaml'}"])


def test_free_form_dict_accepts_any_subkey():
    cfg = load_config(StagedConfig, ["extras.anything=1"])
    assert cfg.extras == {"anything": 1}


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(StagedConfig, ["seed=9", "stage=alternate"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(StagedConfig, [f"config={path}"])
    assert again.seed == 9 and again.stage == "alternate" and again.optim == cfg.optim
