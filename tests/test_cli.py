"""The command line: ``-h`` / ``--help`` (every key with the value the command would run with, its type, choices and
comment) and a missing path reported in one line."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dcar.cli import run_cli
from dcar.config import ConfigError, Preset, TrainConfig, choice, load_config
from dcar.config.help import ConfigHelp, field_comments

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    """The inner section.

    Not shown: only the first paragraph heads the section."""

    depth: int = 2  # how deep
    # a block comment
    # over two lines
    mode: str = choice("a", "a", "b")  # and a trailing one

    # ---- a section rule: explains nothing ----
    rate: float = 0.5
    plain: bool = False


@dataclass
class HelpConfig:
    config: str = ""
    name: str = ""  # what to call it
    sizes: list[int] = field(default_factory=lambda: [1, 2])  # a list
    maybe: float | None = None
    extra: dict[str, Any] = field(default_factory=lambda: {"on": True, "words": ["x", ""]})
    inner: Inner = field(default_factory=Inner)
    after: int = 7  # a key after the section


def _help(argv, **kwargs) -> str:
    with pytest.raises(ConfigHelp) as info:
        load_config(HelpConfig, argv, **kwargs)
    return info.value.text


def test_field_comments_reads_trailing_and_block_comments():
    assert field_comments(Inner) == {"depth": "how deep", "mode": "a block comment over two lines and a trailing one"}
    assert field_comments(HelpConfig) == {"name": "what to call it", "sizes": "a list",
                                          "after": "a key after the section"}


def test_help_lists_every_key_with_type_choices_and_comment():
    text = _help(["--help"])
    lines = text.splitlines()
    assert lines[0] == "keys (key=value on the command line; nested keys with dots):"
    assert '  name = ""  (str)  # what to call it' in lines
    assert "  sizes = [1, 2]  (list[int])  # a list" in lines
    assert "  maybe = null  (float | None)" in lines
    assert '  extra = {on: true, words: [x, ""]}  (dict[str, Any])' in lines
    assert "  inner.mode = a  (str: a | b)  # a block comment over two lines and a trailing one" in lines
    assert "  inner.rate = 0.5  (float)" in lines and "  inner.plain = false  (bool)" in lines
    # a class's own keys come before its sections; a section is headed by its docstring's first paragraph
    assert lines.index("  after = 7  (int)  # a key after the section") < lines.index("inner:  The inner section.")
    assert "Not shown" not in text


def test_help_shows_the_values_of_the_other_arguments(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("name: from-yaml\ninner: {depth: 5}\n")
    text = _help([f"config={base}", "inner.mode=b", "-h", "sizes=[3]"])
    assert text.splitlines()[0] == f"values from: schema defaults <- {base} <- the command line"
    for line in ("  name = from-yaml  (str)  # what to call it", "  inner.depth = 5  (int)  # how deep",
                 "  sizes = [3]  (list[int])  # a list", f"  config = {base}  (str)"):
        assert line in text.splitlines()
    assert "  inner.mode = b  (str: a | b)" in text


def test_help_names_the_chosen_preset(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny.yaml").write_text("kind: imagefolder\nresolution: 64\n")
    with pytest.raises(ConfigHelp) as info:
        load_config(TrainConfig, ["data=tiny", "--help"], presets=[Preset("data", tmp_path / "data", target="data")])
    lines = info.value.text.splitlines()
    assert lines[0] == "values from: schema defaults <- data=tiny"
    assert "  data.resolution = 64  (int)" in lines


def test_errors_come_before_help():
    with pytest.raises(ConfigError, match=r"unknown key 'nam' on the command line \(did you mean 'name'\?\)"):
        load_config(HelpConfig, ["--help", "nam=x"])
    with pytest.raises(ConfigError, match=r"invalid choice 'c' for 'inner.mode'; valid choices: a, b"):
        load_config(HelpConfig, ["inner.mode=c", "-h"])


def test_without_help_flag_nothing_changes():
    cfg = load_config(HelpConfig, ["inner.depth=3"])
    assert cfg.inner.depth == 3 and cfg.after == 7


@pytest.mark.parametrize("argv", [["scripts/sample.py", "--help"],
                                  ["scripts/train_generator.py", "config=configs/generator/shapes.yaml", "-h"]])
def test_scripts_print_their_docstring_and_keys(argv):
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    if argv[0].endswith("sample.py"):
        assert lines[0].startswith("Sample images with DC-AR")
        assert "  top_k = 0  (int)  # 0: off" in lines
        assert "  cfg_schedule = linear  (str: linear | constant)" in lines
    else:
        assert lines[0] == "Train the DC-AR generator on top of a frozen DC-HT tokenizer."
        assert "values from: schema defaults <- configs/generator/shapes.yaml" in lines
        assert "  model.num_layers = 6  (int)" in lines  # the shapes config's value, not the paper's 28
        assert "  train.mixed_precision = no  (str: no | fp16 | bf16)" in lines


def test_train_module_help():
    proc = subprocess.run([sys.executable, "-m", "dcar.train", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m dcar.train {tokenizer,generator} key=value ..." in proc.stdout


def test_a_missing_path_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    argv = [sys.executable, "scripts/sample.py", f"pipeline={tmp_path / 'nope'}", "prompts=a red circle"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tmp_path / 'nope'} is not a pipeline folder (tokenizer/, generator/, "
                                   "text_encoder/) (DCAR_TRACEBACK=1 shows where it was raised)")

    def main(argv):
        raise FileNotFoundError(f"no such file: {argv[0]}")

    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # leave the test process's logging alone

    with pytest.raises(SystemExit) as info:
        run_cli(main, ["x.yaml"])
    assert info.value.code == 2 and capsys.readouterr().err.startswith("error: no such file: x.yaml (DCAR_TRACEBACK")
    monkeypatch.setenv("DCAR_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="no such file: x.yaml"):
        run_cli(main, ["x.yaml"])
